"""Train the embedded default FP models on Fashion-MNIST (the checkpoints the pipeline quantizes).

Usage (one training at a time; two torch jobs on 2 cores collapse throughput):
    nice -n 10 python benchmarks/train_embedded.py --out models/fashion_ddpm --steps 3500
    nice -n 10 python benchmarks/train_embedded.py --out models/fashion_ddpm_class --steps 3000 --class-conditional
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")

import torch  # noqa: E402

from tfmq.diffusion.data import DEFAULT_FASHION_MNIST_DIR, load_fashion_mnist  # noqa: E402
from tfmq.diffusion.training import TrainConfig, train_ddpm  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output model dir (replaced at the end)")
    p.add_argument("--data-root", default=DEFAULT_FASHION_MNIST_DIR)
    p.add_argument("--steps", type=int, default=3500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--class-conditional", action="store_true")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    data = load_fashion_mnist(args.data_root)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                      class_conditional=args.class_conditional, log_every=args.log_every,
                      sample_every=args.sample_every)
    print("TrainConfig:", json.dumps(dataclasses.asdict(cfg)), flush=True)
    t0 = time.perf_counter()
    log = train_ddpm(data["train_images"], data["train_labels"], cfg, args.out, device="cpu", progress=True)
    wall = time.perf_counter() - t0
    print(f"done: {args.out} train {log['wall_seconds']:.0f} s ({log['seconds_per_step']:.3f} s/step), "
          f"total wall {wall:.0f} s, final loss {log['final_loss']:.4f}, threads {log['torch_threads']}", flush=True)


if __name__ == "__main__":
    main()
