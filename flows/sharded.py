"""Sharded sampling + feature extraction of one setting, mapped over Dask through Prefect.

``sharded_scores`` cuts the setting's ``num_samples`` into shards (``tasks.shards.shard_bounds``),
maps ``sample_shard`` over them with Prefect's ``DaskTaskRunner`` and merges the shard files into
FID / sFID / KID / IS (``tfmq.evaluation.shards``). Tasks pass paths, never tensors.

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
