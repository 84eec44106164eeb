"""Sample grids of a text-guided model, one row per evaluation prompt, from the run's paired files.

Sample j of every setting was drawn for prompt ``j mod P`` of ``eval.prompts`` with the same noise, so row r
of each grid shows the samples of prompt r (at most 8), and the grids of two settings compare image by image.

    python scripts/prompt_grid.py fashion_sd fp tfmq-W4A8 --rows 10 --out docs/img
writes ``samples_<model>_<setting>_by_prompt.png`` for each setting and prints the prompt of every row.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch
    import yaml
    from safetensors.torch import load_file

    from tfmq.diffusion.sampling import save_grid
    from tfmq.diffusion.text import read_prompts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("settings", nargs="+")
    ap.add_argument("--rows", type=int, default=10, help="the first ROWS prompts")
    ap.add_argument("--per-row", type=int, default=8)
    ap.add_argument("--config", default=str(ROOT / "params.yaml"))
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    a = ap.parse_args()
    e = yaml.safe_load(Path(a.config).read_text())["eval"]
    prompts = read_prompts(ROOT / e["prompts"])
    for name in a.settings:
        path = ROOT / e["out_dir"] / "paired" / a.model / f"{name}.safetensors"
        if not path.is_file():
            print(f"prompt_grid: {path} not found; run the setting first (dvc repro)", file=sys.stderr)
            return 2
        images = load_file(str(path))["images"]
        n = images.shape[0]
        idx = [j for r in range(min(a.rows, len(prompts))) for j in range(r, n, len(prompts))[: a.per_row]]
        out = save_grid(images[torch.tensor(idx)].float().div(127.5).sub(1.0),
                        Path(a.out) / f"samples_{a.model}_{name}_by_prompt.png", nrow=a.per_row, scale=2)
        print(out)
    for r in range(min(a.rows, len(prompts))):
        print(f"row {r + 1}: {prompts[r]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
