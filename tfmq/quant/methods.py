"""The built-in methods (docs/method.md sections 4-8): their step handlers, registered in
``tfmq.quant.steps``, and their recipes, registered in ``tfmq.quant.recipes`` (bottom of this file).

temporal: ``tiar`` (TFMQ-DM), ``nearest`` (the poster's 'Freeze', naive), ``joint`` (BRECQ / Q-Diffusion:
the temporal layers are reconstructed with their blocks). weight_set: ``every_k`` (Q-Diffusion / TFMQ),
``ptq4dm`` (NDTC). block_recon: ``brecq``, ``nearest``. activations: ``minmax``, ``ema``, ``fsc``,
``learned`` (Q-Diffusion's step-size learning after an EMA init).
"""
from __future__ import annotations

from typing import Any

import torch

from .cache import MemoryPolicy
from .config import ConfigError, QuantConfig
from .fsc import calibrate_shared_ranges, finite_set_calibration, temporal_act_quantizers
from .prepare import act_quantizers
from .recipes import Recipe, register_recipe
from .reconstruction import finalize_all_nearest, learn_activation_steps, reconstruct_units
from .steps import StepContext, register_step
from .tiar import round_temporal_to_nearest, tiar


def _check_rows(calib, n: int | None, field: str) -> None:
    """An explicit rows-per-step count must exist in the calibration set (the error names the field)."""
    if n is not None and n > calib.rows_per_step:
        raise ConfigError(
            f"calib.{field}={n} but the calibration set {calib.path} recorded {calib.rows_per_step} rows per step; "
            f'pass QuantConfig(calib={{"{field}": {calib.rows_per_step}}}) or fewer (None: every recorded row; the paper used 256)'
        )


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


# --- weight_set ---------------------------------------------------------------------------------
@register_step("weight_set", "every_k")
def every_k_rows(calib, config: QuantConfig) -> dict[str, torch.Tensor]:
    """Every k-th sampler step, ``calib.n_per_step`` random rows each."""
    from ..diffusion import calibration as cd

    _check_rows(calib, config.calib.n_per_step, "n_per_step")
    return cd.every_kth_step(calib, config.calib.every_k, config.calib.n_per_step, seed=config.seed)


@register_step("weight_set", "ptq4dm")
def ptq4dm_rows(calib, config: QuantConfig) -> dict[str, torch.Tensor]:
    """PTQ4DM's NDTC: as many rows as the every-k set (or ``ptq4dm_n_total``), timesteps skewed to small t.

    ``n_per_step`` only sets the row count here (rows are drawn per step by NDTC, up to what each step has).
    """
    from ..diffusion import calibration as cd

    c = config.calib
    per_step = c.n_per_step if c.n_per_step is not None else calib.rows_per_step
    n_total = c.ptq4dm_n_total or len(range(0, calib.num_steps, c.every_k)) * per_step
    # t / T_train ~ N(ptq4dm_t_mean, ptq4dm_t_std): PTQ4DM's scripts use N(0.4, 0.4)
    return cd.ptq4dm_timesteps(calib, n_total, mean_frac=c.ptq4dm_t_mean, std_frac=c.ptq4dm_t_std, seed=config.seed)


def weight_calibration_rows(calib, config: QuantConfig, weight_set: str) -> dict[str, torch.Tensor]:
    """The rows of the registered ``weight_set`` step ``weight_set``."""
    from .steps import get_step

    return get_step("weight_set", weight_set)(calib, config)


# --- temporal -----------------------------------------------------------------------------------
@register_step("temporal", "tiar")
def temporal_tiar(ctx: StepContext) -> dict[str, Any]:
    cfg = ctx.config
    k = cfg.calib.every_k if cfg.tiar_timesteps == "weight_set" else 1
    t, c = tiar_inputs(ctx.calib, k)
    return tiar(ctx.unet, t, c, cfg.tiar_recon, cfg.recon, ctx.device, ctx.progress, seed=cfg.seed, resume=ctx.resume)


@register_step("temporal", "nearest")
def temporal_nearest(ctx: StepContext) -> dict[str, Any]:
    return {"rounded_to_nearest": round_temporal_to_nearest(ctx.unet)}


@register_step("temporal", "joint")
def temporal_joint(ctx: StepContext) -> dict[str, Any]:
    return {"note": "temporal layers are reconstructed jointly with their blocks by this method"}


# --- block_recon --------------------------------------------------------------------------------
@register_step("block_recon", "brecq")
def blocks_brecq(ctx: StepContext) -> dict[str, Any]:
    cfg = ctx.config
    data = ctx.weight_rows()
    stats = reconstruct_units(ctx.unet, data, cfg.recon, ctx.device, progress=ctx.progress, seed=cfg.seed,
                              resume=ctx.resume, memory=ctx.memory or MemoryPolicy())
    stats["weight_set"] = ctx.recipe.weight_set
    stats["timesteps_used"] = sorted(set(int(v) for v in data["timestep"].tolist()))
    return stats


@register_step("block_recon", "nearest")
def blocks_nearest(ctx: StepContext) -> dict[str, Any]:
    return {"rounded_to_nearest": finalize_all_nearest(ctx.unet)}


# --- activations --------------------------------------------------------------------------------
def _fsc_steps(calib, n_per_step: int | None) -> list[tuple[int, Any]]:
    """``[(t, loader)]``: each step's rows are read when FSC gets to that step, not all at once."""
    from ..diffusion import calibration as cd

    # select_steps keeps null/conditional pairs together when rows are subsampled (CFG)
    def loader(i: int):
        return (lambda: calib.load_step(i)) if n_per_step is None else (lambda: cd.select_steps(calib, [i], n_per_step))

    return [(int(t), loader(i)) for i, t in enumerate(calib.timesteps)]


def _shared(ctx: StepContext, momentum: float | None) -> dict[str, Any]:
    from ..diffusion import calibration as cd

    c, cfg = ctx.config.calib, ctx.config
    _check_rows(ctx.calib, c.fsc_n_per_step, "fsc_n_per_step")
    rows = cd.all_steps(ctx.calib, c.fsc_n_per_step)
    everything = [q for _, q in act_quantizers(ctx.unet)]
    return calibrate_shared_ranges(ctx.unet, rows, everything, c.fsc_batch_size, momentum, ctx.device, cfg.seed, ctx.progress)


@register_step("activations", "minmax")
def activations_minmax(ctx: StepContext) -> dict[str, Any]:
    return {"shared": _shared(ctx, None)}


@register_step("activations", "ema")
def activations_ema(ctx: StepContext) -> dict[str, Any]:
    return {"shared": _shared(ctx, ctx.config.calib.fsc_momentum)}


@register_step("activations", "learned")
def activations_learned(ctx: StepContext) -> dict[str, Any]:
    cfg = ctx.config
    stats = {"shared": _shared(ctx, cfg.calib.fsc_momentum)}
    data = ctx.weight_rows()
    stats["learned"] = learn_activation_steps(ctx.unet, data, cfg.act_recon, ctx.device, progress=ctx.progress, seed=cfg.seed,
                                              resume=ctx.resume, memory=ctx.memory or MemoryPolicy())
    return stats


@register_step("activations", "fsc")
def activations_fsc(ctx: StepContext) -> dict[str, Any]:
    from ..diffusion import calibration as cd

    cfg, c, unet = ctx.config, ctx.config.calib, ctx.unet
    _check_rows(ctx.calib, c.fsc_n_per_step, "fsc_n_per_step")
    everything = [q for _, q in act_quantizers(unet)]
    steps = _fsc_steps(ctx.calib, c.fsc_n_per_step)
    table_q = everything if cfg.fsc_scope == "all" else temporal_act_quantizers(unet)
    stats: dict[str, Any] = {
        "fsc": finite_set_calibration(unet, steps, table_q, c.fsc_batch_size, c.fsc_momentum, ctx.device, cfg.seed, ctx.progress,
                                      resume=ctx.resume)
    }
    rest = [q for q in everything if q.mode == "uncalibrated"]
    if rest:
        rows = cd.all_steps(ctx.calib, c.fsc_n_per_step)
        stats["shared"] = calibrate_shared_ranges(unet, rows, rest, c.fsc_batch_size, c.fsc_momentum, ctx.device, cfg.seed, ctx.progress)
    stats["fsc_scope"] = cfg.fsc_scope
    return stats


# --- correction ---------------------------------------------------------------------------------
@register_step("correction", "none")
def correction_none(ctx: StepContext) -> dict[str, Any]:
    return {}


@register_step("correction", "ptqd")
def correction_ptqd(ctx: StepContext) -> dict[str, Any]:
    """PTQD: FP vs quantized predictions on every calibration step (guided for a CFG set), then the tables."""
    from ..diffusion import calibration as cd
    from .prepare import enable_inference, set_quant_state
    from .ptqd import attach_noise_correction, fit_noise_correction

    cfg, calib, unet = ctx.config, ctx.calib, ctx.unet
    c = cfg.calib
    _check_rows(calib, c.fsc_n_per_step, "fsc_n_per_step")
    scale = float(calib.meta.get("guidance_scale", 1.0)) if calib.cfg else 1.0
    eps_fp, eps_q, ts = [], [], []
    for i, t in enumerate(calib.timesteps):
        rows = calib.load_step(i) if c.fsc_n_per_step is None else cd.select_steps(calib, [i], c.fsc_n_per_step, cfg.seed)
        outs = []
        for quantized in (False, True):
            if quantized:
                enable_inference(unet)
            else:
                set_quant_state(unet, weight=False, act=False)
            n = rows["sample"].shape[0]
            with torch.no_grad():
                out = torch.cat([unet(**{k: v[j:j + 64].to(ctx.device) for k, v in rows.items()}).sample.float().cpu()
                                 for j in range(0, n, 64)])
            if calib.cfg:  # rows [0, N) null, [N, 2N) conditional: the guided prediction, as PTQD fits it
                null, cond = out.chunk(2)
                out = null + scale * (cond - null)
            outs.append(out)
        eps_fp.append(outs[0])
        eps_q.append(outs[1])
        ts.append(int(t))
    enable_inference(unet)
    corr, stats = fit_noise_correction(eps_fp, eps_q, ts)
    attach_noise_correction(unet, corr)
    stats["guided_fit"] = bool(calib.cfg)
    stats["variance_absorption"] = "sampler noise reduced only when DDIM eta > 0 or DDPM (tfmq.diffusion.sampling.sample)"
    return {"ptqd": stats}


# The built-in methods as recipes (docs/method.md section 8 has the same table).
register_recipe(Recipe(
    "naive", policy="all", attention_matmul=False, split_shortcut=False, temporal="nearest",
    weight_set="every_k", block_recon="nearest", activations="minmax",
    description="RTN: MSE-initialised weights rounded to nearest, one min-max activation range",
))
register_recipe(Recipe(
    "brecq", policy="tfmq", attention_matmul=False, split_shortcut=False, temporal="joint",
    weight_set="every_k", block_recon="brecq", activations="ema",
    description="BRECQ with the temporal layers optimised inside their blocks (the ablation baseline of the paper)",
))
register_recipe(Recipe(
    "freeze", policy="tfmq", attention_matmul=False, split_shortcut=False, temporal="nearest",
    weight_set="every_k", block_recon="brecq", activations="ema",
    description="BRECQ with the temporal layers frozen and rounded to nearest (the poster's 'Freeze')",
))
register_recipe(Recipe(
    "ptq4dm", policy="all", attention_matmul=False, split_shortcut=False, temporal="joint",
    weight_set="ptq4dm", block_recon="brecq", activations="ema",
    description="PTQ4DM: normally distributed calibration timesteps skewed to small t, then BRECQ",
))
register_recipe(Recipe(
    "qdiffusion", policy="all", attention_matmul=True, split_shortcut=True, temporal="joint",
    weight_set="every_k", block_recon="brecq", activations="learned",
    description="Q-Diffusion: time-step-aware calibration, BRECQ, shortcut splitting, learned activation steps",
))
register_recipe(Recipe(
    "ptqd", policy="all", attention_matmul=True, split_shortcut=True, temporal="joint",
    weight_set="every_k", block_recon="brecq", activations="learned", correction="ptqd",
    description="PTQD: Q-Diffusion, then per-timestep correlated-noise and bias correction (+ variance absorption when eta > 0)",
))
register_recipe(Recipe(
    "tfmq", policy="tfmq", attention_matmul=False, split_shortcut=False, temporal="tiar",
    weight_set="every_k", block_recon="brecq", activations="fsc",
    description="TFMQ-DM: TIAR on the temporal information block, BRECQ with it frozen, finite set calibration",
))
