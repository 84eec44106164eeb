"""``dvc repro`` with independent stages run side by side: ``python -m flows.repro --jobs 2 [targets]``.

DVC runs one stage at a time, and one stage of this pipeline keeps about one core busy: torch's second
thread buys 1.19x on a quantize call of the embedded models (many small kernels), a second stage beside it
1.76x (benchmarks/bench_stage_threads.py). So on a 2-core machine one stage at a time leaves a core idle. DVC itself allows
concurrent ``dvc repro`` processes: it releases the repository lock while a stage's command runs and keeps
per-output read/write locks (``dvc --wait-for-lock repro --single-item <stage>`` waits for the lock instead
of failing). This runner:

1. asks ``dvc repro --dry`` which stages would run, and in what order;
2. runs them as ``dvc --wait-for-lock repro --single-item <stage>`` processes, at most ``--jobs`` at a time,
   a stage starting only once every stage it depends on (DVC's graph: deps on outputs) has finished;
   among ready stages the dry run's order decides, except that a PTQD stage waits for its Q-Diffusion
   stage (it adopts that one's finished model from the shared store: ``quant_out.shared_weights``);
3. ends with a plain ``dvc repro`` of the same targets, which finds everything up to date (or runs what
   is left, one at a time), so ``dvc.lock`` is exactly what a serial run writes.

Each stage gets ``TFMQ_TORCH_THREADS`` = cores // jobs (at least 1) unless the caller set it: two
2-thread processes on 2 cores oversubscribe them (OpenMP threads then wait on each other: 4.7x slower per
process, same benchmark). The numbers do not change: every stage computes what it computes serially (the shared-store
entries are keyed by content and taken under a lock; docs/method.md section 12). A stage that fails stops
new starts; the runner waits for the running ones and exits with the failed stage's code.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

_RUNNING = re.compile(r"^Running stage '([^']+)'", re.M)


def planned_stages(targets: list[str], extra: list[str]) -> list[str]:
    """The stages ``dvc repro [targets]`` would run, in its order (``dvc repro --dry``). A dry run cannot look
    past a stage whose input is not there yet (a fresh clone before training): then every stage of the
    targets, dependencies first in dvc.yaml's order, and each ``--single-item`` run skips what is unchanged."""
    out = subprocess.run(["dvc", "repro", "--dry", *extra, *targets], capture_output=True, text=True)
    if out.returncode == 0:
        return _RUNNING.findall(out.stdout)
    return all_stages(targets)


def _graph():
    from dvc.repo import Repo

    with Repo(".") as repo:
        graph = repo.index.graph  # edges stage -> the stages whose outputs it reads
        position = {s.addressing: i for i, s in enumerate(repo.index.stages)}
        return graph, position


def all_stages(targets: list[str]) -> list[str]:
    """Every stage ``targets`` need (all stages without targets), dependencies first, else in dvc.yaml's order."""
    import networkx as nx

    graph, position = _graph()
    by_name = {s.addressing: s for s in graph.nodes}
    picked = [s for t in targets for n, s in by_name.items() if n == t or n.startswith(t + "@")]
    if targets and not picked:
        print(f"flows.repro: no stage named {' or '.join(targets)} in dvc.yaml", file=sys.stderr)
        raise SystemExit(2)
    nodes = set(graph.nodes) if not targets else set().union(*({s} | nx.descendants(graph, s) for s in picked))
    sub = graph.subgraph(nodes).reverse()  # dependencies first
    return [s.addressing for s in nx.lexicographical_topological_sort(sub, key=lambda s: position[s.addressing])]


def upstream(stages: list[str]) -> dict[str, set[str]]:
    """For each stage of ``stages``: the stages of ``stages`` it depends on, directly or through others."""
    import networkx as nx

    graph, _ = _graph()
    by_name = {s.addressing: s for s in graph.nodes}
    wanted = set(stages)
    return {name: {d.addressing for d in nx.descendants(graph, by_name[name])} & wanted for name in stages}


def _partner(stage: str) -> str | None:
    """The Q-Diffusion stage whose finished model a PTQD stage adopts (``run@m-ptqd-W4A8`` -> ``run@m-qdiffusion-W4A8``)."""
    return re.sub(r"(?<=[@-])ptqd(?=-)", "qdiffusion", stage) if re.search(r"[@-]ptqd-", stage) else None


def pick(ready: list[str], pending: list[str], running: set[str]) -> str | None:
    """The next stage to start: the first ready one, a PTQD stage only once its Q-Diffusion stage has finished
    (else it would wait on the store's lock, holding a slot), unless nothing else is ready."""
    busy = {*pending, *running}
    for s in ready:
        if _partner(s) not in busy:
            return s
    return ready[0] if ready else None


def run(targets: list[str], jobs: int, extra: list[str]) -> int:
    order = planned_stages(targets, extra)
    if not order:
        print("[tfmq] repro: nothing to run", flush=True)
        return subprocess.call(["dvc", "repro", *extra, *targets])
    deps = upstream(order)
    env = dict(os.environ)
    if jobs > 1:
        env.setdefault("TFMQ_TORCH_THREADS", str(max(1, len(os.sched_getaffinity(0)) // jobs)))
    print(f"[tfmq] repro: {len(order)} stages, up to {jobs} at a time "
          f"({env.get('TFMQ_TORCH_THREADS', 'default')} torch thread(s) each)", flush=True)
    pending, done, running = list(order), set(), {}
    failed: tuple[str, int] | None = None
    t0 = time.perf_counter()
    while pending or running:
        while failed is None and len(running) < jobs:
            ready = [s for s in pending if deps[s] <= done]
            s = pick(ready, pending, set(running))
            if s is None:
                break
            pending.remove(s)
            running[s] = subprocess.Popen(["dvc", "--wait-for-lock", "repro", "--single-item", *extra, s], env=env)
            print(f"[tfmq] repro: start {s} ({time.perf_counter() - t0:.0f} s; {len(running)} running)", flush=True)
        if failed is not None and not running:
            break
        time.sleep(0.2)
        for s, p in list(running.items()):
            code = p.poll()
            if code is None:
                continue
            del running[s]
            if code == 0:
                done.add(s)
                print(f"[tfmq] repro: done {s} ({time.perf_counter() - t0:.0f} s)", flush=True)
            elif failed is None:
                failed = (s, code)
                print(f"[tfmq] repro: {s} failed (exit {code}); waiting for the running stages", flush=True)
    if failed is not None:
        return failed[1]
    return subprocess.call(["dvc", "repro", *targets])  # everything up to date (never --force here): as a serial run leaves it


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", help="dvc repro targets (default: the whole pipeline)")
    ap.add_argument("--jobs", "-j", type=int, default=len(os.sched_getaffinity(0)),
                    help="stages at a time (default: the cores this process may use)")
    ap.add_argument("--force", "-f", action="store_true", help="dvc repro --force")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        print(f"--jobs {args.jobs}: expected 1 or more", file=sys.stderr)
        return 2
    if not Path("dvc.yaml").is_file():
        print("flows.repro: no dvc.yaml here; run it from the repository root", file=sys.stderr)
        return 2
    extra = ["--force"] if args.force else []
    if args.jobs == 1:
        return subprocess.call(["dvc", "repro", *extra, *args.targets])
    return run(args.targets, args.jobs, extra)


if __name__ == "__main__":
    raise SystemExit(main())
