"""Benchmark: the four performance ratios of the embedded default, measured side by side in one run.

1. Reconstruction loop throughput (iterations/s) vs the physical limit of the loop: a bare forward +
   backward of the same unit (FP weights, gradients to the weights) on the same cached batch. The
   rows in between split the difference: fake-quant forward/backward (gradients to AdaRound's
   alpha), + the rounding regulariser, + Adam / row sampling (= the loop of ``optimize_rows``).
2. Fake-quant sampling time vs FP per setting (DDIM, the sampler of params.yaml), and the layers
   that make the difference (per-layer wall time of one UNet call, fake-quant minus FP).
3. TFMQ vs Q-Diffusion quantization wall time at equal iterations (the quant section of params.yaml,
   on a calibration set recorded here).
4. Calibration capture: UNet calls per trajectory (must be exactly T) and seconds per sample vs
   plain sampling of the same trajectories.

Quantization here is SIMULATED (fake-quant: float tensors on the integer grid), so (2) measures the
cost of simulating it, not an inference speed-up (no real low-bit kernels are used anywhere in tfmq yet).

    python benchmarks/bench_performance.py                 # models/fashion_ldm, ~5 min on 2 cores
    python benchmarks/bench_performance.py --quick         # fewer rows / iterations (smoke run)
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

import tfmq  # noqa: E402
from tfmq.diffusion.calibration import capture_calibration_data, every_kth_step  # noqa: E402
from tfmq.diffusion.models import load_fp_model  # noqa: E402
from tfmq.diffusion.sampling import make_scheduler, sample  # noqa: E402
from tfmq.quant.prepare import quant_layers, set_quant_state  # noqa: E402
from tfmq.quant.reconstruction import (  # noqa: E402
    _main_output, capture_unit_io, discover_units, lp_loss, optimize_rows, rounding_regularizer, unit_step,
)

ROOT = Path(__file__).resolve().parents[1]


def _timeit(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (one warm-up run first)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _table(title: str, header: list[str], rows: list[list]) -> str:
    out = [f"\n### {title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# --- 1. the reconstruction loop vs its physical limit ---------------------------------------------
def bench_loop(unet, calib, cfg: tfmq.QuantConfig, iters: int, device) -> tuple[str, dict]:
    q = tfmq.prepare_model(copy.deepcopy(unet), cfg)
    data = every_kth_step(calib, cfg.calib.every_k, cfg.calib.n_per_step, seed=cfg.seed)
    n = int(data["sample"].shape[0])
    unit = max((u for u in discover_units(q) if u.kind == "block"), key=lambda u: sum(l.weight.numel() for l in u.layers()))
    layers = unit.layers()
    set_quant_state(q, weight=False, act=False)
    _, target = capture_unit_io(q, unit.module, data, 64, device, False, True)
    inputs, _ = capture_unit_io(q, unit.module, data, 64, device, True, False)
    bs = cfg.recon.batch_size
    fixed = torch.arange(bs)
    (a_fixed, k_fixed), t_fixed = inputs.take(fixed, device), target.take(fixed, device)

    def fwd(a, k):
        return _main_output(unit.module(*a, **k))

    # (a) bare FP forward + backward to the FP weights
    set_quant_state(q, weight=False, act=False)
    weights = [l.weight for l in layers]
    for w in weights:
        w.requires_grad_(True)

    def bare():
        with torch.enable_grad():
            torch.autograd.grad(lp_loss(fwd(a_fixed, k_fixed), t_fixed), weights, allow_unused=True)

    # (b) fake-quant forward + backward to alpha (soft rounding), (c) + regulariser, (d) the full loop
    set_quant_state(q, weight=True, act=False)
    for l in layers:
        l.init_adaround()
    params = [p for l in layers for p in l.adaround_parameters()]
    reg = rounding_regularizer(layers, cfg.recon, iters)

    def fake(with_reg: bool):
        def step():
            with torch.enable_grad():
                loss = lp_loss(fwd(a_fixed, k_fixed), t_fixed)
                if with_reg:
                    loss = loss + reg(iters - 1)  # a step past warm-up: the regulariser is on
                torch.autograd.grad(loss, params, allow_unused=True)
        return step

    step_fn = unit_step(unit.module, inputs, target, device)

    r = max(10, iters // 5)
    t_bare = _timeit(lambda: [bare() for _ in range(r)], 3) / r
    t_fake = _timeit(lambda: [fake(False)() for _ in range(r)], 3) / r
    t_reg = _timeit(lambda: [fake(True)() for _ in range(r)], 3) / r
    t0 = time.perf_counter()
    optimize_rows(step_fn, n, params, iters, bs, cfg.recon.lr, reg, "bench", False, seed=0)
    t_loop = (time.perf_counter() - t0) / iters
    for w in weights:
        w.requires_grad_(False)
    rows = [["bare FP forward + backward (the limit)", f"{1 / t_bare:.1f}", "1.00"],
            ["fake-quant forward + backward to alpha", f"{1 / t_fake:.1f}", f"{t_bare / t_fake:.2f}"],
            ["+ rounding regulariser", f"{1 / t_reg:.1f}", f"{t_bare / t_reg:.2f}"],
            ["+ Adam step and row sampling (optimize_rows: the loop)", f"{1 / t_loop:.1f}", f"{t_bare / t_loop:.2f}"]]
    title = (f"1. Reconstruction loop vs its physical limit: unit `{unit.name}` ({sum(w.numel() for w in weights):,} "
             f"weights, batch {bs}, {n} cached rows)")
    return _table(title, ["what runs per iteration", "iterations/s", "x limit"], rows), {
        "unit": unit.name, "loop_vs_limit": t_bare / t_loop, "iters_per_s_loop": 1 / t_loop, "iters_per_s_limit": 1 / t_bare}


# --- 2. fake-quant sampling vs FP ---------------------------------------------------------------
def _layer_times(unet, x, t, calls: int = 5) -> dict[str, float]:
    """Mean wall seconds of each QuantLayer's forward in one UNet call."""
    acc: dict[str, list[float]] = {}
    hooks = []
    for name, layer in quant_layers(unet):
        def pre(m, a, name=name):
            m._bench_t0 = time.perf_counter()

        def post(m, a, o, name=name):
            acc.setdefault(name, []).append(time.perf_counter() - m._bench_t0)
        hooks += [layer.register_forward_pre_hook(pre), layer.register_forward_hook(post)]
    with torch.no_grad():
        for _ in range(calls):
            unet(x, t)
    for h in hooks:
        h.remove()
    return {k: statistics.median(v) for k, v in acc.items()}


def bench_sampling(unet, calib, base: dict, settings: list[str], n: int, steps: int, scheduler, device) -> tuple[str, dict]:
    def run(model):
        return lambda: sample(model, scheduler, n, steps, n, seed=0, device=device, progress=False)

    t_fp = _timeit(run(unet), 2)
    rows, out, per_layer = [["FP", f"{t_fp:.2f}", "1.00"]], {}, ""
    tiny = {**base, "recon": {**base["recon"], "iters": 2}, "tiar_recon": {**base["tiar_recon"], "iters": 2},
            "act_recon": {**base["act_recon"], "iters": 2}}  # inference cost does not depend on iterations
    for s in settings:
        method, bits = s.split("-")
        w, a = tfmq.parse_bits(bits)
        cfg = tfmq.QuantConfig.from_dict({**tiny, "method": method, "weight_bits": w, "act_bits": a})
        qm = tfmq.quantize(copy.deepcopy(unet), calib, cfg, device=device, progress=False)
        t_q = _timeit(run(qm), 2)
        rows.append([s, f"{t_q:.2f}", f"{t_q / t_fp:.2f}"])
        out[s] = t_q / t_fp
        if s == settings[0]:
            x = torch.randn(n, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
            t = torch.full((n,), 500, dtype=torch.int64)
            qt = _layer_times(qm, x, t)
            set_quant_state(qm, weight=False, act=False)
            ft = _layer_times(qm, x, t)
            tfmq.enable_inference(qm)
            diff = sorted(((qt[k] - ft[k], k) for k in qt), reverse=True)
            tot_q, tot_f = sum(qt.values()), sum(ft.values())
            per_layer = _table(f"2b. Where {s} spends its extra time: per-layer forward of one UNet call (batch {n}), "
                               f"quantized layers {tot_q * 1e3:.1f} ms fake-quant vs {tot_f * 1e3:.1f} ms FP",
                               ["layer", "fake-quant ms", "FP ms", "extra ms"],
                               [[k, f"{qt[k] * 1e3:.2f}", f"{ft[k] * 1e3:.2f}", f"{d * 1e3:.2f}"] for d, k in diff[:6]])
    title = f"2. Sampling {n} images, DDIM {steps} steps, batch {n}: fake-quant (simulated) vs FP (not a speed-up)"
    return _table(title, ["setting", "seconds", "x FP"], rows) + "\n" + per_layer, out


# --- 3. TFMQ vs Q-Diffusion quantization time ---------------------------------------------------
def bench_quantize(unet, calib, base: dict, bits: str, device) -> tuple[str, dict]:
    w, a = tfmq.parse_bits(bits)
    rows, total = [], {}
    for method in ("tfmq", "qdiffusion"):
        cfg = tfmq.QuantConfig.from_dict({**base, "method": method, "weight_bits": w, "act_bits": a})
        q = tfmq.prepare_model(copy.deepcopy(unet), cfg)
        st = {}
        for stage, fn in (("temporal", tfmq.reconstruct_temporal), ("blocks", tfmq.reconstruct_blocks),
                          ("activations", tfmq.calibrate_activations)):
            t0 = time.perf_counter()
            fn(q, calib, cfg, device=device, progress=False)
            st[stage] = time.perf_counter() - t0
        total[method] = sum(st.values())
        rows.append([method, *(f"{st[k]:.1f}" for k in st), f"{total[method]:.1f}"])
    ratio = total["tfmq"] / total["qdiffusion"]
    rows.append(["TFMQ / Q-Diffusion", "", "", "", f"{ratio:.2f} (paper: 0.5)"])
    title = (f"3. Quantization wall time at equal iterations ({bits}; recon {base['recon']['iters']}, TIAR "
             f"{base['tiar_recon']['iters']}, act steps {base['act_recon']['iters']} iterations)")
    return _table(title, ["method", "TIAR / temporal s", "BRECQ s", "activations s", "total s"], rows), {"tfmq_vs_qdiffusion": ratio}


# --- 4. calibration capture ---------------------------------------------------------------------
def bench_capture(unet, scheduler, n: int, steps: int, device, tmp: Path) -> tuple[str, dict]:
    calls = []
    h = unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    t0 = time.perf_counter()
    capture_calibration_data(unet, scheduler, tmp / "capture", num_samples=n, num_inference_steps=steps, batch_size=n,
                             seed=0, device=device, progress=False)
    t_cap = time.perf_counter() - t0
    h.remove()
    t_plain = _timeit(lambda: sample(unet, scheduler, n, steps, n, seed=0, device=device, progress=False), 1)
    per_traj = len(calls) / 1  # one batch of n trajectories: each call advances all of them one step
    rows = [["UNet calls per trajectory", f"{per_traj:.0f}", f"T = {steps}"],
            ["seconds per sample, capture", f"{t_cap / n:.3f}", ""],
            ["seconds per sample, plain sampling", f"{t_plain / n:.3f}", ""],
            ["capture / plain", f"{t_cap / t_plain:.2f}", "writes one safetensors file per step"]]
    return _table(f"4. Calibration capture ({n} trajectories, one batch)", ["what", "value", "note"], rows), {
        "calls_per_trajectory": per_traj, "capture_vs_plain": t_cap / t_plain}


def parse_common(ap: argparse.ArgumentParser) -> tuple[argparse.Namespace, dict, dict]:
    """Add --threads / --device / --json, parse, set torch's threads: ``(args, quant section, sampler section)``."""
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = yaml.safe_load(Path(args.params).read_text())
    return args, dict(params["quant"]), params["sampler"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "fashion_ldm"))
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="its quant and sampler sections are used")
    ap.add_argument("--bits", default="W4A8")
    ap.add_argument("--samples", type=int, default=64, help="calibration trajectories recorded for the benchmark")
    ap.add_argument("--sample-n", type=int, default=32, help="images per sampling measurement")
    ap.add_argument("--loop-iters", type=int, default=100)
    ap.add_argument("--settings", default="tfmq-W4A8,naive-W4A8,qdiffusion-W4A8,tfmq-W4A32")
    ap.add_argument("--quick", action="store_true", help="16 trajectories, 8 images, 20 loop iterations, 2 iterations per stage")
    args, base, s = parse_common(ap)
    if args.quick:
        args.samples, args.sample_n, args.loop_iters = 16, 8, 20
        for k in ("recon", "tiar_recon", "act_recon"):
            base[k] = {**base[k], "iters": 2}
    if base["calib"].get("n_per_step") and base["calib"]["n_per_step"] > args.samples:
        base["calib"] = {**base["calib"], "n_per_step": args.samples}  # rows per step of the set recorded here
    unet, train_sched = load_fp_model(args.model, args.device)
    scheduler = make_scheduler(s["name"], train_sched.config)
    tmp = Path(tempfile.mkdtemp(prefix="tfmq-bench-perf-"))
    try:
        t0 = time.perf_counter()
        calib = capture_calibration_data(unet, scheduler, tmp / "calib", num_samples=args.samples,
                                         num_inference_steps=s["num_inference_steps"], batch_size=args.samples, seed=1,
                                         device=args.device, progress=False)
        w, a = tfmq.parse_bits(args.bits)
        cfg = tfmq.QuantConfig.from_dict({**base, "method": "tfmq", "weight_bits": w, "act_bits": a})
        print(f"# tfmq performance benchmark: {args.model} on {args.device} ({torch.get_num_threads()} threads), "
              f"torch {torch.__version__}; calibration {args.samples} x {calib.num_steps} steps "
              f"({time.perf_counter() - t0:.1f} s). Quantization is simulated (fake-quant).")
        results = {}
        for part in (lambda: bench_loop(unet, calib, cfg, args.loop_iters, args.device),
                     lambda: bench_sampling(unet, calib, base, args.settings.split(","), args.sample_n,
                                            s["num_inference_steps"], scheduler, args.device),
                     lambda: bench_quantize(unet, calib, base, args.bits, args.device),
                     lambda: bench_capture(unet, scheduler, args.sample_n, s["num_inference_steps"], args.device, tmp)):
            text, numbers = part()
            print(text, flush=True)
            results.update(numbers)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
