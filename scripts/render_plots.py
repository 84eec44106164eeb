"""Render dvc.yaml's plots offline: `dvc plots show` HTML loads vega from a CDN, which is blank here.

    python scripts/render_plots.py [OUT_DIR] [-- extra `dvc plots show/diff` args, e.g. HEAD~1]

Writes one PNG per vega-lite plot (``vl-convert-python``, no network) plus a self-contained
``index.html`` that embeds them and the image plots. With revisions (``HEAD~1 workspace``) it
renders ``dvc plots diff`` instead, one line per revision.
"""
from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    out = Path(argv[0] if argv and argv[0] != "--" else "dvc_plots")
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dvc", "plots", "diff" if extra else "show", *extra, "--json", "-o", str(out)]
    doc = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    for err in doc.get("errors", []):
        print(f"skipped {err.get('source')}: {err.get('msg')}", file=sys.stderr)
    try:
        import vl_convert as vlc
    except ImportError:
        print("render_plots: pip install vl-convert-python", file=sys.stderr)
        return 2
    parts = []
    for name, items in doc.get("data", {}).items():
        for item in items:
            if item["type"] == "vega":
                png = vlc.vegalite_to_png(item["content"], scale=2)
                path = out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png")
                path.write_bytes(png)
            elif item["type"] == "image":
                path = Path(item["url"])
                png = path.read_bytes()
            else:
                continue
            parts.append(f"<h3>{name}</h3><img src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
            print(path)
    (out / "index.html").write_text("<html><body>" + "\n".join(parts) + "</body></html>\n")
    print(out / "index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
