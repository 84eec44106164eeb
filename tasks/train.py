"""FP training tasks: the embedded pixel DDPMs, the VQ autoencoder and the latent UNets on its latents.

Training costs ~20 min of CPU, so the trained checkpoints are committed (DVC outs with
``cache: false``) and a fresh clone re-uses them; ``dvc repro -f train_fp`` re-trains.
"""
from __future__ import annotations

from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed


@pipeline_task
def train_fp(cfg_section, data_path: str, section: str = "train_fp") -> str:
    """Train one FP DDPM (``train_fp``: unconditional, ``train_fp_class``: class-conditional)."""
    from tfmq.diffusion.data import load_dataset
    from tfmq.diffusion.training import TrainConfig, train_ddpm

    cfg_d = cfg_section.model_dump()
    out_dir = cfg_d.pop("out_dir")
    cfg = TrainConfig(**cfg_d)
    d = load_dataset(data_path)
    with timed(COMPUTE_TIMES, section):
        log = train_ddpm(d["train_images"], d["train_labels"], cfg, out_dir, device=device(), progress=show_progress())
    logger().info("%s: %d steps, final loss %s -> %s", section, cfg.steps, log.get("final_loss"), out_dir)
    return out_dir


@pipeline_task
def train_latent(cfg_section, data_path: str, section: str, autoencoder_dir: str, guidance_scale: float) -> str:
    """Train a latent UNet (``train_ldm`` / ``train_ldm_class``) on the autoencoder's latents; an LDMPipeline folder."""
    from tfmq.diffusion.data import load_dataset
    from tfmq.diffusion.training import TrainConfig, train_latent_ddpm

    cfg_d = cfg_section.model_dump()
    out_dir = cfg_d.pop("out_dir")
    cfg = TrainConfig(**cfg_d)
    d = load_dataset(data_path)
    with timed(COMPUTE_TIMES, section):
        log = train_latent_ddpm(d["train_images"], d["train_labels"], cfg, autoencoder_dir, out_dir,
                                guidance_scale=guidance_scale, device=device(), progress=show_progress())
    logger().info("%s: %d steps, final loss %s -> %s", section, cfg.steps, log.get("final_loss"), out_dir)
    return out_dir


@pipeline_task
def train_text(cfg_section, data_path: str, vae_dir: str, guidance_scale: float) -> str:
    """Train the text-guided latent UNet (``train_sd``) on the VAE's latents; a StableDiffusionPipeline folder."""
    from tfmq.diffusion.data import FASHION_MNIST_CLASSES, load_dataset
    from tfmq.diffusion.training import TrainConfig, train_text_ddpm

    cfg_d = cfg_section.model_dump()
    out_dir = cfg_d.pop("out_dir")
    dropout, text_encoder = cfg_d.pop("prompt_dropout"), cfg_d.pop("text_encoder")
    cfg = TrainConfig(**cfg_d)
    d = load_dataset(data_path)
    with timed(COMPUTE_TIMES, "train_sd"):
        log = train_text_ddpm(d["train_images"], d["train_labels"], cfg, vae_dir, out_dir, FASHION_MNIST_CLASSES,
                              prompt_dropout=dropout, text_encoder=text_encoder, guidance_scale=guidance_scale,
                              device=device(), progress=show_progress())
    logger().info("train_sd: %d steps, final loss %s -> %s", cfg.steps, log.get("final_loss"), out_dir)
    return out_dir
