"""Sharded sampling, scoring and calibration capture, mapped over Dask through Prefect.

``sample_shards`` cuts a setting's ``eval.num_samples`` into shards (``tasks.shards.shard_bounds``, on
batch boundaries) and maps ``tasks.shards.sample_shard`` over them with Prefect's ``DaskTaskRunner``;
``tasks.evaluate.score_shards`` merges the shard files into the evaluate stage's outputs, the same as
an unsharded run (``scale_out.shards: 1``, one shard in the stage's own process). ``calib_shards`` does
the same for the FP calibration trajectories (``tasks.calibration.calib_shard``, merged by
``merge_calib_shards``). ``sharded_scores`` is the bare FID / sFID / KID / IS of one model (benchmarks,
tests). Tasks pass paths, never tensors.

Where the work runs: ``address`` (or ``TFMQ_DASK_ADDRESS``) names an existing Dask scheduler (a
cluster of GPU workers, dask-jobqueue, Kubernetes); without one, a ``LocalCluster`` on 127.0.0.1
with ``workers`` processes of ``threads`` torch threads each, sized by default so that
``workers x threads`` is the number of cores (never oversubscribed).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from prefect import flow, task

from tasks import calibration as calib_tasks
from tasks import shards as shard_tasks

ADDRESS_ENV = "TFMQ_DASK_ADDRESS"


def task_runner(address: str | None = None, workers: int | None = None, threads: int = 1):
    """Prefect's ``DaskTaskRunner``: on ``address`` if given (or ``$TFMQ_DASK_ADDRESS``), else a loopback LocalCluster."""
    from prefect_dask import DaskTaskRunner

    address = address or os.environ.get(ADDRESS_ENV)
    if address:
        return DaskTaskRunner(address=address)
    workers = workers or max(1, (os.cpu_count() or 1) // threads)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                          "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})


sample_shard = task(shard_tasks.sample_shard, name="sample-shard", retries=1)
calib_shard = task(calib_tasks.calib_shard, name="calib-shard", retries=1)
_SHARD_TASKS = {"sample": sample_shard, "calib": calib_shard}


@flow(name="shards", validate_parameters=False)
def _map_shards(kind: str, jobs: list[dict[str, Any]]) -> list[str]:
    futures = [_SHARD_TASKS[kind].submit(**job) for job in jobs]
    return [f.result() for f in futures]


def run_shards(kind: str, jobs: list[dict[str, Any]], address: str | None = None, workers: int | None = None,
               threads: int = 1, plain: bool = False) -> list[str]:
    """The shard files of ``jobs`` (keyword arguments of ``sample_shard`` / ``calib_shard``), in job order.

    ``plain``: one after another in this process (no Prefect, no Dask: ``--no-prefect``), same files."""
    if plain:
        return [_SHARD_TASKS[kind].fn(**{**job, "threads": None}) for job in jobs]
    flow_ = _map_shards.with_options(task_runner=task_runner(address, workers, threads),
                                     flow_run_name=f"{kind}-shards-{len(jobs)}")
    return flow_(kind, jobs)


def sample_shards(job: dict[str, Any], num_shards: int, out_dir: str, address: str | None = None,
                  workers: int | None = None, threads: int = 1, plain: bool = False) -> list[str]:
    """One evaluate stage's samples as ``num_shards`` tasks: ``job`` is ``tasks.evaluate.shard_job``'s."""
    e = job["e"]
    bounds = shard_tasks.shard_bounds(job["num_samples"], num_shards,
                                      math.lcm(e["batch_size"], e.get("feature_batch_size", e["batch_size"])))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    jobs = [{**job, "start": a, "stop": b, "out_dir": out_dir, "threads": threads} for a, b in bounds]
    return run_shards("sample", jobs, address, workers, threads, plain)


def calib_shards(fp_dir: str, c: dict[str, Any], s: dict[str, Any], num_shards: int, out_dir: str,
                 address: str | None = None, workers: int | None = None, threads: int = 1,
                 plain: bool = False) -> list[str]:
    """One model's calibration trajectories as ``num_shards`` tasks (``c``: calib_data, ``s``: sampler, as dicts)."""
    bounds = shard_tasks.shard_bounds(c["num_samples"], num_shards, c["batch_size"])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    jobs = [{"fp_dir": fp_dir, "c": c, "s": s, "start": a, "stop": b, "out_dir": out_dir, "threads": threads}
            for a, b in bounds]
    return run_shards("calib", jobs, address, workers, threads, plain)


@flow(name="sharded-scores", validate_parameters=False)
def _sharded(fp_dir: str, checkpoint: str | None, num_samples: int, num_shards: int, e: dict[str, Any],
             sampler: dict[str, Any], reference: str, out_dir: str, threads: int) -> dict[str, Any]:
    align = math.lcm(e["batch_size"], e["feature_batch_size"])
    bounds = shard_tasks.shard_bounds(num_samples, num_shards, align)
    futures = [sample_shard.submit(fp_dir, checkpoint, a, b, num_samples, e, sampler, out_dir, threads) for a, b in bounds]
    paths = [f.result() for f in futures]
    return shard_tasks.merged_metrics(paths, reference, e["extractor"], e.get("kid_subsets", 100),
                                      e.get("kid_subset_size", 1000))


def sharded_scores(fp_dir: str, checkpoint: str | None, num_samples: int, num_shards: int, e: dict[str, Any],
                   sampler: dict[str, Any], reference: str, out_dir: str, address: str | None = None,
                   workers: int | None = None, threads: int = 1) -> dict[str, Any]:
    """FID / sFID / KID / IS of ``num_samples`` samples of one model, computed as ``num_shards`` Dask tasks.

    Returns ``{"n", "shards", "fid", "sfid", "kid_mean", "kid_std", "is", "is_std"}`` (the keys the
    extractor offers). With shard boundaries at multiples of both batch sizes every number equals
    the unsharded ``compute_metrics`` on the same samples to float64 round-off.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    runner = task_runner(address, workers, threads)
    return _sharded.with_options(task_runner=runner)(fp_dir, checkpoint, num_samples, num_shards, e, sampler,
                                                     reference, out_dir, threads)
