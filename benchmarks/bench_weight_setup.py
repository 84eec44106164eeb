"""Benchmark: the per-output-channel weight clipping search (``tfmq.quant.quantizer.mse_clip_search``,
docs/method.md section 2) that every ``WeightQuantizer`` runs at setup, against the original one-shot
implementation (``_reference_clip_search`` in tests/test_clip_search.py) on the same seeded weights.

Each weight set is searched by both (W4, 80 candidates, the default p = 2.4; one set also at p = 2.0, where
``pow`` is a square and the rest of the arithmetic dominates) on each thread count, the new one first; "identical" says whether
every scale and zero point tensor is equal bit for bit. Sets under 4 M weights are timed best of 3, larger
ones once. The original materialises ~10 weight-sized temporaries per candidate; the new one builds the error
in cache-sized blocks in one reused buffer and runs ``pow`` / ``mean`` once on the whole tensor (which keeps
the scores bit-identical), so at p = 2.4 the vectorised ``pow`` itself bounds the speed-up.

    python benchmarks/bench_weight_setup.py                 # 1 and 2 threads, up to 14.7 M weights (~4 min on 1 thread each)
    python benchmarks/bench_weight_setup.py --threads 1     # 1 thread only
    python benchmarks/bench_weight_setup.py --quick         # small sets only (~20 s)
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_clip_search import _reference_clip_search  # noqa: E402  (the original implementation, verbatim)

from tfmq.quant.quantizer import mse_clip_search  # noqa: E402

# (label, shapes, p): SD v1.4 UNet layer shapes; 14.7 M weights as four [640, 640, 3, 3] convs and as one
# [1280, 1280, 3, 3] conv (the original's 59 MB temporaries are above glibc's mmap threshold: fresh pages each)
FULL_SETS = [
    ("linear [1280, 320]", [(1280, 320)], 2.4),
    ("conv [320, 320, 3, 3]", [(320, 320, 3, 3)], 2.4),
    ("4 x conv [640, 640, 3, 3]", [(640, 640, 3, 3)] * 4, 2.4),
    ("conv [1280, 1280, 3, 3]", [(1280, 1280, 3, 3)], 2.4),
    ("conv [1280, 1280, 3, 3]", [(1280, 1280, 3, 3)], 2.0),
]
QUICK_SETS = [
    ("linear [1280, 320]", [(1280, 320)], 2.4),
    ("conv [320, 320, 3, 3]", [(320, 320, 3, 3)], 2.4),
    ("conv [320, 320, 3, 3]", [(320, 320, 3, 3)], 2.0),
]
BITS = 4


def _weights(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Kaiming-like scale with heavy tails (a few large weights), as trained weights have
    return [torch.randn(s, generator=g) * torch.exp(0.5 * torch.randn(s, generator=g)) * 0.02 for s in shapes]


def _time(fn, weights: list[torch.Tensor], p: float, repeats: int) -> tuple[float, list]:
    best, out = float("inf"), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [fn(w, BITS, p=p) for w in weights]
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (default 1,2)")
    ap.add_argument("--quick", action="store_true", help="small weight sets only")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    sets = QUICK_SETS if args.quick else FULL_SETS

    print(f"# weight clipping search: reference (one-shot) vs blocked in-place `mse_clip_search`, W{BITS}, 80 candidates")
    print(f"# {datetime.date.today().isoformat()}, torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores visible")
    print()
    print("| weights | threads | reference s | new s | speed-up | identical |")
    print("|---|---|---|---|---|---|")
    for t in threads:
        torch.set_num_threads(t)
        for label, shapes, p in sets:
            weights = _weights(shapes)
            n = sum(w.numel() for w in weights)
            repeats = 3 if n < 4_000_000 else 1
            t_new, new = _time(mse_clip_search, weights, p, repeats)
            t_ref, ref = _time(_reference_clip_search, weights, p, repeats)
            same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref, new))
            print(f"| {label} ({n / 1e6:.2f} M), p={p} | {t} | {t_ref:.2f} | {t_new:.2f} | "
                  f"{t_ref / t_new:.1f}x | {'yes' if same else 'NO'} |", flush=True)


if __name__ == "__main__":
    main()
