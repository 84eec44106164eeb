"""Benchmark: one evaluate stage sharded on Dask, 1 worker x 2 threads vs 2 workers x 1 thread, side by side.

Each layout runs the evaluate stage's own sharded path on the FP row of the embedded latent model:
``flows.sharded.sample_shards`` (Prefect flow, ``DaskTaskRunner`` on a loopback ``LocalCluster``) over
``tasks.shards.sample_shard`` (sample, decode, features, domain classifier), then
``tasks.evaluate.score_shards`` (merge, FID with bootstrap, sFID, KID, IS, grid, paired file). The table
gives the wall time of each, their ratio, where the workers' time went (summed over shards), the merge
and the Dask + Prefect overhead (wall time minus work / workers minus merge), and projects the full
50 000-sample protocol per worker from the measured per-sample cost. The layouts cut the samples
differently (on batch boundaries); a worker's thread count changes float round-off, the shard count not.

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

    from flows.params import Eval, Sampler
    from flows.sharded import sample_shards
    from tasks.evaluate import score_shards, eval_job
    from tasks.setting import Setting
    from tfmq.evaluation.reference_stats import compute_reference_stats

    tmp = Path(tempfile.mkdtemp(prefix="tfmq-bench-sharded-"))
    e = Eval(out_dir=str(tmp), num_samples=args.samples, batch_size=args.batch_size, seed=2,
             extractor="efficientnet-lite0", inception_weights=None, clip_model=None,
             prompts=str(ROOT / "prompts" / "fashion-val.txt"), num_bootstrap=100, grid_images=64,
             temporal_samples=1, activation_layers=1)
    sampler = Sampler(name="ddim", num_inference_steps=args.steps, eta=0.0, guidance_scale=1.0)
    classifier = str(ROOT / "models" / "classifier")
    try:
        torch.set_num_threads(2)
        real = (torch.rand(256, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
        ref = compute_reference_stats(real, tmp / "ref.safetensors", "efficientnet-lite0", progress=False)
        rows, out = [], {}
        with prefect_test_harness():
            for label, workers, threads, shards in (("1 worker x 2 threads", 1, 2, 1), ("2 workers x 1 thread", 2, 1, 2),
                                                    ("2 workers x 1 thread, 4 shards", 2, 1, 4)):
                d = tmp / label.replace(" ", "_").replace(",", "")
                setting = Setting(name="fp", kind="fp", method="fp", bits="W32A32", model="m", fp_dir=args.model,
                                  calib_dir=None, quant_dir=None, results_dir=str(d / "results"),
                                  metrics_path=str(d / "fp.json"), paired_path=str(d / "paired" / "fp.safetensors"))
                t0 = time.perf_counter()
                paths = sample_shards(eval_job(setting, e, sampler, classifier), shards, str(d / "shards"),
                                      workers=workers, threads=threads)
                r = score_shards.fn(setting, e, sampler, str(ref.path), classifier, paths)
                wall = time.perf_counter() - t0
                sec = r["times"]
                merge = sec["merge_and_score"]
                work = sum(sec.get(k, 0.0) for k in ("load", "sample", "decode", "features", "classifier"))
                per_sample = work / args.samples  # worker-seconds per sample on `threads` threads
                fid = next(v for k, v in r["scores"]["values"].items() if k.startswith("fid/"))
                out[label] = {"wall_s": wall, "fid": fid, **sec, "per_sample_worker_s": per_sample}
                rows.append([label, shards, f"{wall:.1f}", f"{sec.get('load', 0):.1f}", f"{sec.get('sample', 0):.1f}",
                             f"{sec.get('decode', 0):.1f}", f"{sec.get('features', 0) + sec.get('classifier', 0):.1f}",
                             f"{merge:.1f}", f"{wall - work / workers - merge:.1f}", f"{fid:.6f}",
                             f"{per_sample * 50_000 / 3600:.2f}"])
        base = out["1 worker x 2 threads"]["wall_s"]
        for r_ in rows:
            r_.insert(3, f"{float(r_[2]) / base:.2f}")
        print(f"# one evaluate stage (FP row) of {args.samples} samples of {args.model} (DDIM {args.steps}, batch {args.batch_size}), "
              f"torch {torch.__version__}, {os.cpu_count()} cores; Prefect + Dask LocalCluster on 127.0.0.1")
        print(_table("Layouts side by side (worker seconds summed over shards; overhead = wall - work / workers - merge)",
                     ["layout", "shards", "wall s", "x 1 worker", "load s", "sample s", "decode s",
                      "features + classifier s", "merge + score + files s", "Dask/Prefect overhead s", "FID", "50 000 samples: worker-hours"], rows))
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
