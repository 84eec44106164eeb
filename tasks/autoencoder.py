"""Autoencoder task: the latent family's VQ autoencoder (LDM-4's VQ-f4 in miniature), trained once and committed.

Its own module so that the ``train_autoencoder`` stage depends on the autoencoder code only, not on
the UNet training code (a change there must not re-train the committed autoencoder).
"""
from __future__ import annotations

from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed


@pipeline_task
def train_autoencoder(cfg_section, data_path: str) -> str:
    """Train the VQ autoencoder of the latent family (``autoencoder``); reports its test PSNR."""
    from tfmq.diffusion.autoencoder import AutoencoderConfig, train_autoencoder as train
    from tfmq.diffusion.data import load_dataset

    cfg_d = cfg_section.model_dump()
    out_dir = cfg_d.pop("out_dir")
    d = load_dataset(data_path)
    with timed(COMPUTE_TIMES, "train_autoencoder"):
        log = train(d["train_images"], AutoencoderConfig(**cfg_d), out_dir, d["test_images"], device=device(),
                    progress=show_progress())
    logger().info("autoencoder: %d steps, test PSNR %.2f dB -> %s", cfg_d["steps"], log.get("test_psnr_db", float("nan")),
                  out_dir)
    return out_dir
