"""Per-stage wall times and orchestration overhead of a run, from the CLI's TFMQ_TIMINGS_LOG.

Each `tfmq` process appends one JSON line: its whole life (``process_s``: interpreter start to exit,
so imports, Prefect flow start-up, MLflow, model loading) and the seconds spent inside tfmq calls
(``compute_s``). Overhead = wall time of the run - the sum of compute: DVC's own work, process and
import start-up, Prefect, MLflow and file I/O, everything that is not quantization or evaluation.

    python scripts/stage_times.py .dvc/tmp/stage_times-<stamp>.jsonl --total 2710.4
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("log")
    ap.add_argument("--total", type=float, default=None, help="wall seconds of the whole run (script start to end)")
    ap.add_argument("--repro", type=float, default=None, help="wall seconds of `dvc repro` alone")
    args = ap.parse_args()
    path = Path(args.log)
    recs = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    if not recs:
        print(f"no stage ran (nothing in {path}): everything was up to date")
        return
    print(f"{'stage':28s} {'process s':>10s} {'compute s':>10s} {'overhead s':>10s}  compute by task")
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for r in recs:
        stage = r["dvc_stage"] or r["command"]
        print(f"{stage:28s} {r['process_s']:10.1f} {r['compute_s']:10.1f} {r['process_s'] - r['compute_s']:10.1f}  "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["compute"].items()))
        g = groups[stage.split("@")[0]]
        g[0] += r["process_s"]
        g[1] += r["compute_s"]
        g[2] += 1
    print()
    for name, (proc, comp, n) in groups.items():
        print(f"{name:28s} x{n:<3d} process {proc:8.1f} s, compute {comp:8.1f} s")
    proc = sum(r["process_s"] for r in recs)
    comp = sum(r["compute_s"] for r in recs)
    print(f"\n{len(recs)} stage processes: {proc:.1f} s in processes, {comp:.1f} s compute "
          f"({proc - comp:.1f} s = {100 * (proc - comp) / proc:.1f} % per-process overhead)")
    if args.total and comp > args.total:
        print(f"run wall time {args.total:.1f} s ({args.total / 60:.1f} min): {comp:.1f} s of compute in it, stages side by "
              f"side ({comp / args.total:.2f} x the wall)" + (f"; dvc repro alone {args.repro:.1f} s" if args.repro else ""))
    elif args.total:
        over = args.total - comp
        print(f"run wall time {args.total:.1f} s ({args.total / 60:.1f} min); orchestration overhead "
              f"(wall - compute) {over:.1f} s = {100 * over / args.total:.1f} %"
              + (f"; dvc repro alone {args.repro:.1f} s" if args.repro else ""))
    if all("startup_s" in r for r in recs):
        breakdown(recs, args.total, args.repro)


def breakdown(recs: list[dict], total: float | None, repro: float | None) -> None:
    """Where the non-compute seconds go, by cause (records of this version of flows/cli.py)."""
    startup = sum(r["startup_s"] for r in recs)
    prefect_import = sum(r["prefect_import_s"] for r in recs)
    mlflow = sum(r["mlflow_s"] for r in recs)
    rest = sum(r["main_s"] - r["compute_s"] - r["mlflow_s"] for r in recs)
    spans = sorted((r["start"], r["end"]) for r in recs)
    covered, reach = 0.0, spans[0][0]  # the union of the stage processes' spans (they may overlap: flows.repro)
    for a, b in spans:
        covered += max(0.0, b - max(a, reach))
        reach = max(reach, b)
    between = (spans[-1][1] - spans[0][0]) - covered  # no stage process alive: DVC, process exit + spawn
    busy = sum(b - a for a, b in spans)
    if busy > covered * 1.01:
        print(f"\nstages side by side: {busy:.1f} s of stage processes in {covered:.1f} s of wall "
              f"(on average {busy / covered:.2f} at a time); the rows below are summed over processes, so together "
              "they exceed the wall time")
    rows = [
        ("compute (inside tfmq calls)", sum(r["compute_s"] for r in recs)),
        ("process start-up: python + torch/diffusers/tfmq imports", startup),
        ("prefect import (flows/tasks modules)", prefect_import),
        ("in-process rest: Prefect flow/task runs, model + checkpoint loading, file writes", rest),
        ("MLflow logging", mlflow),
        ("between stage processes: DVC bookkeeping, process exit + spawn", between),
    ]
    if total and repro:
        rows.append(("before/after dvc repro: Prefect server start, this table", total - repro))
        rows.append(("dvc repro start + end (before the first / after the last stage)",
                     repro - (spans[-1][1] - spans[0][0])))
    width = max(len(n) for n, _ in rows)
    print(f"\n{'where the wall time goes':{width}s} {'s':>8s} {'% wall':>7s}")
    for name, sec in rows:
        print(f"{name:{width}s} {sec:8.1f} {100 * sec / total if total else float('nan'):7.1f}")


if __name__ == "__main__":
    main()
