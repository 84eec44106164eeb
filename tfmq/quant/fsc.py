"""Activation range calibration: Finite Set Calibration (docs/method.md section 5) and shared ranges.

FSC keeps one (scale, zero point) per sampler timestep: for each t, that step's calibration
rows are shuffled and forwarded in mini-batches of 16 with the whole model in quantized mode
(later layers see quantized inputs); each quantizer keeps an EMA (momentum 0.95) of the batch
min/max. The baselines use one shared range: plain min-max (naive) or EMA min-max.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .prepare import act_quantizers, quant_layers, set_quant_state
from .quantizer import ActQuantizer
from .reconstruction import Batch, batches, num_rows


def _enable_only(unet: nn.Module, active: list[ActQuantizer]) -> None:
    """Enable the quantizers being calibrated plus every one already calibrated."""
    ids = {id(q) for q in active}
    for _, q in act_quantizers(unet):
        q.enabled = id(q) in ids or q.mode != "uncalibrated"


def temporal_act_quantizers(unet: nn.Module) -> list[ActQuantizer]:
    """Activation quantizers of the Temporal Information Block (inputs of its Linears)."""
    return [q for _, l in quant_layers(unet) if l.temporal and l.aq is not None for q in l.aq]


def calibrate_shared_ranges(
    unet: nn.Module,
    data: Batch,
    quantizers: list[ActQuantizer],
    batch_size: int,
    momentum: float | None,
    device,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """One range per quantizer over all ``data`` rows (shuffled): EMA, or min-max if momentum is None."""
    t0 = time.perf_counter()
    set_quant_state(unet, weight=True, act=False)
    _enable_only(unet, quantizers)
    for q in quantizers:
        q.start_observing(momentum)
    order = torch.randperm(num_rows(data), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for b in tqdm(list(batches(data, batch_size, device, order)), desc="activation ranges", disable=not progress, leave=False):
            unet(**b)
    for q in quantizers:
        q.commit_shared()
    return {"quantizers": len(quantizers), "rows": num_rows(data), "momentum": momentum, "seconds": time.perf_counter() - t0}


def finite_set_calibration(
    unet: nn.Module,
    steps: list[tuple[int, Batch]],
    quantizers: list[ActQuantizer],
    batch_size: int = 16,
    momentum: float = 0.95,
    device=None,
    seed: int = 0,
    progress: bool = True,
    resume=None,
) -> dict[str, Any]:
    """Per-timestep EMA min-max tables for ``quantizers``; ``steps`` = [(t, rows of that step)], the rows as
    a dict or a zero-argument callable returning it (read when FSC gets to that step: one step in memory).

    ``resume``: a ``tfmq.quant.resume.UnitProgress``: every finished timestep's entries (and the state of
    the batch-order generator) are filed there; timesteps it already holds for the same model state,
    rows and settings are restored, not re-run. ``None`` (default): nothing is read or written.
    """
    t0 = time.perf_counter()
    # a timestep the sampler visits twice (PLMS warm-up) gets one entry fitted on both steps' rows
    merged: dict[int, list] = {}
    for t, rows in steps:
        merged.setdefault(int(t), []).append(rows)

    def load(t: int) -> Batch:
        parts = [r() if callable(r) else r for r in merged[t]]
        return parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    names = {id(q): name for name, q in act_quantizers(unet)}
    done: dict[int, dict[str, Any]] = {}
    if resume is not None:
        from .resume import model_state_digest, tensor_digest

        done = {int(r["index"]): r for r in resume.open({
            "entering_state": model_state_digest(unet),
            "rows": [[t, tensor_digest(load(t))] for t in merged],  # read once more, one step at a time
            "quantizers": [names[id(q)] for q in quantizers],
            "momentum": momentum, "batch_size": batch_size, "seed": seed,
        })}
    last_done = max(done, default=-1)
    set_quant_state(unet, weight=True, act=False)
    _enable_only(unet, quantizers)
    gen = torch.Generator().manual_seed(seed)
    rows_per_step = 0
    with torch.no_grad():
        for i, t in enumerate(tqdm(list(merged), desc="FSC timesteps", disable=not progress)):
            if i in done:  # the entries this timestep committed, and the generator as it left it
                _, _, entries = resume.restore(done[i], last=i == last_done, generator=gen)
                for q in quantizers:
                    if names[id(q)] in entries:
                        q.restore_timestep_entry(t, entries[names[id(q)]])
                continue
            rows = load(t)
            rows_per_step = rows_per_step or num_rows(rows)
            for q in quantizers:
                q.start_observing(momentum)
            order = torch.randperm(num_rows(rows), generator=gen)
            for b in batches(rows, batch_size, device, order):
                unet(**b)
            for q in quantizers:
                q.commit_timestep(int(t))
            if resume is not None:
                entries = {names[id(q)]: list(q.timestep_entry(t)) for q in quantizers if q.timestep_entry(t) is not None}
                resume.record(i, f"t={t}", {"timestep": int(t)}, meta=entries, generator=gen)
    for q in quantizers:
        q.commit_table()
    return {
        "quantizers": len(quantizers),
        "timesteps": list(merged),
        "rows_per_step": rows_per_step or (num_rows(load(next(iter(merged)))) if merged else 0),
        "momentum": momentum,
        "batch_size": batch_size,
        "seconds": time.perf_counter() - t0,
        **({"resumed_timesteps": resume.restored} if resume is not None else {}),
    }
