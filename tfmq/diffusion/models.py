"""The full-precision (FP) UNets that get quantized: the embedded default and local diffusers checkpoints.

The default is a 1.1M-parameter ``UNet2DModel`` for 28x28 Fashion-MNIST with attention only at
7x7 (where self-attention over 49 tokens is cheapest on CPU). ``load_fp_model`` reads any
local diffusers directory with ``unet/`` + ``scheduler/`` (our checkpoints or a Stable-Diffusion-style
pipeline folder), never the network.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import UNet2DModel

EMBEDDED_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 28,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 32,
    "num_class_embeds": None,
}
_UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")

#: The embedded text-guided UNet (Stable Diffusion's layout in miniature): 4x8x8 latents, cross-attention
#: transformer blocks at 4x4 and 2x2 and in the mid block, attending to the text encoder's 64-dim states.
EMBEDDED_TEXT_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}


def build_unet(cfg: dict[str, Any] | None = None, *, seed: int | None = None) -> UNet2DModel:
    """Build a freshly initialised ``UNet2DModel``: the embedded default, overridden by ``cfg``.

    Args:
        cfg: ``UNet2DModel`` constructor arguments overriding :data:`EMBEDDED_UNET_CONFIG`
            (e.g. ``{"num_class_embeds": 10}`` for the class-conditional default). Unknown keys are
            rejected, so a typo in params.yaml fails loudly.
        seed: if given, the weight initialisation is seeded (``torch.manual_seed``) for reproducibility.

    Returns:
        UNet2DModel in float32 on CPU, train mode. Input [N, in_channels, 28, 28] -> same shape.

    Example:
        >>> unet = build_unet({"num_class_embeds": 10}, seed=0)
    """
    return _build("build_unet", UNet2DModel, EMBEDDED_UNET_CONFIG, cfg, seed)


def _build(caller: str, cls, defaults: dict[str, Any], cfg: dict[str, Any] | None, seed: int | None):
    """``cls(**(defaults | cfg))`` with the tuple-valued keys as tuples; keys ``cls`` does not take are refused."""
    cfg = dict(cfg or {})
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"{caller} got unknown {cls.__name__} keys {unknown}; allowed keys: {sorted(allowed)}")
    merged = {**defaults, **cfg}
    for k in ("block_out_channels", "down_block_types", "up_block_types"):
        merged[k] = tuple(merged[k])
    if seed is not None:
        torch.manual_seed(seed)
    return cls(**merged)


def build_text_unet(cfg: dict[str, Any] | None = None, *, seed: int | None = None):
    """A freshly initialised ``UNet2DConditionModel``: :data:`EMBEDDED_TEXT_UNET_CONFIG` overridden by ``cfg``
    (unknown keys rejected, like :func:`build_unet`)."""
    from diffusers import UNet2DConditionModel

    return _build("build_text_unet", UNet2DConditionModel, EMBEDDED_TEXT_UNET_CONFIG, cfg, seed)


def _read_class_name(config_path: Path, allowed: tuple[str, ...] | None = None) -> str:
    try:
        name = json.loads(config_path.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read _class_name from {config_path} ({e}); expected a diffusers save_pretrained config") from e
    if allowed is not None and name not in allowed:
        raise ValueError(f"{config_path} describes a {name}, expected one of {allowed}; point at a diffusers UNet directory")
    if not hasattr(diffusers, name):
        raise ValueError(f"{config_path} names class {name}, which diffusers {diffusers.__version__} does not provide")
    return name


def _check_model_dir(model_dir: str | os.PathLike) -> Path:
    model_dir = Path(model_dir)
    missing = [sub for sub in ("unet", "scheduler") if not (model_dir / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"model directory {model_dir} lacks {missing} (expected unet/ and scheduler/ from save_pretrained); "
            "train it first (benchmarks/train_embedded.py / the train stage) or fix model_dir in params.yaml"
        )
    return model_dir


def load_fp_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Any]:
    """Load the FP UNet (eval mode, no grads) and its scheduler from a local diffusers directory.

    Args:
        model_dir: directory holding ``unet/`` and ``scheduler/`` (ours, or a Stable-Diffusion-style
            pipeline folder; other subfolders are ignored).
        device: where the UNet goes.

    Returns:
        ``(unet, scheduler)``: a ``UNet2DModel`` or ``UNet2DConditionModel``, and the scheduler instance
        of the class saved in ``scheduler/scheduler_config.json`` (the training scheduler for ours).
    """
    model_dir = _check_model_dir(model_dir)
    unet_cls = getattr(diffusers, _read_class_name(model_dir / "unet" / "config.json", _UNET_CLASSES))
    sched_cls = getattr(diffusers, _read_class_name(model_dir / "scheduler" / "scheduler_config.json"))
    unet = unet_cls.from_pretrained(model_dir / "unet", local_files_only=True).to(device).eval()
    unet.requires_grad_(False)
    scheduler = sched_cls.from_pretrained(model_dir / "scheduler", local_files_only=True)
    return unet, scheduler


def load_pipeline_parts(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Like :func:`load_fp_model`, but return the scheduler *config* dict (for ``sampling.make_scheduler``)."""
    unet, scheduler = load_fp_model(model_dir, device)
    return unet, dict(scheduler.config)
