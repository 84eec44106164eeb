"""Benchmark: how many cores one stage uses, and what two stages side by side give (flows.repro's premise).

One stage's work is a quantize call plus sampling. Each row runs that work (``tfmq.quantize`` of one setting
of models/fashion_ldm, then DDIM sampling) in a fresh process:

1. alone, with 1 and with 2 torch threads (``TFMQ_TORCH_THREADS``): the speed-up of the second thread;
2. two copies at once, 1 thread each (what ``flows.repro --jobs 2`` does), and two copies at once with 2
   threads each (what two concurrent stages with torch's default would do: oversubscribed);
3. the throughput of each arrangement as settings per minute.

Rounds alternate the arrangements (interleaved), and the table gives the median wall time per process.
Nothing else should run on the cores.

    python benchmarks/bench_stage_threads.py               # freeze W4A8, 60 BRECQ iterations, 64 samples, 3 rounds
    python benchmarks/bench_stage_threads.py --quick       # 20 iterations, 16 samples, 1 round
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORK = """
import json, sys, time
import torch, tfmq
from tfmq.diffusion.calibration import CalibrationSet
from tfmq.diffusion.models import load_fp_model
from tfmq.diffusion.sampling import sample
method, iters, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
calib = CalibrationSet("calib/fashion_ldm")
unet, sched = load_fp_model("models/fashion_ldm", "cpu")
cfg = tfmq.QuantConfig.from_dict(dict(method=method, weight_bits=4, act_bits=8, recon=dict(iters=iters),
                                      tiar_recon=dict(iters=2 * iters), calib=dict(every_k=2, n_per_step=64)))
t0 = time.perf_counter()
q = tfmq.quantize(unet, calib, cfg, progress=False)
t1 = time.perf_counter()
sample(q, sched, n, 20, n, 2, progress=False)
t2 = time.perf_counter()
print(json.dumps({"quantize_s": t1 - t0, "sample_s": t2 - t1, "threads": torch.get_num_threads()}))
"""


def _launch(threads: int, args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    code = f"import torch; torch.set_num_threads({threads})\n" + WORK
    return subprocess.Popen([sys.executable, "-c", code, args.method, str(args.iters), str(args.samples)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, text=True)


def _arrangement(copies: int, threads: int, args) -> tuple[float, list[dict]]:
    t0 = time.perf_counter()
    procs = [_launch(threads, args) for _ in range(copies)]
    outs = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"a benchmark process failed (exit {p.returncode})")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return time.perf_counter() - t0, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="freeze")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.iters, args.samples, args.rounds = 20, 16, 1
    if not (ROOT / "calib" / "fashion_ldm").is_dir() or not (ROOT / "models" / "fashion_ldm").is_dir():
        raise SystemExit("needs models/fashion_ldm and calib/fashion_ldm: run `dvc repro calib_data@fashion_ldm` first")
    arrangements = {"alone, 1 thread": (1, 1), "alone, 2 threads": (1, 2), "2 at once, 1 thread each": (2, 1),
                    "2 at once, 2 threads each": (2, 2)}
    walls: dict[str, list[float]] = {k: [] for k in arrangements}
    per: dict[str, list[dict]] = {k: [] for k in arrangements}
    for _ in range(args.rounds):
        for name, (copies, threads) in arrangements.items():
            wall, outs = _arrangement(copies, threads, args)
            walls[name].append(wall)
            per[name] += outs
    print(f"# one stage's work: tfmq.quantize({args.method} W4A8, {args.iters} BRECQ iterations) + {args.samples} DDIM-20 "
          f"samples, models/fashion_ldm; {args.rounds} interleaved round(s), medians; {os.cpu_count()} cores\n")
    print("| arrangement | processes | quantize s (per process) | sample s (per process) | wall s | settings / min |")
    print("|---|---|---|---|---|---|")
    for name, (copies, _) in arrangements.items():
        q = statistics.median(r["quantize_s"] for r in per[name])
        s = statistics.median(r["sample_s"] for r in per[name])
        w = statistics.median(walls[name])
        print(f"| {name} | {copies} | {q:.1f} | {s:.2f} | {w:.1f} | {60 * copies / w:.2f} |")


if __name__ == "__main__":
    main()
