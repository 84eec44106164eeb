"""Benchmark: every recipe on one small model at equal iterations (simulated quantization).

Prints, per method at the chosen bits: wall time of each stage, the temporal feature error
mean(1 - cos(emb_{t,i}, emb^q_{t,i})) over the sampler's timesteps and resnets, and the output
error of the quantized UNet vs FP on held-out calibration rows. Timings are of *fake*
quantization on this machine: they measure the cost of quantizing, not any inference speed-up.

    python benchmarks/bench_recipes.py --model models/fashion_ddpm --bits W4A8 --iters 200
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import tfmq  # noqa: E402
from tfmq.diffusion.models import build_unet, load_fp_model  # noqa: E402
from tfmq.quant.reconstruction import mean_temporal_cos  # noqa: E402
from tfmq.diffusion.sampling import make_scheduler  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/fashion_ddpm", help="FP model dir (unet/ + scheduler/); random 1.1M UNet if missing")
    ap.add_argument("--bits", default="W4A8")
    ap.add_argument("--iters", type=int, default=200, help="iterations per reconstruction unit (TIAR, BRECQ, act steps)")
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of the calibration trajectories")
    ap.add_argument("--samples", type=int, default=32, help="calibration trajectories")
    ap.add_argument("--methods", default=",".join(tfmq.METHODS) + ",tfmq:tiar=false,tfmq:fsc=false",
                    help="comma list; 'tfmq:tiar=false' switches a config field off for an ablation row")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w_bits, a_bits = tfmq.parse_bits(args.bits)

    if Path(args.model, "unet").is_dir():
        load = lambda: load_fp_model(args.model, args.device)[0].eval()  # noqa: E731
        source = args.model
        sched_cfg = Path(args.model, "scheduler")
    else:
        load = lambda: build_unet(seed=0).to(args.device).eval()  # noqa: E731
        source = "random-init build_unet() (no trained model found)"
        sched_cfg = {"num_train_timesteps": 1000, "beta_schedule": "linear"}
    fp = load()
    scheduler = make_scheduler("ddim", sched_cfg)
    tmp = Path(tempfile.mkdtemp(prefix="tfmq-bench-"))
    try:
        t0 = time.perf_counter()
        calib = tfmq.capture_calibration_data(
            fp, scheduler, tmp / "calib", num_samples=args.samples, num_inference_steps=args.steps,
            batch_size=args.samples, seed=0, device=args.device, progress=False,
        )
        t_calib = time.perf_counter() - t0
        ts = calib.timesteps
        fp_feats = tfmq.temporal_features(fp, ts)
        held_out = calib.load_step(len(ts) // 2)
        held_out = {k: v[-8:].to(args.device) for k, v in held_out.items()}
        with torch.no_grad():
            ref = fp(**held_out).sample
        rows = []
        for spec in args.methods.split(","):
            method, *switches = spec.split(":")
            extra = {k: v.lower() == "true" for k, v in (sw.split("=") for sw in switches)}
            unet = load()
            cfg = tfmq.QuantConfig(
                method=method, weight_bits=w_bits, act_bits=a_bits, **extra,
                recon={"iters": args.iters, "batch_size": 32},
                tiar_recon={"iters": args.iters, "batch_size": 32},
                act_recon={"iters": args.iters, "batch_size": 32},
                calib={"every_k": 2, "n_per_step": args.samples, "fsc_batch_size": 16},
            )
            tfmq.prepare_model(unet, cfg)
            times = {}
            for name, fn in (("temporal", tfmq.reconstruct_temporal), ("blocks", tfmq.reconstruct_blocks), ("activations", tfmq.calibrate_activations)):
                s = time.perf_counter()
                fn(unet, calib, None, args.device, False)
                times[name] = time.perf_counter() - s
            q_feats = tfmq.temporal_features(unet, ts)
            with torch.no_grad():
                out = unet(**held_out).sample
            cos_out = float(torch.nn.functional.cosine_similarity(out.flatten().double(), ref.flatten().double(), dim=0))
            rows.append((spec, times, mean_temporal_cos(fp_feats, q_feats), cos_out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"model: {source}; {sum(p.numel() for p in fp.parameters())/1e6:.2f} M params; bits {args.bits}; "
          f"{args.iters} iterations per unit; calibration: {args.samples} DDIM-{args.steps} trajectories ({t_calib:.1f} s); "
          f"threads {args.threads}; device {args.device}; SIMULATED quantization")
    print("| method | TIB stage s | blocks s | activations s | total s | temporal 1-cos (mean over t,i) | output cos vs FP |")
    print("|---|---|---|---|---|---|---|")
    for method, times, tcos, ocos in rows:
        total = sum(times.values())
        print(f"| {method} | {times['temporal']:.1f} | {times['blocks']:.1f} | {times['activations']:.1f} | {total:.1f} | {tcos:.3e} | {ocos:.5f} |")


if __name__ == "__main__":
    main()
