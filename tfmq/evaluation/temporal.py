"""Temporal-disturbance analyses of the TFMQ-DM poster (docs/method.md sections 1 and 9) for any FP/quantized UNet pair.

* temporal feature error: ``cos(emb_{t,i}, emb^q_{t,i})`` where ``emb_{t,i}`` is the output of residual
  block i's ``time_emb_proj`` at timestep t (down, mid, up order);
* temporal information mismatch: ``delta_{t,i} = argmax_{t'} cos(emb_{t',i}, emb^q_{t,i}) - t``;
* trajectory deviation: FP and quantized samplers started from the same noise, per-step distance
  of their ``x_t`` (plus the one-step error of the quantized model on the FP trajectory);
* activation range per timestep: min/max of the inputs of chosen Conv2d/Linear layers.

Only ``unet(sample, timestep, ...)`` forwards and module attributes are used, so the quantized model
can be anything the engine returns. Features are captured with forward hooks on every module that
has a ``time_emb_proj`` (diffusers' ``ResnetBlock2D`` or a wrapper around it); the direct path
(time_proj -> time_embedding (+ class embedding) -> each ``time_emb_proj(nonlinearity(emb))``)
must agree for a plain UNet and is kept as a check. Use the hook path for quantized models: it
runs the UNet forward, so per-timestep quantizer state set by a pre-forward hook is honoured.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from tfmq.diffusion.temporal import TemporalInformationBlock, temporal_resnets


@dataclass
class TemporalFeatures:
    """``features[i]``: [T, C_i] float64 outputs of residual block ``names[i]``'s time_emb_proj."""

    names: list[str]
    timesteps: list[int]
    features: list[torch.Tensor]


def _sample_shape(unet: nn.Module, batch: int) -> tuple[int, ...]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (batch, unet.config.in_channels, h, w)


def _device_dtype(unet: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(unet.parameters())
    return p.device, p.dtype


def _class_tensor(class_label: int | None, batch: int, device) -> torch.Tensor | None:
    return None if class_label is None else torch.full((batch,), int(class_label), dtype=torch.long, device=device)


@torch.no_grad()
def measure_temporal_features(
    unet: nn.Module,
    timesteps: Sequence[int] | torch.Tensor,
    class_label: int | None = None,
    method: str = "hooks",
    unet_kwargs: dict | None = None,
) -> TemporalFeatures:
    """Temporal features ``emb_{t,i}`` for all residual blocks i and the given timesteps.

    Args:
        timesteps: timesteps in sampler order (e.g. ``scheduler.timesteps``); row t of each feature.
        class_label: class for class-conditional UNets (the same for every t).
        method: ``"hooks"`` (one UNet forward per timestep on a zero sample, batch 1; faithful for
            quantized models) or ``"direct"`` (embedding path only, all t in one batch).
        unet_kwargs: extra forward kwargs for the hook path, e.g. ``encoder_hidden_states`` [1, L, D].
    """
    ts = [int(t) for t in (timesteps.tolist() if torch.is_tensor(timesteps) else timesteps)]
    if not ts:
        raise ValueError("timesteps is empty; pass e.g. scheduler.timesteps after set_timesteps(n)")
    resnets = temporal_resnets(unet)
    names = [n for n, _ in resnets]
    device, dtype = _device_dtype(unet)
    if method == "direct":
        if getattr(unet.config, "addition_embed_type", None) is not None:
            raise ValueError(
                f"method='direct' ignores addition_embed_type={unet.config.addition_embed_type!r}; "
                "fix: use method='hooks' with unet_kwargs"
            )
        t = torch.tensor(ts, dtype=torch.long, device=device)
        feats = TemporalInformationBlock(unet).features(t, _class_tensor(class_label, len(ts), device))
        return TemporalFeatures(names, ts, [f.double().cpu() for f in feats])
    if method != "hooks":
        raise ValueError(f"method must be 'hooks' or 'direct'; got {method!r}")
    rows: list[list[torch.Tensor]] = [[] for _ in resnets]
    current: dict[int, torch.Tensor] = {}
    handles = [
        r.time_emb_proj.register_forward_hook(lambda m, i, o, k=k: current.__setitem__(k, o.detach()))
        for k, (_, r) in enumerate(resnets)
    ]
    was_training = unet.training
    unet.eval()
    try:
        sample = torch.zeros(_sample_shape(unet, 1), device=device, dtype=dtype)
        for t in ts:
            current.clear()
            unet(sample, torch.tensor([t], device=device), **_forward_kwargs(unet, class_label, 1, device, unet_kwargs))
            missing = [names[k] for k in range(len(resnets)) if k not in current]
            if missing:
                raise RuntimeError(f"time_emb_proj of {missing} did not run in the UNet forward at t={t}")
            for k in range(len(resnets)):
                rows[k].append(current[k].reshape(1, -1).double().cpu())
    finally:
        for h in handles:
            h.remove()
        unet.train(was_training)
    return TemporalFeatures(names, ts, [torch.cat(r) for r in rows])


def _forward_kwargs(unet, class_label, batch, device, unet_kwargs) -> dict:
    kw = dict(unet_kwargs or {})
    if class_label is not None:
        kw["class_labels"] = _class_tensor(class_label, batch, device)
    kw["return_dict"] = False
    return kw


def _as_features(x, timesteps, class_label, method, unet_kwargs) -> TemporalFeatures:
    return x if isinstance(x, TemporalFeatures) else measure_temporal_features(x, timesteps, class_label, method, unet_kwargs)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-300)


def temporal_feature_error(
    fp: nn.Module | TemporalFeatures,
    q: nn.Module | TemporalFeatures,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    class_label: int | None = None,
    method: str = "hooks",
    unet_kwargs: dict | None = None,
    plot_path: str | Path | None = None,
) -> dict:
    """``cos[t, i] = cos(emb_{t,i}, emb^q_{t,i})`` as a [T, n_resnets] float64 tensor (+ heatmap PNG)."""
    f = _as_features(fp, timesteps, class_label, method, unet_kwargs)
    g = _as_features(q, timesteps if timesteps is not None else f.timesteps, class_label, method, unet_kwargs)
    _check_same_layout(f, g)
    cos = torch.stack([_cosine(a, b) for a, b in zip(f.features, g.features)], dim=1)
    out = {"cos": cos, "names": f.names, "timesteps": f.timesteps, "min_cos": float(cos.min()),
           "mean_cos": float(cos.mean())}
    if plot_path is not None:
        from tfmq.evaluation.plots import plot_temporal_feature_error

        plot_temporal_feature_error(cos, f.names, f.timesteps, plot_path)
    return out


def _check_same_layout(f: TemporalFeatures, g: TemporalFeatures) -> None:
    if f.names != g.names or f.timesteps != g.timesteps:
        raise ValueError(
            "FP and quantized temporal features differ in residual blocks or timesteps "
            f"({len(f.names)} vs {len(g.names)} blocks); expected the same UNet architecture and timesteps"
        )


def temporal_mismatch(
    fp: nn.Module | TemporalFeatures,
    q: nn.Module | TemporalFeatures,
    timesteps: Sequence[int] | torch.Tensor | None = None,
    class_label: int | None = None,
    method: str = "hooks",
    unet_kwargs: dict | None = None,
    plot_path: str | Path | None = None,
) -> dict:
    """Temporal information mismatch ``delta_{t,i} = argmax_{t'} cos(emb_{t',i}, emb^q_{t,i}) - t``.

    ``t'`` ranges over the same timestep list. Two index spaces are returned:

    * ``delta_step`` [T, n]: in sampler-step indices (position in ``timesteps``, first = noisiest);
      positive = the quantized feature looks like a *later* (less noisy) step.
    * ``delta_timestep`` [T, n]: in training-timestep units, ``timesteps[argmax] - timesteps[t]``;
      for a descending schedule it has the opposite sign of ``delta_step``.
    """
    f = _as_features(fp, timesteps, class_label, method, unet_kwargs)
    g = _as_features(q, timesteps if timesteps is not None else f.timesteps, class_label, method, unet_kwargs)
    _check_same_layout(f, g)
    T = len(f.timesteps)
    ts = torch.tensor(f.timesteps)
    best_idx, best_cos = [], []
    for a, b in zip(f.features, g.features):
        a = a.double() / a.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
        b = b.double() / b.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
        sim = b @ a.T  # [t (quantized), t' (FP)]
        c, j = sim.max(dim=1)
        best_idx.append(j)
        best_cos.append(c)
    argmax = torch.stack(best_idx, dim=1)  # [T, n]
    delta_step = argmax - torch.arange(T)[:, None]
    delta_timestep = ts[argmax] - ts[:, None]
    out = {
        "delta_step": delta_step,
        "delta_timestep": delta_timestep,
        "argmax_step": argmax,
        "best_cos": torch.stack(best_cos, dim=1),
        "names": f.names,
        "timesteps": f.timesteps,
        "mismatched_fraction": float((delta_step != 0).double().mean()),
        "index_space": "delta_step: sampler-step index; delta_timestep: training timesteps",
    }
    if plot_path is not None:
        from tfmq.evaluation.plots import plot_temporal_mismatch

        plot_temporal_mismatch(delta_step, f.names, f.timesteps, plot_path)
    return out


# ----------------------------------------------------------------------------- sampling-based analyses


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


def _eps(unet, scheduler, x, t, class_labels, unet_kwargs):
    kw = dict(unet_kwargs or {})
    if class_labels is not None:
        kw["class_labels"] = class_labels
    return unet(scheduler.scale_model_input(x, t), t, return_dict=False, **kw)[0]


def _step_generator(seed: int, i: int) -> torch.Generator:
    # Same stochastic noise at step i for every run, so FP and quantized samplers differ only by the model.
    return torch.Generator().manual_seed(seed * 1_000_003 + i)


def _per_sample_rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt()


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
    """
    from tqdm.auto import tqdm

    if class_labels is not None:
        class_labels = class_labels.to(_device_dtype(fp)[0])
    sched_fp, x0 = _prepare(fp, scheduler, num_inference_steps, num_samples, seed)
    sched_q = copy.deepcopy(sched_fp)
    x_fp, x_q = x0.clone(), x0.clone()
    rmse, cos, local = [0.0], [1.0], []
    for i, t in enumerate(tqdm(sched_fp.timesteps, disable=not progress, leave=False, desc="trajectory")):
        sched_local = copy.deepcopy(sched_fp)  # FP history, so multistep schedulers stay comparable
        eps_q_on_fp = _eps(q, sched_local, x_fp, t, class_labels, unet_kwargs)
        x_local = sched_local.step(eps_q_on_fp, t, x_fp, **_step_kwargs(sched_local, eta, _step_generator(seed, i)))[0]
        x_fp = sched_fp.step(_eps(fp, sched_fp, x_fp, t, class_labels, unet_kwargs), t, x_fp,
                             **_step_kwargs(sched_fp, eta, _step_generator(seed, i)))[0]
        x_q = sched_q.step(_eps(q, sched_q, x_q, t, class_labels, unet_kwargs), t, x_q,
                           **_step_kwargs(sched_q, eta, _step_generator(seed, i)))[0]
        rmse.append(float(_per_sample_rmse(x_fp, x_q).mean()))
        cos.append(float(_cosine(x_fp.flatten(1), x_q.flatten(1)).mean()))
        local.append(float(_per_sample_rmse(x_local, x_fp).mean()))
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
    modules = dict(unet.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"layers {unknown} not found in the UNet; expected names from unet.named_modules()")
    cur_min: dict[str, float] = {}
    cur_max: dict[str, float] = {}

    def hook(name):
        def fn(module, inputs):
            x = inputs[0].detach()
            lo, hi = float(x.min()), float(x.max())
            cur_min[name] = min(lo, cur_min.get(name, lo))
            cur_max[name] = max(hi, cur_max.get(name, hi))

        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    if class_labels is not None:
        class_labels = class_labels.to(_device_dtype(unet)[0])
    sched, x = _prepare(unet, scheduler, num_inference_steps, num_samples, seed)
    mins, maxs = [], []
    try:
        for i, t in enumerate(tqdm(sched.timesteps, disable=not progress, leave=False, desc="activation ranges")):
            cur_min.clear()
            cur_max.clear()
            eps = _eps(unet, sched, x, t, class_labels, unet_kwargs)
            mins.append([cur_min.get(n, float("nan")) for n in names])
            maxs.append([cur_max.get(n, float("nan")) for n in names])
            x = sched.step(eps, t, x, **_step_kwargs(sched, eta, _step_generator(seed, i)))[0]
    finally:
        for h in handles:
            h.remove()
    out = {
        "names": names,
        "timesteps": [int(t) for t in sched.timesteps],
        "min": torch.tensor(mins, dtype=torch.float64),
        "max": torch.tensor(maxs, dtype=torch.float64),
        "num_samples": num_samples,
        "seed": seed,
    }
    if plot_path is not None:
        from tfmq.evaluation.plots import plot_activation_ranges

        plot_activation_ranges(out, plot_path)
    return out


# ----------------------------------------------------------------------------- tables and one-call report


def temporal_table(error: dict, mismatch: dict) -> list[dict]:
    """One row per (sampler step, residual block): cos, delta in steps and timesteps, best-matching timestep."""
    rows = []
    ts = error["timesteps"]
    for k, t in enumerate(ts):
        for i, name in enumerate(error["names"]):
            j = int(mismatch["argmax_step"][k, i])
            rows.append({"step": k, "timestep": t, "resnet": name, "cos": float(error["cos"][k, i]),
                         "delta_step": int(mismatch["delta_step"][k, i]),
                         "delta_timestep": int(mismatch["delta_timestep"][k, i]),
                         "best_match_timestep": ts[j], "best_match_cos": float(mismatch["best_cos"][k, i])})
    return rows


def write_csv(rows: list[dict], path: str | Path) -> Path:
    import csv
    import io

    from tfmq.io import atomic_write_text

    if not rows:
        raise ValueError(f"no rows to write to {path}")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(buf.getvalue(), path)


def temporal_report(
    fp: nn.Module,
    q: nn.Module,
    scheduler,
    num_inference_steps: int,
    out_dir: str | Path,
    num_samples: int = 8,
    seed: int = 0,
    eta: float = 0.0,
    class_label: int | None = None,
    layer_names: Sequence[str] | None = None,
    unet_kwargs: dict | None = None,
    progress: bool = False,
) -> dict:
    """All four analyses on the sampler's own timesteps; writes into ``out_dir``:
    ``temporal_feature_error.png``, ``temporal_mismatch.png``, ``trajectory_deviation.png``,
    ``activation_ranges_fp.png`` / ``_q.png``, ``temporal_table.csv`` and ``temporal.json`` (summary + series).
    """
    from tfmq.io import atomic_write_json

    out_dir = Path(out_dir)
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps)
    ts = [int(t) for t in sched.timesteps]
    f = measure_temporal_features(fp, ts, class_label, "hooks", unet_kwargs)
    g = measure_temporal_features(q, ts, class_label, "hooks", unet_kwargs)
    err = temporal_feature_error(f, g, plot_path=out_dir / "temporal_feature_error.png")
    mm = temporal_mismatch(f, g, plot_path=out_dir / "temporal_mismatch.png")
    labels = None if class_label is None else torch.full((num_samples,), int(class_label), dtype=torch.long)
    traj = trajectory_deviation(fp, q, scheduler, num_inference_steps, num_samples, seed, eta, labels, unet_kwargs,
                                out_dir / "trajectory_deviation.png", progress)
    ranges = {}
    for tag, model in (("fp", fp), ("q", q)):
        r = activation_ranges(model, layer_names, scheduler, num_inference_steps, num_samples, seed, eta, labels,
                              unet_kwargs, out_dir / f"activation_ranges_{tag}.png", progress)
        ranges[tag] = {"names": r["names"], "min": r["min"].tolist(), "max": r["max"].tolist()}
    write_csv(temporal_table(err, mm), out_dir / "temporal_table.csv")
    summary = {
        "temporal_cos_mean": err["mean_cos"],
        "temporal_cos_min": err["min_cos"],
        "mismatched_fraction": mm["mismatched_fraction"],
        "delta_step_mean_abs": float(mm["delta_step"].abs().double().mean()),
        "trajectory_rmse_final": traj["final_rmse"],
        "trajectory_rmse_mean": float(sum(traj["rmse"]) / len(traj["rmse"])),
        "local_rmse_mean": float(sum(traj["local_rmse"]) / len(traj["local_rmse"])),
    }
    report = {"summary": summary, "timesteps": ts, "resnets": err["names"], "cos": err["cos"].tolist(),
              "delta_step": mm["delta_step"].tolist(), "delta_timestep": mm["delta_timestep"].tolist(),
              "trajectory": {k: v for k, v in traj.items()}, "activation_ranges": ranges,
              "index_space": mm["index_space"]}
    atomic_write_json(report, out_dir / "temporal.json")
    return report
