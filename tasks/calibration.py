"""Calibration data task: the FP sampler's trajectories, recorded once and shared by every method.

Spec section 7: one pass per seed records the UNet inputs ``(x_t, t, cond)`` at every sampler step
(O(T) model calls). Each method then selects its rows: every k-th step (Q-Diffusion/TFMQ weight
set), all steps (FSC), or PTQ4DM's normal-distributed timesteps.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed
from tfmq.diffusion.calibration import merge_calibration_shards
from tfmq.diffusion.jobs import CalibJob, SamplerRun, run_calibration
from tfmq.diffusion.pipelines import read_family


def calib_job(c, s, fp_dir: str) -> CalibJob:
    """The library job of a model's calibration capture (``c``: the calib_data section, ``s``: the sampler's)."""
    return CalibJob(fp_dir=fp_dir, num_samples=c.num_samples, batch_size=c.batch_size, seed=c.seed,
                    sampler=SamplerRun(s.name, s.num_inference_steps, s.eta, s.guidance_scale), prompts=c.prompts)


@pipeline_task
def calib_data(c, s, fp_dir: str, out_dir: str) -> str:
    """Record the FP sampler's UNet inputs at every step (the set every method selects from); ``c``: calib_data,
    ``s``: sampler. Latent models are calibrated in latent space; a guided model records the (null, conditional)
    rows of every CFG call at ``sampler.guidance_scale``; a text-guided one samples the prompts of
    ``calib_data.prompts`` against ``""``."""
    with timed(COMPUTE_TIMES, "calib_data"):
        calib = run_calibration(calib_job(c, s, fp_dir), out_dir, device=device(), progress=show_progress())
    logger().info("calibration set (%s): %d steps x %d rows -> %s", read_family(fp_dir).name, calib.num_steps,
                  calib.rows_per_step, out_dir)
    return out_dir


def calib_shard(job: CalibJob, start: int, stop: int, out_dir: str, threads: int | None = 1) -> str:
    """Trajectories ``[start, stop)`` of ``job`` -> ``out_dir/shard_<start>_<stop>`` (a Dask task;
    ``merge_calib_shards`` joins them)."""
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir) / f"shard_{start:07d}_{stop:07d}"
    run_calibration(job, out, shard=(start, stop), device=device())
    return str(out)


@pipeline_task
def merge_calib_shards(paths: list[str], out_dir: str) -> str:
    """Join the calibration shards of ``calib_shard`` into ``out_dir``: the set an unsharded capture records."""
    with timed(COMPUTE_TIMES, "calib_data"):
        calib = merge_calibration_shards(paths, out_dir)
    logger().info("calibration set from %d shards: %d steps x %d rows -> %s", len(paths), calib.num_steps,
                  calib.rows_per_step, out_dir)
    return out_dir
