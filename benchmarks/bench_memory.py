"""Benchmark: memory of block reconstruction (docs/method.md section 6, "Memory").

1. The cache formula at Stable Diffusion v1.4 scale: BRECQ caches, for every unit, its inputs and its FP
   output per calibration row; ``tfmq.quant.cache.unit_cache_bytes`` gives those bytes from one forward
   pass of SD v1.4's UNet (its published config, built on the ``meta`` device: no weights, nothing
   computed). Rows = steps used x 256 (128 captions x {prompt, ""}, the paper's calibration).
2. The formula checked on the embedded default (models/fashion_ldm): predicted bytes x rows against the
   cache BRECQ actually held for each block unit (one iteration per unit).
3. The accelerator's working set of one unit at SD v1.4 scale, batch 8 (the paper's SD mini-batch): the AdaRound
   state (alpha, its gradient, Adam's two moments: 16 bytes per weight), the activations the fake-quant forward
   saves for backward (counted with ``torch.autograd.graph.saved_tensors_hooks`` on the ``meta`` device, the
   unit prepared by ``tfmq.prepare_model`` exactly as BRECQ runs it: weights fake-quantized with AdaRound, no
   activation quantizers) and the mini-batch's inputs + FP target; plus the resident FP UNet (``tfmq.quantize``
   moves the model to the device). Checked on the embedded text-guided model (batch 32) against the peak
   GPU memory of its whole quantization measured on an H200 (``benchmarks/gpu_check.py``).
4. Peak RSS of the default quantize stage (``tfmq quantize --model fashion_ldm --method tfmq --bits W8A8``,
   shared weights off), each run in its own process: the unit caches in memory vs spilled to files
   (``quant_out.memory_budget_mb: 0``), and whether the two checkpoints are identical.

    python benchmarks/bench_memory.py            # ~2 min on 2 cores (needs calib/fashion_ldm: dvc repro calib_data@fashion_ldm)
    python benchmarks/bench_memory.py --no-rss   # 1-3 only (~2 min: preparing SD v1.4 on the meta device)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tfmq.quant.cache import unit_cache_bytes  # noqa: E402

GIB, MIB = 2**30, 2**20
# CompVis/stable-diffusion-v1-4 unet/config.json (the keys that differ from UNet2DConditionModel's defaults)
SD14_UNET = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)


def _table(title: str, header: list[str], rows: list[list]) -> str:
    out = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def sd14_formula() -> str:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET)
        inputs = {"sample": torch.empty(1, 4, 64, 64), "timestep": torch.tensor([500]),
                  "encoder_hidden_states": torch.empty(1, 77, 768)}
    units = unit_cache_bytes(unet, inputs)
    per_row = sorted(units, key=lambda u: u["input_bytes"] + u["output_bytes"], reverse=True)
    row_in = 4 * 64 * 64 * 4 + 77 * 768 * 4 + 8  # the calibration row itself: latent, text embedding, timestep
    out = [f"SD v1.4 UNet (meta device): {len(units)} block units; a calibration row is {row_in / MIB:.3f} MiB "
           "(latent 4x64x64, text 77x768, timestep, float32)."]
    rows = [[u["unit"], u["kind"], f"{u['input_bytes'] / MIB:.3f}", f"{u['output_bytes'] / MIB:.3f}",
             f"{(u['input_bytes'] + u['output_bytes']) / MIB:.3f}"] for u in per_row[:5]]
    out.append(_table("SD v1.4: the five largest unit caches per calibration row",
                      ["unit", "kind", "inputs MiB/row", "output MiB/row", "total MiB/row"], rows))
    big = per_row[0]["input_bytes"] + per_row[0]["output_bytes"]
    rows = []
    for label, n in (("PLMS 50, every 10th step (5 x 256)", 1280), ("every 5th step (10 x 256)", 2560),
                     ("the LDM set of the paper (20 x 256)", 5120), ("every step (50 x 256)", 12800)):
        cache, data = n * big / GIB, n * row_in / GIB
        rows.append([label, n, f"{cache:.1f}", f"{data:.1f}", f"{cache + data:.1f}",
                     "yes" if cache + data < 24 * 0.8 else "no", "yes" if cache + data < 80 * 0.8 else "no"])
    out.append(_table("SD v1.4: the largest unit's cache (inputs + FP output) and the calibration rows held for BRECQ",
                      ["calibration rows", "N", "largest unit cache GiB", "rows GiB", "together GiB",
                       "all in memory fits 24 GB (80 % usable)", "fits 80 GB"], rows))
    out.append(f"\nFormula: cache(unit) = N x (inputs + output bytes per row); the largest is `{per_row[0]['unit']}` "
               f"at {big / MIB:.3f} MiB per row. With `quant_out.memory_budget_mb: B` a unit keeps at most B MiB "
               "of it in memory (the rest in files, read per mini-batch); without one, all of it sits in host "
               "memory (never on the accelerator: each mini-batch is moved there when used).")
    return "\n".join(out)


def unit_working_sets(unet: torch.nn.Module, inputs: dict[str, Any], batch: int, units: list[str] | None = None,
                      cfg=None) -> list[dict[str, Any]]:
    """Per unit, the bytes one BRECQ mini-batch of ``batch`` rows needs on the accelerator (see the module doc).

    ``unet``: FP (or on the ``meta`` device); it is prepared here with ``cfg`` (default tfmq W4A8). ``inputs``:
    UNet keywords for one row. Shared saved tensors are counted once (by storage), so the count is what
    autograd keeps alive at the end of the forward, the peak of the step up to transient buffers.
    """
    import tfmq
    from tfmq.quant.prepare import set_quant_state
    from tfmq.quant.reconstruction import _main_output, discover_units

    cfg = cfg or tfmq.QuantConfig(method="tfmq", weight_bits=4, act_bits=8)
    captured: dict[str, tuple] = {}
    handles = []
    for name, m in unet.named_modules():
        if units is None or name in units:
            def pre(mod, args, kwargs, name=name):
                captured.setdefault(name, (args, kwargs))
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    rows = {k: (v.expand(batch, *v.shape[1:]) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in inputs.items()}
    try:
        with torch.no_grad():
            unet(**rows)
    finally:
        for h in handles:
            h.remove()
    q = tfmq.prepare_model(unet, cfg)
    set_quant_state(q, weight=True, act=False)
    out = []
    for u in discover_units(q):
        if u.kind != "block" or (units is not None and u.name not in units) or u.name not in captured:
            continue
        layers = list(u.layers())
        for l in layers:
            l.init_adaround()
        alpha = sum(p.numel() * p.element_size() for l in layers for p in l.adaround_parameters())
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            seen[id(st) if t.device.type == "meta" else st.data_ptr()] = st.nbytes()
            return t

        args, kwargs = captured[u.name]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = _main_output(u.module(*args, **kwargs))
        io = sum(a.numel() * a.element_size() for a in list(args) + list(kwargs.values()) if torch.is_tensor(a))
        io += y.numel() * y.element_size()  # the FP target of the mini-batch, the same shape
        out.append({"unit": u.name, "kind": type(u.module).__name__, "adaround_state_bytes": 4 * alpha,
                    "saved_bytes": sum(seen.values()), "batch_io_bytes": io})
        del y
        for l in layers:
            l.finalize()
    return out


def sd14_working_set(batch: int = 8) -> str:
    """Table 3 for SD v1.4 (meta device): the five largest unit working sets at ``batch`` and the verdicts."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD14_UNET)
        inputs = {"sample": torch.empty(1, 4, 64, 64), "timestep": torch.tensor([500]),
                  "encoder_hidden_states": torch.empty(1, 77, 768)}
    model_bytes = sum(p.numel() * p.element_size() for p in unet.parameters())
    t0 = time.perf_counter()
    sets = unit_working_sets(unet, inputs, batch)
    total = lambda u: u["adaround_state_bytes"] + u["saved_bytes"] + u["batch_io_bytes"]
    top = sorted(sets, key=total, reverse=True)[:5]
    rows = [[u["unit"], u["kind"], f"{u['adaround_state_bytes'] / MIB:.0f}", f"{u['saved_bytes'] / MIB:.0f}",
             f"{u['batch_io_bytes'] / MIB:.0f}", f"{total(u) / GIB:.2f}", f"{(total(u) + model_bytes) / GIB:.2f}",
             "yes" if total(u) + model_bytes < 24e9 * 0.8 else "no", "yes" if total(u) + model_bytes < 80e9 * 0.8 else "no"]
            for u in top]
    return _table(f"SD v1.4, batch {batch}: the accelerator's working set of the five largest units (MiB; counted on the "
                  f"meta device in {time.perf_counter() - t0:.0f} s; resident FP UNet {model_bytes / GIB:.2f} GiB fp32; "
                  "unit caches stay on the host, table 2)",
                  ["unit", "kind", "AdaRound state", "saved for backward", "mini-batch in + target", "unit GiB",
                   "+ UNet GiB", "fits 24 GB (80 % usable)", "fits 80 GB"], rows)


def embedded_working_set(model_dir: Path, batch: int = 32, measured_mib: float | None = None) -> str:
    """Table 3's count on an embedded text-guided folder (real tensors, CPU) beside a measured GPU peak."""
    from tfmq.diffusion.pipelines import load_diffusion_model

    m = load_diffusion_model(model_dir, "cpu")
    size = m.unet.config.sample_size
    inputs = {"sample": torch.randn(1, m.unet.config.in_channels, size, size), "timestep": torch.tensor([500]),
              "encoder_hidden_states": m.encode_prompts(["a photo of a sneaker"])}
    model_bytes = sum(p.numel() * p.element_size() for p in m.unet.parameters())
    sets = unit_working_sets(m.unet, inputs, batch)
    total = lambda u: u["adaround_state_bytes"] + u["saved_bytes"] + u["batch_io_bytes"]
    big = max(sets, key=total)
    predicted = (total(big) + model_bytes) / MIB
    rows = [[big["unit"], f"{big['adaround_state_bytes'] / MIB:.2f}", f"{big['saved_bytes'] / MIB:.2f}",
             f"{big['batch_io_bytes'] / MIB:.2f}", f"{model_bytes / MIB:.2f}", f"{predicted:.1f}",
             "-" if measured_mib is None else f"{measured_mib:.1f}"]]
    return _table(f"Embedded text-guided model ({model_dir.name}), batch {batch}: the largest unit's working set + the "
                  "resident UNet vs the peak GPU memory of its whole tfmq W4A8 quantization (H200)",
                  ["largest unit", "AdaRound state MiB", "saved for backward MiB", "mini-batch MiB", "UNet MiB",
                   "predicted MiB", "measured peak MiB"], rows)


def embedded_check(model_dir: Path, calib_dir: Path) -> str:
    import yaml

    import tfmq
    from tfmq.diffusion.calibration import CalibrationSet, every_kth_step
    from tfmq.diffusion.models import load_fp_model

    q = yaml.safe_load((ROOT / "params.yaml").read_text())["quant"]
    cfg = tfmq.QuantConfig.from_dict({**q, "method": "tfmq", "weight_bits": 8, "act_bits": 8,
                                      "recon": {**q["recon"], "iters": 1}})
    calib = CalibrationSet(calib_dir)
    n = every_kth_step(calib, cfg.calib.every_k, cfg.calib.n_per_step, seed=cfg.seed)["sample"].shape[0]
    unet, _ = load_fp_model(model_dir, "cpu")
    row = {k: v[:1] for k, v in calib.load_step(0).items()}
    formula = {u["unit"]: u for u in unit_cache_bytes(unet, row)}
    q_unet = tfmq.prepare_model(unet, cfg)
    tfmq.reconstruct_temporal(q_unet, calib, progress=False)
    stats = tfmq.reconstruct_blocks(q_unet, calib, progress=False)
    rows, worst = [], 0.0
    for name, u in formula.items():
        if name not in stats["units"]:
            continue
        predicted = n * (u["input_bytes"] + u["output_bytes"]) / MIB
        measured = stats["units"][name]["cache_mb"]
        worst = max(worst, abs(measured - predicted) / predicted)
        rows.append([name, u["kind"], f"{predicted:.4f}", f"{measured:.4f}"])
    return _table(f"Embedded default ({model_dir.name}): formula x {n} rows vs the cache BRECQ held (MiB; max relative "
                  f"difference {worst:.1e}, the 4-decimal rounding of the stats)", ["unit", "kind", "formula", "measured"], rows)


def _run(cmd: list[str], cwd: Path) -> tuple[float, float, int]:
    """(wall s, peak RSS MiB, exit code) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, p.returncode


def rss(model: str) -> str:
    import hashlib

    base = (ROOT / "params.yaml").read_text()
    base = re.sub(r"(?m)^  shared_weights: .*$", "  shared_weights: null", base)
    work = Path(tempfile.mkdtemp(prefix="tfmq-bench-memory-"))
    rows, digests = [], {}
    try:
        for label, budget in (("caches in memory (memory_budget_mb: null)", "null"), ("caches spilled (memory_budget_mb: 0)", "0")):
            params = work / f"params-{budget}.yaml"
            text = re.sub(r"(?m)^  memory_budget_mb: .*$", f"  memory_budget_mb: {budget}", base)
            params.write_text(re.sub(r"(?m)^(quant_out:.*\n  dir: )\S+", lambda m: m.group(1) + str(work / budget), text))
            wall, peak, rc = _run([sys.executable, "-m", "flows.cli", "quantize", "--model", model, "--method", "tfmq",
                                   "--bits", "W8A8", "--no-prefect", "--config", str(params)], ROOT)
            if rc != 0:
                raise SystemExit(f"quantize with memory_budget_mb={budget} failed (exit {rc})")
            ckpt = next((work / budget / model / "tfmq-W8A8" / "model").glob("*.safetensors"))
            from safetensors.torch import load_file

            t = load_file(str(ckpt))
            digests[budget] = hashlib.sha256(b"".join(k.encode() + t[k].contiguous().view(torch.uint8).numpy().tobytes()
                                                      for k in sorted(t))).hexdigest()[:16]
            spilled = json.loads((work / budget / model / "tfmq-W8A8" / "stage_times.json").read_text())
            n_spilled = sum(u.get("cache_spilled", 0) for u in spilled["recon_blocks"]["stats"]["units"].values())
            rows.append([label, f"{wall:.1f}", f"{peak:.0f}", n_spilled, digests[budget]])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    same = "identical" if len(set(digests.values())) == 1 else "DIFFERENT"
    return _table(f"Peak RSS of `tfmq quantize --model {model} --method tfmq --bits W8A8` (one process each; "
                  f"checkpoints {same})", ["run", "wall s", "peak RSS MiB", "unit caches spilled", "checkpoint tensors sha256"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fashion_ldm")
    ap.add_argument("--no-rss", action="store_true", help="skip the two quantize processes of table 3")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print("# Memory benchmark (CPU)\n")
    print(sd14_formula())
    print(sd14_working_set(8))
    gpu = ROOT / "benchmarks" / "results" / "gpu-h200-run1.json"
    measured = json.loads(gpu.read_text())["part_a"]["rows"]["tfmq-W4A8"]["quant_peak_gpu_mib"] if gpu.is_file() else None
    print(embedded_working_set(ROOT / "models" / "fashion_sd", 32, measured))
    calib_dir = ROOT / "calib" / args.model
    if not (calib_dir / "meta.json").is_file():
        raise SystemExit(f"{calib_dir} is missing: record it first (dvc repro calib_data@{args.model})")
    print(embedded_check(ROOT / "models" / args.model, calib_dir))
    if not args.no_rss:
        print(rss(args.model))


if __name__ == "__main__":
    main()
