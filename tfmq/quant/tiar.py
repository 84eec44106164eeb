"""Temporal Information Aware Reconstruction, TIAR (docs/method.md section 4), and the round-to-nearest
freeze of the Temporal Information Block that the 'Freeze' and naive recipes use instead.

TIAR fits AdaRound on the TIB's quantized Linears against the FP temporal features ``emb_{t,i}`` of
the finite set of sampler timesteps, so that the features every resnet receives stay those of FP.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch import nn

from .config import ReconConfig, TiarConfig
from .prepare import quant_layers, set_quant_state
from .reconstruction import lp_loss, optimize_rows, rounding_regularizer
from .tib import TemporalInformationBlock


def tiar_loss(q_feats: list[torch.Tensor], fp_feats: list[torch.Tensor]) -> torch.Tensor:
    """``sum_i ||g^q_i(h^q(t)) - g_i(h(t))||^2``: squared error summed over channels and resnets i,
    mean over the rows (timesteps, or (timestep, class) pairs)."""
    return sum(lp_loss(f, tgt) for f, tgt in zip(q_feats, fp_feats))


def tiar(
    unet: nn.Module,
    timesteps: torch.Tensor,
    class_labels: torch.Tensor | None,
    cfg: TiarConfig,
    reg_cfg: ReconConfig,
    device,
    progress: bool = True,
    seed: int = 0,
    resume=None,
) -> dict[str, Any]:
    """Temporal Information Aware Reconstruction: AdaRound on the TIB against FP temporal features.

    ``L = tiar_loss(g^q(h^q(t)), g(h(t)))`` plus the rounding regulariser over the TIB's quantized
    Linears. Weight-only. Afterwards every TIB layer is hard-rounded and frozen.

    ``resume``: a ``tfmq.quant.resume.UnitProgress``; TIAR is one unit, filed when it ends and restored
    (not re-run) when the progress holds it for the same model state, rows and settings.

    Returns:
        stats: ``iters``, ``rec_loss_first``/``rec_loss_last`` (mini-batch losses), ``loss_final``
        (``tiar_loss`` over every row after hard rounding), ``rows``, ``layers``, ``seconds``
        (plus ``resumed_units`` with ``resume``).
    """
    tib = TemporalInformationBlock(unet)
    names = set(tib.layer_names())
    layers = [l for n, l in quant_layers(unet) if n in names]
    t = timesteps.to(device)
    c = None if class_labels is None else class_labels.to(device)
    if resume is not None:
        from .resume import model_state_digest, tensor_digest

        rows = {"timestep": timesteps} if class_labels is None else {"timestep": timesteps, "class_labels": class_labels}
        done = resume.open({"entering_state": model_state_digest(unet), "rows": tensor_digest(rows),
                            "layers": sorted(names), "tiar": dataclasses.asdict(cfg), "recon": dataclasses.asdict(reg_cfg),
                            "seed": seed})
        if done:
            stats = resume.restore(done[0], layers, last=True)[0]
            return {**stats, "resumed_units": resume.restored}
    set_quant_state(unet, weight=False, act=False)
    with torch.no_grad():
        targets = [f.detach() for f in tib.features(t, c)]
    set_quant_state(unet, weight=True, act=False)
    for l in layers:
        l.init_adaround()
    params = [p for l in layers for p in l.adaround_parameters()]

    def step_fn(idx):
        feats = tib.features(t[idx], None if c is None else c[idx])
        return tiar_loss(feats, [tgt[idx] for tgt in targets])

    t0 = time.perf_counter()
    stats = optimize_rows(
        step_fn, len(t), params, cfg.iters, cfg.batch_size, cfg.lr, rounding_regularizer(layers, reg_cfg, cfg.iters),
        "TIAR", progress, seed=seed,
    )
    for l in layers:
        l.finalize()
    with torch.no_grad():
        final = float(tiar_loss(tib.features(t, c), targets))
    stats.update(loss_final=final, rows=len(t), layers=len(layers), seconds=time.perf_counter() - t0)
    if resume is not None:
        resume.record(0, "temporal information block", stats, layers)
        stats["resumed_units"] = 0
    return stats


def round_temporal_to_nearest(unet: nn.Module) -> int:
    """Freeze the TIB's quantized layers at round-to-nearest (the poster's 'Freeze' / naive)."""
    names = set(TemporalInformationBlock(unet).layer_names())
    n = 0
    for name, l in quant_layers(unet):
        if name in names:
            l.finalize()
            n += 1
    return n
