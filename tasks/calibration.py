"""Calibration data task: the FP sampler's trajectories, recorded once and shared by every method.

Spec section 7: one pass per seed records the UNet inputs ``(x_t, t, cond)`` at every sampler step
(O(T) model calls). Each method then selects its rows: every k-th step (Q-Diffusion/TFMQ weight
set), all steps (FSC), or PTQ4DM's normal-distributed timesteps.
"""
from __future__ import annotations


from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed


def class_labels_for(unet, n: int, family=None):
    """Balanced class labels (sample j gets class j mod K) for class-conditional UNets, else None.

    K is the number of real classes: a trained null class (``family.null_class_label``) is never drawn."""
    import torch

    k = family.num_classes if family is not None and family.conditioning == "class" else \
        getattr(unet.config, "num_class_embeds", None)
    return None if not k else torch.arange(n, dtype=torch.int64) % int(k)


def guidance_kwargs(family, guidance_scale: float) -> dict:
    """``sample``/``capture`` keywords of a model's classifier-free guidance: the scale (1 = none) and null class."""
    g = family.guidance(guidance_scale)
    return {"guidance_scale": g, "null_class_label": family.null_class_label if g > 1.0 else None}


@pipeline_task
def calib_data(c, s, fp_dir: str, out_dir: str) -> str:
    """Record the FP sampler's UNet inputs at every step (the set every method selects from); ``c``: calib_data,
    ``s``: sampler. Latent models are calibrated in latent space; a guided model records the (null, conditional)
    rows of every CFG call at ``sampler.guidance_scale``."""
    from tfmq.diffusion.calibration import capture_calibration_data
    from tfmq.diffusion.models import load_fp_model
    from tfmq.diffusion.pipelines import read_family
    from tfmq.diffusion.sampling import make_scheduler

    dev = device()
    family = read_family(fp_dir)
    unet, train_sched = load_fp_model(fp_dir, dev)
    scheduler = make_scheduler(s.name, train_sched.config)
    with timed(COMPUTE_TIMES, "calib_data"):
        calib = capture_calibration_data(
            unet, scheduler, out_dir, num_samples=c.num_samples, num_inference_steps=s.num_inference_steps,
            batch_size=c.batch_size, seed=c.seed, eta=s.eta,
            class_labels=class_labels_for(unet, c.num_samples, family), device=dev, progress=show_progress(),
            **guidance_kwargs(family, s.guidance_scale))
    logger().info("calibration set (%s): %d steps x %d rows -> %s", family.name, calib.num_steps, calib.rows_per_step,
                  out_dir)
    return out_dir


def calib_shard(fp_dir: str, c: dict, s: dict, start: int, stop: int, out_dir: str, threads: int | None = 1) -> str:
    """Trajectories ``[start, stop)`` of ``calib_data``'s capture -> ``out_dir/shard_<start>_<stop>`` (a Dask task:
    plain arguments, ``c`` / ``s`` the calib_data / sampler sections as dicts; ``merge_calib_shards`` joins them)."""
    import os

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pathlib import Path

    from tfmq.diffusion.calibration import capture_calibration_data
    from tfmq.diffusion.models import load_fp_model
    from tfmq.diffusion.pipelines import read_family
    from tfmq.diffusion.sampling import make_scheduler

    family = read_family(fp_dir)
    unet, train_sched = load_fp_model(fp_dir, device())
    out = Path(out_dir) / f"shard_{start:07d}_{stop:07d}"
    capture_calibration_data(
        unet, make_scheduler(s["name"], train_sched.config), out, num_samples=c["num_samples"],
        num_inference_steps=s["num_inference_steps"], batch_size=c["batch_size"], seed=c["seed"], eta=s["eta"],
        class_labels=class_labels_for(unet, c["num_samples"], family), device=device(), progress=False,
        shard=(start, stop), **guidance_kwargs(family, s["guidance_scale"]))
    return str(out)


@pipeline_task
def merge_calib_shards(paths: list[str], out_dir: str) -> str:
    """Join the calibration shards of ``calib_shard`` into ``out_dir``: the set an unsharded capture records."""
    from tfmq.diffusion.calibration import merge_calibration_shards

    with timed(COMPUTE_TIMES, "calib_data"):
        calib = merge_calibration_shards(paths, out_dir)
    logger().info("calibration set from %d shards: %d steps x %d rows -> %s", len(paths), calib.num_steps,
                  calib.rows_per_step, out_dir)
    return out_dir
