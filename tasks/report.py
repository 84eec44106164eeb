"""Results tables: per model family, real images + autoencoder floor + FP + methods x bits, with the extractor named.

Numbers from different feature extractors never share a column: the table refuses to mix them
(the header names the one extractor every row used).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.common import logger, pipeline_task


def _quant_cell(m: dict) -> str:
    """Quantization seconds as if computed here; ``(shared)`` when stages 1-2 were adopted from another setting."""
    from tasks.claims import quant_seconds

    cell = _fmt(quant_seconds(m), 0)
    return f"{cell} (shared)" if m.get("weights_shared_from") else cell


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


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _model_rows(results: Path, model: str, grid, studies=None) -> list[tuple[str, str, dict[str, Any] | None]]:
    """(method, bits, metrics) of one model: autoencoder floor (latent), FP, then bits x methods (then the named
    studies when ``studies.model`` is this model: method = the study's name)."""
    rows: list[tuple[str, str, dict[str, Any] | None]] = []
    fp = _load(results / model / "fp.json")
    if fp is not None and fp.get("autoencoder_floor"):
        rows.append(("autoencoder recon.", "FP", fp["autoencoder_floor"]))
    rows.append(("FP", "W32A32", fp))
    for bits in grid.bits:
        for method in grid.methods:
            rows.append((method, bits, _load(results / model / f"{method}-{bits}.json")))
    if studies is not None and studies.model == model:
        for name, st in studies.settings.items():
            rows.append((f"study {name}", st.bits, _load(results / model / f"{name}.json")))
    return rows


def _family(rows) -> dict[str, Any]:
    return next((m for _, _, m in rows if m and m.get("conditioning")), {})


def _summary_table(title: str, models: list[str], per_model: dict, real: dict | None, cols: tuple[str, ...]) -> list[str]:
    """The paper's layout: one column group per model (``cols`` of FID/sFID/IS), rows = methods x bits."""
    cell = {"FID": _fid_cell, "sFID": lambda m: _fmt(m.get("sfid")), "IS": _is_cell,
            "CLIP score": lambda m: _fmt(m.get("clip_score")),
            "prompt acc. (domain classifier)": lambda m: _fmt(m.get("prompt_accuracy"), 3)}
    head = "| Method | Bits | " + " | ".join(f"{model}: {c}" for model in models for c in cols) + " |"
    lines = [title, "", head, "|---|---|" + "---|" * (len(models) * len(cols))]
    keys: list[tuple[str, str]] = [("real images", "-")]
    if any(mm == "autoencoder recon." for model in models for mm, _, _ in per_model[model]):
        keys.append(("autoencoder recon.", "FP"))  # the floors first, then FP and the grid
    for model in models:
        for method, bits, _ in per_model[model]:
            if (method, bits) not in keys:
                keys.append((method, bits))
    for method, bits in keys:
        cells = []
        for model in models:
            m = real if method == "real images" else next((r for mm, b, r in per_model[model] if (mm, b) == (method, bits)), None)
            absent = method == "autoencoder recon." and not any(mm == method for mm, _, _ in per_model[model])
            cells += ["-" if absent else ("not run" if m is None else cell[c](m)) for c in cols]
        lines.append(f"| {method} | {bits} | " + " | ".join(cells) + " |")
    return lines + [""]


def build_table(out_dir: str, grid, studies=None) -> tuple[str, list[dict[str, Any]]]:
    """Markdown of the grid's metrics files under ``<eval.out_dir>/metrics/<model>/`` (missing settings show as
    'not run'): table 1 (unconditional models, FID and sFID per model), table 2a (class-conditional: IS, FID,
    sFID), then one detailed table per model (KID, IS, temporal error, quantization time)."""
    results = Path(out_dir) / "metrics"
    real = _load(results / "real.json")  # the real-data row (optional: an older run has none)
    models = list(grid.models) + ([studies.model] if studies is not None and studies.model not in grid.models else [])
    per_model = {model: _model_rows(results, model, grid, studies) for model in models}
    present = [m for rows in per_model.values() for _, _, m in rows if m] + ([real] if real else [])
    extractors = sorted({m.get("extractor", "unknown") for m in present})
    if len(extractors) > 1:
        raise ValueError(f"metrics from different extractors {extractors} cannot share a table; re-run the "
                         "evaluate stages with one eval.extractor")
    ref = next((m for m in present if m.get("sampler")), present[0] if present else {})  # a sampled row: it names the sampler
    fid_label = ref.get("extractor_label", ref.get("extractor", "?"))
    fams = {model: _family(rows) for model, rows in per_model.items()}
    uncond = [m for m in grid.models if fams[m].get("conditioning", "none") == "none"]
    cond = [m for m in grid.models if fams[m].get("conditioning") == "class"]
    guided = next((fams[m].get("guidance_scale") for m in cond if fams[m].get("guidance_scale")), None)
    text = [m for m in grid.models if fams[m].get("conditioning") == "text"]
    lines = [
        "# TFMQ-DM results",
        "",
        f"- FID/KID features: **{fid_label}**",
        f"- sFID: **{ref.get('sfid_label', '?')}**; IS: **{ref.get('is_label', '?')}**",
        f"- {ref.get('num_samples', '?')} samples per row vs {ref.get('reference', '?')}; sampler "
        f"{ref.get('sampler', '?')} {ref.get('num_inference_steps', '?')} steps, eta {ref.get('eta', '?')}; "
        "FID with a 95 % bootstrap interval, KID x 1e3",
        "- models: " + "; ".join(f"{m} ({fams[m].get('family', '?')}"
                                  + (f", CFG scale {fams[m].get('guidance_scale')}" if fams[m].get("conditioning") in ("class", "text") else "")
                                  + ")" for m in grid.models),
        "- latent models: only the UNet is quantized; the autoencoder stays in full precision and every metric is "
        "computed on decoded images. Their `autoencoder recon.` row (the real images encoded and decoded) is the "
        "floor every latent row sits on",
        "- temporal error = mean over timesteps and resnets of 1 - cos(emb_{t,i}, emb^q_{t,i}), x 1e4 "
        "(the poster's temporal feature error; per-timestep curves in results/<model>/<setting>/temporal.csv)",
        *([f"- real images = {real.get('num_samples', '?')} real images from the split the reference "
            "does not use, scored like samples: the floor of each metric at this N (FID is biased upwards "
            "at small N, so read every FID as a distance above this row)"] if real else []),
        "- quantization is simulated (fake-quant), so no speed or memory claims; quant time = wall seconds on "
        f"{ref.get('device', '?')}, with the weight stages (TIAR, BRECQ) counted where they ran: '(shared)' marks a "
        "setting that adopted them from another setting of the same weights (quant_out.shared_weights)",
        "",
    ]
    if uncond:
        lines += _summary_table("## Table 1: unconditional generation (FID / sFID)", uncond, per_model, real,
                                ("FID", "sFID"))
    if cond:
        scale = f", classifier-free guidance scale {guided}" if guided else ""
        lines += _summary_table(f"## Table 2a: class-conditional generation (IS / FID / sFID{scale})", cond,
                                per_model, real, ("IS", "FID", "sFID"))
    if text:
        tguided = next((fams[m].get("guidance_scale") for m in text if fams[m].get("guidance_scale")), None)
        with_clip = any(r and r.get("clip_score") is not None for m in text for _, _, r in per_model[m])
        agree = "CLIP score" if with_clip else "prompt acc. (domain classifier)"
        lines += _summary_table(f"## Table 2b: text-guided generation (FID / sFID / {agree}"
                                + (f", classifier-free guidance scale {tguided}" if tguided else "") + ")",
                                text, per_model, real, ("FID", "sFID", agree))
        if not with_clip:
            lines += ["prompt acc. = the share of samples the Fashion-MNIST classifier assigns to the class their "
                      "prompt names (prompts: eval.prompts, templates the model never trained on); not a CLIP "
                      "score (no CLIP weights offline: set eval.clip_model to a local CLIP folder for it).", ""]
    table = []
    for model in models:
        fam = fams[model]
        # LPIPS vs FP: only when eval.lpips_backbone named a local AlexNet file
        with_lpips = any(m is not None and m.get("lpips_vs_fp") is not None for _, _, m in per_model[model])
        lines += [f"## {model} ({fam.get('family', '?')}): all metrics", "",
                  f"| Method | Bits | FID ({ref.get('extractor', '?')}) | sFID | KID | IS | temporal error | quant time (s) "
                  "| PSNR vs FP (dB) | FID vs FP |" + (" LPIPS vs FP |" if with_lpips else ""),
                  "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_lpips else "")]
        rows = ([("real images", "-", real)] if real else []) + per_model[model]
        for method, bits, m in rows:
            if m is None:
                lines.append(f"| {method} | {bits} | not run | | | | | | | |")
                continue
            unq = method in ("FP", "real images", "autoencoder recon.")
            paired = (f" {m['psnr_vs_fp']:.2f} [{m['psnr_vs_fp_ci_low']:.2f}, {m['psnr_vs_fp_ci_high']:.2f}]"
                      if m.get("psnr_vs_fp") is not None else " -")
            extra = f" (PSNR {m['psnr_db']:.2f} dB)" if m.get("psnr_db") is not None else ""
            lines.append(
                f"| {method}{extra} | {bits} | {_fid_cell(m)} | {_fmt(m.get('sfid'))} | {_kid_cell(m)} | {_is_cell(m)} | "
                f"{'0' if method == 'FP' else '-' if unq else _temporal_cell(m)} | "
                f"{'-' if unq else _quant_cell(m)} |{paired} | "
                f"{_fmt(m.get('fid_vs_fp')) if m.get('fid_vs_fp') is not None else '-'} |"
                + ((f" {m['lpips_vs_fp']:.4f} [{m['lpips_vs_fp_ci_low']:.4f}, {m['lpips_vs_fp_ci_high']:.4f}] |"
                    if m.get("lpips_vs_fp") is not None else " - |") if with_lpips else "")
            )
            table.append({"model": model, "method": method, "bits": bits,
                          **{k: v for k, v in m.items() if k != "per_timestep"}})
        lines.append("")
    return "\n".join(lines), table


@pipeline_task
def report(out_dir: str, grid, path: str, studies=None, reference_path: str | dict[str, str] | None = None,
           rules=None, domain: dict | None = None) -> str:
    """Write the results tables, the paired comparisons, the poster's tables and the claims (``report.path``,
    Markdown; their data in ``<eval.out_dir>/claims.json``) and print them. ``rules``: ``tasks.claims.Rules``;
    ``domain``: ``tasks.claims.DomainData`` per model."""
    from tasks.claims import Rules, paired_report
    from tfmq.io import atomic_write_json, atomic_write_text

    text, _ = build_table(out_dir, grid, studies)
    if studies is not None:
        sections, data = paired_report(out_dir, grid, studies, reference_path, rules or Rules(), domain)
        text += "\n" + "\n".join(sections)
        atomic_write_json(data, Path(out_dir) / "claims.json")
    atomic_write_text(text, path)
    logger().info("results table -> %s", path)
    print(text)
    return path
