"""Temporal feature analyses of the TFMQ-DM poster (docs/method.md sections 1 and 9): what quantization does to
``emb_{t,i}``, the output of residual block i's ``time_emb_proj`` at timestep t (down, mid, up order).

* temporal feature error: ``cos(emb_{t,i}, emb^q_{t,i})``;
* temporal information mismatch: ``delta_{t,i} = argmax_{t'} cos(emb_{t',i}, emb^q_{t,i}) - t``;
* ``temporal_table``: both per (sampler step, residual block), the rows of ``temporal_table.csv``.

Features are captured with forward hooks on every module that has a ``time_emb_proj`` (diffusers'
``ResnetBlock2D`` or a wrapper around it); the direct path (time_proj -> time_embedding (+ class
embedding) -> each ``time_emb_proj(nonlinearity(emb))``) must agree for a plain UNet and is kept as
a check. Use the hook path for quantized models: it runs the UNet forward, so per-timestep quantizer
state set by a pre-forward hook is honoured.
"""
from __future__ import annotations

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
    candidates: TemporalFeatures | None = None,
) -> dict:
    """Temporal information mismatch ``delta_{t,i} = argmax_{t'} cos(emb_{t',i}, emb^q_{t,i}) - t``.

    ``t'`` ranges over the same timestep list, or with ``candidates`` (FP features of another timestep list,
    e.g. every training timestep) over that list: then only ``delta_timestep`` (training-timestep units)
    and ``best_timestep`` are meaningful, and ``delta_step`` is the index shift within ``candidates``.
    Two index spaces are returned:

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
    cand = f
    if candidates is not None:
        if candidates.names != f.names:
            raise ValueError("candidate features come from another architecture (residual blocks differ)")
        cand = candidates
    cts = torch.tensor(cand.timesteps)
    best_idx, best_cos = [], []
    for a, b in zip(cand.features, g.features):
        a = a.double() / a.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
        b = b.double() / b.double().norm(dim=-1, keepdim=True).clamp_min(1e-300)
        sim = b @ a.T  # [t (quantized), t' (FP)]
        c, j = sim.max(dim=1)
        best_idx.append(j)
        best_cos.append(c)
    argmax = torch.stack(best_idx, dim=1)  # [T, n] index into the candidate list
    own = torch.tensor([cand.timesteps.index(int(t)) if int(t) in cand.timesteps else -1 for t in f.timesteps])
    delta_step = argmax - (torch.arange(T) if candidates is None else own)[:, None]
    delta_timestep = cts[argmax] - ts[:, None]
    out = {
        "delta_step": delta_step,
        "delta_timestep": delta_timestep,
        "best_timestep": cts[argmax],
        "argmax_step": argmax,
        "best_cos": torch.stack(best_cos, dim=1),
        "names": f.names,
        "timesteps": f.timesteps,
        "mismatched_fraction": float((delta_timestep != 0).double().mean()),
        "index_space": "delta_step: sampler-step index; delta_timestep: training timesteps",
    }
    if plot_path is not None and candidates is None:
        from tfmq.evaluation.plots import plot_temporal_mismatch

        plot_temporal_mismatch(delta_step, f.names, f.timesteps, plot_path)
    return out


# ----------------------------------------------------------------------------- table


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
