"""Shard tasks of a sharded evaluation: a Dask worker runs the library's ``run_eval_shard`` on its index range.

The job (``tfmq.evaluation.job.EvalJob``) is a frozen, picklable object; a worker loads the model folder
(and the quantized checkpoint) itself and returns the path of the shard it wrote. ``EvalJob.shard_bounds``
cuts ``[0, N)`` at multiples of the sampling and feature batch sizes, so every batch of a shard is a batch
of the unsharded run and its images and features are bit-identical to it.
"""
from __future__ import annotations

from tasks.common import device
from tfmq.evaluation.job import EvalJob, run_eval_shard


def sample_shard(job: EvalJob, start: int, stop: int, out_dir: str, threads: int | None = 1) -> str:
    """Samples ``[start, stop)`` of ``job`` -> ``out_dir/shard_<start>_<stop>``; ``threads``: torch threads of this
    worker process (``None``: leave them)."""
    return run_eval_shard(job, start, stop, out_dir, device=device(), threads=threads)
