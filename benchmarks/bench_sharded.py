"""Benchmark: one setting's sharded scoring on Dask, 1 worker x 2 threads vs 2 workers x 1 thread, side by side.

Each layout runs ``flows.sharded.sharded_scores`` (Prefect flow, ``DaskTaskRunner`` on a loopback
``LocalCluster``) on the same samples of the embedded FP latent model; the table gives the wall time of
each, their ratio, where the workers' time went (load, sampling, decoding, features: summed over
shards) and the Dask + Prefect overhead (wall time minus the slowest worker's share), and projects the
full 50 000-sample protocol per worker from the measured per-sample cost. Both layouts must give the
same FID (they cut the samples differently, on batch boundaries).

    python benchmarks/bench_sharded.py              # 256 samples, ~3 min on 2 cores
    python benchmarks/bench_sharded.py --quick      # 64 samples
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_performance import _table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "fashion_ldm"))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="64 samples")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.samples = 64
    from prefect.testing.utilities import prefect_test_harness

    from flows.sharded import sharded_scores
    from tfmq.evaluation.reference_stats import compute_reference_stats

    tmp = Path(tempfile.mkdtemp(prefix="tfmq-bench-sharded-"))
    e = {"seed": 2, "batch_size": args.batch_size, "feature_batch_size": args.batch_size, "extractor": "efficientnet-lite0",
         "kid_subsets": 10, "kid_subset_size": min(100, args.samples)}
    sampler = {"name": "ddim", "num_inference_steps": args.steps, "eta": 0.0, "guidance_scale": 1.0}
    try:
        torch.set_num_threads(2)
        real = (torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
        ref = compute_reference_stats(real, tmp / "ref.safetensors", "efficientnet-lite0", progress=False)
        rows, out = [], {}
        with prefect_test_harness():
            for label, workers, threads, shards in (("1 worker x 2 threads", 1, 2, 1), ("2 workers x 1 thread", 2, 1, 2),
                                                    ("2 workers x 1 thread, 4 shards", 2, 1, 4)):
                t0 = time.perf_counter()
                r = sharded_scores(args.model, None, args.samples, shards, e, sampler, str(ref.path),
                                   str(tmp / label.replace(" ", "_").replace(",", "")), workers=workers, threads=threads)
                wall = time.perf_counter() - t0
                sec = r["shard_seconds"]
                work = sum(v for k, v in sec.items() if k != "merge_and_score")
                per_sample = work / args.samples  # worker-seconds per sample on `threads` threads
                out[label] = {"wall_s": wall, "fid": r["fid"], **sec, "per_sample_worker_s": per_sample}
                rows.append([label, shards, f"{wall:.1f}", f"{sec.get('load', 0):.1f}", f"{sec.get('sample', 0):.1f}",
                             f"{sec.get('decode', 0):.1f}", f"{sec.get('features', 0):.1f}", f"{sec['merge_and_score']:.1f}",
                             f"{wall - work / workers - sec['merge_and_score']:.1f}", f"{r['fid']:.6f}",
                             f"{per_sample * 50_000 / 3600:.2f}"])
        base = out["1 worker x 2 threads"]["wall_s"]
        for r_ in rows:
            r_.insert(3, f"{float(r_[2]) / base:.2f}")
        print(f"# sharded scoring of {args.samples} samples of {args.model} (DDIM {args.steps}, batch {args.batch_size}), "
              f"torch {torch.__version__}, {os.cpu_count()} cores; Prefect + Dask LocalCluster on 127.0.0.1")
        print(_table("Layouts side by side (worker seconds summed over shards; overhead = wall - work / workers - merge)",
                     ["layout", "shards", "wall s", "x 1 worker", "load s", "sample s", "decode s", "features s",
                      "merge + score s", "Dask/Prefect overhead s", "FID", "50 000 samples: worker-hours"], rows))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
