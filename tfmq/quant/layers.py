"""Quantized Conv2d/Linear, quantized attention matmuls, and the named layer policies.

Spec section 2: which layers are quantized is a named policy chosen by module *name*
(``tfmq``: the float exceptions of the released TFMQ code; ``all``: Q-Diffusion's every layer),
never by registration order. Section 8: Q-Diffusion's shortcut splitting for up-block
``conv_shortcut`` layers whose input is the concatenation of the deep feature and the skip.
A wrapped layer keeps its ``weight``/``bias`` under the same parameter names, so the FP
state dict of the UNet is unchanged by wrapping.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import ActQuantizer, TimestepContext, WeightQuantizer

FIRST_RESNET_CONV = "down_blocks.0.resnets.0.conv1"
TEMPORAL_LINEARS = ("time_embedding.linear_1", "time_embedding.linear_2")


def is_temporal(name: str) -> bool:
    """True for the layers of the Temporal Information Block (docs/method.md section 3)."""
    return name in TEMPORAL_LINEARS or name.endswith("time_emb_proj")


def layer_policy(name: str, policy: str) -> tuple[bool, bool]:
    """``(quantize_weights, quantize_input_activation)`` for the Conv2d/Linear called ``name``."""
    if policy == "all":
        return True, True
    if policy != "tfmq":
        raise ValueError(f"policy={policy!r}: expected 'tfmq' or 'all'")
    if (
        name in ("conv_in", "conv_out", "time_embedding.linear_1")
        or name.endswith("conv_shortcut")
        or ".downsamplers." in name
        or name.startswith(("class_embedding.", "add_embedding."))
    ):
        return False, False
    if name in ("time_embedding.linear_2", FIRST_RESNET_CONV):
        return True, False
    return True, True


class QuantLayer(nn.Module):
    """A Conv2d or Linear with a per-channel weight quantizer and a per-tensor input quantizer.

    ``split`` (Q-Diffusion shortcut splitting) gives input channels ``[:split]`` and
    ``[split:]`` their own activation quantizer and weight quantizer.
    """

    def __init__(
        self,
        module: nn.Conv2d | nn.Linear,
        name: str,
        weight_bits: int,
        act_bits: int | None,
        ctx: TimestepContext,
        act_quant: bool = True,
        split: int | None = None,
        init: bool = True,
    ):
        super().__init__()
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"{name}: only Conv2d and Linear can be quantized, got {type(module).__name__}")
        self.name = name
        self.kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
        self.weight = module.weight
        self.bias = module.bias
        if self.kind == "conv":
            self.conv_args = dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)
            if module.padding_mode != "zeros":
                raise ValueError(f"{name}: padding_mode={module.padding_mode!r} is not supported (only 'zeros')")
        self.temporal = is_temporal(name)
        self.split = split
        w = module.weight.detach()
        parts = [w] if split is None else [w[:, :split], w[:, split:]]
        self.wq = nn.ModuleList(WeightQuantizer(p, weight_bits, init=init) for p in parts)
        self.aq = nn.ModuleList(
            ActQuantizer(act_bits, ctx) for _ in parts
        ) if (act_bits is not None and act_quant) else None
        self.use_wq = False
        self._w_cache: torch.Tensor | None = None
        self.kernel: nn.Module | None = None  # set by tfmq.quant.export.export_int8: the real integer forward

    # --- state ------------------------------------------------------------------------------
    def weight_parts(self) -> list[torch.Tensor]:
        w = self.weight
        return [w] if self.split is None else [w[:, : self.split], w[:, self.split :]]

    def set_quant_state(self, weight: bool, act: bool) -> None:
        self.use_wq = weight
        if self.aq is not None:
            for q in self.aq:
                q.enabled = act

    def _apply(self, fn, *args, **kwargs):
        self._w_cache = None
        return super()._apply(fn, *args, **kwargs)

    def invalidate_cache(self) -> None:
        self._w_cache = None

    def init_adaround(self) -> None:
        for q, w in zip(self.wq, self.weight_parts()):
            q.init_adaround(w)
        self.invalidate_cache()

    def adaround_parameters(self) -> list[nn.Parameter]:
        return [q.alpha for q in self.wq if q.alpha is not None]

    def round_regularizer(self, beta: float) -> torch.Tensor:
        return sum(q.round_regularizer(beta) for q in self.wq if q.mode == "adaround")

    def finalize(self) -> None:
        for q, w in zip(self.wq, self.weight_parts()):
            q.harden()
            q.finalize(w)
        self.invalidate_cache()

    @property
    def finalized(self) -> bool:
        return all(q.mode == "int" for q in self.wq)

    # --- checkpoint -------------------------------------------------------------------------
    def export_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The weight quantizers' state: tensors ``wq.<k>.<name>``, meta ``{weight, split, act, temporal}``.

        The input activation quantizers (``aq.<k>``) are ActQuantizer modules of their own and
        export themselves.
        """
        tensors, modes = {}, []
        for k, q in enumerate(self.wq):
            t, meta = q.export_state()
            tensors.update({f"wq.{k}.{key}": v for key, v in t.items()})
            modes.append(meta)
        return tensors, {"weight": modes, "split": self.split, "act": self.aq is not None, "temporal": self.temporal}

    def restore_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Inverse of ``export_state`` on a layer wrapped the same way (``init=False``).

        Raises:
            ValueError: the layer was wrapped differently (split, activation quantizer, number of
                weight quantizers) or a weight quantizer's state is bad.
        """
        if not isinstance(meta, dict):
            raise ValueError(f"layer entry {meta!r}, expected a dict with 'weight', 'split' and 'act'")
        for key, mine in (("split", self.split), ("act", self.aq is not None)):
            if meta.get(key) != mine:
                raise ValueError(f"{key}={meta.get(key)!r} in the checkpoint, but this layer has {key}={mine!r}")
        weight = meta.get("weight")
        if not isinstance(weight, list) or len(weight) != len(self.wq):
            raise ValueError(f"{len(self.wq)} weight quantizer(s) expected, the checkpoint describes {weight!r}")
        for k, (q, m) in enumerate(zip(self.wq, weight)):
            prefix = f"wq.{k}."
            try:
                q.restore_state({key[len(prefix):]: v for key, v in tensors.items() if key.startswith(prefix)}, m)
            except ValueError as e:
                raise ValueError(f"wq.{k}: {e}") from None
        self.invalidate_cache()

    # --- forward ----------------------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        if self._w_cache is not None:
            return self._w_cache
        parts = [q(w) for q, w in zip(self.wq, self.weight_parts())]
        w_hat = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if self.finalized:  # the grid can no longer change: compute the float weight once
            self._w_cache = w_hat.detach()
        return w_hat

    def release_float_weight(self) -> None:
        """Drop the float weight and the uint8 grid once ``kernel`` computes this layer (export_int8)."""
        if self.kernel is None:
            raise RuntimeError(f"{self.name}: no integer kernel set; the float weight is still needed")
        self.weight = nn.Parameter(torch.empty(0, device=self.weight.device), requires_grad=False)
        self._w_cache = None
        for q in self.wq:
            q.w_int = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(x)
        if self.aq is not None and self.aq[0].enabled:
            if self.split is None:
                x = self.aq[0](x)
            else:
                x = torch.cat([self.aq[0](x[:, : self.split]), self.aq[1](x[:, self.split :])], dim=1)
        w = self.quantized_weight() if self.use_wq else self.weight
        if self.kind == "conv":
            return F.conv2d(x, w, self.bias, **self.conv_args)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{self.name}, kind={self.kind}, temporal={self.temporal}, split={self.split}"


class QuantAttnProcessor(nn.Module):
    """diffusers attention with the matmul operands (q, k, v, softmax) quantized (Q-Diffusion).

    Mirrors diffusers' classic ``AttnProcessor`` step by step and inserts an activation
    quantizer on q, k, v after the head split and on the attention probabilities (unsigned,
    zero point 0).
    """

    def __init__(self, act_bits: int, ctx: TimestepContext, softmax_bits: int | None = None):
        super().__init__()
        self.q_quant = ActQuantizer(act_bits, ctx)
        self.k_quant = ActQuantizer(act_bits, ctx)
        self.v_quant = ActQuantizer(act_bits, ctx)
        self.softmax_quant = ActQuantizer(softmax_bits or act_bits, ctx, unsigned=True)

    def quantizers(self) -> list[ActQuantizer]:
        return [self.q_quant, self.k_quant, self.v_quant, self.softmax_quant]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = self.q_quant(attn.head_to_batch_dim(query))
        key = self.k_quant(attn.head_to_batch_dim(key))
        value = self.v_quant(attn.head_to_batch_dim(value))
        attention_probs = self.softmax_quant(attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(attention_probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
