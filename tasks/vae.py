"""VAE task: the text-guided family's ``AutoencoderKL`` (Stable Diffusion's first stage in miniature), trained once
and committed. Its own module so that the ``train_vae`` stage depends on the VAE code only."""
from __future__ import annotations

from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed


@pipeline_task
def train_vae(cfg_section, data_path: str) -> str:
    """Train the KL autoencoder of the text-guided family (``vae``); reports its test PSNR."""
    from tfmq.diffusion.data import load_dataset
    from tfmq.diffusion.vae import KLAutoencoderConfig, train_kl_autoencoder

    cfg_d = cfg_section.model_dump()
    out_dir = cfg_d.pop("out_dir")
    d = load_dataset(data_path)
    with timed(COMPUTE_TIMES, "train_vae"):
        log = train_kl_autoencoder(d["train_images"], KLAutoencoderConfig(**cfg_d), out_dir, d["test_images"],
                                   device=device(), progress=show_progress())
    logger().info("vae: %d steps, test PSNR %.2f dB -> %s", cfg_d["steps"], log.get("test_psnr_db", float("nan")), out_dir)
    return out_dir
