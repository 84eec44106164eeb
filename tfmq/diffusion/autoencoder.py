"""The autoencoder of the latent family: a diffusers ``VQModel`` in the role of LDM-4's VQ-f4.

LDM-4 (Rombach et al. 2022) runs its UNet on the latents of a VQ-regularised autoencoder that
downsamples by 4. The embedded default mirrors it on Fashion-MNIST: images padded from 28x28 to
32x32 (with the background value), a three-level ``VQModel`` (two downsamplings: 32 -> 8), latents
8x8 with ``latent_channels`` channels and a ``num_vq_embeddings``-entry codebook. The diffusion
runs on ``z = encode(x).latents * scaling_factor`` with ``scaling_factor = 1 / std`` measured on
the training latents (so z has unit variance, like the LDM latents the schedules were made for),
and images come back as ``decode(z / scaling_factor)``: exactly what ``diffusers.LDMPipeline``
does with ``vqvae.config.scaling_factor``, so a folder we write samples the same in diffusers.

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
from diffusers import VQModel
from tqdm.auto import tqdm

from tfmq.diffusion.data import to_model_range
from tfmq.diffusion.sampling import save_grid
from tfmq.io import atomic_dir, atomic_write_json


def check_autoencoder_config(cfg, counts: tuple[str, ...] = ()) -> None:
    """The checks a VQ and a KL autoencoder config share (``block_out_channels`` made a tuple of ints in place):
    ``pad_to``, ``latent_channels``, ``steps``, ``batch_size`` and ``counts`` >= 1, channel counts divisible by 8,
    ``pad_to`` divisible by the downsampling factor, a positive finite ``lr``. Errors name the config class."""
    who = type(cfg).__name__
    cfg.block_out_channels = tuple(int(c) for c in cfg.block_out_channels)
    for name in ("pad_to", "latent_channels", *counts, "steps", "batch_size"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{who}.{name}={getattr(cfg, name)} must be >= 1")
    if not cfg.block_out_channels or any(c < 1 or c % 8 for c in cfg.block_out_channels):
        raise ValueError(f"{who}.block_out_channels={cfg.block_out_channels}: expected a non-empty "
                         "list of channel counts divisible by 8 (GroupNorm groups), e.g. [16, 32, 32]")
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if cfg.pad_to % factor:
        raise ValueError(f"{who}.pad_to={cfg.pad_to} is not divisible by the downsampling factor "
                         f"{factor} of {len(cfg.block_out_channels)} levels")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ValueError(f"{who}.lr={cfg.lr} must be a positive finite number, e.g. 1e-3")


@dataclass
class AutoencoderConfig:
    """Architecture and training recipe of the embedded VQ autoencoder (params.yaml ``autoencoder``).

    Attributes:
        pad_to: images are padded (background value -1) to this square size before encoding;
            decoded images are cropped back to the data's size (recorded in ``tfmq.json``).
        block_out_channels: one entry per encoder level; ``len - 1`` downsamplings (3 levels: f4).
        latent_channels: channels of the latent (and of the codebook vectors).
        num_vq_embeddings: codebook size.
        steps, batch_size, lr, seed: AdamW training (cosine decay after a 100-step warm-up).
        commitment: weight of VQModel's commitment/codebook loss against the L1 + L2 reconstruction loss.
        restart_every: every N steps, codebook entries no batch of the last N steps used are moved onto
            random encoder outputs of the current batch (dead-code restart against codebook collapse; 0 = off).
    """

    pad_to: int = 32
    block_out_channels: tuple[int, ...] = (16, 32, 32)
    latent_channels: int = 3
    num_vq_embeddings: int = 256
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    commitment: float = 1.0
    restart_every: int = 100

    def __post_init__(self) -> None:
        check_autoencoder_config(self, ("num_vq_embeddings",))


    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def build_vqmodel(cfg: AutoencoderConfig, in_channels: int = 1, *, seed: int | None = None) -> VQModel:
    """A freshly initialised ``VQModel`` of ``cfg``'s architecture (float32, CPU)."""
    if seed is not None:
        torch.manual_seed(seed)
    levels = len(cfg.block_out_channels)
    groups = math.gcd(*cfg.block_out_channels, 32)
    return VQModel(in_channels=in_channels, out_channels=in_channels,
                   down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                   block_out_channels=cfg.block_out_channels, layers_per_block=1,
                   latent_channels=cfg.latent_channels, num_vq_embeddings=cfg.num_vq_embeddings,
                   vq_embed_dim=cfg.latent_channels, norm_num_groups=groups, sample_size=cfg.pad_to,
                   scaling_factor=1.0)


def pad_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """[N, C, H, W] in [-1, 1] -> [N, C, size, size], centred, padded with -1 (the black background)."""
    h, w = x.shape[-2:]
    if h > size or w > size:
        raise ValueError(f"images of {h}x{w} do not fit the autoencoder's {size}x{size} input")
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(x, (left, size - w - left, top, size - h - top), value=-1.0)


def crop_images(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """The inverse of :func:`pad_images`: the centred ``size`` crop (``None`` = unchanged)."""
    if size is None:
        return x
    h, w = x.shape[-2:]
    th, tw = size
    if (th, tw) == (h, w):
        return x
    if th > h or tw > w:
        raise ValueError(f"cannot crop {h}x{w} decoded images to {th}x{tw}")
    top, left = (h - th) // 2, (w - tw) // 2
    return x[..., top:top + th, left:left + tw]


@torch.no_grad()
def encode(vqvae: VQModel, images: torch.Tensor, batch_size: int = 256, pad_to: int | None = None) -> torch.Tensor:
    """Diffusion latents ``z = encode(x).latents * scaling_factor`` of images in [-1, 1] (padded first if asked);
    for an ``AutoencoderKL`` (``tfmq.diffusion.vae``) the posterior's mode in place of ``latents``.

    Returns float32 [N, latent_channels, H/f, W/f] on CPU (``f`` the downsampling factor).
    """
    dev = next(vqvae.parameters()).device
    scale = float(vqvae.config.scaling_factor)
    out = []
    for lo in range(0, images.shape[0], batch_size):
        x = images[lo:lo + batch_size].to(dev, torch.float32)
        if pad_to is not None:
            x = pad_images(x, pad_to)
        enc = vqvae.encode(x)  # VQModel: .latents; AutoencoderKL: the posterior, whose mode is the latent
        h = enc.latents if hasattr(enc, "latents") else enc.latent_dist.mode()
        out.append((h * scale).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def decode(vqvae: VQModel, latents: torch.Tensor, batch_size: int = 256,
           crop: tuple[int, int] | None = None) -> torch.Tensor:
    """Images in [-1, 1] (float32, CPU) from diffusion latents: ``decode(z / scaling_factor)`` (codebook
    lookup included, as ``LDMPipeline``), clamped, then cropped to ``crop`` (the data's size)."""
    dev = next(vqvae.parameters()).device
    dtype = next(vqvae.parameters()).dtype
    scale = float(vqvae.config.scaling_factor)
    out = []
    for lo in range(0, latents.shape[0], batch_size):
        z = latents[lo:lo + batch_size].to(dev, dtype)
        out.append(crop_images(vqvae.decode(z / scale).sample.float().clamp(-1, 1).cpu(), crop))
    return torch.cat(out)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1] (peak-to-peak 2), float64 [N]."""
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def _restart_dead_codes(vq: VQModel, h: torch.Tensor, used: torch.Tensor, gen: torch.Generator) -> int:
    """Move the unused codebook entries onto random encoder output vectors of ``h`` [B, C, H, W]."""
    dead = (~used).nonzero().flatten()
    if dead.numel() == 0:
        return 0
    vectors = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    pick = torch.randint(0, vectors.shape[0], (dead.numel(),), generator=gen).to(vectors.device)
    vq.quantize.embedding.weight[dead] = vectors[pick]
    return int(dead.numel())


def train_autoencoder(train_images_uint8: torch.Tensor, cfg: AutoencoderConfig, out_dir: str | os.PathLike,
                      test_images_uint8: torch.Tensor | None = None, device: str = "cpu",
                      progress: bool = True) -> dict[str, Any]:
    """Train the VQ autoencoder and write ``out_dir`` (replaced whole): ``vqvae/`` (``VQModel``, safetensors,
    ``scaling_factor`` set to 1/std of the training latents), ``train_log.json`` and ``reconstructions.png``
    (top rows originals, bottom rows reconstructions, from the test split when given).

    Loss: L1 + L2 of the reconstruction plus ``cfg.commitment`` x VQModel's codebook/commitment loss.
    Returns the train log (with the test PSNR when test images are given).
    """
    images = train_images_uint8 if train_images_uint8.dim() == 4 else train_images_uint8.unsqueeze(1)
    if images.dtype != torch.uint8:
        raise ValueError(f"train_images_uint8 has dtype {images.dtype}, expected uint8")
    data_size = tuple(images.shape[-2:])
    vq = build_vqmodel(cfg, images.shape[1], seed=cfg.seed).to(device).train()
    opt = torch.optim.AdamW(vq.parameters(), lr=cfg.lr, weight_decay=0.0)
    warm = 100
    lr_at = lambda k: min(1.0, (k + 1) / warm) * (0.5 * (1 + math.cos(math.pi * min(k, cfg.steps) / cfg.steps)) * 0.9 + 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = images.shape[0]
    curve, window = [], []
    used = torch.zeros(cfg.num_vq_embeddings, dtype=torch.bool, device=device)
    restarted = 0
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.steps + 1), desc="autoencoder", disable=not progress, mininterval=2.0)
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        x = pad_images(to_model_range(images[idx]), cfg.pad_to).to(device)
        h = vq.encode(x).latents
        quant, commit, (_, _, codes) = vq.quantize(h)
        used[codes.flatten()] = True
        out_sample = vq.decode(quant, force_not_quantize=True).sample
        rec = F.l1_loss(out_sample, x) + F.mse_loss(out_sample, x)
        loss = rec + cfg.commitment * commit.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        sched.step()
        if cfg.restart_every and step % cfg.restart_every == 0 and step < cfg.steps:
            restarted += _restart_dead_codes(vq, h.detach(), used, gen)
            used.zero_()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"autoencoder loss became {value} at step {step}; lower autoencoder.lr")
        window.append(float(rec.detach()))
        if step % 50 == 0 or step == cfg.steps:
            curve.append({"step": step, "recon_loss": sum(window) / len(window),
                          "wall_s": round(time.perf_counter() - t0, 2)})
            window = []
            bar.set_postfix(rec=f"{curve[-1]['recon_loss']:.4f}")
    wall = time.perf_counter() - t0
    vq.eval().requires_grad_(False)

    # scaling_factor = 1/std of the (unscaled) training latents: unit-variance diffusion latents
    sub = images[torch.randperm(n, generator=gen)[: min(n, 4096)]]
    h = encode(vq, to_model_range(sub), pad_to=cfg.pad_to)
    vq.register_to_config(scaling_factor=float(1.0 / h.double().std()))
    log: dict[str, Any] = {"config": dataclasses.asdict(cfg), "loss_curve": curve, "wall_seconds": round(wall, 2),
                           "latent_std_unscaled": float(h.double().std()), "scaling_factor": vq.config.scaling_factor,
                           "latent_shape": list(h.shape[1:]), "codebook_restarts": restarted, "data_size": list(data_size),
                           "num_params": sum(p.numel() for p in vq.parameters()),
                           "torch_threads": torch.get_num_threads(), "diffusers_version": diffusers.__version__}
    with atomic_dir(out_dir) as tmp:
        vq.save_pretrained(tmp / "vqvae", safe_serialization=True)
        grid_src = images if test_images_uint8 is None else (
            test_images_uint8 if test_images_uint8.dim() == 4 else test_images_uint8.unsqueeze(1))
        x = to_model_range(grid_src[:32])
        r = decode(vq, encode(vq, x, pad_to=cfg.pad_to), crop=data_size)
        save_grid(torch.cat([x, r]), tmp / "reconstructions.png", nrow=8, scale=2)
        if test_images_uint8 is not None:
            xt = to_model_range(grid_src[:2000])
            rt = decode(vq, encode(vq, xt, pad_to=cfg.pad_to), crop=data_size)
            p = psnr(rt, xt)
            log["test_psnr_db"] = float(p.mean())
            log["test_psnr_n"] = int(p.numel())
        codes = vq.quantize(vq.encode(pad_images(x, cfg.pad_to).to(device)).latents)[2][2]
        log["codebook_entries_used_on_32_test_images"] = int(torch.unique(codes).numel())
        atomic_write_json(log, tmp / "train_log.json")
    return log
