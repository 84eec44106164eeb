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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

import tfmq  # noqa: E402
from tfmq.diffusion.calibration import capture_calibration_data, every_kth_step  # noqa: E402
from tfmq.diffusion.models import load_fp_model  # noqa: E402
from tfmq.diffusion.sampling import make_scheduler, sample  # noqa: E402
from tfmq.quant.prepare import quant_layers, set_quant_state  # noqa: E402
from tfmq.quant.fused import reference_autograd  # noqa: E402
from tfmq.quant.reconstruction import (  # noqa: E402
    _main_output, capture_unit_io, discover_units, lp_loss, optimize_rows, rounding_regularizer, unit_step,
)
from tfmq.quant.methods import tiar_inputs  # noqa: E402
from tfmq.quant.tiar import tiar_loss  # noqa: E402
from tfmq.quant.tib import TemporalInformationBlock  # noqa: E402

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
def _interleaved(fns: dict[str, Callable[[], None]], per_call: dict[str, int], rounds: int) -> dict[str, float]:
    """Median seconds per iteration of each ``fns[k]()`` (which runs ``per_call[k]`` iterations).

    The functions run in alternation, ``rounds`` times after one warm-up round, so a machine whose
    speed drifts (a shared or throttled CPU) slows every row alike and the ratios stay comparable.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[k].append((time.perf_counter() - t0) / per_call[k])
    return {k: statistics.median(v) for k, v in times.items()}


def _ratio_rows(t: dict[str, float], labels: dict[str, str], limit: str) -> list[list[str]]:
    return [[labels[k], f"{1 / t[k]:.1f}", f"{t[limit] / t[k]:.2f}"] for k in labels]


def _bare(fwd: Callable[[], torch.Tensor], weights: list[torch.Tensor]) -> Callable[[], None]:
    """One FP forward + backward to ``weights``: what an iteration cannot go below."""
    def run():
        with torch.enable_grad():
            torch.autograd.grad(fwd(), weights, allow_unused=True)
    return run


def _soft_step(fwd: Callable[[], torch.Tensor], params: list[torch.Tensor], reg: Callable[[], torch.Tensor | None] | None):
    def run():
        with torch.enable_grad():
            r = reg() if reg is not None else None
            loss = fwd() if r is None else fwd() + r
            torch.autograd.grad(loss, params, allow_unused=True)
    return run


def _loop(step_fn, n: int, params, iters: int, batch: int, lr: float, reg, cosine: bool = False):
    return lambda: optimize_rows(step_fn, n, params, iters, batch, lr, reg, "bench", False, cosine=cosine, seed=0)


def bench_loop(unet, calib, cfg: tfmq.QuantConfig, iters: int, device, rounds: int = 5) -> tuple[str, dict]:
    """BRECQ on the largest block, TIAR on the TIB, Q-Diffusion's step learning on the same block."""
    q = tfmq.prepare_model(copy.deepcopy(unet), cfg)
    data = every_kth_step(calib, cfg.calib.every_k, cfg.calib.n_per_step, seed=cfg.seed)
    n = int(data["sample"].shape[0])
    unit = max((u for u in discover_units(q) if u.kind == "block"), key=lambda u: sum(l.weight.numel() for l in u.layers()))
    layers = unit.layers()
    set_quant_state(q, weight=False, act=False)
    _, target = capture_unit_io(q, unit.module, data, 64, device, False, True)
    inputs, _ = capture_unit_io(q, unit.module, data, 64, device, True, False)
    bs = cfg.recon.batch_size
    (a_fixed, k_fixed), t_fixed = inputs.take(torch.arange(bs), device), target.take(torch.arange(bs), device)
    weights = [l.weight for l in layers]

    def fwd():
        return lp_loss(_main_output(unit.module(*a_fixed, **k_fixed)), t_fixed)

    def fp(fn):  # the limit runs on the FP weights, the rest on the fake-quant ones
        def run():
            set_quant_state(q, weight=False, act=False)
            fn()
            set_quant_state(q, weight=True, act=False)
        return run

    for w in weights:
        w.requires_grad_(True)
    set_quant_state(q, weight=True, act=False)
    for l in layers:
        l.init_adaround()
    params = [p for l in layers for p in l.adaround_parameters()]
    reg = rounding_regularizer(layers, cfg.recon, iters)
    late = iters - 1  # a step past warm-up: the regulariser is on
    step_fn = unit_step(unit.module, inputs, target, device)
    r = max(10, iters // 5)
    with reference_autograd():
        ref = _interleaved({
            "bare": fp(lambda: [_bare(fwd, weights)() for _ in range(r)]),
            "ref_soft": lambda: [_soft_step(fwd, params, None)() for _ in range(r)],
            "ref_reg": lambda: [_soft_step(fwd, params, lambda: reg(late))() for _ in range(r)],
            "ref_loop": _loop(step_fn, n, params, iters, bs, cfg.recon.lr, reg),
        }, {"bare": r, "ref_soft": r, "ref_reg": r, "ref_loop": iters}, rounds)
    fused = _interleaved({
        "bare": fp(lambda: [_bare(fwd, weights)() for _ in range(r)]),
        "soft": lambda: [_soft_step(fwd, params, lambda: reg(late))() for _ in range(r)],
        "loop": _loop(step_fn, n, params, iters, bs, cfg.recon.lr, reg),
    }, {"bare": r, "soft": r, "loop": iters}, rounds)
    for w in weights:
        w.requires_grad_(False)
    t = {**ref, **{k: v * ref["bare"] / fused["bare"] for k, v in fused.items() if k != "bare"}}  # one scale
    rows = _ratio_rows(t, {
        "bare": "bare FP forward + backward (the limit)",
        "ref_soft": "before: fake-quant forward + backward to alpha (autograd)",
        "ref_reg": "before: + rounding regulariser (autograd)",
        "ref_loop": "before: + Adam step and row sampling (the loop)",
        "soft": "fused soft rounding forward + backward, regulariser's gradient folded in",
        "loop": "**now: + fused Adam and row sampling (optimize_rows: the loop)**"}, "bare")
    title = (f"1. BRECQ loop vs its physical limit: unit `{unit.name}` ({sum(w.numel() for w in weights):,} weights, "
             f"batch {bs}, {n} cached rows; medians of {rounds} interleaved rounds)")
    out = {"unit": unit.name, "loop_vs_limit": t["bare"] / t["loop"], "loop_vs_limit_before": t["bare"] / t["ref_loop"],
           "iters_per_s_loop": 1 / t["loop"], "iters_per_s_limit": 1 / t["bare"]}
    text = _table(title, ["what runs per iteration", "iterations/s", "x limit"], rows)
    tiar_text, tiar_out = _bench_tiar(unet, calib, cfg, iters, device, rounds)
    act_text, act_out = _bench_act_steps(q, unit, inputs, target, cfg, iters, device, rounds)
    inputs.close()
    target.close()
    return text + "\n" + tiar_text + "\n" + act_text, {**out, **tiar_out, **act_out}


def _bench_tiar(unet, calib, cfg: tfmq.QuantConfig, iters: int, device, rounds: int) -> tuple[str, dict]:
    """TIAR: AdaRound on the TIB's layers against the FP temporal features, the loop vs bare."""
    q = tfmq.prepare_model(copy.deepcopy(unet), cfg)
    tib = TemporalInformationBlock(q)
    names = set(tib.layer_names())
    layers = [l for nm, l in quant_layers(q) if nm in names]
    steps, cls = tiar_inputs(calib, 1)  # the rows TIAR trains on (every recorded step, classes if any)
    steps, cls = steps.to(device), None if cls is None else cls.to(device)
    set_quant_state(q, weight=False, act=False)
    with torch.no_grad():
        targets = [f.detach() for f in tib.features(steps, cls)]
    bs = cfg.tiar_recon.batch_size
    fixed = torch.arange(min(bs, len(steps)))  # a mini-batch is at most every row

    def fwd():
        return tiar_loss(tib.features(steps[fixed], None if cls is None else cls[fixed]), [tg[fixed] for tg in targets])

    def step_fn(idx):
        return tiar_loss(tib.features(steps[idx], None if cls is None else cls[idx]), [tg[idx] for tg in targets])

    weights = [l.weight for l in layers]
    for w in weights:
        w.requires_grad_(True)
    set_quant_state(q, weight=True, act=False)
    for l in layers:
        l.init_adaround()
    params = [p for l in layers for p in l.adaround_parameters()]
    reg = rounding_regularizer(layers, cfg.recon, iters)
    r = max(10, iters // 5)

    def bare():
        set_quant_state(q, weight=False, act=False)
        for _ in range(r):
            _bare(fwd, weights)()
        set_quant_state(q, weight=True, act=False)

    with reference_autograd():
        ref = _interleaved({"bare": bare, "ref_loop": _loop(step_fn, len(steps), params, iters, bs, cfg.tiar_recon.lr, reg)},
                           {"bare": r, "ref_loop": iters}, rounds)
    fused = _interleaved({"bare": bare, "loop": _loop(step_fn, len(steps), params, iters, bs, cfg.tiar_recon.lr, reg)},
                         {"bare": r, "loop": iters}, rounds)
    for w in weights:
        w.requires_grad_(False)
    t = {**ref, "loop": fused["loop"] * ref["bare"] / fused["bare"]}
    rows = _ratio_rows(t, {"bare": "bare FP forward + backward of the TIB (the limit)",
                           "ref_loop": "before: the TIAR loop (autograd, single-tensor Adam)",
                           "loop": "**now: the TIAR loop (fused)**"}, "bare")
    title = (f"1b. TIAR loop: the TIB's {len(layers)} layers ({sum(w.numel() for w in weights):,} weights), batch "
             f"{len(fixed)} of {len(steps)} rows")
    return _table(title, ["what runs per iteration", "iterations/s", "x limit"], rows), {
        "tiar_vs_limit": t["bare"] / t["loop"], "tiar_vs_limit_before": t["bare"] / t["ref_loop"]}


def _bench_act_steps(q, unit, inputs, target, cfg: tfmq.QuantConfig, iters: int, device, rounds: int) -> tuple[str, dict]:
    """Q-Diffusion's activation step learning on the BRECQ unit (weights on their grid), the loop vs bare."""
    layers = unit.layers()
    for l in layers:
        if not l.finalized:
            l.finalize()
    qs = unit.act_quantizers()
    n = inputs.rows
    set_quant_state(q, weight=True, act=True)
    for aq in qs:  # a shared range from the cached rows (the activation stage's starting point)
        aq.start_observing(None)
    with torch.no_grad():
        a_all, k_all = inputs.all(device)
        unit.module(*a_all, **k_all)
    for aq in qs:
        aq.commit_shared()
    bs = cfg.act_recon.batch_size
    (a_fixed, k_fixed), t_fixed = inputs.take(torch.arange(bs), device), target.take(torch.arange(bs), device)
    weights = [l.weight for l in layers]
    for w in weights:
        w.requires_grad_(True)
    r = max(10, iters // 5)

    def bare():
        set_quant_state(q, weight=False, act=False)
        for _ in range(r):
            _bare(lambda: lp_loss(_main_output(unit.module(*a_fixed, **k_fixed)), t_fixed, p=cfg.act_recon.p), weights)()
        set_quant_state(q, weight=True, act=True)

    scales = [aq.scale for aq in qs]
    for sc in scales:
        sc.requires_grad_(True)
    step_fn = unit_step(unit.module, inputs, target, device, p=cfg.act_recon.p)
    with reference_autograd():
        ref = _interleaved({"bare": bare, "ref_loop": _loop(step_fn, n, scales, iters, bs, cfg.act_recon.lr, None, True)},
                           {"bare": r, "ref_loop": iters}, rounds)
    fused = _interleaved({"bare": bare, "loop": _loop(step_fn, n, scales, iters, bs, cfg.act_recon.lr, None, True)},
                         {"bare": r, "loop": iters}, rounds)
    for sc in scales:
        sc.requires_grad_(False)
    for w in weights:
        w.requires_grad_(False)
    t = {**ref, "loop": fused["loop"] * ref["bare"] / fused["bare"]}
    rows = _ratio_rows(t, {"bare": "bare FP forward + backward (the limit)",
                           "ref_loop": "before: step-size learning loop (autograd fake-quant)",
                           "loop": "**now: step-size learning loop (fused fake-quant)**"}, "bare")
    title = f"1c. Q-Diffusion's activation step learning on `{unit.name}`: {len(qs)} quantizers, batch {bs}"
    return _table(title, ["what runs per iteration", "iterations/s", "x limit"], rows), {
        "act_steps_vs_limit": t["bare"] / t["loop"], "act_steps_vs_limit_before": t["bare"] / t["ref_loop"]}


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


# --- 3b. where a quantize call's wall time goes ----------------------------------------------------
class _Timers:
    """Wall seconds spent inside chosen module functions (patched for the measurement, restored after)."""

    def __init__(self, targets: dict[str, tuple[object, str]]):
        self.targets, self.seconds, self._saved = targets, {k: 0.0 for k in targets}, []

    def __enter__(self):
        for key, (mod, attr) in self.targets.items():
            orig = getattr(mod, attr)
            self._saved.append((mod, attr, orig))

            def timed(*a, _orig=orig, _key=key, **k):
                t0 = time.perf_counter()
                try:
                    return _orig(*a, **k)
                finally:
                    self.seconds[_key] += time.perf_counter() - t0
            setattr(mod, attr, timed)
        return self

    def __exit__(self, *exc):
        for mod, attr, orig in reversed(self._saved):
            setattr(mod, attr, orig)


def bench_call_shares(unet, calib, base: dict, bits: str, device, tmp: Path) -> tuple[str, dict]:
    """Shares of one quantize call (prepare, TIAR, BRECQ loop vs unit capture, activations, save) + process start-up."""
    from tfmq.diffusion import calibration as calib_mod
    from tfmq.quant import methods as methods_mod, quantizer as quant_mod, reconstruction as recon_mod, tiar as tiar_mod

    w, a = tfmq.parse_bits(bits)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import flows.stages"], cwd=ROOT, check=True)
    startup = time.perf_counter() - t0  # what every stage process pays before its first line of work
    rows, out = [], {}
    for method in ("tfmq", "qdiffusion"):
        cfg = tfmq.QuantConfig.from_dict({**base, "method": method, "weight_bits": w, "act_bits": a})
        timers = _Timers({
            "calibration reads": (calib_mod.CalibrationSet, "load_step"),
            "weight clipping search (prepare)": (quant_mod, "mse_clip_search"),
            "unit input/output capture (per unit)": (recon_mod, "capture_unit_io"),
            "FP input/output capture (one pass)": (recon_mod, "capture_fp_io_once"),
            "BRECQ / step-learning loops": (recon_mod, "optimize_rows"),
            "TIAR loop": (tiar_mod, "optimize_rows"),
            "FSC per-timestep passes": (methods_mod, "finite_set_calibration"),
            "shared-range passes": (methods_mod, "calibrate_shared_ranges"),
        })
        t0 = time.perf_counter()
        with timers:
            q = tfmq.quantize(copy.deepcopy(unet), calib, cfg, device=device, progress=False)
        t_call = time.perf_counter() - t0
        t0 = time.perf_counter()
        tfmq.save(q, tmp / f"ckpt-{method}")
        t_save = time.perf_counter() - t0
        total = startup + t_call + t_save
        parts = {"process start-up (imports)": startup, **timers.seconds, "checkpoint write": t_save}
        inside = sum(v for k, v in timers.seconds.items() if k != "calibration reads")  # reads sit inside the others
        parts["everything else in the call"] = max(t_call - inside, 0.0)
        for k, v in parts.items():
            if v > 0:
                rows.append([method, k, f"{v:.1f}", f"{100 * v / total:.1f}"])
        rows.append([method, "**total**", f"{total:.1f}", "100"])
        out[f"{method}_call_s"] = total
    title = (f"3b. Where a quantize call's wall time goes ({bits}; recon {base['recon']['iters']}, TIAR "
             f"{base['tiar_recon']['iters']}, act steps {base['act_recon']['iters']} iterations; calibration reads happen "
             f"inside the other parts and are shown on their own)")
    return _table(title, ["method", "part", "seconds", "% of call"], rows), out


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
                     lambda: bench_call_shares(unet, calib, base, args.bits, args.device, tmp),
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
