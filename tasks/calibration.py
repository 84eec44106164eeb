"""Calibration data task: the FP sampler's trajectories, recorded once and shared by every method.

Spec section 7: one pass per seed records the UNet inputs ``(x_t, t, cond)`` at every sampler step
(O(T) model calls). Each method then selects its rows: every k-th step (Q-Diffusion/TFMQ weight
set), all steps (FSC), or PTQ4DM's normal-distributed timesteps.
"""
from __future__ import annotations


from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed


def class_labels_for(unet, n: int):
    """Balanced class labels (sample j gets class j mod K) for class-conditional UNets, else None."""
    import torch

    k = getattr(unet.config, "num_class_embeds", None)
    return None if not k else torch.arange(n, dtype=torch.int64) % int(k)


@pipeline_task
def calib_data(c, s, fp_dir: str) -> str:
    """Record the FP sampler's UNet inputs at every step (the set every method selects from); ``c``: calib_data, ``s``: sampler."""
    from tfmq.diffusion.calibration import capture_calibration_data
    from tfmq.diffusion.models import load_fp_model
    from tfmq.diffusion.sampling import make_scheduler

    dev = device()
    unet, train_sched = load_fp_model(fp_dir, dev)
    scheduler = make_scheduler(s.name, train_sched.config)
    with timed(COMPUTE_TIMES, "calib_data"):
        calib = capture_calibration_data(
            unet, scheduler, c.out_dir, num_samples=c.num_samples, num_inference_steps=s.num_inference_steps,
            batch_size=c.batch_size, seed=c.seed, eta=s.eta,
            class_labels=class_labels_for(unet, c.num_samples), device=dev, progress=show_progress())
    logger().info("calibration set: %d steps x %d rows -> %s", calib.num_steps, calib.rows_per_step, c.out_dir)
    return c.out_dir
