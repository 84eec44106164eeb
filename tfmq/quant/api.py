"""The public verbs: prepare, the three reconstruction/calibration stages, and ``quantize``.

Each stage reads the method's recipe (``tfmq.quant.recipes``) and does that recipe's step, or records
that the recipe has none. The stages can run in separate processes: save the model with
``tfmq.save`` after a stage and ``tfmq.load`` it onto a fresh FP model before the next one.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .fsc import calibrate_shared_ranges, finite_set_calibration, temporal_act_quantizers
from .prepare import act_quantizers, enable_inference, get_state, is_quantized, prepare_model, set_quant_state
from .reconstruction import (
    finalize_all_nearest,
    learn_activation_steps,
    reconstruct_units,
    round_temporal_to_nearest,
    tiar,
)
from .tib import TemporalInformationBlock, install_feature_cache

STAGES = ("temporal", "blocks", "activations")


def _device(unet: nn.Module, device) -> torch.device:
    return torch.device(device) if device is not None else next(unet.parameters()).device


def _begin(unet: nn.Module, stage: str, config: QuantConfig | None):
    state = get_state(unet)
    if config is not None:
        for key in ("method", "weight_bits", "act_bits"):
            if getattr(config, key) != getattr(state.config, key):
                raise ValueError(
                    f"stage {stage!r}: config.{key}={getattr(config, key)!r} but the model was prepared with "
                    f"{getattr(state.config, key)!r}; load the matching checkpoint or prepare a fresh FP model"
                )
    if stage in state.stages_done:
        raise ValueError(f"stage {stage!r} has already run on this model (done: {', '.join(state.stages_done)})")
    need = STAGES[: STAGES.index(stage)]
    missing = [s for s in need if s not in state.stages_done]
    if missing:
        raise ValueError(f"stage {stage!r} needs {', '.join(missing)} first (done: {', '.join(state.stages_done) or 'none'})")
    return state


def _temporal_mode(state) -> str:
    mode = state.recipe.temporal
    if mode == "tiar" and not state.config.tiar:
        return "nearest"
    return mode


def _activation_mode(state) -> str:
    mode = state.recipe.activations
    if mode == "fsc" and not state.config.fsc:
        return "ema"
    return mode


def tiar_inputs(calib, every_k: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The finite set TIAR is fitted on: every (k-th) sampler timestep x every class seen, if any."""
    ts, cs = [], []
    for i, t in enumerate(calib.timesteps):
        if i % every_k:
            continue
        labels = calib.load_step(i).get("class_labels")
        if labels is None:
            ts.append(int(t))
        else:
            for c in sorted(set(int(v) for v in labels.tolist())):
                ts.append(int(t))
                cs.append(c)
    t = torch.tensor(ts, dtype=torch.int64)
    return t, (torch.tensor(cs, dtype=torch.int64) if cs else None)


def weight_calibration_rows(calib, config: QuantConfig, weight_set: str) -> dict[str, torch.Tensor]:
    from ..diffusion import calibration as cd

    c = config.calib
    if weight_set == "ptq4dm":
        n_total = c.ptq4dm_n_total or len(range(0, calib.num_steps, c.every_k)) * c.n_per_step
        # config: fraction along the trajectory (0.75 = late steps, small t); the selector takes t / T
        return cd.ptq4dm_timesteps(calib, n_total, mean_frac=1.0 - c.ptq4dm_mean_frac, std_frac=c.ptq4dm_std_frac, seed=config.seed)
    return cd.every_kth_step(calib, c.every_k, c.n_per_step)


def reconstruct_temporal(unet: nn.Module, calib, config: QuantConfig | None = None, device=None, progress: bool = True) -> dict[str, Any]:
    """Stage 1: TIAR (``tfmq``), round-to-nearest freeze (``freeze``/``naive``), or nothing (joint)."""
    state = _begin(unet, "temporal", config)
    dev = _device(unet, device)
    mode = _temporal_mode(state)
    t0 = time.perf_counter()
    if mode == "tiar":
        k = state.config.calib.every_k if state.config.tiar_timesteps == "weight_set" else 1
        t, c = tiar_inputs(calib, k)
        stats = tiar(unet, t, c, state.config.tiar_recon, state.config.recon, dev, progress, seed=state.config.seed)
    elif mode == "nearest":
        stats = {"rounded_to_nearest": round_temporal_to_nearest(unet)}
    else:
        stats = {"note": "temporal layers are reconstructed jointly with their blocks by this method"}
    stats.update(mode=mode, seconds=time.perf_counter() - t0)
    state.stages_done.append("temporal")
    state.stats["temporal"] = stats
    set_quant_state(unet, weight=True, act=False)
    return stats


def reconstruct_blocks(unet: nn.Module, calib, config: QuantConfig | None = None, device=None, progress: bool = True) -> dict[str, Any]:
    """Stage 2: BRECQ on every remaining unit (TIB layers stay as stage 1 left them)."""
    state = _begin(unet, "blocks", config)
    dev = _device(unet, device)
    t0 = time.perf_counter()
    if state.recipe.block_recon:
        data = weight_calibration_rows(calib, state.config, state.recipe.weight_set)
        stats = reconstruct_units(unet, data, state.config.recon, dev, progress=progress, seed=state.config.seed)
        stats["weight_set"] = state.recipe.weight_set
        stats["timesteps_used"] = sorted(set(int(v) for v in data["timestep"].tolist()))
    else:
        stats = {"rounded_to_nearest": finalize_all_nearest(unet)}
    stats["seconds"] = time.perf_counter() - t0
    state.stages_done.append("blocks")
    state.stats["blocks"] = stats
    return stats


def _steps(calib, n_per_step: int | None) -> list[tuple[int, dict[str, torch.Tensor]]]:
    from ..diffusion import calibration as cd

    out = []
    for i, t in enumerate(calib.timesteps):
        # select_steps keeps null/conditional pairs together when rows are subsampled (CFG)
        rows = calib.load_step(i) if n_per_step is None else cd.select_steps(calib, [i], n_per_step)
        out.append((int(t), rows))
    return out


def calibrate_activations(unet: nn.Module, calib, config: QuantConfig | None = None, device=None, progress: bool = True) -> dict[str, Any]:
    """Stage 3: activation ranges (FSC / shared EMA / min-max / Q-Diffusion learned steps)."""
    from ..diffusion import calibration as cd

    state = _begin(unet, "activations", config)
    cfg = state.config
    dev = _device(unet, device)
    t0 = time.perf_counter()
    mode = _activation_mode(state)
    c = cfg.calib
    stats: dict[str, Any] = {"mode": mode}
    if cfg.act_bits is None:
        stats["note"] = "weight-only (A32): no activation quantizers"
    else:
        everything = [q for _, q in act_quantizers(unet)]
        if mode == "fsc":
            steps = _steps(calib, c.fsc_n_per_step)
            table_q = everything if cfg.fsc_scope == "all" else temporal_act_quantizers(unet)
            stats["fsc"] = finite_set_calibration(unet, steps, table_q, c.fsc_batch_size, c.fsc_momentum, dev, cfg.seed, progress)
            rest = [q for q in everything if q.mode == "uncalibrated"]
            if rest:
                rows = cd.all_steps(calib, c.fsc_n_per_step)
                stats["shared"] = calibrate_shared_ranges(unet, rows, rest, c.fsc_batch_size, c.fsc_momentum, dev, cfg.seed, progress)
            stats["fsc_scope"] = cfg.fsc_scope
        else:
            rows = cd.all_steps(calib, c.fsc_n_per_step)
            momentum = None if mode == "minmax" else c.fsc_momentum
            stats["shared"] = calibrate_shared_ranges(unet, rows, everything, c.fsc_batch_size, momentum, dev, cfg.seed, progress)
            if mode == "learned":
                data = weight_calibration_rows(calib, cfg, state.recipe.weight_set)
                stats["learned"] = learn_activation_steps(unet, data, cfg.act_recon, dev, progress=progress, seed=cfg.seed)
    if cfg.cached_temporal_features:
        t, cl = tiar_inputs(calib)
        stats["cached_temporal_features"] = install_feature_cache(unet, t, cl)
    stats["seconds"] = time.perf_counter() - t0
    state.stages_done.append("activations")
    state.stats["activations"] = stats
    enable_inference(unet)
    return stats


def quantize(unet: nn.Module, calib, config: QuantConfig, device=None, progress: bool = True) -> nn.Module:
    """Quantize ``unet`` in place with ``config.method`` and return it, ready for sampling.

    Args:
        unet: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` (FP).
        calib: a ``tfmq.CalibrationSet`` recorded along the sampler's trajectories.
        config: ``tfmq.QuantConfig``.

    Example:
        >>> calib = tfmq.capture_calibration_data(unet, scheduler, "calib/", num_samples=64, num_inference_steps=50)
        >>> qunet = tfmq.quantize(unet, calib, tfmq.QuantConfig(method="tfmq", weight_bits=4, act_bits=8))
        >>> tfmq.save(qunet, "qunet/")
    """
    if not is_quantized(unet):
        prepare_model(unet, config)
    dev = _device(unet, device)
    unet.to(dev)
    state = get_state(unet)
    for stage, fn in (("temporal", reconstruct_temporal), ("blocks", reconstruct_blocks), ("activations", calibrate_activations)):
        if stage not in state.stages_done:
            fn(unet, calib, None, dev, progress)
    return unet


def quant_summary(unet: nn.Module) -> dict[str, Any]:
    """Counts of quantized layers / activation quantizers and the TIB size, for logs and reports."""
    from .prepare import quant_layers

    state = get_state(unet)
    layers = list(quant_layers(unet))
    return {
        "method": state.config.method,
        "bits": state.config.bits_name,
        "policy": state.config.policy,
        "quantized_layers": len(layers),
        "act_quantizers": sum(1 for _ in act_quantizers(unet)),
        "tib_resnets": len(TemporalInformationBlock(unet).resnets),
        "stages_done": list(state.stages_done),
        "simulated": True,
    }
