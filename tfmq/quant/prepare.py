"""Turning a diffusers UNet into a (fake-)quantized one, in place, and switching its state.

Wrapping follows the method's layer policy (docs/method.md section 2); a pre-forward hook on the UNet
records the ``timestep`` argument of every call so that per-timestep activation tables (FSC,
docs/method.md section 5) select their entry without touching the pipeline or counting calls.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm
from diffusers.models.attention_processor import Attention

from .config import QuantConfig
from .layers import QuantAttnProcessor, QuantLayer, layer_policy, set_module
from .quantizer import ActQuantizer, TimestepContext
from .recipes import Recipe, get_recipe

PROGRESS_MIN_LAYERS = 50  # below this the clipping search takes seconds: no bar


@dataclass
class QuantState:
    """What a quantized UNet carries besides its modules (kept on ``unet._tfmq``)."""

    config: QuantConfig
    recipe: Recipe
    ctx: TimestepContext
    stages_done: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    hook: Any = None
    cache_hooks: list[Any] = field(default_factory=list)


def get_state(unet: nn.Module) -> QuantState:
    state = getattr(unet, "_tfmq", None)
    if state is None:
        raise ValueError("this UNet has not been prepared for quantization; call tfmq.prepare_model(unet, config) first")
    return state


def is_quantized(unet: nn.Module) -> bool:
    return getattr(unet, "_tfmq", None) is not None


def quant_layers(unet: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for name, m in unet.named_modules():
        if isinstance(m, QuantLayer):
            yield name, m


def act_quantizers(unet: nn.Module) -> Iterator[tuple[str, ActQuantizer]]:
    for name, m in unet.named_modules():
        if isinstance(m, ActQuantizer):
            yield name, m


def example_inputs(unet: nn.Module, batch_size: int = 1, device=None) -> dict[str, Any]:
    """A valid forward-kwargs dict for a dry run (zeros; timestep 1)."""
    cfg = unet.config
    device = device or next(unet.parameters()).device
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    kw: dict[str, Any] = {
        "sample": torch.zeros(batch_size, cfg.in_channels, h, w, device=device),
        "timestep": torch.ones(batch_size, dtype=torch.int64, device=device),
    }
    if getattr(unet, "class_embedding", None) is not None:
        kw["class_labels"] = torch.zeros(batch_size, dtype=torch.int64, device=device)
    if getattr(cfg, "cross_attention_dim", None) is not None and "encoder_hidden_states" in _forward_params(unet):
        dim = cfg.cross_attention_dim
        dim = dim[0] if isinstance(dim, (list, tuple)) else dim
        kw["encoder_hidden_states"] = torch.zeros(batch_size, 2, dim, device=device)
    return kw


def dry_run(unet: nn.Module, handles: list) -> None:
    """One no-grad forward on :func:`example_inputs` for the hooks behind ``handles``, which are removed after."""
    try:
        with torch.no_grad():
            unet(**example_inputs(unet))
    finally:
        for h in handles:
            h.remove()


def _forward_params(unet: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(unet.forward).parameters)


def _third_param(unet: nn.Module) -> str | None:
    import inspect

    names = list(inspect.signature(unet.forward).parameters)
    return names[2] if len(names) > 2 else None


def _timestep_hook(ctx: TimestepContext):
    def hook(module, args, kwargs):
        sample = kwargs.get("sample", args[0] if args else None)
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None or sample is None:
            return None
        t = torch.as_tensor(t, device=sample.device)
        if t.dim() == 0:
            t = t[None]
        t = t.round().to(torch.int64).expand(sample.shape[0]) if t.numel() == 1 else t.round().to(torch.int64)
        ctx.timesteps = t
        # class_labels is the 3rd positional argument of UNet2DModel only (UNet2DConditionModel: encoder_hidden_states)
        positional = args[2] if len(args) > 2 and _third_param(module) == "class_labels" else None
        ctx.class_labels = kwargs.get("class_labels", positional)
        return None

    return hook


def _shortcut_splits(unet: nn.Module) -> dict[str, int]:
    """Channel split of every up-block ``conv_shortcut`` fed by ``cat([deep, skip])`` (dry run)."""
    splits: dict[str, int] = {}
    handles = []
    for bi, block in enumerate(getattr(unet, "up_blocks", [])):
        resnets = getattr(block, "resnets", None)
        if resnets is None:
            continue

        def block_hook(module, args, kwargs, bi=bi, resnets=resnets):
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            if res is None:
                return None
            skips = [r.shape[1] for r in res]
            for j, r in enumerate(resnets):
                if r.conv_shortcut is None or j >= len(skips):
                    continue
                in_ch = r.conv1.in_channels
                splits[f"up_blocks.{bi}.resnets.{j}.conv_shortcut"] = in_ch - skips[-(j + 1)]
            return None

        handles.append(block.register_forward_pre_hook(block_hook, with_kwargs=True))
    dry_run(unet, handles)
    return {k: v for k, v in splits.items() if v > 0}


def resolve_config(config: QuantConfig) -> QuantConfig:
    """``config`` with ``policy``, ``attention_matmul`` and ``split_shortcut`` taken from the method's
    recipe where they are ``None``: the config ``prepare_model`` stores on the model."""

    recipe = get_recipe(config.method)
    return dataclasses.replace(
        config,
        policy=config.policy or recipe.policy,
        attention_matmul=recipe.attention_matmul if config.attention_matmul is None else config.attention_matmul,
        split_shortcut=recipe.split_shortcut if config.split_shortcut is None else config.split_shortcut,
    )


def prepare_model(unet: nn.Module, config: QuantConfig, init: bool = True, progress: bool = True) -> nn.Module:
    """Wrap ``unet`` in place for ``config``: quantized layers, attention matmul quantizers, hook.

    Weight quantizers are initialised by the per-channel clipping search (unless ``init=False``,
    used when a checkpoint is about to overwrite them). The model starts in FP mode.

    Args:
        progress: a progress bar over the layers being initialised (shown only when there are at least
            ``PROGRESS_MIN_LAYERS`` of them and ``init``: the search takes ~14 min on SD v1.4 on 2 CPU cores).
    """
    if is_quantized(unet):
        raise ValueError("this UNet is already prepared for quantization; start from a fresh FP model")

    recipe = get_recipe(config.method)
    resolved = resolve_config(config)
    policy, attention_matmul, split_shortcut = resolved.policy, resolved.attention_matmul, resolved.split_shortcut
    ctx = TimestepContext()
    splits = _shortcut_splits(unet) if split_shortcut else {}
    targets = [(n, m) for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    wanted = progress and init and len(targets) >= PROGRESS_MIN_LAYERS
    bar = tqdm(targets, desc="weight clipping search", unit="layer", leave=False,
               disable=None if wanted else True)  # None: only on a terminal (logs and captured stderr stay clean)
    for name, module in bar:
        wq, aq = layer_policy(name, policy)
        if not wq:
            continue
        layer = QuantLayer(
            module, name, config.weight_bits, config.act_bits, ctx, act_quant=aq, split=splits.get(name), init=init
        )
        set_module(unet, name, layer)
    if attention_matmul and config.act_bits is not None:
        for name, m in list(unet.named_modules()):
            if isinstance(m, Attention):
                m.set_processor(QuantAttnProcessor(config.act_bits, ctx, softmax_bits=config.softmax_bits))
    state = QuantState(config=resolved, recipe=recipe, ctx=ctx)
    state.hook = unet.register_forward_pre_hook(_timestep_hook(ctx), with_kwargs=True)
    object.__setattr__(unet, "_tfmq", state)  # plain attribute: not a submodule, not in state_dict
    set_quant_state(unet, weight=False, act=False)
    return unet


def set_quant_state(unet: nn.Module, weight: bool, act: bool) -> None:
    """Switch weight and activation quantization on/off for the whole model."""
    for _, layer in quant_layers(unet):
        layer.set_quant_state(weight, act)
    for _, m in unet.named_modules():
        if isinstance(m, QuantAttnProcessor):
            for q in m.quantizers():
                q.enabled = act
    corr = getattr(unet, "tfmq_noise_correction", None)
    if corr is not None:  # PTQD's output correction belongs to the quantized model only
        corr.enabled = weight or act


def enable_inference(unet: nn.Module) -> nn.Module:
    """Weights quantized, activations quantized where calibrated: the deployable fake-quant model."""
    state = get_state(unet)
    set_quant_state(unet, weight=True, act=state.config.act_bits is not None)
    return unet
