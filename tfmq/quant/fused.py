"""Fused forward/backward of the reconstruction loop's elementwise work (docs/method.md section 6).

The loop optimises AdaRound's ``alpha`` (and Q-Diffusion's activation step sizes) through a few
hundred thousand elementwise operations per iteration. Written as plain autograd expressions,
each weight costs ~15 small kernels forward and ~25 backward (every ``clamp``, ``sigmoid``, ``abs``,
``pow`` is recorded and differentiated on its own), which made one iteration ~3x a bare forward +
backward of the unit. Here each piece is one ``torch.autograd.Function`` with its gradient in
closed form:

- ``soft_rounding``: AdaRound's soft weight ``s * (clamp(floor(W / s) + h(alpha) + z, 0, 2^b - 1) - z)``
  written as ``base + span * h(alpha)`` with ``base``/``span`` fixed while ``alpha`` learns (``W``,
  ``s``, ``z`` do not change), and the rounding regulariser ``lambda * sum(1 - |2h - 1|^beta)``
  folded into the same backward: only its gradient is ever used, so its value is not computed.
- ``fake_quant_learnable``: ``fake_quant`` with a learnable step size (Q-Diffusion's activation
  step learning), gradient to the input (straight-through inside the grid) and to the scale.

The values are the unfused expressions' up to float round-off (``base + span * h`` rounds
differently from ``(floor + h + z - z) * s``); gradients agree in float64 (tests/test_fused.py).
``reference_autograd()`` switches back to the plain autograd expressions, for tests and the
benchmark's "before" rows.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

GAMMA, ZETA = -0.1, 1.1  # AdaRound's stretch of the rectified sigmoid

_reference = False


@contextlib.contextmanager
def reference_autograd() -> Iterator[None]:
    """Within this block quantizers and the regulariser use the plain (unfused) autograd expressions."""
    global _reference
    old, _reference = _reference, True
    try:
        yield
    finally:
        _reference = old


def fused_enabled() -> bool:
    return not _reference


def soft_rounding_terms(w_floor_z: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        n_bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(base, span, span * (zeta - gamma))`` with ``s * (clamp(F + h, 0, L) - z) = base + span * h`` for ``h`` in [0, 1].

    ``F = floor(W / s) + z``. Where ``0 <= F <= L - 1`` the clamp never acts (``span = s``);
    elsewhere it pins the value to the grid's end whatever ``h`` is (``span = 0``). The third tensor
    is the backward's factor (``dh / dsigmoid`` folded in), kept so no iteration recomputes it.
    """
    levels = 2**n_bits - 1
    base = (torch.clamp(w_floor_z, 0, levels) - zero_point) * scale
    free = (w_floor_z >= 0) & (w_floor_z <= levels - 1)
    span = torch.where(free, scale.expand_as(w_floor_z), torch.zeros((), dtype=scale.dtype, device=scale.device))
    return base, span, span * (ZETA - GAMMA)


class _SoftRounding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, alpha, base, span, span_zg, reg_coef, beta):  # noqa: D102 (see soft_rounding)
        sig = torch.sigmoid(alpha)
        h_raw = torch.add(_const(GAMMA, sig), sig, alpha=ZETA - GAMMA)
        h = h_raw.clamp(0.0, 1.0)
        inside = h == h_raw  # where the clamp passes a gradient (h_raw exactly 0 or 1, where autograd passes none, has measure 0)
        ctx.save_for_backward(sig, h, inside, span_zg)
        ctx.reg = (reg_coef, beta)
        return torch.addcmul(base, span, h)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        sig, h, inside, span_zg = ctx.saved_tensors
        coef, beta = ctx.reg
        g_h = grad * span_zg  # (zeta - gamma) * dL/dh
        if coef:
            # d/dh of coef * (1 - |2h - 1|^beta) = -2 * beta * coef * sign(2h - 1) * |2h - 1|^(beta - 1)
            t = torch.add(_const(-1.0, h), h, alpha=2.0)
            g_h.add_(torch.copysign(t.abs().pow_(beta - 1.0), t), alpha=-2.0 * beta * coef * (ZETA - GAMMA))
        g_h.mul_(inside)
        return torch.ops.aten.sigmoid_backward(g_h, sig), None, None, None, None, None


_CONSTS: dict[tuple, torch.Tensor] = {}


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor of ``value`` in ``like``'s dtype and device (``torch.add(c, x, alpha=k)``: c + k x in one kernel)."""
    key = (value, like.dtype, like.device)
    if key not in _CONSTS:
        _CONSTS[key] = torch.tensor(value, dtype=like.dtype, device=like.device)
    return _CONSTS[key]


def soft_rounding(alpha: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor, torch.Tensor], reg_coef: float = 0.0,
                  beta: float = 2.0) -> torch.Tensor:
    """AdaRound's soft weight ``base + span * h(alpha)``, differentiable in ``alpha``.

    ``terms``: ``soft_rounding_terms(...)``. With ``reg_coef`` > 0 the backward also adds the gradient
    of ``reg_coef * sum(1 - |2h - 1|^beta)`` (the rounding regulariser), so a loss built on this
    weight is optimised as ``rec + reg``.
    """
    return _SoftRounding.apply(alpha, *terms, float(reg_coef), float(beta))


class _FakeQuantLearnable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, n_bits):  # noqa: D102 (see fake_quant_learnable)
        levels = 2**n_bits - 1
        r = torch.round(x / scale)
        x_int = r + zero_point
        q = x_int.clamp(0, levels)
        # strictly inside the grid: autograd's clamp with number bounds passes no gradient at a bound itself
        inside = (x_int > 0) & (x_int < levels)
        ctx.save_for_backward(x, scale, zero_point, r, q, inside)
        return (q - zero_point).mul_(scale)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, scale, zero_point, r, q, inside = ctx.saved_tensors
        g_x = grad * inside if ctx.needs_input_grad[0] else None
        g_s = None
        if ctx.needs_input_grad[1]:
            # inside: d/ds [round_ste(x / s) * s] = round(x / s) - x / s; clamped: the grid end minus z
            d = torch.where(inside, r - x / scale, q - zero_point)
            g_s = (grad * d).sum().reshape(scale.shape) if scale.numel() == 1 else _reduce_to(grad * d, scale.shape)
        return g_x, g_s, None, None


def _reduce_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    dims = [i for i, (a, b) in enumerate(zip(t.shape, (1,) * (t.dim() - len(shape)) + tuple(shape))) if b == 1 and a != 1]
    return t.sum(dim=dims, keepdim=True).reshape(shape)


def fake_quant_learnable(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, n_bits: int) -> torch.Tensor:
    """``fake_quant`` (same forward values) with one fused backward to ``x`` and ``scale``."""
    return _FakeQuantLearnable.apply(x, scale, zero_point, n_bits)
