"""The autoencoder of the text-guided family: a diffusers ``AutoencoderKL`` in the role of Stable Diffusion's VAE.

Stable Diffusion v1.x runs its UNet on ``z = vae.encode(x).latent_dist.sample() * 0.18215`` (a
KL-regularised autoencoder, 4 latent channels, downsampling 8) and decodes ``vae.decode(z / 0.18215)``.
The embedded default mirrors it on Fashion-MNIST: images padded 28 -> 32 like the latent family's
VQ autoencoder, three levels (32 -> 8, a factor of 4: our images are 28 pixels, not 512), 4 latent
channels, the KL term weighted like SD's first stage (a small ``kl_weight`` against the
reconstruction loss), and ``scaling_factor = 1 / std`` of the training latents (SD's 0.18215 was
measured the same way). :func:`tfmq.diffusion.autoencoder.encode` / ``decode`` serve both kinds
(the posterior's mode is the latent, as in SD's img2img path with a fixed seed).

Only the UNet is ever quantized; the autoencoder stays in full precision (docs/method.md section 10).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from tfmq.diffusion.autoencoder import check_autoencoder_config, decode, encode, pad_images, psnr
from tfmq.diffusion.data import to_model_range
from tfmq.diffusion.sampling import save_grid
from tfmq.io import atomic_dir, atomic_write_json


@dataclass
class KLAutoencoderConfig:
    """Architecture and recipe of the embedded ``AutoencoderKL`` (params.yaml ``vae``).

    Attributes:
        pad_to: images are padded (background -1) to this square size; decoded images are cropped back.
        block_out_channels: one entry per level; ``len - 1`` downsamplings (3 levels: f4).
        latent_channels: 4, as Stable Diffusion.
        kl_weight: weight of the KL term against the L1 + L2 reconstruction loss (SD's first stage: 1e-6
            against its perceptual loss; larger here because the reconstruction loss is per pixel mean).
        steps, batch_size, lr, seed: AdamW training (cosine decay after a 100-step warm-up).
    """

    pad_to: int = 32
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 4
    kl_weight: float = 1e-4
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        check_autoencoder_config(self)
        if not (self.kl_weight >= 0 and math.isfinite(self.kl_weight)):
            raise ValueError(f"KLAutoencoderConfig.kl_weight={self.kl_weight} must be a finite number >= 0, e.g. 1e-4")


def build_kl_autoencoder(cfg: KLAutoencoderConfig, in_channels: int = 1, *, seed: int | None = None) -> AutoencoderKL:
    """A freshly initialised ``AutoencoderKL`` of ``cfg``'s architecture (float32, CPU)."""
    if seed is not None:
        torch.manual_seed(seed)
    levels = len(cfg.block_out_channels)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels,
                         down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                         block_out_channels=cfg.block_out_channels, layers_per_block=1,
                         latent_channels=cfg.latent_channels, norm_num_groups=math.gcd(*cfg.block_out_channels, 32),
                         sample_size=cfg.pad_to, scaling_factor=1.0)


def train_kl_autoencoder(train_images_uint8: torch.Tensor, cfg: KLAutoencoderConfig, out_dir: str | os.PathLike,
                         test_images_uint8: torch.Tensor | None = None, device: str = "cpu",
                         progress: bool = True) -> dict[str, Any]:
    """Train the KL autoencoder and write ``out_dir`` (replaced whole): ``vae/`` (``AutoencoderKL``, safetensors,
    ``scaling_factor`` = 1/std of the training latents), ``train_log.json`` and ``reconstructions.png``.

    Loss: L1 + L2 of the reconstruction of a posterior sample + ``kl_weight`` x the KL to N(0, I) (mean per
    latent element). Returns the train log (with the test PSNR when test images are given).
    """
    images = train_images_uint8 if train_images_uint8.dim() == 4 else train_images_uint8.unsqueeze(1)
    if images.dtype != torch.uint8:
        raise ValueError(f"train_images_uint8 has dtype {images.dtype}, expected uint8")
    data_size = tuple(images.shape[-2:])
    vae = build_kl_autoencoder(cfg, images.shape[1], seed=cfg.seed).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr_at = lambda k: min(1.0, (k + 1) / 100) * (0.5 * (1 + math.cos(math.pi * min(k, cfg.steps) / cfg.steps)) * 0.9 + 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = images.shape[0]
    curve, window = [], []
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc="vae", disable=not progress, mininterval=2.0)
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x = pad_images(to_model_range(images[idx]), cfg.pad_to).to(device)
        post = vae.encode(x).latent_dist
        eps = torch.randn(post.mean.shape, generator=gen).to(device)
        z = post.mean + post.std * eps
        out = vae.decode(z).sample
        rec = F.l1_loss(out, x) + F.mse_loss(out, x)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"vae loss became {value} at step {step}; lower vae.lr")
        window.append(float(rec.detach()))
        if step % 50 == 0 or step == cfg.steps:
            curve.append({"step": step, "recon_loss": sum(window) / len(window), "kl": float(kl.detach()),
                          "wall_s": round(time.perf_counter() - t0, 2)})
            window = []
            bar.set_postfix(rec=f"{curve[-1]['recon_loss']:.4f}")
    wall = time.perf_counter() - t0
    vae.eval().requires_grad_(False)
    sub = images[torch.randperm(n, generator=gen)[: min(n, 4096)]]
    h = encode(vae, to_model_range(sub), pad_to=cfg.pad_to)
    vae.register_to_config(scaling_factor=float(1.0 / h.double().std()))
    log: dict[str, Any] = {"config": dataclasses.asdict(cfg), "loss_curve": curve, "wall_seconds": round(wall, 2),
                           "latent_std_unscaled": float(h.double().std()), "scaling_factor": vae.config.scaling_factor,
                           "latent_shape": list(h.shape[1:]), "data_size": list(data_size),
                           "num_params": sum(p.numel() for p in vae.parameters()),
                           "torch_threads": torch.get_num_threads(), "diffusers_version": diffusers.__version__}
    with atomic_dir(out_dir) as tmp:
        vae.save_pretrained(tmp / "vae", safe_serialization=True)
        src = images if test_images_uint8 is None else (
            test_images_uint8 if test_images_uint8.dim() == 4 else test_images_uint8.unsqueeze(1))
        x = to_model_range(src[:32])
        save_grid(torch.cat([x, decode(vae, encode(vae, x, pad_to=cfg.pad_to), crop=data_size)]),
                  tmp / "reconstructions.png", nrow=8, scale=2)
        if test_images_uint8 is not None:
            xt = to_model_range(src[:2000])
            p = psnr(decode(vae, encode(vae, xt, pad_to=cfg.pad_to), crop=data_size), xt)
            log["test_psnr_db"] = float(p.mean())
            log["test_psnr_n"] = int(p.numel())
        atomic_write_json(log, tmp / "train_log.json")
    return log
