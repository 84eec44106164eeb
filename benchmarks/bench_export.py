"""Benchmark: real integer inference (tfmq.export_int8, torchao int8 kernels) vs fake-quant vs FP, side by side.

Per setting (the embedded LDM's UNet, quantized here with 2 iterations per stage: inference cost and
the export do not depend on the iteration count):

- latency of one UNet call and of a full DDIM sampling run, as a ratio to FP measured in the same run;
- the bytes of the model's tensors (parameters + buffers; int8 weights count one byte) and the size of
  the quantized checkpoint (packed W4 grids, format version 2) vs the FP UNet's safetensors file;
- the exported model's output vs the fake-quant model's: cosine of one UNet call and of the sampled latents.

Rows: ``fake-quant`` (tfmq's simulation), ``int8 (im2col)`` (every quantized layer on the int8 GEMM;
convolutions as unfold + GEMM, since torchao 0.18 has no int8 convolution) and ``int8 (linear only)``
(convolutions left fake-quant). On a CPU without VNNI / AMX the int8 GEMM is not faster than float
SGEMM and im2col costs memory traffic, so the exported model may be slower: the table says so.

    python benchmarks/bench_export.py            # ~4 min on 2 cores
    python benchmarks/bench_export.py --quick    # 8 images, 10 steps
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import tfmq  # noqa: E402
from tfmq.diffusion.calibration import capture_calibration_data  # noqa: E402
from tfmq.diffusion.models import load_fp_model  # noqa: E402
from tfmq.diffusion.sampling import make_scheduler, sample  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_performance import _table, _timeit, parse_common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer (a torchao int8 weight: its int8 data + float scales)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        inner = [getattr(t, n) for n in ("qdata", "scale") if isinstance(getattr(t, n, None), torch.Tensor)]
        total += sum(x.numel() * x.element_size() for x in inner) if inner else t.numel() * t.element_size()
    return total


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def gemm_table(unet: torch.nn.Module, n: int, repeats: int, device) -> str:
    """The kernels alone: float GEMM vs ``torch._int_mm`` on the shapes of the largest conv (im2col) and linear."""
    shapes, hooks = {}, []
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            def hook(mod, args, out, name=name):
                x = args[0]
                if isinstance(mod, torch.nn.Conv2d):
                    k = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
                    shapes[name] = (out.shape[0] * out.shape[2] * out.shape[3], k, mod.out_channels, "conv")
                else:
                    shapes[name] = (x.numel() // x.shape[-1], x.shape[-1], mod.out_features, "linear")
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        s = unet.config.sample_size
        unet(torch.zeros(n, unet.config.in_channels, s, s, device=device), torch.full((n,), 1, device=device))
    for h in hooks:
        h.remove()
    rows = []
    for kind in ("conv", "linear"):
        name, (m, k, nn_, _) = max(((nm, v) for nm, v in shapes.items() if v[3] == kind), key=lambda kv: kv[1][0] * kv[1][1] * kv[1][2])
        a, b = torch.randn(m, k, device=device), torch.randn(k, nn_, device=device)
        ai, bi = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device), torch.randint(-128, 128, (k, nn_), dtype=torch.int8, device=device)
        tf = _timeit(lambda: a @ b, max(repeats, 5))
        ti = _timeit(lambda: torch._int_mm(ai, bi), max(repeats, 5))
        rows.append([f"{name} ({kind})", f"{m} x {k} x {nn_}", f"{tf * 1e3:.3f}", f"{ti * 1e3:.3f}", f"{ti / tf:.2f}"])
    return _table("The GEMM kernels alone, on the largest layer shapes of one UNet call (int8 in, int32 out vs float32)",
                  ["layer", "M x K x N", "float mm ms", "torch._int_mm ms", "int8 / float"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "fashion_ldm"))
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="its quant and sampler sections are used")
    ap.add_argument("--settings", default="tfmq-W8A8,tfmq-W4A8,qdiffusion-W4A8,tfmq-W4A32")
    ap.add_argument("--sample-n", type=int, default=32, help="images per sampling run (one batch)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default: params.yaml's)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="8 images, 10 steps, 1 repeat")
    args, base, s = parse_common(ap)
    steps = args.steps or s["num_inference_steps"]
    if args.quick:
        args.sample_n, steps, args.repeats = 8, 10, 1
    for k in ("recon", "tiar_recon", "act_recon"):
        base[k] = {**base[k], "iters": 2}
    base["calib"] = {**base["calib"], "n_per_step": min(base["calib"].get("n_per_step") or 16, 16)}
    unet, train_sched = load_fp_model(args.model, args.device)
    scheduler = make_scheduler(s["name"], train_sched.config)
    fp_file = Path(args.model) / "unet" / "diffusion_pytorch_model.safetensors"
    fp_bytes = fp_file.stat().st_size
    tmp = Path(tempfile.mkdtemp(prefix="tfmq-bench-export-"))
    n, c, hw = args.sample_n, unet.config.in_channels, unet.config.sample_size
    x = torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(0)).to(args.device)
    try:
        calib = capture_calibration_data(unet, scheduler, tmp / "calib", num_samples=16, num_inference_steps=steps,
                                         batch_size=16, seed=1, device=args.device, progress=False)
        scheduler.set_timesteps(steps)
        t_call = torch.full((n,), int(scheduler.timesteps[steps // 2]), dtype=torch.int64, device=args.device)

        def call(model):
            def f():
                with torch.no_grad():
                    return model(x, t_call).sample
            return f

        def run(model):
            return lambda: sample(model, scheduler, n, steps, n, seed=0, device=args.device, progress=False)

        t_fp_call, t_fp_run = _timeit(call(unet), args.repeats), _timeit(run(unet), args.repeats)
        fp_tensor = tensor_bytes(unet)
        print(f"# tfmq integer-export benchmark: {args.model} on {args.device} ({torch.get_num_threads()} threads), "
              f"torch {torch.__version__}, torchao {__import__('torchao').__version__}; one UNet call = batch {n}; "
              f"sampling = {n} images, {s['name']} {steps} steps. FP: {t_fp_call * 1e3:.1f} ms per call, "
              f"{t_fp_run:.2f} s per run, {fp_tensor / 1e6:.2f} MB of tensors, {fp_bytes / 1e6:.2f} MB checkpoint.")
        rows, numbers = [["FP", "", f"{t_fp_call * 1e3:.1f}", "1.00", "1.00", f"{fp_tensor / 1e6:.2f}", f"{fp_bytes / 1e6:.2f}", "", ""]], {}
        for setting in args.settings.split(","):
            method, bits = setting.split("-")
            w, a = tfmq.parse_bits(bits)
            cfg = tfmq.QuantConfig.from_dict({**base, "method": method, "weight_bits": w, "act_bits": a})
            q = tfmq.quantize(copy.deepcopy(unet), calib, cfg, device=args.device, progress=False)
            ckpt = tfmq.save(q, tmp / setting)
            ck_bytes = (ckpt / "quantized.safetensors").stat().st_size
            ref_call, ref_run = call(q)(), run(q)()
            variants = [("fake-quant", q, None)]
            for conv in ("im2col", "simulated"):
                e = tfmq.load(ckpt, copy.deepcopy(unet), device=args.device)
                report = tfmq.export_int8(e, conv=conv)
                variants.append((f"int8 ({'im2col' if conv == 'im2col' else 'linear only'})", e, report))
            for label, model, report in variants:
                tc, tr = _timeit(call(model), args.repeats), _timeit(run(model), args.repeats)
                cos_call = _cos(call(model)(), ref_call) if report else 1.0
                cos_run = _cos(run(model)(), ref_run) if report else 1.0
                layers = "" if report is None else f"{len(report.integer)} int8xint8, {len(report.weight_only)} W-only, {len(report.simulated)} simulated"
                rows.append([setting, label, f"{tc * 1e3:.1f}", f"{tc / t_fp_call:.2f}", f"{tr / t_fp_run:.2f}",
                             f"{tensor_bytes(model) / 1e6:.2f}", f"{ck_bytes / 1e6:.2f} ({ck_bytes / fp_bytes:.2f}x)",
                             f"{cos_call:.6f} / {cos_run:.6f}" if report else "(reference)", layers])
                numbers[f"{setting} {label}"] = {"call_x_fp": tc / t_fp_call, "run_x_fp": tr / t_fp_run,
                                                 "tensor_bytes": tensor_bytes(model), "checkpoint_bytes": ck_bytes,
                                                 "cos_call": cos_call, "cos_run": cos_run}
            print(f"  {setting} done", file=sys.stderr, flush=True)
        # FP once more at the end (the first timings of a process run slow): the faster of the two is the baseline
        t_fp_call2, t_fp_run2 = _timeit(call(unet), args.repeats), _timeit(run(unet), args.repeats)
        f_call, f_run = min(t_fp_call, t_fp_call2) / t_fp_call, min(t_fp_run, t_fp_run2) / t_fp_run
        for r in rows[1:]:
            r[3], r[4] = f"{float(r[3]) / f_call:.2f}", f"{float(r[4]) / f_run:.2f}"
        for v in numbers.values():
            v["call_x_fp"], v["run_x_fp"] = v["call_x_fp"] / f_call, v["run_x_fp"] / f_run
        rows[0][2] = f"{min(t_fp_call, t_fp_call2) * 1e3:.1f}"
        print(f"# FP measured twice: {t_fp_call * 1e3:.1f} / {t_fp_call2 * 1e3:.1f} ms per call, {t_fp_run:.2f} / "
              f"{t_fp_run2:.2f} s per run; ratios use the faster")
        print(_table("Integer export vs fake-quant vs FP (ratios measured in this run; fake-quant is a simulation, not a speed-up)",
                     ["setting", "model", "ms per UNet call", "call x FP", "sampling x FP", "tensor MB",
                      "checkpoint MB (x FP file)", "cos vs fake-quant (call / samples)", "layers"], rows))
        print(gemm_table(unet, n, args.repeats, args.device))
        if args.json:
            Path(args.json).write_text(json.dumps(numbers, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
