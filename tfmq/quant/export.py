"""Real integer inference: a quantized UNet's layers mapped onto torchao's int8 kernels.

Everywhere else tfmq *simulates* quantization (float tensors on the integer grid). ``export_int8``
turns a finished quantized model (``tfmq.quantize`` or ``tfmq.load``) into one whose quantized
Conv2d / Linear layers hold int8 weights and compute int8 x int8 -> int32 products: the int8 GEMM
``torch._int_mm`` on the CPU (oneDNN, what torchao's own CPU path calls) and torchao's
``safe_int_mm`` on CUDA; layers without an input quantizer use torchao's ``Int8Tensor`` weight-only
linear. Our grids and scales are mapped onto int8 exactly:

- weight ``(q - z) * s`` (per output channel, asymmetric, ``q`` in ``[0, 2^b - 1]``) becomes the
  symmetric int8 ``qdata = q - z`` with the same ``s`` (torchao's int8 kernels take no weight zero
  point): exact for every ``b <= 7``. An 8-bit channel whose ``q - z`` leaves ``[-128, 127]`` is
  stored as ``q - 128`` and gets the rank-one term ``(128 - z) * s * sum_k x_hat_k`` added to its
  output (``x_hat``: the quantized input), which is exact as well.
- activation ``clamp(round(x / s) + z, 0, 2^b - 1)`` (per tensor, asymmetric) becomes the int8
  ``clamp(round(x / s) + (z - 128), -128, 127)``: the same integers shifted by 128 for ``b = 8``; for
  ``b < 8`` the clamp is the ``b``-bit one, so it is exact too (rounding is ``round(x / s)``, as in
  fake-quant, computed before im2col, where zero padding is exactly the zero point). The
  scale is read from the layer's own quantizer at every call, so **per-timestep scales (FSC)
  carry over** (one per UNet call; a batch mixing timesteps gets per-row scales).
- a Conv2d is run as im2col (``F.unfold``) + the int8 GEMM: torchao 0.18 has no int8 convolution.
  ``conv="simulated"`` leaves convolutions as they are (fake-quant, float conv).
- a layer without an input quantizer (W-only settings, the policy's exceptions) gets torchao's int8
  weight-only path: int8 storage, float matmul (no integer product).

What stays simulated: the attention matmuls of Q-Diffusion's ``attention_matmul`` (q / k / v /
softmax quantizers: torchao has no quantized bmm), grouped convolutions, and FP-kept layers (FP).
The integer products are exact; the float rescaling differs from fake-quant in the last bits, so
outputs agree to float rounding (tests: cosine >= 0.999 on tiny UNets). The export changes the model
in place, releases the float weights of the layers it converts, and is for inference only: it
cannot be saved with ``tfmq.save`` (save the fake-quant model; export after ``tfmq.load``).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .layers import QuantLayer
from .prepare import get_state, quant_layers

CONV_MODES = ("im2col", "simulated")


class ExportError(ValueError):
    """The model cannot be exported (not quantized, not finished, or torchao missing)."""


def _torchao():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.kernel.intmm import safe_int_mm
            from torchao.quantization import Int8Tensor
    except ImportError as e:  # pragma: no cover - torchao is a dependency
        raise ExportError(f"the integer export needs torchao (pip install 'torchao==0.18.0'): {e}") from None
    return Int8Tensor, safe_int_mm


class _Part(nn.Module):
    """One weight part of a layer (all of it, or one side of a shortcut split) as a torchao int8 weight."""

    def __init__(self, grid: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor, act, act_bits: int | None):
        super().__init__()
        Int8Tensor, self._cuda_int_mm = _torchao()
        c = grid.shape[0]
        diff = grid.to(torch.int16).reshape(c, -1) - zero_point.to(torch.int16).reshape(c, 1)
        fits = (diff.amin(dim=1) >= -128) & (diff.amax(dim=1) <= 127)
        # int8 offset per channel: the zero point where q - z fits int8, else 2^(b-1) (8-bit grids), whose
        # difference to z comes back as a rank-one term: (offset - z) * s * sum_k x_hat_k
        offset = torch.where(fits, zero_point.reshape(c).to(torch.int16), torch.full_like(fits, 128, dtype=torch.int16))
        qdata = (grid.to(torch.int16).reshape(c, -1) - offset[:, None]).to(torch.int8)
        corr = (offset.float() - zero_point.reshape(c).float()) * scale.reshape(c).float()
        self.register_buffer("correction", None if bool(fits.all()) else corr)
        self.act = act  # the layer's ActQuantizer (not owned: it stays registered in the layer)
        self.act_bits = act_bits
        if act is None:  # torchao's int8 weight (its weight-only linear: int8 storage, float matmul)
            w = Int8Tensor(qdata, scale.reshape(c, 1).float().contiguous(), [1, qdata.shape[1]], torch.float32)
            self.weight = nn.Parameter(w, requires_grad=False)

        else:  # int8 x int8: the GEMM's right operand, its column sums (the zero point term) and scales
            self.register_buffer("w_t", qdata.t().contiguous())  # [K, N] int8
            self.register_buffer("w_rowsum", qdata.sum(dim=1, dtype=torch.int32))
            self.register_buffer("w_scale", scale.reshape(c).float())

    def int8_bytes(self) -> int:
        """Bytes of this part's int8 weight and its float scales."""
        if self.act is None:
            return self.weight.qdata.numel() + 4 * self.weight.scale.numel()
        return self.w_t.numel() + 4 * self.w_scale.numel()

    def forward(self, x: torch.Tensor, columns=None) -> torch.Tensor:
        """``x`` (float; ``columns(x)`` gives its ``[..., K]`` GEMM rows) -> ``[..., N]`` without bias.

        Quantized input: ``v = clamp(round(x / s), -z, 2^b - 1 - z)`` (the integers ``u - z`` of
        fake-quant, computed on ``x`` before im2col, where zero padding is exactly the zero point), then
        the int8 GEMM (``torch._int_mm``, int32 out) on ``A8 = int8(v + z - 128)`` and the int8 weight,
        the zero point's rank-one term removed in int32 (exact): ``s * s_w * (A8 W - (z - 128) rowsum(W))``.
        """
        cols = columns if columns is not None else (lambda t: t)
        if self.act is None:  # torchao's int8 weight-only path
            xc = cols(x)
            y = F.linear(xc, self.weight)
            return y if self.correction is None else y + xc.sum(dim=-1, keepdim=True) * self.correction
        if self.act.mode == "uncalibrated":
            raise RuntimeError("activation quantizer is enabled but was never calibrated; run calibrate_activations")
        s, z = self.act.current_qparams(x)
        if s.dim() > 0 and s.numel() > 1:  # one timestep per batch row: that row's scale on each of its rows
            s, z = s.reshape(s.shape[0], *([1] * (x.dim() - 1))), z.reshape(s.shape[0], *([1] * (x.dim() - 1)))
        v = torch.clamp(torch.round(x / s), -z, 2**self.act_bits - 1 - z)  # x / s: fake_quant's own rounding
        vc = cols(v)  # [B, L, K] (or [..., K] for a linear)
        lead, k = vc.shape[:-1], vc.shape[-1]
        if s.dim() > 0 and s.numel() > 1:
            rows = vc.numel() // k // s.shape[0]
            s_rows, zp8 = s.reshape(-1, 1).repeat_interleave(rows, 0), (z.reshape(-1, 1) - 128).repeat_interleave(rows, 0)
        else:
            s_rows, zp8 = s.reshape(1, 1), z.reshape(1, 1) - 128
        a8 = (vc.reshape(-1, k) + zp8).to(torch.int8)
        # int8 x int8 -> int32: the CPU kernel (oneDNN) directly, as torchao's CPU path does; on CUDA
        # torchao's safe_int_mm, which handles cuBLAS's shape rules (its CPU branch is an int32 matmul)
        mm = self._cuda_int_mm if a8.is_cuda else torch._int_mm
        acc = mm(a8, self.w_t) - zp8.to(torch.int32) * self.w_rowsum  # exact int32 [M, N]
        y = acc.float() * (s_rows.float() * self.w_scale)
        if self.correction is not None:
            y = y + (s_rows * vc.reshape(-1, k).sum(dim=1, keepdim=True)) * self.correction
        return y.reshape(*lead, -1)


class IntegerKernel(nn.Module):
    """The integer forward of one ``QuantLayer`` (set as ``layer.kernel``; the layer's hooks stay)."""

    def __init__(self, layer: QuantLayer):
        super().__init__()
        self.kind = layer.kind
        self.conv_args = dict(layer.conv_args) if layer.kind == "conv" else None
        self.kernel_size = tuple(layer.weight.shape[2:]) if layer.kind == "conv" else None
        self.split = layer.split
        bits = layer.aq[0].n_bits if layer.aq is not None else None
        acts = list(layer.aq) if layer.aq is not None and layer.aq[0].enabled else [None] * len(layer.wq)
        parts = []
        for q, w, a in zip(layer.wq, layer.weight_parts(), acts):
            grid = q.integer_weight(w.detach())
            parts.append(_Part(grid, q.zero_point, q.scale, a, bits if a is not None else None))
        self.parts = nn.ModuleList(parts)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)

    def _columns(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv_args
        cols = F.unfold(x, self.kernel_size, dilation=a["dilation"], padding=a["padding"], stride=a["stride"])
        return cols.transpose(1, 2)  # [B, L, C * kh * kw]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = [x] if self.split is None else [x[:, : self.split], x[:, self.split :]]
        if self.kind == "linear":
            y = sum(p(xi) for p, xi in zip(self.parts, xs))
            return y if self.bias is None else y + self.bias
        b, _, h, w = x.shape
        y = sum(p(xi, self._columns) for p, xi in zip(self.parts, xs))  # [B, L, Cout]
        if self.bias is not None:
            y = y + self.bias
        a = self.conv_args
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, a["stride"], a["padding"], a["dilation"]
        ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return y.transpose(1, 2).reshape(b, -1, ho, wo)


@dataclass
class ExportReport:
    """What ``export_int8`` did to each quantized layer, and the weight bytes before / after."""

    integer: list[str] = field(default_factory=list)  # int8 x int8 GEMM
    weight_only: list[str] = field(default_factory=list)  # int8 storage, float matmul
    simulated: dict[str, str] = field(default_factory=dict)  # layer -> why it stays fake-quant
    attention_matmuls_simulated: int = 0
    float_weight_bytes: int = 0  # the converted layers' float weights (released)
    int8_weight_bytes: int = 0  # their int8 weights + scales

    def to_dict(self) -> dict[str, Any]:
        return {"integer": len(self.integer), "weight_only": len(self.weight_only), "simulated": dict(self.simulated),
                "attention_matmuls_simulated": self.attention_matmuls_simulated,
                "float_weight_bytes": self.float_weight_bytes, "int8_weight_bytes": self.int8_weight_bytes}


def _why_simulated(layer: QuantLayer, conv: str) -> str | None:
    if layer.kind == "conv" and conv == "simulated":
        return "conv='simulated'"
    if layer.kind == "conv" and layer.conv_args["groups"] != 1:
        return f"grouped convolution (groups={layer.conv_args['groups']})"
    return None


def export_int8(unet: nn.Module, conv: str = "im2col") -> ExportReport:
    """Run the quantized layers of a finished quantized ``unet`` on torchao int8 kernels (in place).

    Args:
        unet: a model from ``tfmq.quantize`` / ``tfmq.load`` with its weights finalized (every
            weight stage done); activations calibrated or not quantized (W-only).
        conv: ``"im2col"`` (convolutions as unfold + int8 GEMM) or ``"simulated"`` (left fake-quant).

    Returns:
        An ``ExportReport``: which layers run int8 x int8, which int8 weight-only, which stay simulated and why.

    Raises:
        ExportError: ``unet`` is not a finished quantized model, or ``conv`` is unknown.
    """
    if conv not in CONV_MODES:
        raise ExportError(f"conv={conv!r}: expected one of {', '.join(CONV_MODES)}")
    try:
        state = get_state(unet)
    except (AttributeError, ValueError, KeyError):
        state = None
    layers = list(quant_layers(unet))
    if state is None or not layers:
        raise ExportError("export_int8 needs a model quantized by tfmq.quantize or loaded with tfmq.load")
    if state.config.act_bits is not None and "activations" not in state.stages_done:
        raise ExportError(f"activations are not calibrated yet (stages done: {', '.join(state.stages_done) or 'none'}); "
                          f"finish the quantization (tfmq.quantize / calibrate_activations) before exporting")
    not_final = [n for n, layer in layers if not layer.finalized]
    if not_final:
        raise ExportError(f"{len(not_final)} layer(s) still have learnable rounding (e.g. {not_final[0]}); "
                          f"export a finished model (tfmq.quantize, or tfmq.load of a finished checkpoint)")
    report = ExportReport()
    for name, layer in layers:
        if getattr(layer, "kernel", None) is not None:
            raise ExportError(f"{name} is already exported; load the checkpoint again to export once more")
        why = _why_simulated(layer, conv)
        if why is not None:
            report.simulated[name] = why
            continue
        kernel = IntegerKernel(layer)
        (report.integer if kernel.parts[0].act is not None else report.weight_only).append(name)
        report.float_weight_bytes += layer.weight.numel() * layer.weight.element_size()
        report.int8_weight_bytes += sum(p.int8_bytes() for p in kernel.parts)
        layer.kernel = kernel
        layer.release_float_weight()
    from .layers import QuantAttnProcessor

    report.attention_matmuls_simulated = sum(isinstance(m, QuantAttnProcessor) for m in unet.modules())
    state.stats = {**state.stats, "export": {"backend": "torchao", "conv": conv, **report.to_dict()}}
    return report
