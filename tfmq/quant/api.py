"""The public verbs: prepare, the three reconstruction/calibration stages, and ``quantize``.

Each stage looks up the handler its method's recipe names for that step (``tfmq.quant.steps``;
the ablation switches ``tiar``/``fsc`` substitute ``nearest``/``ema``) and calls it. The stages can run in separate processes: save the model with
``tfmq.save`` after a stage and ``tfmq.load`` it onto a fresh FP model before the next one.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .methods import tiar_inputs
from .config import QuantConfig, cap_stage_iters
from .prepare import enable_inference, get_state, is_quantized, prepare_model, resolve_config, set_quant_state
from .cache import MemoryPolicy
from .resume import UnitProgress, stage_identity
from .steps import StepContext, get_step, resolve_step
from .tib import TemporalInformationBlock, install_feature_cache

STAGES = ("temporal", "blocks", "activations")


def _device(unet: nn.Module, device) -> torch.device:
    return torch.device(device) if device is not None else next(unet.parameters()).device


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(passed: QuantConfig, prepared: QuantConfig) -> list[tuple[str, Any, Any]]:
    """``(field, passed value, prepared value)`` for every field (nested as ``recon.iters``) in which
    ``passed``, resolved against its recipe as ``prepare_model`` does, differs from ``prepared``."""
    a, b = _flat(resolve_config(passed).to_dict()), _flat(prepared.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _begin(unet: nn.Module, stage: str, config: QuantConfig | None):
    state = get_state(unet)
    if config is not None:
        diffs = config_differences(config, state.config)
        if diffs:
            listed = "; ".join(f"{k}: passed {v!r}, prepared with {w!r}" for k, v, w in diffs)
            raise ValueError(
                f"stage {stage!r}: the config passed differs from the one this model was prepared with "
                f"(stored by prepare_model / the checkpoint) in {len(diffs)} field(s): {listed}. A stage always runs "
                "on the prepared config: pass config=None (or that same config), or prepare a fresh FP model with "
                "the new config (tfmq.prepare_model) / load the checkpoint that matches it"
            )
    if stage in state.stages_done:
        raise ValueError(f"stage {stage!r} has already run on this model (done: {', '.join(state.stages_done)})")
    need = STAGES[: STAGES.index(stage)]
    missing = [s for s in need if s not in state.stages_done]
    if missing:
        raise ValueError(f"stage {stage!r} needs {', '.join(missing)} first (done: {', '.join(state.stages_done) or 'none'})")
    return state


def _context(unet: nn.Module, calib, state, stage: str, device, progress: bool, resume_dir=None,
             memory_budget_mb: float | None = None, spill_dir=None) -> tuple[StepContext, dict[str, Any]]:
    config, capped = cap_stage_iters(state.config, stage)
    ctx = StepContext(unet, calib, config, state.recipe, _device(unet, device), progress,
                      memory=MemoryPolicy(memory_budget_mb, None if spill_dir is None else str(spill_dir)))
    if resume_dir is not None:
        ctx.resume = UnitProgress(resume_dir, stage_identity(unet, calib, config))
    return ctx, capped


def reconstruct_temporal(unet: nn.Module, calib, config: QuantConfig | None = None, device=None, progress: bool = True,
                         resume_dir=None) -> dict[str, Any]:
    """Stage 1: the recipe's ``temporal`` step: TIAR (``tfmq``), round-to-nearest freeze
    (``freeze``/``naive``), or nothing (``joint``: the temporal layers go with their blocks).

    Args:
        config: ``None`` (the config stored at ``prepare_model``) or that same config; any other is refused.
        resume_dir: as for ``reconstruct_blocks``; TIAR is one unit.
    """
    state = _begin(unet, "temporal", config)
    ctx, capped = _context(unet, calib, state, "temporal", device, progress, resume_dir)
    mode = resolve_step("temporal", state.recipe, state.config)
    t0 = time.perf_counter()
    stats = get_step("temporal", mode)(ctx)
    stats.update(mode=mode, seconds=time.perf_counter() - t0)
    if capped:
        stats["iters_capped"] = capped
    state.stages_done.append("temporal")
    state.stats["temporal"] = stats
    set_quant_state(unet, weight=True, act=False)
    return stats


def reconstruct_blocks(
    unet: nn.Module, calib, config: QuantConfig | None = None, device=None, progress: bool = True, resume_dir=None,
    memory_budget_mb: float | None = None, spill_dir=None,
) -> dict[str, Any]:
    """Stage 2: the recipe's ``block_recon`` step on every remaining unit (BRECQ, or round-to-nearest);
    the TIB layers stay as stage 1 left them. ``config``: as for ``reconstruct_temporal``.

    Args:
        resume_dir: ``None`` (default: nothing is read or written) or a directory where the stage files
            every finished unit (here every BRECQ block or layer). A re-run with the same FP model, entering
            state, calibration set and config restores those units and continues with the next one, ending
            bit-identical to an uninterrupted run; progress written for anything else is discarded (one log
            line). The directory is left in place: delete it once the stage's output is saved.
        memory_budget_mb: ``None`` (default: every unit's cached inputs and targets in memory, on the CPU)
            or the most MiB one unit's cache may hold in memory; a larger one is written to files in
            ``spill_dir`` (default: the system temp dir) as it is captured and read back per mini-batch.
            Either way each mini-batch is moved to ``device`` when it is used, and the result is the same.
    """
    state = _begin(unet, "blocks", config)
    ctx, capped = _context(unet, calib, state, "blocks", device, progress, resume_dir, memory_budget_mb, spill_dir)
    t0 = time.perf_counter()
    stats = get_step("block_recon", resolve_step("block_recon", state.recipe, state.config))(ctx)
    stats["seconds"] = time.perf_counter() - t0
    if capped:
        stats["iters_capped"] = capped
    state.stages_done.append("blocks")
    state.stats["blocks"] = stats
    return stats


def calibrate_activations(unet: nn.Module, calib, config: QuantConfig | None = None, device=None, progress: bool = True,
                          resume_dir=None, memory_budget_mb: float | None = None, spill_dir=None) -> dict[str, Any]:
    """Stage 3: the recipe's ``activations`` step (FSC / shared EMA / min-max / Q-Diffusion learned steps),
    then the feature cache if configured. ``config``: as for ``reconstruct_temporal``.

    Args:
        resume_dir: as for ``reconstruct_blocks``; the units are the FSC timesteps, or the units of
            Q-Diffusion's step-size learning.
        memory_budget_mb, spill_dir: as for ``reconstruct_blocks`` (the caches of the step-size learning);
            FSC reads one calibration step at a time.
    """
    state = _begin(unet, "activations", config)
    cfg = state.config
    ctx, capped = _context(unet, calib, state, "activations", device, progress, resume_dir, memory_budget_mb, spill_dir)
    t0 = time.perf_counter()
    mode = resolve_step("activations", state.recipe, cfg)
    stats: dict[str, Any] = {"mode": mode}
    if cfg.act_bits is None:
        stats["note"] = "weight-only (A32): no activation quantizers"
    else:
        stats.update(get_step("activations", mode)(ctx))
    if cfg.cached_temporal_features:
        t, cl = tiar_inputs(calib)
        stats["cached_temporal_features"] = install_feature_cache(unet, t, cl)
    stats.update(_correct(unet, ctx, state))
    stats["seconds"] = time.perf_counter() - t0
    if capped and cfg.act_bits is not None:
        stats["iters_capped"] = capped
    state.stages_done.append("activations")
    state.stats["activations"] = stats
    enable_inference(unet)
    return stats


def _correct(unet: nn.Module, ctx: StepContext, state) -> dict[str, Any]:
    """The recipe's ``correction`` step on the finished model (weights and activations quantized)."""
    correction = resolve_step("correction", state.recipe, state.config)
    if correction == "none":
        return {}
    enable_inference(unet)
    return {"correction": {"mode": correction, **get_step("correction", correction)(ctx)}}


def adopt_activations(path, fp_unet: nn.Module, calib, config: QuantConfig, device=None, progress: bool = True) -> dict[str, Any]:
    """Stages 1-3 of ``config`` taken from another config's finished checkpoint, then ``config``'s correction.

    The checkpoint at ``path`` must come from a config that runs the same TIAR, block reconstruction and
    activation step (``tfmq.quant.share.same_activations``: e.g. ``qdiffusion`` for ``ptqd``, whose
    recipe only adds a correction after them) and carry no correction itself; anything else is a
    ``CheckpointMismatchError`` naming the fields that differ. ``fp_unet`` is prepared with ``config``,
    gets every quantizer as saved and is then corrected on ``calib`` as ``calibrate_activations`` would
    (the same numbers as quantizing ``config`` from scratch: tests/test_share.py).

    Returns:
        the activation stage's stats: the saved ones, the correction's (``correction``, ``correction_s``)
        and ``adopted_from`` (the checkpoint path and its method).
    """
    from .checkpoint import _load

    unet = _load(path, fp_unet, device, config, "activations")
    state = get_state(unet)
    ctx, _ = _context(unet, calib, state, "activations", device, progress)
    t0 = time.perf_counter()
    corr = _correct(unet, ctx, state)
    stats = {k: v for k, v in state.stats.get("activations", {}).items() if k != "correction"}
    stats.update(corr, correction_s=time.perf_counter() - t0,
                 adopted_from={"path": str(path), "method": state.stats["activations_from"]["config"]["method"]})
    state.stats["activations"] = stats
    enable_inference(unet)
    return stats


def quantize(unet: nn.Module, calib, config: QuantConfig, device=None, progress: bool = True, resume_dir=None,
             memory_budget_mb: float | None = None, spill_dir=None) -> nn.Module:
    """Quantize ``unet`` in place with ``config.method`` and return it, ready for sampling.

    Args:
        unet: a diffusers ``UNet2DModel`` or ``UNet2DConditionModel`` (FP).
        calib: a ``tfmq.CalibrationSet`` recorded along the sampler's trajectories.
        config: ``tfmq.QuantConfig``. If ``unet`` is already prepared (e.g. loaded from a checkpoint
            after some stages), the remaining stages run and ``config`` must equal the stored one.
        resume_dir: ``None`` or a directory; each stage keeps its progress in a subdirectory of it
            (``temporal/``, ``blocks/``, ``activations/``; see ``reconstruct_blocks``), so a call killed
            half-way and made again continues where it stopped. Delete it once the model is saved.
        memory_budget_mb, spill_dir: see ``reconstruct_blocks``.

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
            kw = {} if stage == "temporal" else {"memory_budget_mb": memory_budget_mb, "spill_dir": spill_dir}
            sub = None if resume_dir is None else Path(resume_dir) / stage
            fn(unet, calib, config, dev, progress, resume_dir=sub, **kw)  # an already-prepared model must match config
    return unet


def quant_summary(unet: nn.Module) -> dict[str, Any]:
    """Counts of quantized layers / activation quantizers and the TIB size, for logs and reports."""
    from .prepare import act_quantizers, quant_layers

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

