"""Sampling-based temporal-disturbance analyses (docs/method.md sections 1 and 9) for any FP/quantized UNet pair.

* trajectory deviation: FP and quantized samplers started from the same noise (and the same
  per-step noise), per-step distance of their ``x_t``, plus the one-step error of the quantized
  model on the FP trajectory (error without accumulation);
* activation range per timestep: min/max of the inputs of chosen Conv2d/Linear layers along the
  model's own trajectory, what one shared activation range ignores (the case for FSC, section 5).

Only ``unet(sample, timestep, ...)`` forwards and scheduler steps are used, so the quantized model
can be anything the engine returns.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from tfmq.evaluation.temporal_features import _cosine, _device_dtype, _sample_shape


def _default_scheduler(num_train_timesteps: int = 1000):
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=num_train_timesteps)


def _step_kwargs(scheduler, eta: float, generator) -> dict:
    params = inspect.signature(scheduler.step).parameters
    kw = {}
    if "eta" in params:
        kw["eta"] = eta
    if "generator" in params:
        kw["generator"] = generator
    return kw


def _prepare(unet, scheduler, num_inference_steps, num_samples, seed):
    scheduler = copy.deepcopy(scheduler if scheduler is not None else _default_scheduler())
    scheduler.set_timesteps(num_inference_steps)
    device, dtype = _device_dtype(unet)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(_sample_shape(unet, num_samples), generator=g).to(device, dtype)
    return scheduler, x * scheduler.init_noise_sigma


def broadcast_kwargs(unet_kwargs: dict | None, batch: int) -> dict:
    """``unet_kwargs`` with every one-row tensor (e.g. one prompt's ``encoder_hidden_states`` [1, L, D]) expanded to
    ``batch`` rows; other values unchanged."""
    return {k: v.expand(batch, *v.shape[1:]) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == 1 and batch != 1
            else v for k, v in (unet_kwargs or {}).items()}


def _eps(unet, scheduler, x, t, class_labels, unet_kwargs):
    kw = broadcast_kwargs(unet_kwargs, x.shape[0])
    if class_labels is not None:
        kw["class_labels"] = class_labels
    return unet(scheduler.scale_model_input(x, t), t, return_dict=False, **kw)[0]


def _step_generator(seed: int, i: int) -> torch.Generator:
    # Same stochastic noise at step i for every run, so FP and quantized samplers differ only by the model.
    return torch.Generator().manual_seed(seed * 1_000_003 + i)


def _per_sample_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt()


class _RangeRecorder:
    """Min/max of the input of each named layer of ``unet``, one row per ``step()`` (forward pre-hooks that
    record only inside ``with recorder:``)."""

    def __init__(self, unet: nn.Module, names: Sequence[str]):
        self.names = list(names)
        modules = dict(unet.named_modules())
        unknown = [n for n in self.names if n not in modules]
        if unknown:
            raise ValueError(f"layers {unknown} not found in the UNet; expected names from unet.named_modules()")
        self.mins: list[list[float]] = []
        self.maxs: list[list[float]] = []
        self._lo: dict[str, float] = {}
        self._hi: dict[str, float] = {}
        self._on = False
        self._handles = [modules[n].register_forward_pre_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str):
        def fn(module, inputs):
            if not self._on:
                return
            x = inputs[0].detach()
            lo, hi = float(x.min()), float(x.max())
            self._lo[name] = min(lo, self._lo.get(name, lo))
            self._hi[name] = max(hi, self._hi.get(name, hi))

        return fn

    def __enter__(self) -> "_RangeRecorder":
        self._lo.clear()
        self._hi.clear()
        self._on = True
        return self

    def __exit__(self, *exc) -> None:
        self._on = False
        self.mins.append([self._lo.get(n, float("nan")) for n in self.names])
        self.maxs.append([self._hi.get(n, float("nan")) for n in self.names])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def result(self, timesteps, num_samples: int, seed: int) -> dict:
        return {"names": self.names, "timesteps": [int(t) for t in timesteps],
                "min": torch.tensor(self.mins, dtype=torch.float64), "max": torch.tensor(self.maxs, dtype=torch.float64),
                "num_samples": num_samples, "seed": seed}


@torch.no_grad()
def trajectory_deviation(
    fp: nn.Module,
    q: nn.Module,
    scheduler=None,
    num_inference_steps: int = 50,
    num_samples: int = 8,
    seed: int = 0,
    eta: float = 0.0,
    class_labels: torch.Tensor | None = None,
    unet_kwargs: dict | None = None,
    plot_path: str | Path | None = None,
    progress: bool = False,
    range_layers: Sequence[str] | None = None,
) -> dict:
    """FP vs quantized sampling trajectories from the same initial noise and per-step noise.

    Args:
        scheduler: a diffusers scheduler configured like the model's training scheduler (deep-copied,
            never mutated). ``None``: ``DDIMScheduler(1000)`` with diffusers' default linear betas.
        eta: DDIM eta (0 = deterministic); ignored by schedulers without it.

    Returns:
        ``rmse[k]`` / ``cos[k]`` (mean over samples) between FP and quantized ``x`` after step k
        (k = 0 is the shared ``x_T``), ``local_rmse[k]``: quantized single step taken from the FP
        ``x_t`` vs the FP ``x_{t-1}`` (error without accumulation), ``timesteps``, and settings.
        With ``range_layers``, also ``activation_ranges``: ``{"fp": ..., "q": ...}``, each what
        ``activation_ranges`` returns for that model, recorded on the same passes (each model along its
        own trajectory, the same one ``activation_ranges`` would sample), so no extra sampling.
    """
    from tqdm.auto import tqdm

    if class_labels is not None:
        class_labels = class_labels.to(_device_dtype(fp)[0])
    sched_fp, x0 = _prepare(fp, scheduler, num_inference_steps, num_samples, seed)
    sched_q = copy.deepcopy(sched_fp)
    x_fp, x_q = x0.clone(), x0.clone()
    rmse, cos, local = [0.0], [1.0], []
    rec = {} if range_layers is None else {"fp": _RangeRecorder(fp, range_layers), "q": _RangeRecorder(q, range_layers)}
    own = rec.get if rec else (lambda tag: contextlib.nullcontext())
    try:
        for i, t in enumerate(tqdm(sched_fp.timesteps, disable=not progress, leave=False, desc="trajectory")):
            sched_local = copy.deepcopy(sched_fp)  # FP history, so multistep schedulers stay comparable
            eps_q_on_fp = _eps(q, sched_local, x_fp, t, class_labels, unet_kwargs)
            x_local = sched_local.step(eps_q_on_fp, t, x_fp, **_step_kwargs(sched_local, eta, _step_generator(seed, i)))[0]
            with own("fp"):
                eps_fp = _eps(fp, sched_fp, x_fp, t, class_labels, unet_kwargs)
            x_fp = sched_fp.step(eps_fp, t, x_fp, **_step_kwargs(sched_fp, eta, _step_generator(seed, i)))[0]
            with own("q"):
                eps_q = _eps(q, sched_q, x_q, t, class_labels, unet_kwargs)
            x_q = sched_q.step(eps_q, t, x_q, **_step_kwargs(sched_q, eta, _step_generator(seed, i)))[0]
            rmse.append(float(_per_sample_rmse(x_fp, x_q).mean()))
            cos.append(float(_cosine(x_fp.flatten(1), x_q.flatten(1)).mean()))
            local.append(float(_per_sample_rmse(x_local, x_fp).mean()))
    finally:
        for r in rec.values():
            r.remove()
    out = {
        "rmse": rmse,
        "cos": cos,
        "local_rmse": local,
        "timesteps": [int(t) for t in sched_fp.timesteps],
        "step_index": "entry k is after k sampler steps; k=0 is the shared initial noise x_T",
        "scheduler": type(sched_fp).__name__,
        "num_inference_steps": num_inference_steps,
        "num_samples": num_samples,
        "seed": seed,
        "eta": eta,
        "final_rmse": rmse[-1],
    }
    if rec:
        out["activation_ranges"] = {tag: r.result(sched_fp.timesteps, num_samples, seed) for tag, r in rec.items()}
    if plot_path is not None:
        from tfmq.evaluation.plots import plot_trajectory_deviation

        plot_trajectory_deviation(out, plot_path)
    return out


def default_activation_layers(unet: nn.Module) -> list[str]:
    """A handful of representative Conv2d/Linear layers: input conv, first and a mid/up resnet's
    convs and time projection, the first attention query, and the output conv."""
    convs_linears = [n for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    picks = []
    for want in ("conv_in", "down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.time_emb_proj",
                 "mid_block.resnets.0.conv1", "up_blocks.0.resnets.0.conv2", "conv_out"):
        if want in convs_linears:
            picks.append(want)
    picks += [n for n in convs_linears if n.endswith("to_q")][:1]
    return picks or convs_linears[:4]


@torch.no_grad()
def activation_ranges(
    unet: nn.Module,
    layer_names: Sequence[str] | None = None,
    scheduler=None,
    num_inference_steps: int = 50,
    num_samples: int = 8,
    seed: int = 0,
    eta: float = 0.0,
    class_labels: torch.Tensor | None = None,
    unet_kwargs: dict | None = None,
    plot_path: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Min/max of the input of each named layer at every sampler step, along the model's own trajectory.

    Returns ``{"names", "timesteps", "min": [T, L], "max": [T, L]}`` (float64 tensors); the spread of
    ``max - min`` across rows is what one shared activation range per layer ignores.
    """
    from tqdm.auto import tqdm

    names = list(layer_names) if layer_names is not None else default_activation_layers(unet)
    rec = _RangeRecorder(unet, names)
    if class_labels is not None:
        class_labels = class_labels.to(_device_dtype(unet)[0])
    sched, x = _prepare(unet, scheduler, num_inference_steps, num_samples, seed)
    try:
        for i, t in enumerate(tqdm(sched.timesteps, disable=not progress, leave=False, desc="activation ranges")):
            with rec:
                eps = _eps(unet, sched, x, t, class_labels, unet_kwargs)
            x = sched.step(eps, t, x, **_step_kwargs(sched, eta, _step_generator(seed, i)))[0]
    finally:
        rec.remove()
    out = rec.result(sched.timesteps, num_samples, seed)
    if plot_path is not None:
        from tfmq.evaluation.plots import plot_activation_ranges

        plot_activation_ranges(out, plot_path)
    return out
