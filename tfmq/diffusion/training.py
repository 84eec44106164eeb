"""Train the FP DDPM that the embedded pipeline quantizes (no pretrained weights exist offline).

Epsilon-prediction DDPM training (Ho et al. 2020) with the CPU recipe measured when the embedded
default was built (train_fp in params.yaml): AdamW lr 1e-3 with a linear warm-up, random batches of 64,
EMA 0.999 with warm-up; the EMA weights are what gets saved and later quantized.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from tfmq.diffusion.data import to_model_range
from tfmq.io import atomic_dir, atomic_write_json
from tfmq.diffusion.models import build_unet
from tfmq.diffusion.sampling import make_scheduler, sample, save_grid

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass
class TrainConfig:
    """Every training hyper-parameter with its default and unit; validated on construction.

    Attributes:
        steps: optimizer steps (the recipe: ~3 000-3 500 at batch 64 for recognisable Fashion-MNIST).
        batch_size: images per step, drawn uniformly at random with replacement across steps.
        lr: AdamW peak learning rate, reached linearly over ``warmup_steps`` steps, then constant.
        weight_decay, betas: AdamW (torch defaults).
        grad_clip: max global gradient L2 norm (0 disables).
        ema_decay: EMA decay cap; the decay at update k is ``min(ema_decay, (1 + k) / (10 + k))``.
        seed: seeds the weight init, batch indices, noise and timesteps (one CPU generator).
        num_train_timesteps, beta_schedule, beta_start, beta_end: the DDPM forward process.
        class_conditional: add ``num_class_embeds=10`` and feed ``class_labels``.
        class_dropout: probability that a training label is replaced by the null class (id 10, an 11th
            embedding), so the model also learns the unconditional prediction classifier-free guidance needs
            (Ho & Salimans 2022). 0 = no null class (``num_class_embeds=10``).
        unet: extra ``build_unet`` overrides (UNet2DModel constructor keys).
        log_every: steps per point of the loss curve (mean loss over that window).
        sample_every: write a progress grid every N steps to ``progress/`` (0 = only the final grid).
        num_sample_images: final grid size, unconditional (class-conditional: 8 per class, 10 rows).
        sample_steps: DDIM steps for the grids (eta 0, from the EMA weights).
        save_raw_weights: also save the non-EMA weights to ``unet_raw/`` (for comparisons and tests).
    """

    steps: int = 3500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    class_conditional: bool = False
    class_dropout: float = 0.0
    unet: dict[str, Any] = field(default_factory=dict)
    log_every: int = 50
    sample_every: int = 0
    num_sample_images: int = 64
    sample_steps: int = 50
    save_raw_weights: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_train_timesteps", "log_every", "num_sample_images", "sample_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        for name in ("warmup_steps", "sample_every"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 0 (0 disables)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr={self.lr} must be a positive finite number, e.g. 1e-3")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay={self.ema_decay} must be in [0, 1), e.g. 0.999")
        if self.beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"TrainConfig.beta_schedule={self.beta_schedule!r}; expected one of {_BETA_SCHEDULES}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ValueError(f"TrainConfig betas ({self.beta_start}, {self.beta_end}) need 0 < beta_start < beta_end < 1")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"TrainConfig.class_dropout={self.class_dropout} must be in [0, 1), e.g. 0.1 for CFG")
        if self.class_dropout > 0 and not self.class_conditional:
            raise ValueError("TrainConfig.class_dropout > 0 needs class_conditional=true (it trains the null class)")
        self.betas = tuple(float(b) for b in self.betas)
        self.unet = dict(self.unet)

    def unet_config(self) -> dict[str, Any]:
        """The ``build_unet`` overrides this config implies."""
        cfg = dict(self.unet)
        if self.class_conditional:
            cfg.setdefault("num_class_embeds", 10 + (1 if self.class_dropout > 0 else 0))
        return cfg

    @property
    def null_class_label(self) -> int | None:
        """The class id trained as 'no class' (the last embedding) when ``class_dropout > 0``, else None."""
        return int(self.unet_config()["num_class_embeds"]) - 1 if self.class_dropout > 0 else None


def _grid_labels(cfg: TrainConfig, num_classes: int) -> tuple[int, torch.Tensor | None]:
    if not cfg.class_conditional:
        return cfg.num_sample_images, None
    labels = torch.arange(num_classes).repeat_interleave(8)  # row r of the 8-wide grid = class r
    return labels.numel(), labels


def _write_grid(unet: torch.nn.Module, noise_sched: DDPMScheduler, cfg: TrainConfig, path: Path, device: str,
                decode_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, guidance_scale: float = 1.0) -> None:
    null = cfg.null_class_label
    n, labels = _grid_labels(cfg, int(unet.config.num_class_embeds or 10) - (null is not None))
    ddim = make_scheduler("ddim", noise_sched.config)
    images = sample(unet, ddim, n, cfg.sample_steps, batch_size=n, seed=cfg.seed, class_labels=labels,
                    device=device, progress=False, null_class_label=null,
                    guidance_scale=guidance_scale if null is not None else 1.0)
    save_grid(images if decode_fn is None else decode_fn(images), path, nrow=8, scale=2)


def _write_text_grid(unet, noise_sched, cfg: TrainConfig, path: Path, device: str, text: dict[str, Any],
                     decode_fn=None, guidance_scale: float = 1.0) -> None:
    """Row r of the 8-wide grid: 8 samples of ``text["grid_prompts"][r]``, guided against the "" prompt."""
    ehs = text["grid_embeds"].repeat_interleave(8, dim=0)
    ddim = make_scheduler("ddim", noise_sched.config)
    z = sample(unet, ddim, ehs.shape[0], cfg.sample_steps, batch_size=ehs.shape[0], seed=cfg.seed, device=device,
               progress=False, encoder_hidden_states=ehs, negative_encoder_hidden_states=text["embeds"][-1:],
               guidance_scale=guidance_scale)
    save_grid(decode_fn(z), path, nrow=8, scale=2)


def _checked_labels(cfg: TrainConfig, train_labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if not cfg.class_conditional:
        return None
    if train_labels is None or train_labels.shape != (n,):
        got = None if train_labels is None else tuple(train_labels.shape)
        raise ValueError(f"class_conditional training needs train_labels of shape ({n},), got {got}")
    return train_labels.to(torch.int64)


def _uint8_images(train_images_uint8: torch.Tensor) -> torch.Tensor:
    images = train_images_uint8 if train_images_uint8.dim() == 4 else train_images_uint8.unsqueeze(1)
    if images.dtype != torch.uint8:
        raise ValueError(f"train_images_uint8 has dtype {images.dtype}, expected uint8 (use the raw dataset tensor)")
    return images


def train_ddpm(
    train_images_uint8: torch.Tensor,
    train_labels: torch.Tensor | None,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train an epsilon-prediction pixel-space DDPM and write a self-describing diffusers checkpoint.

    Args:
        train_images_uint8: uint8 [N, 28, 28] (or [N, 1, H, W]) training images.
        train_labels: int64 [N] in 0..9; required when ``cfg.class_conditional``.
        cfg: the hyper-parameters.
        out_dir: replaced as a whole at the end (built in a temp dir): ``unet/`` (EMA weights,
            safetensors), ``scheduler/`` (DDPMScheduler), ``train_log.json``, ``samples.png``
            (DDIM grid from the EMA weights), optionally ``unet_raw/`` and ``progress/``.
        device: torch device for training.
        progress: tqdm bar with the running loss.

    Returns:
        The train log dict (also written to ``train_log.json``): loss curve, final loss, wall seconds, ...

    Example:
        >>> d = load_fashion_mnist()
        >>> train_ddpm(d["train_images"], d["train_labels"], TrainConfig(steps=3500), "models/fashion_ddpm")
    """
    images = _uint8_images(train_images_uint8)
    labels = _checked_labels(cfg, train_labels, images.shape[0])
    return _train(lambda idx: to_model_range(images[idx]), tuple(images.shape), labels, cfg, out_dir, device,
                  progress)


def train_latent_ddpm(
    train_images_uint8: torch.Tensor,
    train_labels: torch.Tensor | None,
    cfg: TrainConfig,
    autoencoder_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    guidance_scale: float = 1.0,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train a latent DDPM (the LDM-4 analogue) on the latents of a trained VQ autoencoder.

    The images are encoded once (``tfmq.diffusion.autoencoder.encode``: padded to the autoencoder's
    ``sample_size``, scaled by its ``scaling_factor``) and the UNet learns epsilon-prediction on those
    latents exactly as :func:`train_ddpm` does on pixels. ``out_dir`` becomes a diffusers ``LDMPipeline``
    folder (``model_index.json``, ``unet/``, ``vqvae/`` copied from ``autoencoder_dir``, ``scheduler/``
    as DDIM) plus ``tfmq.json`` (family, image size, null class), ``train_log.json`` and ``samples.png``
    (decoded; class-conditional grids use classifier-free guidance at ``guidance_scale``).

    Example:
        >>> train_latent_ddpm(d["train_images"], None, TrainConfig(), "models/fashion_vq", "models/fashion_ldm")
    """
    from diffusers import VQModel

    from tfmq.diffusion.autoencoder import decode, encode

    images = _uint8_images(train_images_uint8)
    labels = _checked_labels(cfg, train_labels, images.shape[0])
    vq_dir = Path(autoencoder_dir) / "vqvae"
    if not (vq_dir / "config.json").is_file():
        raise FileNotFoundError(f"no autoencoder at {vq_dir} (expected a VQModel save_pretrained folder); "
                                "train it first (the train_autoencoder stage)")
    vqvae = VQModel.from_pretrained(vq_dir, local_files_only=True).to(device).eval().requires_grad_(False)
    latents = encode(vqvae, to_model_range(images), pad_to=int(vqvae.config.sample_size))
    crop = tuple(int(v) for v in images.shape[-2:])
    ldm = {"vqvae": vqvae, "image_size": crop, "guidance_scale": guidance_scale,
           "latent_std": float(latents.double().std())}
    return _train(lambda idx: latents[idx], tuple(latents.shape), labels, cfg, out_dir, device, progress,
                  decode_fn=lambda z: decode(vqvae, z, crop=crop), ldm=ldm)


def train_text_ddpm(
    train_images_uint8: torch.Tensor,
    train_labels: torch.Tensor,
    cfg: TrainConfig,
    vae_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    class_names: tuple[str, ...] | list[str],
    prompt_dropout: float = 0.1,
    text_encoder: dict[str, int] | None = None,
    guidance_scale: float = 1.0,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train the text-guided latent UNet (the Stable Diffusion analogue) on the latents of a trained ``AutoencoderKL``.

    Every training image gets a caption (``tfmq.diffusion.text.captions``: a training template filled with its
    class phrase); a ``CLIPTokenizer`` is learned from the caption corpus (training and held-out templates, so
    evaluation prompts tokenize to whole words) and a seeded ``CLIPTextModel`` (``text_encoder``: hidden_size,
    num_layers, num_heads) encodes them, frozen as in Stable Diffusion. The ``UNet2DConditionModel``
    (:data:`tfmq.diffusion.models.EMBEDDED_TEXT_UNET_CONFIG` + ``cfg.unet``) learns epsilon-prediction with
    ``prompt_dropout`` of its captions replaced by ``""`` (the null prompt classifier-free guidance needs).
    ``out_dir`` becomes a ``StableDiffusionPipeline`` folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``
    (PNDM), ``model_index.json``, no safety checker) + ``tfmq.json``, ``train_log.json``, ``samples.png``
    (row r: the prompt ``"a photo of a <class r>"``, guided at ``guidance_scale``).
    """
    from diffusers import AutoencoderKL

    from tfmq.diffusion.autoencoder import decode, encode
    from tfmq.diffusion.pipelines import encode_prompts
    from tfmq.diffusion.text import build_clip_tokenizer, build_text_encoder, caption_corpus, captions, class_phrase

    if not 0.0 < prompt_dropout < 1.0:
        raise ValueError(f"prompt_dropout={prompt_dropout} must be in (0, 1), e.g. 0.1: guidance needs the '' prompt")
    images = _uint8_images(train_images_uint8)
    if train_labels is None or train_labels.shape != (images.shape[0],):
        raise ValueError("text-guided training needs train_labels (they name each caption's class)")
    sub = Path(vae_dir) / "vae"
    if not (sub / "config.json").is_file():
        raise FileNotFoundError(f"no autoencoder at {sub} (expected an AutoencoderKL save_pretrained folder); "
                                "train it first (the train_vae stage)")
    vae = AutoencoderKL.from_pretrained(sub, local_files_only=True).to(device).eval().requires_grad_(False)
    latents = encode(vae, to_model_range(images), pad_to=int(vae.config.sample_size))
    crop = tuple(int(v) for v in images.shape[-2:])
    import tempfile

    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = build_clip_tokenizer(caption_corpus(class_names), tok_dir)
    te = dict(text_encoder or {})
    encoder = build_text_encoder(tokenizer, hidden_size=int(te.get("hidden_size", 64)),
                                 num_layers=int(te.get("num_layers", 2)), num_heads=int(te.get("num_heads", 2)),
                                 seed=cfg.seed).to(device)
    caps = captions(class_names, train_labels, seed=cfg.seed)
    unique = sorted(set(caps))
    where = {c: i for i, c in enumerate(unique)}
    embeds = encode_prompts(tokenizer, encoder, unique + [""])  # [U + 1, L, D]; the last row: the null prompt
    grid_prompts = [f"a photo of a {class_phrase(c)}" for c in class_names]
    text = {"embeds": embeds, "caption_index": torch.tensor([where[c] for c in caps]), "prompt_dropout": prompt_dropout,
            "tokenizer": tokenizer, "text_encoder": encoder.cpu(), "grid_prompts": grid_prompts,
            "grid_embeds": encode_prompts(tokenizer, encoder, grid_prompts)}
    ldm = {"vqvae": vae, "image_size": crop, "guidance_scale": guidance_scale,
           "latent_std": float(latents.double().std()), "text": text}
    return _train(lambda idx: latents[idx], tuple(latents.shape), None, cfg, out_dir, device, progress,
                  decode_fn=lambda z: decode(vae, z, crop=crop), ldm=ldm)


def _train(batch_fn: Callable[[torch.Tensor], torch.Tensor], data_shape: tuple[int, ...],
           train_labels: torch.Tensor | None, cfg: TrainConfig, out_dir: str | os.PathLike, device: str,
           progress: bool, decode_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
           ldm: dict[str, Any] | None = None) -> dict[str, Any]:
    """The training loop both entry points share: x0 = ``batch_fn(indices)`` [B, C, H, W] in model space."""
    n, c, h, w = data_shape
    if h != w:
        raise ValueError(f"training data of {h}x{w}: the UNet's sample_size needs square inputs")
    text = (ldm or {}).get("text")
    shape_cfg = {"sample_size": h, "in_channels": c, "out_channels": c}
    if text is not None:
        from tfmq.diffusion.models import build_text_unet

        unet = build_text_unet({**shape_cfg, "cross_attention_dim": int(text["embeds"].shape[-1]), **cfg.unet},
                               seed=cfg.seed).to(device).train()
    else:
        unet = build_unet({**shape_cfg, **cfg.unet_config()}, seed=cfg.seed).to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    # latents are not bounded to [-1, 1] like pixels: no x0 clipping in their samplers (LDM's own setting)
    noise_sched = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                                beta_start=cfg.beta_start, beta_end=cfg.beta_end, clip_sample=ldm is None)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    warm = max(cfg.warmup_steps, 1)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / warm))
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    gen = torch.Generator().manual_seed(cfg.seed)
    n_params = sum(p.numel() for p in params)
    null = cfg.null_class_label
    grid_kw = {"decode_fn": decode_fn, "guidance_scale": (ldm or {}).get("guidance_scale", 1.0)}

    def grid(model: torch.nn.Module, path: Path) -> None:
        if text is not None:
            _write_text_grid(model, noise_sched, cfg, path, device, text, **grid_kw)
        else:
            _write_grid(model, noise_sched, cfg, path, device, **grid_kw)

    curve, window, all_losses = [], [], []
    with atomic_dir(out_dir) as tmp:
        bar = tqdm(range(1, cfg.steps + 1), desc="train", disable=not progress, mininterval=2.0)
        t0 = time.perf_counter()
        for step in bar:
            idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
            x0 = batch_fn(idx).to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, cfg.num_train_timesteps, (cfg.batch_size,), generator=gen)
            xt = noise_sched.add_noise(x0, noise, t)
            labels = train_labels[idx] if train_labels is not None else None
            if labels is not None and null is not None:  # class dropout: the null class for CFG
                drop = torch.rand(cfg.batch_size, generator=gen) < cfg.class_dropout
                labels = torch.where(drop, torch.full_like(labels, null), labels)
            labels = labels.to(device) if labels is not None else None
            if text is not None:  # the caption's frozen text-encoder states; prompt dropout: the "" prompt (CFG)
                ci = text["caption_index"][idx]
                drop = torch.rand(cfg.batch_size, generator=gen) < text["prompt_dropout"]
                ci = torch.where(drop, torch.full_like(ci, text["embeds"].shape[0] - 1), ci)
                cond = {"encoder_hidden_states": text["embeds"][ci].to(device)}
            else:
                cond = {"class_labels": labels}
            loss = F.mse_loss(unet(xt, t.to(device), **cond).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            lr_sched.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, p in zip(ema_params, params):
                    pe.lerp_(p, 1.0 - decay)
            value = loss.detach().item()
            if not math.isfinite(value):
                raise FloatingPointError(f"training loss became {value} at step {step}; lower TrainConfig.lr (now {cfg.lr})")
            window.append(value)
            all_losses.append(value)
            if step % cfg.log_every == 0 or step == cfg.steps:
                point = {"step": step, "loss": sum(window) / len(window), "lr": opt.param_groups[0]["lr"],
                         "wall_s": round(time.perf_counter() - t0, 2)}
                curve.append(point)
                window = []
                bar.set_postfix(loss=f"{point['loss']:.4f}")
                if progress:
                    tqdm.write(f"step {step}/{cfg.steps} loss {point['loss']:.4f} wall {point['wall_s']:.0f}s")
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                grid(ema, tmp / "progress" / f"samples_step{step:06d}.png")
        train_wall = time.perf_counter() - t0
        bar.close()

        if text is not None:
            from diffusers import PNDMScheduler

            from tfmq.diffusion.pipelines import save_sd_pipeline

            plms = PNDMScheduler.from_config(noise_sched.config, skip_prk_steps=True, steps_offset=1,  # SD v1.x ships
                                             set_alpha_to_one=False)  # PLMS with these settings
            save_sd_pipeline(tmp, ema, ldm["vqvae"], text["text_encoder"], text["tokenizer"], plms,
                             image_size=ldm["image_size"])
        elif ldm is None:
            ema.save_pretrained(tmp / "unet", safe_serialization=True)
            noise_sched.save_pretrained(tmp / "scheduler")
        else:
            from tfmq.diffusion.pipelines import save_ldm_pipeline

            save_ldm_pipeline(tmp, ema, ldm["vqvae"], noise_sched, image_size=ldm["image_size"],
                              null_class_label=null)
        if cfg.save_raw_weights:
            unet.save_pretrained(tmp / "unet_raw", safe_serialization=True)
        t1 = time.perf_counter()
        grid(ema, tmp / "samples.png")
        tail = all_losses[-min(100, len(all_losses)):]
        log = {
            "config": dataclasses.asdict(cfg),
            "loss_curve": curve,
            "final_loss": sum(tail) / len(tail),
            "final_loss_window": len(tail),
            "steps": cfg.steps,
            "wall_seconds": round(train_wall, 2),
            "seconds_per_step": round(train_wall / cfg.steps, 4),
            "sample_grid_seconds": round(time.perf_counter() - t1, 2),
            "num_params": n_params,
            "num_train_images": n,
            "torch_threads": torch.get_num_threads(),
            "device": str(device),
            "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__,
            "weights": "EMA",
        }
        if text is not None:
            log.update(conditioning="text", prompt_dropout=text["prompt_dropout"], grid_prompts=text["grid_prompts"],
                       num_captions=int(text["embeds"].shape[0] - 1), text_encoder="frozen at its seeded initialisation",
                       text_encoder_params=sum(p.numel() for p in text["text_encoder"].parameters()))
        if ldm is not None:
            log.update(space="latent", latent_shape=[c, h, w], latent_std=ldm["latent_std"],
                       grid_guidance_scale=grid_kw["guidance_scale"] if (null is not None or text is not None) else 1.0,
                       null_class_label=null)
        atomic_write_json(log, tmp / "train_log.json")
    return log
