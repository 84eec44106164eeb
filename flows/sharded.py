"""Sharded sampling, scoring and calibration capture, mapped over Dask through Prefect.

``sample_shards`` cuts a setting's evaluation job (``tfmq.evaluation.job.EvalJob``) into shards
(``EvalJob.shard_bounds``, on batch boundaries) and maps ``tasks.shards.sample_shard`` over them with Prefect's ``DaskTaskRunner``;
``tasks.evaluate.score_shards`` merges the shard files into the evaluate stage's outputs, the same as
an unsharded run (``scale_out.shards: 1``, one shard in the stage's own process). ``calib_shards`` does
the same for the FP calibration trajectories of a ``tfmq.diffusion.jobs.CalibJob`` (``tasks.calibration.calib_shard``, merged by
``merge_calib_shards``). ``sharded_scores`` is the bare FID / sFID / KID / IS of one model (benchmarks,
tests). Tasks pass paths, never tensors.

Where the work runs: ``address`` (or ``TFMQ_DASK_ADDRESS``) names an existing Dask scheduler (a
cluster of GPU workers, dask-jobqueue, Kubernetes); without one, a ``LocalCluster`` on 127.0.0.1
with ``workers`` processes of ``threads`` torch threads each, sized by default so that
``workers x threads`` is the number of cores (never oversubscribed).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, task

from tasks import calibration as calib_tasks
from tasks import shards as shard_tasks
from tfmq.diffusion.jobs import CalibJob
from tfmq.evaluation.job import EvalJob, feature_layers, shard_bounds
from tfmq.evaluation.reference_stats import ReferenceStats
from tfmq.evaluation.shards import load_shard, merge_shards, metrics_from_shards

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


def sample_shards(job: EvalJob, num_shards: int, out_dir: str, address: str | None = None,
                  workers: int | None = None, threads: int = 1, plain: bool = False) -> list[str]:
    """One evaluate stage's samples as ``num_shards`` tasks over the library job (``tasks.evaluate.eval_job``)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    jobs = [{"job": job, "start": a, "stop": b, "out_dir": out_dir, "threads": threads}
            for a, b in job.shard_bounds(num_shards)]
    return run_shards("sample", jobs, address, workers, threads, plain)


def calib_shards(job: CalibJob, num_shards: int, out_dir: str, address: str | None = None, workers: int | None = None,
                 threads: int = 1, plain: bool = False) -> list[str]:
    """One model's calibration trajectories as ``num_shards`` tasks over the library job (``tasks.calibration.calib_job``)."""
    bounds = shard_bounds(job.num_samples, num_shards, job.batch_size)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    jobs = [{"job": job, "start": a, "stop": b, "out_dir": out_dir, "threads": threads} for a, b in bounds]
    return run_shards("calib", jobs, address, workers, threads, plain)


def sharded_scores(job: EvalJob, num_shards: int, reference: str, out_dir: str, address: str | None = None,
                   workers: int | None = None, threads: int = 1, kid_subsets: int = 100,
                   kid_subset_size: int = 1000) -> dict[str, Any]:
    """FID / sFID / KID / IS of ``job``'s samples, computed as ``num_shards`` Dask tasks and merged:
    ``{"n", "shards", "fid", "sfid", "kid_mean", "kid_std", "is", "is_std"}``, equal to the unsharded
    ``compute_metrics`` on the same samples to float64 round-off."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    paths = run_shards("sample", [{"job": job, "start": a, "stop": b, "out_dir": out_dir, "threads": threads}
                                  for a, b in job.shard_bounds(num_shards)], address, workers, threads)
    layers = feature_layers(job.extractor)
    values = metrics_from_shards(merge_shards(load_shard(p) for p in paths), ReferenceStats.load(reference),
                                 layers["fid"], layers["spatial"], layers["logits"], kid_subsets=kid_subsets,
                                 kid_subset_size=kid_subset_size)
    return {"n": job.num_samples, "shards": len(paths), **values}
