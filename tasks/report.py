"""Results table: real images + FP + methods x bits, columns FID, sFID, KID, IS with the extractor named.

Numbers from different feature extractors never share a column: the table refuses to mix them
(the header names the one extractor every row used).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.common import logger, pipeline_task


def _fmt(v: Any, digits: int = 2, scale: float = 1.0) -> str:
    if v is None or isinstance(v, str):
        return "n/a" if v is None else v
    return f"{v * scale:.{digits}f}"


def _fid_cell(m: dict[str, Any]) -> str:
    fid = _fmt(m.get("fid"))
    lo, hi = m.get("fid_ci_low"), m.get("fid_ci_high")
    return f"{fid} [{lo:.1f}, {hi:.1f}]" if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) else fid


def _temporal_cell(m: dict[str, Any]) -> str:
    cos = m.get("temporal_cos_mean")
    return "n/a" if cos is None else f"{(1.0 - cos) * 1e4:.1f}"


def _kid_cell(m: dict[str, Any]) -> str:
    if m.get("kid_mean") is None:
        return "n/a"
    return f"{m['kid_mean'] * 1e3:.2f} ± {m.get('kid_std', 0.0) * 1e3:.2f}"


def _is_cell(m: dict[str, Any]) -> str:
    if m.get("is_mean") is None:
        return "n/a"
    return f"{m['is_mean']:.2f} ± {m.get('is_std', 0.0):.2f}"


def build_table(out_dir: str, grid) -> tuple[str, list[dict[str, Any]]]:
    """Markdown of the grid's metrics.json files under ``<eval.out_dir>/metrics`` (missing settings show as 'not run')."""
    results = Path(out_dir) / "metrics"
    rows: list[tuple[str, str, dict[str, Any] | None]] = []
    real_path = results / "real.json"  # the real-data row (optional: an older run has none)
    if real_path.is_file():
        rows.append(("real images", "-", json.loads(real_path.read_text())))
    fp_path = results / "fp.json"
    rows.append(("FP", "W32A32", json.loads(fp_path.read_text()) if fp_path.is_file() else None))
    for bits in grid.bits:
        for method in grid.methods:
            p = results / f"{method}-{bits}.json"
            rows.append((method, bits, json.loads(p.read_text()) if p.is_file() else None))
    present = [m for _, _, m in rows if m]
    extractors = sorted({m.get("extractor", "unknown") for m in present})
    if len(extractors) > 1:
        raise ValueError(f"metrics from different extractors {extractors} cannot share a table; re-run the "
                         "evaluate stages with one eval.extractor")
    ref = present[0] if present else {}
    fid_label = ref.get("extractor_label", ref.get("extractor", "?"))
    lines = [
        "# TFMQ-DM results",
        "",
        f"- FID/KID features: **{fid_label}**",
        f"- sFID: **{ref.get('sfid_label', '?')}**; IS: **{ref.get('is_label', '?')}**",
        f"- {ref.get('num_samples', '?')} samples per row vs {ref.get('reference', '?')}; sampler "
        f"{ref.get('sampler', '?')} {ref.get('num_inference_steps', '?')} steps, eta {ref.get('eta', '?')}; "
        "FID with a 95 % bootstrap interval, KID x 1e3",
        "- temporal error = mean over timesteps and resnets of 1 - cos(emb_{t,i}, emb^q_{t,i}), x 1e4 "
        "(the poster's temporal feature error; per-timestep curves in results/<setting>/temporal.csv)",
        *([f"- real images = {rows[0][2].get('num_samples', '?')} real images from the split the reference "
            "does not use, scored like samples: the floor of each metric at this N (FID is biased upwards "
            "at small N, so read every FID as a distance above this row)"] if real_path.is_file() else []),
        "- quantization is simulated (fake-quant), so no speed or memory claims; quant time = wall seconds on "
        f"{ref.get('device', '?')}",
        "",
        f"| Method | Bits | FID ({ref.get('extractor', '?')}) | sFID | KID | IS | temporal error | quant time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = []
    for method, bits, m in rows:
        if m is None:
            lines.append(f"| {method} | {bits} | not run | | | | | |")
            continue
        lines.append(
            f"| {method} | {bits} | {_fid_cell(m)} | {_fmt(m.get('sfid'))} | {_kid_cell(m)} | {_is_cell(m)} | "
            f"{_temporal_cell(m) if method not in ('FP', 'real images') else '-' if method != 'FP' else '0'} | "
            f"{_fmt(m.get('quant_time_total_s'), 0) if method not in ('FP', 'real images') else '-'} |"
        )
        table.append({"method": method, "bits": bits, **{k: v for k, v in m.items() if k != "per_timestep"}})
    return "\n".join(lines) + "\n", table


@pipeline_task
def report(out_dir: str, grid, path: str) -> str:
    """Write the results table (``report.path``, Markdown) and print it."""
    from tfmq.io import atomic_write_text

    text, _ = build_table(out_dir, grid)
    atomic_write_text(text, path)
    logger().info("results table -> %s", path)
    print(text)
    return path
