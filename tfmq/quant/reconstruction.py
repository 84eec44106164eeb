"""Reconstruction engine: BRECQ blocks (docs/method.md section 6), layer units, and Q-Diffusion's
activation step-size learning (section 8); TIAR (section 4) is ``tfmq.quant.tiar``.

Every unit is reconstructed from cached tensors: its FP output (target) and its input taken
from the already weight-quantized model in front of it (so a resnet receives h^q(t)). Caching
runs the calibration rows through the UNet only up to the unit (a forward hook stops the
pass), so the optimisation loop never runs a forward pass it does not need.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten
from tqdm.auto import tqdm
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

from .config import ActReconConfig, ReconConfig
from .fused import fused_enabled
from .layers import QuantLayer
from .prepare import dry_run, quant_layers, set_quant_state
from .quantizer import ActQuantizer, beta_schedule
from .cache import MemoryPolicy, RowCache
from .resume import UnitProgress, model_state_digest, tensor_digest

Batch = dict[str, torch.Tensor]


class _StopForward(Exception):
    pass


@dataclass
class Unit:
    """One reconstruction unit: a block (resnet, attention, transformer block) or a lone layer."""

    name: str
    module: nn.Module
    kind: str  # "block" | "layer"

    def layers(self) -> list[QuantLayer]:
        if isinstance(self.module, QuantLayer):
            return [self.module]
        return [m for m in self.module.modules() if isinstance(m, QuantLayer)]

    def act_quantizers(self) -> list[ActQuantizer]:
        return [m for m in self.module.modules() if isinstance(m, ActQuantizer)]


# --------------------------------------------------------------------------------------------
# data helpers
def num_rows(data: Batch) -> int:
    return int(data["sample"].shape[0])


def batches(data: Batch, batch_size: int, device, order: torch.Tensor | None = None):
    n = num_rows(data)
    order = torch.arange(n) if order is None else order
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        yield {k: (v[idx].to(device) if isinstance(v, torch.Tensor) else v) for k, v in data.items()}


def _main_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"cannot reconstruct a unit that returns {type(out).__name__}")


# --------------------------------------------------------------------------------------------
# units
def discover_units(unet: nn.Module, skip_layers: set[str] = frozenset()) -> list[Unit]:
    """Reconstruction units in execution order (found by one dry forward pass).

    Blocks: every ResnetBlock2D, every BasicTransformerBlock, every Attention outside one.
    Layers: every quantized layer outside those blocks (``conv_in``, sampler convs, ``proj_in``...),
    except those named in ``skip_layers`` (e.g. the TIB's, reconstructed by TIAR).
    """
    candidates: dict[str, tuple[nn.Module, str]] = {}
    block_names: list[str] = []
    for name, m in unet.named_modules():
        if isinstance(m, (ResnetBlock2D, BasicTransformerBlock)) or (
            isinstance(m, Attention) and not any(name.startswith(b + ".") for b in block_names)
        ):
            block_names.append(name)
            candidates[name] = (m, "block")
    for name, m in quant_layers(unet):
        if name in skip_layers or any(name.startswith(b + ".") for b in block_names):
            continue
        candidates[name] = (m, "layer")
    order: list[str] = []
    handles = []
    for name, (m, _) in candidates.items():
        handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name) if name not in order else None))
    dry_run(unet, handles)
    units = [Unit(n, *candidates[n]) for n in order]
    return [u for u in units if u.layers() or u.act_quantizers()]


def capture_unit_io(
    unet: nn.Module,
    unit: nn.Module,
    data: Batch,
    batch_size: int,
    device,
    want_input: bool,
    want_output: bool,
    budget_bytes: int | None = None,
    spill_dir=None,
) -> tuple[RowCache | None, RowCache | None]:
    """Run ``data`` through ``unet`` (in its current quant state) up to ``unit``; keep its I/O.

    Returns ``(inputs, output)`` as ``tfmq.quant.cache.RowCache`` (``None`` where not wanted): the
    inputs as ``(args, kwargs)`` per row, the output's main tensor per row; kept on the CPU, or in
    files under ``spill_dir`` when one would exceed ``budget_bytes``.
    """
    n = num_rows(data)
    ins = RowCache(n, budget_bytes, spill_dir) if want_input else None
    outs = RowCache(n, budget_bytes, spill_dir) if want_output else None

    def pre(m, args, kwargs):
        if want_input:
            ins.append((args, kwargs))
        if not want_output:
            raise _StopForward

    def post(m, args, kwargs, out):
        outs.append(_main_output(out))
        raise _StopForward

    h1 = unit.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = unit.register_forward_hook(post, with_kwargs=True) if want_output else None
    try:
        with torch.no_grad():
            for b in batches(data, batch_size, device):
                try:
                    unet(**b)
                except _StopForward:
                    pass
    finally:
        h1.remove()
        if h2 is not None:
            h2.remove()
    if (want_input and ins.filled != n) or (want_output and outs.filled != n):
        raise RuntimeError("the reconstruction unit was not executed by the UNet forward; cannot cache its inputs")
    return ins, outs


def _available_bytes() -> int | None:
    """MemAvailable of this machine (Linux), ``None`` where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def capture_fp_io_once(
    unet: nn.Module, units: dict[int, nn.Module], data: Batch, batch_size: int, device, want_input: bool,
    memory: MemoryPolicy, share: float = 0.25,
) -> dict[int, tuple[RowCache | None, RowCache]] | None:
    """The FP inputs (``want_input``) and outputs of every module in ``units`` from ONE pass of ``data``.

    Per-unit capture runs the UNet from its start up to each unit, so a stage with U units pays ~U/2 full
    passes per cache; FP tensors do not depend on how far reconstruction has got, so one pass holds them all.
    The values are the per-unit capture's (same batches, same kernels). Only without a memory budget and when
    every cache together fits in ``share`` of the machine's available memory (measured on the first batch);
    otherwise ``None``, and the caller captures unit by unit. The caller sets the FP quant state and closes
    the caches.
    """
    if memory.budget_bytes is not None or not units:
        return None
    n = num_rows(data)
    per_row = {k: 0 for k in units}

    def size(k):
        def hook(m, args, kwargs, out=None):
            leaves, _ = tree_flatten(((args, kwargs) if want_input else ()) if out is None else _main_output(out))
            per_row[k] += sum(l[0].numel() * l.element_size() for l in leaves if isinstance(l, torch.Tensor)
                              and l.dim() > 0 and l.shape[0] == rows)
        return hook

    first = next(batches(data, batch_size, device))
    rows = num_rows(first)
    hs = [m.register_forward_pre_hook(size(k), with_kwargs=True) for k, m in units.items()]
    hs += [m.register_forward_hook(size(k), with_kwargs=True) for k, m in units.items()]
    try:
        with torch.no_grad():
            unet(**first)
    finally:
        for h in hs:
            h.remove()
    avail = _available_bytes()
    if avail is None or sum(per_row.values()) * n > share * avail:
        return None
    caches = {k: (RowCache(n) if want_input else None, RowCache(n)) for k in units}

    def pre(k):
        return lambda m, args, kwargs: caches[k][0].append((args, kwargs))

    def post(k):
        return lambda m, args, kwargs, out: caches[k][1].append(_main_output(out))

    hs = [m.register_forward_hook(post(k), with_kwargs=True) for k, m in units.items()]
    if want_input:
        hs += [m.register_forward_pre_hook(pre(k), with_kwargs=True) for k, m in units.items()]
    try:
        with torch.no_grad():
            for b in batches(data, batch_size, device):
                unet(**b)
    except BaseException:
        for i, o in caches.values():
            o.close()
            if i is not None:
                i.close()
        raise
    finally:
        for h in hs:
            h.remove()
    if any(o.filled != n for _, o in caches.values()):
        raise RuntimeError("a reconstruction unit was not executed by the UNet forward; cannot cache its outputs")
    return caches


def unit_step(unit: nn.Module, inputs: RowCache, target: RowCache, device, p: float = 2.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reconstruction loss of ``unit`` on cached rows ``idx`` (each mini-batch moved to ``device``)."""

    def step(idx: torch.Tensor) -> torch.Tensor:
        args, kwargs = inputs.take(idx, device)
        return lp_loss(_main_output(unit(*args, **kwargs)), target.take(idx, device), p=p)

    return step


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``|pred - target|^p`` summed over dim 1, mean over the rest (the official codes' reduction)."""
    return (pred - target).abs().pow(p).sum(1).mean()


def optimize_rows(
    step_fn: Callable[[torch.Tensor], torch.Tensor],
    n_rows: int,
    params: list[nn.Parameter],
    iters: int,
    batch_size: int,
    lr: float,
    reg_fn: Callable[[int], torch.Tensor | None] | None,
    desc: str,
    progress: bool,
    cosine: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    if iters == 0 or not params:
        return {"iters": 0}
    # fused Adam: one kernel over every tensor (the reference path keeps the single-tensor loop)
    opt = torch.optim.Adam(params, lr=lr, **({"fused": True} if fused_enabled() else {"foreach": False}))
    learn = {id(p) for p in params}
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.0) if cosine else None
    gen = torch.Generator().manual_seed(seed)
    first = last = float("nan")
    bar = tqdm(range(iters), desc=desc, disable=not progress, leave=False)
    with torch.enable_grad():
        for step in bar:
            idx = torch.randperm(n_rows, generator=gen)[:batch_size]
            reg = reg_fn(step) if reg_fn is not None else None  # before the forward: a fused one sets its state
            rec = step_fn(idx)
            loss = rec if reg is None else rec + reg
            grads = torch.autograd.grad(loss, params)  # only the learned tensors: no .grad on FP weights
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            if sched is not None:
                sched.step()
            if step == 0:
                first = float(rec.detach())
            if step % 50 == 0 or step == iters - 1:
                last = float(rec.detach())
                bar.set_postfix(rec=f"{last:.4g}")
    return {"iters": iters, "rec_loss_first": first, "rec_loss_last": last}


def rounding_regularizer(layers: list[QuantLayer], cfg: ReconConfig, iters: int) -> Callable[[int], torch.Tensor | None]:
    """``reg(step)``: the rounding regulariser's term of the loss at ``step`` (``None``: none to add).

    Fused (the default, ``tfmq.quant.fused``): ``reg(step)`` sets the coefficient and beta that the
    layers' soft-weight backward adds the regulariser's gradient with, and returns ``None``; call it
    before the step's forward. Under ``reference_autograd()`` it returns the term's value.
    """
    quantizers = [q for l in layers for q in l.wq]

    def reg(step: int):
        beta = beta_schedule(step, iters, cfg.warmup, cfg.beta_start, cfg.beta_end)
        on = beta is not None and cfg.round_weight != 0
        if fused_enabled():
            for q in quantizers:
                q.set_round_reg(cfg.round_weight if on else 0.0, beta if on else 2.0)
            return None
        if not on:
            return None
        return cfg.round_weight * sum(l.round_regularizer(beta) for l in layers)

    return reg


# --------------------------------------------------------------------------------------------
# BRECQ
def reconstruct_units(
    unet: nn.Module,
    data: Batch,
    cfg: ReconConfig,
    device,
    frozen: set[str] = frozenset(),
    skip_layers: set[str] = frozenset(),
    capture_batch_size: int = 64,
    progress: bool = True,
    seed: int = 0,
    resume: UnitProgress | None = None,
    memory: MemoryPolicy = MemoryPolicy(),
) -> dict[str, Any]:
    """BRECQ over every unit in execution order; layers named in ``frozen`` keep their grid.

    Args:
        resume: a ``tfmq.quant.resume.UnitProgress``: every finished unit is filed there, and units
            it already holds (for the same model state, rows and config) are restored, not re-run.
            ``None`` (default): nothing is read or written.
        memory: where the unit caches live (``tfmq.quant.cache.MemoryPolicy``: on the CPU, spilled to
            files over a budget); it never changes a result.
    """
    units = discover_units(unet, skip_layers=skip_layers)
    per_unit = {}
    t0 = time.perf_counter()
    n = num_rows(data)
    done: dict[int, dict[str, Any]] = {}
    if resume is not None:
        todo = {ui: [l for l in u.layers() if l.name not in frozen and not l.finalized] for ui, u in enumerate(units)}
        records = resume.open(_unit_identity(unet, data, cfg, units, todo, frozen, skip_layers, seed))
        done = {int(r["index"]): r for r in records}
    last_done = max(done, default=-1)
    todo = {ui: u.module for ui, u in enumerate(units) if ui not in done
            and any(l.name not in frozen and not l.finalized for l in u.layers())}
    set_quant_state(unet, weight=False, act=False)
    fp_out = capture_fp_io_once(unet, todo, data, capture_batch_size, device, False, memory) or {}
    for ui, unit in enumerate(tqdm(units, desc="BRECQ units", disable=not progress)):
        layers = [l for l in unit.layers() if l.name not in frozen and not l.finalized]
        if not layers:
            continue
        if ui in done:
            per_unit[unit.name] = resume.restore(done[ui], layers, last=ui == last_done)[0]
            continue
        set_quant_state(unet, weight=False, act=False)
        if ui in fp_out:
            target = fp_out.pop(ui)[1]
        else:
            _, target = capture_unit_io(unet, unit.module, data, capture_batch_size, device, False, True,
                                        memory.budget_bytes, memory.spill_dir)
        set_quant_state(unet, weight=True, act=False)
        inputs, _ = capture_unit_io(unet, unit.module, data, capture_batch_size, device, True, False,
                                    memory.left_after(target), memory.spill_dir)
        for l in layers:
            l.init_adaround()
        params = [p for l in layers for p in l.adaround_parameters()]
        u0 = time.perf_counter()
        stats = optimize_rows(
            unit_step(unit.module, inputs, target, device), n, params, cfg.iters, cfg.batch_size, cfg.lr,
            rounding_regularizer(layers, cfg, cfg.iters), f"{unit.name}", progress, seed=seed + ui,
        )
        for l in layers:
            l.finalize()
        stats.update(seconds=time.perf_counter() - u0, **memory.describe(inputs, target))
        per_unit[unit.name] = stats
        inputs.close()
        target.close()
        if resume is not None:
            resume.record(ui, unit.name, stats, layers)
    # anything left (a quantized layer no unit executed) is rounded to nearest
    for _, l in quant_layers(unet):
        if not l.finalized:
            l.finalize()
    set_quant_state(unet, weight=True, act=False)
    out = {"units": per_unit, "num_units": len(per_unit), "rows": n, "seconds": time.perf_counter() - t0}
    if resume is not None:
        out["resumed_units"] = resume.restored
    return out


def _unit_identity(unet, data: Batch, cfg: ReconConfig, units: list[Unit], todo, frozen, skip_layers, seed: int) -> dict[str, Any]:
    """What unit k's result depends on: the state the stage starts from, the rows, the units, the settings."""
    return {
        "entering_state": model_state_digest(unet),
        "rows": tensor_digest(data),
        "units": [[u.name, [l.name for l in todo[ui]]] for ui, u in enumerate(units)],
        "recon": dataclasses.asdict(cfg),
        "seed": seed,
        "frozen": sorted(frozen),
        "skip_layers": sorted(skip_layers),
    }


def finalize_all_nearest(unet: nn.Module) -> int:
    n = 0
    for _, l in quant_layers(unet):
        if not l.finalized:
            l.finalize()
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# Q-Diffusion activation step sizes
def learn_activation_steps(
    unet: nn.Module,
    data: Batch,
    cfg: ActReconConfig,
    device,
    capture_batch_size: int = 64,
    progress: bool = True,
    seed: int = 0,
    resume: UnitProgress | None = None,
    memory: MemoryPolicy = MemoryPolicy(),
) -> dict[str, Any]:
    """Per unit, learn the shared activation step sizes (Adam, cosine to 0, ``|.|^p`` loss).

    Inputs and targets both come from the FP model (Q-Diffusion's activation stage); weights
    keep their final grid; zero points stay fixed. ``resume``, ``memory``: as for ``reconstruct_units``
    (a unit's learned step sizes are filed when it ends).
    """
    from .prepare import act_quantizers

    units = discover_units(unet)
    n = num_rows(data)
    per_unit = {}
    t0 = time.perf_counter()
    qname = {id(q): name for name, q in act_quantizers(unet)}
    shared = {ui: [q for q in u.act_quantizers() if q.mode == "shared"] for ui, u in enumerate(units)}
    done: dict[int, dict[str, Any]] = {}
    if resume is not None:
        records = resume.open({
            "entering_state": model_state_digest(unet), "rows": tensor_digest(data),
            "units": [[u.name, [qname[id(q)] for q in shared[ui]]] for ui, u in enumerate(units)],
            "act_recon": dataclasses.asdict(cfg), "seed": seed,
        })
        done = {int(r["index"]): r for r in records}
    last_done = max(done, default=-1)
    set_quant_state(unet, weight=False, act=False)
    fp_io = capture_fp_io_once(unet, {ui: u.module for ui, u in enumerate(units) if shared[ui] and ui not in done},
                               data, capture_batch_size, device, True, memory) or {}
    for ui, unit in enumerate(tqdm(units, desc="activation step sizes", disable=not progress)):
        qs = shared[ui]
        if not qs:
            continue
        if ui in done:
            per_unit[unit.name], scales, _ = resume.restore(done[ui], last=ui == last_done)
            for q in qs:
                q.scale.data = scales[qname[id(q)]].to(q.scale.device)
            continue
        set_quant_state(unet, weight=False, act=False)
        if ui in fp_io:
            inputs, target = fp_io.pop(ui)
        else:
            _, target = capture_unit_io(unet, unit.module, data, capture_batch_size, device, False, True,
                                        memory.budget_bytes, memory.spill_dir)
            inputs, _ = capture_unit_io(unet, unit.module, data, capture_batch_size, device, True, False,
                                        memory.left_after(target), memory.spill_dir)
        set_quant_state(unet, weight=True, act=True)
        for q in qs:
            q.scale.requires_grad_(True)
        stats = optimize_rows(
            unit_step(unit.module, inputs, target, device, p=cfg.p), n, [q.scale for q in qs], cfg.iters,
            cfg.batch_size, cfg.lr, None, f"act {unit.name}", progress, cosine=True, seed=seed + ui,
        )
        stats.update(memory.describe(inputs, target))
        inputs.close()
        target.close()
        for q in qs:
            q.scale.requires_grad_(False)
            with torch.no_grad():
                q.scale.clamp_(min=1e-8)
        per_unit[unit.name] = stats
        if resume is not None:
            resume.record(ui, unit.name, stats, tensors={qname[id(q)]: q.scale.detach() for q in qs})
    set_quant_state(unet, weight=True, act=True)
    out = {"units": per_unit, "seconds": time.perf_counter() - t0}
    if resume is not None:
        out["resumed_units"] = resume.restored
    return out


def mean_temporal_cos(fp_feats: list[torch.Tensor], q_feats: list[torch.Tensor]) -> float:
    """Mean over (t, i) of ``1 - cos(emb_{t,i}, emb^q_{t,i})`` (the TIAR objective's proxy)."""
    errs = [1 - torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1) for a, b in zip(fp_feats, q_feats)]
    return float(torch.stack(errs).mean())

