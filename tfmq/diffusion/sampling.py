"""The sampler loop shared by evaluation, calibration capture and trajectory analysis (docs/method.md sections 7, 9).

One visible denoising loop over a diffusers scheduler (DDIM with eta, DDPM, PNDM/PLMS), batched
and seeded so that sample j is the same image whatever the batch size: the initial noise of all
samples comes from ONE CPU generator seeded with ``seed``, and the fresh noise of stochastic steps
(DDIM eta>0, DDPM) comes from one CPU generator per *sample*, seeded from ``(seed, sample index)``
through numpy's ``SeedSequence``. (A per-batch generator, seeded from seed + batch index, would make
stochastic samples depend on the batch size, so it is not used.)
"""
from __future__ import annotations

import inspect
import io
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image
from tqdm.auto import tqdm

from tfmq.io import atomic_write_bytes

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "pndm": PNDMScheduler, "plms": PNDMScheduler}
StepCallback = Callable[[int, int, torch.Tensor], None]


def _scheduler_config(config_or_dir: Any) -> dict:
    if isinstance(config_or_dir, SchedulerMixin):
        return dict(config_or_dir.config)
    if isinstance(config_or_dir, dict):
        return dict(config_or_dir)
    path = Path(config_or_dir)
    for cand in (path, path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
        if cand.is_file():
            return dict(DDPMScheduler.load_config(str(cand)))
    raise FileNotFoundError(
        f"no scheduler_config.json at {path} (nor {path}/scheduler/); pass a config dict, a scheduler, "
        "a scheduler/ directory or a model directory written by save_pretrained"
    )


def make_scheduler(
    name: str, config_or_dir: Any, num_inference_steps: int | None = None, device: str | torch.device | None = None
) -> SchedulerMixin:
    """Build a sampling scheduler from the training scheduler's config.

    Args:
        name: ``"ddim"`` (eta is an argument of :func:`sample`), ``"ddpm"``, or ``"pndm"``/``"plms"``
            (PLMS with ``skip_prk_steps=True``: ``num_inference_steps + 1`` UNet calls, one timestep repeated).
        config_or_dir: a config dict, a scheduler instance, a ``scheduler/`` dir or a model dir holding one.
        num_inference_steps: if given, ``set_timesteps`` is called.

    Example:
        >>> sched = make_scheduler("ddim", "models/fashion_ddpm", num_inference_steps=50)
    """
    key = name.lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; expected one of {sorted(SCHEDULERS)}")
    config = _scheduler_config(config_or_dir)
    extra = {"skip_prk_steps": True} if SCHEDULERS[key] is PNDMScheduler else {}
    scheduler = SCHEDULERS[key].from_config(config, **extra)
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps, device=device)
    return scheduler


def _sample_generators(seed: int, indices: range) -> list[torch.Generator]:
    return [
        torch.Generator().manual_seed(int(np.random.SeedSequence([seed, j]).generate_state(1, np.uint32)[0]))
        for j in indices
    ]


def _per_sample(x: torch.Tensor | None, n: int, name: str) -> torch.Tensor | None:
    """Broadcast a conditioning tensor with a leading dim of 1 (or none) to n rows."""
    if x is None:
        return None
    if x.dim() == 2:  # [L, D] text embedding shared by all samples
        x = x.unsqueeze(0)
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    if x.shape[0] != n:
        raise ValueError(f"{name} has {x.shape[0]} rows, expected 1 or num_samples={n}")
    return x


def initial_noise(seed: int, shape: tuple[int, ...], start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Rows ``[start, stop)`` of the initial noise ``sample`` draws for a run of ``shape[0]`` samples.

    The whole run's noise comes from one CPU generator, so a shard draws all ``shape[0]`` rows and
    keeps its own (``4 * prod(shape)`` bytes for a moment: 38 MB for 50 000 samples of 3x8x8).
    """
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))[start:stop].clone()


def sample(
    unet: torch.nn.Module,
    scheduler: SchedulerMixin,
    num_samples: int,
    num_inference_steps: int,
    batch_size: int,
    seed: int,
    eta: float = 0.0,
    class_labels: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    callback: StepCallback | None = None,
    noise: torch.Tensor | None = None,
    return_trajectory: bool = False,
    trajectory_noise: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    negative_encoder_hidden_states: torch.Tensor | None = None,
    null_class_label: int | None = None,
    guidance_scale: float = 1.0,
    first_index: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run the sampler; one UNet call per entry of ``scheduler.timesteps`` per batch.

    Args:
        unet: ``UNet2DModel``/``UNet2DConditionModel`` (or a quantized one with the same forward).
        scheduler: from :func:`make_scheduler`; ``set_timesteps`` is called for every batch (resets PLMS state).
        num_samples, num_inference_steps, batch_size, seed: as named; results do not depend on batch_size.
        eta: DDIM stochasticity (0 = deterministic DDIM); only DDIM accepts eta != 0.
        class_labels: int64 [num_samples] for class-conditional UNets.
        callback: ``callback(step_index, t, x_t)`` before each UNet call, once per batch in batch order;
            ``x_t`` [B, C, H, W] is the UNet input of that step (before the CFG duplication).
        noise: float [num_samples, C, H, W] initial x_T (default: ``randn`` from a CPU generator seeded with seed).
        return_trajectory: also return the UNet inputs ``x_t`` of all steps, [S, num_samples, C, H, W] on CPU,
            ``S = len(scheduler.timesteps)``.
        trajectory_noise: the name docs/interfaces.md used for ``noise``; give one of the two.
        encoder_hidden_states: [num_samples or 1, L, D] text conditioning (UNet2DConditionModel).
        negative_encoder_hidden_states / null_class_label: the null condition for classifier-free guidance.
            With both text and class labels, the null half gets ``null_class_label`` if given, else the
            same class labels (guidance by the text alone).
        guidance_scale: > 1 enables CFG: each UNet call gets the batch [null; cond] (2B rows) and
            ``eps = eps_null + g (eps_cond - eps_null)``.
        first_index: the index of this call's first sample in a larger run (a shard: pass its ``noise``
            from :func:`initial_noise` too); the stochastic steps' per-sample generators use it, so
            samples ``[first_index, first_index + num_samples)`` equal those rows of the whole run.

    Returns:
        float32 [num_samples, C, H, W] on CPU: the sampler's final ``x``, not clamped (a pixel model's
        images lie about in [-1, 1]: ``DiffusionModel.to_images`` / ``to_uint8`` / ``save_grid`` clamp
        them; a latent model's unit-variance latents go to the decoder as they are, as in diffusers'
        ``LDMPipeline`` and ``StableDiffusionPipeline``), plus the trajectory if requested.
        The UNet gets ``timestep`` as an int64 [rows] tensor, the same form the calibration set stores.

    Example:
        >>> imgs = sample(unet, make_scheduler("ddim", sched), 64, 50, 64, seed=0)
    """
    if noise is not None and trajectory_noise is not None:
        raise ValueError("sample got both noise and trajectory_noise; they are the same argument, give one")
    noise = trajectory_noise if noise is None else noise
    step_params = inspect.signature(scheduler.step).parameters
    if eta != 0.0 and "eta" not in step_params:
        raise ValueError(f"eta={eta} only applies to DDIM, got {type(scheduler).__name__}; use eta=0.0")
    stochastic = (eta > 0.0) or isinstance(scheduler, DDPMScheduler)
    cfg = getattr(unet, "config", {})
    size = cfg.get("sample_size") if hasattr(cfg, "get") else None
    hw = (size, size) if isinstance(size, int) else tuple(size or ())
    shape = (num_samples, cfg.get("in_channels", 1), *hw) if hw else None
    if noise is None:
        if shape is None:
            raise ValueError("the UNet config has no sample_size; pass noise [N, C, H, W] explicitly")
        noise = initial_noise(seed, shape)
    elif noise.shape[0] != num_samples:
        raise ValueError(f"noise has {noise.shape[0]} rows, expected num_samples={num_samples}")

    do_cfg = guidance_scale > 1.0
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, dtype=torch.int64)
        if class_labels.shape != (num_samples,):
            raise ValueError(f"class_labels has shape {tuple(class_labels.shape)}, expected ({num_samples},)")
    ehs = _per_sample(encoder_hidden_states, num_samples, "encoder_hidden_states")
    neg = _per_sample(negative_encoder_hidden_states, num_samples, "negative_encoder_hidden_states")
    if do_cfg:
        if ehs is not None and neg is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs negative_encoder_hidden_states (e.g. the '' prompt)")
        if class_labels is not None and null_class_label is None and ehs is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs null_class_label (the class id trained as 'no class')")
        if class_labels is None and ehs is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs class_labels or encoder_hidden_states to guide with")

    dtype = next(unet.parameters()).dtype
    absorb = _variance_absorption(unet, scheduler, eta)
    scheduler.set_timesteps(num_inference_steps, device=device)
    n_steps = len(scheduler.timesteps)
    n_batches = -(-num_samples // batch_size)
    outputs, trajectory = [], []
    bar = tqdm(total=n_batches * n_steps, desc="sampling", disable=not progress)
    with torch.no_grad():
        for b in range(n_batches):
            lo, hi = b * batch_size, min((b + 1) * batch_size, num_samples)
            scheduler.set_timesteps(num_inference_steps, device=device)
            x = noise[lo:hi].to(device=device, dtype=dtype) * scheduler.init_noise_sigma
            step_kwargs: dict[str, Any] = {}
            if "eta" in step_params:
                step_kwargs["eta"] = eta
            if stochastic and "generator" in step_params:
                step_kwargs["generator"] = _sample_generators(seed, range(first_index + lo, first_index + hi))
            cond: dict[str, torch.Tensor] = {}
            if class_labels is not None:
                labels = class_labels[lo:hi]
                if do_cfg:  # the null half: the null class, or (text guidance with a class) the same classes
                    null = labels if null_class_label is None else torch.full_like(labels, int(null_class_label))
                    labels = torch.cat([null, labels])
                cond["class_labels"] = labels.to(device)
            if ehs is not None:
                e = ehs[lo:hi]
                if do_cfg:
                    e = torch.cat([neg[lo:hi], e])
                cond["encoder_hidden_states"] = e.to(device=device, dtype=dtype)
            batch_traj = []
            for i, t in enumerate(scheduler.timesteps):
                model_input = scheduler.scale_model_input(x, t)
                if callback is not None:
                    callback(i, int(t), model_input)
                if return_trajectory:
                    batch_traj.append(model_input.detach().float().cpu())
                unet_in = torch.cat([model_input, model_input]) if do_cfg else model_input
                t_vec = torch.full((unet_in.shape[0],), int(t), dtype=torch.int64, device=device)
                out = unet(unet_in, t_vec, **cond)
                eps = out.sample if hasattr(out, "sample") else out[0]
                if do_cfg:
                    eps_null, eps_cond = eps.chunk(2)
                    eps = eps_null + guidance_scale * (eps_cond - eps_null)
                kw = step_kwargs
                if absorb is not None:  # PTQD: the residual quantization noise replaces part of the step's noise
                    from diffusers.utils.torch_utils import randn_tensor

                    scale = absorb.noise_scale(scheduler, int(t), eta)
                    # its own name: ``noise`` is the run's initial x_T, which the next batch still reads
                    step_noise = randn_tensor(eps.shape, generator=step_kwargs["generator"], device=eps.device,
                                              dtype=eps.dtype)
                    kw = {**{k: v for k, v in step_kwargs.items() if k != "generator"},
                          "variance_noise": step_noise * scale}
                x = scheduler.step(eps, t, x, **kw).prev_sample
                bar.update(1)
            outputs.append(x.float().cpu())  # never clamped here: latents are not images
            if return_trajectory:
                trajectory.append(torch.stack(batch_traj))
    bar.close()
    images = torch.cat(outputs)
    if return_trajectory:
        return images, torch.cat(trajectory, dim=1)
    return images


def ddim_noise_scale(scheduler, t: int, eta: float, sigma_q: float) -> float:
    """Factor on a DDIM step's added noise that absorbs residual variance ``sigma_q^2`` (PTQD's noise fusion):
    ``sigma_t' / sigma_t`` with ``sigma_t'^2 = sigma_t^2 - c_t^2 sigma_q^2`` (0 when negative; 1 when eta = 0)."""
    if eta == 0.0:
        return 1.0
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    prev = t - step
    a_t = float(scheduler.alphas_cumprod[t])
    a_prev = float(scheduler.alphas_cumprod[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    sigma = eta * var ** 0.5
    if sigma == 0.0:
        return 1.0
    c = (1 - a_prev - sigma ** 2) ** 0.5 - (a_prev * (1 - a_t) / a_t) ** 0.5
    new_sq = sigma ** 2 - c ** 2 * sigma_q ** 2
    return (new_sq ** 0.5) / sigma if new_sq > 0 else 0.0


class _Absorb:
    def __init__(self, corr):
        self.corr = corr

    def noise_scale(self, scheduler, t: int, eta: float) -> float:
        return ddim_noise_scale(scheduler, t, eta, self.corr.sigma_q_at(t))


def _variance_absorption(unet, scheduler, eta: float):
    """PTQD's noise fusion when the UNet carries a fitted correction, the sampler is DDIM and eta > 0; else None."""
    from diffusers import DDIMScheduler

    corr = getattr(unet, "tfmq_noise_correction", None)
    if corr is None or not corr.enabled or eta == 0.0 or not isinstance(scheduler, DDIMScheduler):
        return None
    return _Absorb(corr)


def make_grid_uint8(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: int = 128, scale: int = 1) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [rows*(H+p)+p, nrow*(W+p)+p, C] image, row-major; empty cells are pad."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, 1|3, H, W], got shape {tuple(images.shape)}")
    imgs = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if scale > 1:
        imgs = imgs.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    n, c, h, w = imgs.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = np.full((nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, dtype=np.uint8)
    arr = imgs.permute(0, 2, 3, 1).numpy()
    for k in range(n):
        r, col = divmod(k, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = arr[k]
    return grid


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 1) -> Path:
    """Save [N, 1|3, H, W] images in [-1, 1] as one PNG grid (``nrow`` images per row), atomically."""
    grid = make_grid_uint8(images, nrow=nrow, scale=scale)
    img = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)  # uint8 2-D -> "L", HxWx3 -> "RGB"
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(buf.getvalue(), path)
