"""Uniform affine quantizers, the weight clipping search, AdaRound and per-timestep tables.

Spec section 2 (quantizers shared by TFMQ-DM and every baseline) and section 5 (the
per-timestep activation table of Finite Set Calibration). Everything here is *simulated*
(fake) quantization: values are rounded onto the integer grid and mapped back to float, so
the numerics of a low-bit model are exact while no integer kernel is used. Each quantizer also
exports and restores its own checkpoint state, which keeps this file at about 400 lines: a new
quantizer mode is then a change to this one file, not to the checkpoint format code.
"""
from __future__ import annotations

import math

from typing import Any

import torch
from torch import nn

from .fused import GAMMA, ZETA, fake_quant_learnable, fused_enabled, soft_rounding, soft_rounding_terms
MIN_SCALE = 1e-8


def _tensor(tensors: dict[str, torch.Tensor], key: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """``tensors[key]``, checked against the shape of ``like``; the error says which tensor is bad."""
    if key not in tensors:
        raise ValueError(f"tensor {key!r} is missing")
    t = tensors[key]
    if like is not None and tuple(t.shape) != tuple(like.shape):
        raise ValueError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
    return t


class UncalibratedTimestepError(KeyError):
    """The UNet was called at a timestep that Finite Set Calibration never saw."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it one readable line
        return str(self.args[0])


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient."""
    return (x.round() - x).detach() + x


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``s * (clamp(round(x / s) + z, 0, 2^b - 1) - z)`` with a straight-through round."""
    x_int = torch.clamp(round_ste(x / scale) + zero_point, 0, 2**n_bits - 1)
    return (x_int - zero_point) * scale


def minmax_qparams(x_min: torch.Tensor, x_max: torch.Tensor, n_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max parameters with 0 forced into the range (docs/method.md sections 2 and 5)."""
    x_min = torch.clamp(torch.as_tensor(x_min, dtype=torch.float32), max=0.0)
    x_max = torch.clamp(torch.as_tensor(x_max, dtype=torch.float32), min=0.0)
    scale = torch.clamp((x_max - x_min) / (2**n_bits - 1), min=MIN_SCALE)
    zero_point = torch.round(-x_min / scale)
    return scale, zero_point


# The clipping search's error ``|x_hat - x|`` is built in blocks of rows of about this many elements (1 MiB
# of float32: a block and its weights stay in the CPU's cache through the candidate's eight in-place passes;
# measured on 14.7 M weights, 256 Ki beat 32 Ki-128 Ki, 512 Ki and no blocking).
_CLIP_BLOCK_ELEMS = 1 << 18


def _clip_scores(
    flat: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, levels: int, p: float, err: torch.Tensor | None
) -> torch.Tensor:
    """Mean ``|x_hat - x|^p`` of each row of ``flat`` for one candidate ``(scale, zp)``, each ``[C]``.

    Bit for bit the one-shot expression (still used when ``err`` is None). Otherwise the error is written
    into ``err`` (``[C, K]``, contiguous like ``flat``) a block of rows at a time with in-place passes: each
    element goes through the same float32 operations in the same order (``x / s``, round, ``+ z``, clamp,
    ``- z``, ``* s``, ``- x``, abs), each exactly rounded however the kernel runs it, so blocking changes
    nothing. ``pow`` and ``mean`` then run once on the whole tensor, as in the expression. They must: on
    CPU, ``pow`` computes the tail of each thread's share (``numel % 16`` elements with AVX2) with a scalar
    kernel that raises to the double ``p`` where the vectorised one uses float32(p), a few ulps apart, and a
    one-row ``mean`` on several threads sums in another order, so per block both would change scores.
    """
    if err is None:
        x_hat = (torch.clamp(torch.round(flat / scale[:, None]) + zp[:, None], 0, levels) - zp[:, None]) * scale[:, None]
        return (x_hat - flat).abs().pow(p).mean(dim=1)
    rows = max(1, _CLIP_BLOCK_ELEMS // max(1, flat.shape[1])) if flat.device.type == "cpu" else flat.shape[0]
    for r0 in range(0, flat.shape[0], rows):
        x, e = flat[r0:r0 + rows], err[r0:r0 + rows]
        s, z = scale[r0:r0 + rows, None], zp[r0:r0 + rows, None]
        torch.div(x, s, out=e).round_().add_(z).clamp_(0, levels).sub_(z).mul_(s).sub_(x).abs_()
    return err.pow_(p).mean(dim=1)


def mse_clip_search(
    w: torch.Tensor, n_bits: int, n_candidates: int = 80, p: float = 2.4, step: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel scale and zero point by the clipping search of docs/method.md section 2.

    Candidates ``i = 0..n_candidates-1`` clip the channel's ``[min, max]`` to ``(1 - step * i)``
    of itself; the one with the lowest mean ``|x_hat - x|^p`` wins (first one on ties).

    Args:
        w: weight, output channels on dim 0, any trailing shape.
    Returns:
        ``(scale, zero_point)``, each shaped ``[C, 1, ..., 1]`` to broadcast against ``w``.
    """
    flat = w.detach().reshape(w.shape[0], -1).float()
    w_min, w_max = flat.min(dim=1).values, flat.max(dim=1).values
    levels = 2**n_bits - 1
    best_score = torch.full_like(w_min, float("inf"))
    best_scale = torch.ones_like(w_min)
    best_zp = torch.zeros_like(w_min)
    # one error buffer reused by every candidate (_clip_scores); a view that is not row-major (reshape of an
    # unusual layout) keeps the one-shot expression, whose pow and mean follow that layout
    err = torch.empty_like(flat) if flat.is_contiguous() else None
    for i in range(n_candidates):
        c_min, c_max = w_min * (1.0 - step * i), w_max * (1.0 - step * i)
        scale = torch.clamp((c_max - c_min) / levels, min=MIN_SCALE)
        zp = torch.round(-c_min / scale)
        score = _clip_scores(flat, scale, zp, levels, p, err)
        better = score < best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    return best_scale.reshape(shape), best_zp.reshape(shape)


class WeightQuantizer(nn.Module):
    """Per-output-channel asymmetric weight quantizer with nearest or AdaRound rounding.

    Modes: ``nearest`` (round-to-nearest on the float weight), ``adaround`` (learned rounding
    ``floor(W/s) + h(alpha)``; soft while optimising, hard ``alpha >= 0`` after), ``int`` (the
    final integer grid is stored in ``w_int``; the float weight is no longer read).
    """

    def __init__(self, weight: torch.Tensor, n_bits: int, init: bool = True):
        super().__init__()
        self.n_bits = n_bits
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        if init:
            scale, zp = mse_clip_search(weight, n_bits)
        else:
            scale, zp = torch.ones(shape), torch.zeros(shape)
        self.register_buffer("scale", scale.to(weight.device))
        self.register_buffer("zero_point", zp.to(weight.device))
        self.mode = "nearest"
        self.soft = False
        self.alpha: nn.Parameter | None = None
        self.register_buffer("w_int", None)
        self._terms: tuple[torch.Tensor, ...] | None = None  # soft_rounding_terms of the fused soft weight
        self.reg = (0.0, 2.0)  # (coefficient, beta) of the rounding regulariser folded into the fused backward

    def _apply(self, fn, *args, **kwargs):
        self._terms = None
        return super()._apply(fn, *args, **kwargs)

    # --- AdaRound -------------------------------------------------------------------------
    def init_adaround(self, weight: torch.Tensor) -> None:
        """Start learned rounding with h(alpha) equal to the fractional part of ``W / s``."""
        w_s = weight.detach() / self.scale
        rest = w_s - torch.floor(w_s)
        alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        self.alpha = nn.Parameter(alpha)
        self.mode, self.soft = "adaround", True
        self._terms, self.reg = None, (0.0, 2.0)

    def h(self) -> torch.Tensor:
        assert self.alpha is not None
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def round_regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2h - 1|^beta)``: pushes every h(alpha) to 0 or 1."""
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    def harden(self) -> None:
        """End optimisation: rounding becomes ``1[alpha >= 0]``."""
        self.soft = False
        self._terms, self.reg = None, (0.0, 2.0)

    def set_round_reg(self, coef: float, beta: float) -> None:
        """The regulariser the fused soft weight's backward adds (``coef`` 0: none); see ``tfmq.quant.fused``."""
        self.reg = (float(coef), float(beta))

    # --- integer grid ---------------------------------------------------------------------
    def integer_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The clamped integer grid ``clamp(W_int + z, 0, 2^b - 1)`` as float values."""
        if self.mode == "int":
            assert self.w_int is not None
            return self.w_int.to(self.scale.dtype)
        w_s = weight / self.scale
        if self.mode == "nearest":
            w_int = torch.round(w_s)
        else:
            rounding = self.h() if self.soft else (self.alpha >= 0).to(weight.dtype)
            w_int = torch.floor(w_s.detach()) + rounding
        return torch.clamp(w_int + self.zero_point, 0, 2**self.n_bits - 1)

    def finalize(self, weight: torch.Tensor) -> None:
        """Freeze the grid: store ``w_int`` (uint8) and drop alpha; outputs do not change."""
        if self.mode == "int":
            return
        with torch.no_grad():
            q = self.integer_weight(weight.detach())
        self.alpha, self.soft, self.mode = None, False, "int"
        self._terms, self.reg = None, (0.0, 2.0)
        self.w_int = q.to(torch.uint8)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.mode == "adaround" and self.soft and fused_enabled():
            if self._terms is None:
                w_floor_z = torch.floor(weight.detach() / self.scale) + self.zero_point
                self._terms = soft_rounding_terms(w_floor_z, self.scale, self.zero_point, self.n_bits)
            return soft_rounding(self.alpha, self._terms, *self.reg)
        return (self.integer_weight(weight) - self.zero_point) * self.scale

    # --- checkpoint -------------------------------------------------------------------------
    def export_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What a checkpoint must store to rebuild this quantizer exactly.

        Returns:
            ``(tensors, meta)``: ``scale`` and ``zero_point`` always, plus the final grid (mode ``int``)
            or ``alpha`` (mode ``adaround``); ``meta = {"mode", "soft"}`` (JSON). A grid of at most 4
            bits is stored packed, two values per byte (``w_packed``, ``meta["packed"] = "nibble"``,
            ``meta["shape"]``: the grid's shape; ``pack_nibbles``); wider grids as ``w_int`` (uint8).
        """
        tensors = {"scale": self.scale, "zero_point": self.zero_point}
        meta: dict[str, Any] = {"mode": self.mode, "soft": self.soft}
        if self.mode == "int" and self.n_bits <= 4:
            tensors["w_packed"] = pack_nibbles(self.w_int)
            meta.update(packed="nibble", shape=list(self.w_int.shape))
        elif self.mode == "int":
            tensors["w_int"] = self.w_int
        elif self.mode == "adaround":
            tensors["alpha"] = self.alpha.detach()
        return tensors, meta

    def restore_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of ``export_state`` onto a quantizer of the same weight (built with ``init=False``).

        Reads a packed (``w_packed``) or a plain uint8 (``w_int``) grid.

        Raises:
            ValueError: a tensor is missing or has the wrong shape or dtype, or the mode is unknown.
        """
        mode = meta.get("mode") if isinstance(meta, dict) else None
        if mode not in ("nearest", "adaround", "int"):
            raise ValueError(f"weight quantizer mode={mode!r}, expected 'nearest', 'adaround' or 'int'")
        scale = _tensor(tensors, "scale", self.scale)
        zero_point = _tensor(tensors, "zero_point", self.zero_point)
        alpha = w_int = None
        if mode == "int" and meta.get("packed") is not None:
            w_int = self._unpacked(tensors, meta)
        elif mode == "int":
            w_int = _tensor(tensors, "w_int")
            if w_int.dtype != torch.uint8 or w_int.dim() != self.scale.dim() or w_int.shape[0] != self.scale.shape[0]:
                raise ValueError(f"tensor 'w_int' is {w_int.dtype} {tuple(w_int.shape)}, expected a uint8 grid with "
                                 f"{self.scale.shape[0]} output channels")
        if w_int is not None and int(w_int.max()) > 2**self.n_bits - 1:
            raise ValueError(f"tensor 'w_int' holds {int(w_int.max())}, beyond the {self.n_bits}-bit grid")
        if mode == "adaround":
            alpha = _tensor(tensors, "alpha")
            if not alpha.is_floating_point() or alpha.dim() != self.scale.dim() or alpha.shape[0] != self.scale.shape[0]:
                raise ValueError(f"tensor 'alpha' is {alpha.dtype} {tuple(alpha.shape)}, expected float with "
                                 f"{self.scale.shape[0]} output channels")
        dev = self.scale.device
        with torch.no_grad():
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        self.w_int = None if w_int is None else w_int.to(dev)
        self.alpha = None if alpha is None else nn.Parameter(alpha.to(dev))
        self.mode, self.soft = mode, bool(meta.get("soft", False)) and mode == "adaround"
        self._terms = None

    def _unpacked(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> torch.Tensor:
        """The uint8 grid of a packed entry, checked against this quantizer's channels."""
        if meta.get("packed") != "nibble":
            raise ValueError(f"packed={meta.get('packed')!r}, expected 'nibble' (two 4-bit values per byte)")
        shape = meta.get("shape")
        channels = self.scale.shape[0]
        if not (isinstance(shape, list) and len(shape) == self.scale.dim() and all(isinstance(d, int) and d > 0 for d in shape)
                and shape[0] == channels):
            raise ValueError(f"packed grid shape={shape!r}, expected {self.scale.dim()} positive ints starting with "
                             f"{channels} output channels")
        packed = _tensor(tensors, "w_packed")
        per_row = (math.prod(shape[1:]) + 1) // 2
        if packed.dtype != torch.uint8 or tuple(packed.shape) != (channels, per_row):
            raise ValueError(f"tensor 'w_packed' is {packed.dtype} {tuple(packed.shape)}, expected uint8 "
                             f"({channels}, {per_row}) for a {tuple(shape)} grid")
        return unpack_nibbles(packed, tuple(shape))


def pack_nibbles(grid: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte, row by row: uint8 ``[C, ...]`` (values < 16) -> uint8 ``[C, ceil(n / 2)]``.

    Element ``2j`` of a row goes into the low nibble of byte ``j``, element ``2j + 1`` into the high
    one; an odd row is padded with 0. ``unpack_nibbles`` inverts it exactly.
    """
    if grid.dtype != torch.uint8 or (grid.numel() and int(grid.max()) > 15):
        raise ValueError(f"pack_nibbles: expected a uint8 grid of values 0..15, got {grid.dtype}")
    flat = grid.reshape(grid.shape[0], -1)
    if flat.shape[1] % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    return (flat[:, 0::2] | (flat[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: the uint8 grid of ``shape``."""
    both = torch.stack([packed & 0x0F, packed >> 4], dim=2).reshape(packed.shape[0], -1)
    return both[:, : math.prod(shape[1:])].reshape(shape).contiguous()


class TimestepContext:
    """The timestep(s) of the UNet call in progress, set by a pre-forward hook on the UNet."""

    def __init__(self) -> None:
        self.timesteps: torch.Tensor | None = None  # int64 [B]
        self.class_labels: torch.Tensor | None = None

    def uniform_timestep(self) -> int | None:
        t = self.timesteps
        if t is None or t.numel() == 0:
            return None
        first = int(t[0])
        return first if bool((t == first).all()) else None


class ActQuantizer(nn.Module):
    """Per-tensor asymmetric activation quantizer: one range, or one range per timestep (FSC).

    In ``shared`` mode it holds one (scale, zero point). In ``table`` mode it holds ``[T]``
    tensors keyed by the scheduler's integer timestep and selects the row(s) of the current UNet
    call from the ``TimestepContext``; an uncalibrated timestep raises. While ``observing``, it
    tracks the (EMA) min/max of what flows through it and quantizes with the running estimate,
    so later layers see quantized inputs (sequential calibration, docs/method.md section 5).
    """

    def __init__(self, n_bits: int, ctx: TimestepContext, unsigned: bool = False):
        super().__init__()
        self.n_bits = n_bits
        self.ctx = ctx
        self.unsigned = unsigned  # softmax output: zero point fixed at 0
        self.enabled = False
        self.mode = "uncalibrated"
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(()))
        self.register_buffer("table_timesteps", torch.zeros(0, dtype=torch.int64))
        self.register_buffer("table_scale", torch.zeros(0))
        self.register_buffer("table_zero_point", torch.zeros(0))
        self._lookup: dict[int, int] | None = None
        # observer state
        self.observing = False
        self.momentum: float | None = None
        self.running_min: torch.Tensor | None = None
        self.running_max: torch.Tensor | None = None
        self._pending: dict[int, tuple[float, float]] = {}

    # --- calibration ----------------------------------------------------------------------
    def start_observing(self, momentum: float | None) -> None:
        self.observing, self.momentum = True, momentum
        self.running_min = self.running_max = None

    def _qparams(self, x_min: torch.Tensor, x_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.unsigned:
            scale = torch.clamp(torch.clamp(x_max, min=0.0) / (2**self.n_bits - 1), min=MIN_SCALE)
            return scale, torch.zeros_like(scale)
        return minmax_qparams(x_min, x_max, self.n_bits)

    def _observe(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b_min, b_max = x.detach().min().float(), x.detach().max().float()
        if self.running_min is None:
            self.running_min, self.running_max = b_min, b_max
        elif self.momentum is None:  # plain min-max over everything seen
            self.running_min = torch.minimum(self.running_min, b_min)
            self.running_max = torch.maximum(self.running_max, b_max)
        else:  # EMA of the batch min/max
            m = self.momentum
            self.running_min = m * self.running_min + (1 - m) * b_min
            self.running_max = m * self.running_max + (1 - m) * b_max
        return self._qparams(self.running_min, self.running_max)

    def commit_shared(self) -> None:
        """Turn the observed range into the one shared (scale, zero point)."""
        if self.running_min is None:
            return  # never executed (e.g. a branch the model does not take)
        s, z = self._qparams(self.running_min, self.running_max)
        with torch.no_grad():
            self.scale.data = s.to(self.scale.device)
            self.zero_point.data = z.to(self.zero_point.device)
        self.mode, self.observing = "shared", False

    def commit_timestep(self, t: int) -> None:
        """Store the observed range as the entry of timestep ``t`` and reset the observer."""
        if self.running_min is not None:
            s, z = self._qparams(self.running_min, self.running_max)
            self._pending[int(t)] = (float(s), float(z))
        self.running_min = self.running_max = None

    def timestep_entry(self, t: int) -> tuple[float, float] | None:
        """The (scale, zero point) committed for timestep ``t`` and not yet in a table (``None``: none)."""
        return self._pending.get(int(t))

    def restore_timestep_entry(self, t: int, entry) -> None:
        """Put back an entry ``timestep_entry(t)`` returned (a resumed FSC timestep)."""
        self._pending[int(t)] = (float(entry[0]), float(entry[1]))

    def commit_table(self) -> None:
        """Build the ``[T]`` table from every committed timestep."""
        self.observing = False
        if not self._pending:
            return
        ts = sorted(self._pending)
        dev = self.zero_point.device
        self.table_timesteps = torch.tensor(ts, dtype=torch.int64, device=dev)
        self.table_scale = torch.tensor([self._pending[t][0] for t in ts], device=dev)
        self.table_zero_point = torch.tensor([self._pending[t][1] for t in ts], device=dev)
        self._pending, self._lookup = {}, None
        self.mode = "table"

    # --- checkpoint -------------------------------------------------------------------------
    def calibrated_timesteps(self) -> list[int] | None:
        """The timesteps of the per-timestep table (mode ``table``), else ``None``."""
        return [int(t) for t in self.table_timesteps.tolist()] if self.mode == "table" else None

    def export_state(self) -> tuple[dict[str, torch.Tensor], str]:
        """What a checkpoint must store to rebuild the calibrated ranges exactly (no copies are made).

        Returns:
            ``(tensors, meta)``: ``scale`` / ``zero_point`` (mode ``shared``), ``table_timesteps`` /
            ``table_scale`` / ``table_zero_point`` (mode ``table``) or nothing (``uncalibrated``).
            ``meta`` is the mode string (the layout of checkpoint format version 1); a mode that
            needs more can return a dict, which ``restore_state`` then has to accept as well.
        """
        if self.mode == "shared":
            return {"scale": self.scale.detach(), "zero_point": self.zero_point}, self.mode
        if self.mode == "table":
            return {"table_timesteps": self.table_timesteps, "table_scale": self.table_scale,
                    "table_zero_point": self.table_zero_point}, self.mode
        return {}, self.mode

    def restore_state(self, tensors: dict[str, torch.Tensor], meta: str) -> None:
        """Inverse of ``export_state``.

        Raises:
            ValueError: a tensor is missing or malformed, or the mode is unknown.
        """
        dev = self.zero_point.device
        if meta == "shared":
            self.scale.data = _tensor(tensors, "scale", self.scale).to(dev)
            self.zero_point.data = _tensor(tensors, "zero_point", self.zero_point).to(dev)
        elif meta == "table":
            ts = _tensor(tensors, "table_timesteps")
            if ts.dtype != torch.int64 or ts.dim() != 1 or ts.numel() == 0:
                raise ValueError(f"tensor 'table_timesteps' is {ts.dtype} {tuple(ts.shape)}, expected non-empty int64 [T]")
            scale, zp = _tensor(tensors, "table_scale", ts), _tensor(tensors, "table_zero_point", ts)
            self.table_timesteps, self.table_scale, self.table_zero_point = ts.to(dev), scale.to(dev), zp.to(dev)
            self._lookup = None
        elif meta != "uncalibrated":
            raise ValueError(f"activation quantizer mode={meta!r}, expected 'uncalibrated', 'shared' or 'table'")
        self.mode = meta

    # --- inference ------------------------------------------------------------------------
    def _table_index(self, t: int) -> int:
        if self._lookup is None:
            self._lookup = {int(v): i for i, v in enumerate(self.table_timesteps.tolist())}
        try:
            return self._lookup[t]
        except KeyError:
            ts = sorted(self._lookup)
            raise UncalibratedTimestepError(
                f"timestep {t} was never calibrated by Finite Set Calibration (calibrated: {len(ts)} timesteps "
                f"from {ts[0]} to {ts[-1]}); sample with the scheduler and step count used for calibration"
            ) from None

    def current_qparams(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode != "table":
            return self.scale, self.zero_point
        ts = self.ctx.timesteps
        if ts is None:
            raise UncalibratedTimestepError(
                "a per-timestep activation quantizer ran outside a UNet forward (no timestep known); call the UNet itself"
            )
        t0 = self.ctx.uniform_timestep()
        if t0 is not None:
            i = self._table_index(t0)
            return self.table_scale[i], self.table_zero_point[i]
        idx = torch.tensor([self._table_index(int(t)) for t in ts.tolist()], device=x.device)
        rep = x.shape[0] // ts.shape[0]
        if rep * ts.shape[0] != x.shape[0]:
            raise RuntimeError(f"cannot align a batch of {x.shape[0]} rows with {ts.shape[0]} timesteps")
        idx = idx.repeat_interleave(rep)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return self.table_scale[idx].reshape(shape), self.table_zero_point[idx].reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.observing:
            s, z = self._observe(x)
            return fake_quant(x, s.to(x.device), z.to(x.device), self.n_bits)
        if self.mode == "uncalibrated":
            raise RuntimeError("activation quantizer is enabled but was never calibrated; run calibrate_activations")
        s, z = self.current_qparams(x)
        if not torch.is_grad_enabled() or not (x.requires_grad or s.requires_grad):
            # no gradient wanted: the same operations in place (round_ste's forward is round() exactly)
            return torch.round(x / s).add_(z).clamp_(0, 2**self.n_bits - 1).sub_(z).mul_(s)
        if fused_enabled():
            return fake_quant_learnable(x, s, z, self.n_bits)
        return fake_quant(x, s, z, self.n_bits)

    def extra_repr(self) -> str:
        return f"bits={self.n_bits}, mode={self.mode}, unsigned={self.unsigned}"


def beta_schedule(step: int, iters: int, warmup: float, beta_start: float, beta_end: float) -> float | None:
    """AdaRound's beta at 0-based ``step``: ``None`` (regulariser off) during warm-up, then linear start -> end.

    As the released code (BRECQ / Q-Diffusion ``LossFunction`` + ``LinearTempDecay``), which counts
    iterations from 1: with ``count = step + 1`` the regulariser is on from ``count >= warmup * iters``
    with ``beta_start`` and decays linearly to ``beta_end`` at ``count = iters`` (the last step).
    """
    count = step + 1
    start = warmup * iters
    if count < start:
        return None
    frac = (count - start) / max(iters - start, 1)
    return beta_end + (beta_start - beta_end) * max(0.0, 1.0 - frac)
