"""Self-describing quantized checkpoint: safetensors tensors + a JSON header, no pickle.

``save(unet, dir)`` writes ``dir/quantized.safetensors`` (integer weight grids as uint8, weight
scales / zero points, activation ranges or per-timestep tables, the temporal feature cache) and
``dir/quant_config.json`` (method, bits, layer policy, FSC scope and timesteps, stages done,
library versions, format version, the FP model's config and a fingerprint of its weights).
``load(dir, fp_unet)`` rebuilds the quantized model on a fresh FP model of the same kind and
refuses a mismatch with a message saying what differs.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from safetensors.torch import load_file

from .config import FORMAT_VERSION, QuantConfig
from ..io import atomic_dir, atomic_save_safetensors, atomic_write_json
from .prepare import act_quantizers, enable_inference, get_state, prepare_model, quant_layers, set_quant_state
from .tib import TemporalFeatureCache, _attach_cache

WEIGHTS_NAME = "quantized.safetensors"
HEADER_NAME = "quant_config.json"


class CheckpointMismatchError(ValueError):
    """The checkpoint does not belong to the FP model it is being loaded onto."""


def _versions() -> dict[str, str]:
    import diffusers
    import safetensors

    from .. import __version__

    return {"tfmq": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "safetensors": safetensors.__version__}


def fp_fingerprint(unet: nn.Module) -> dict[str, float]:
    """Sum of |w| (float64) of every FP parameter, keyed by name: cheap identity of the FP weights."""
    out = {}
    for n, p in unet.named_parameters():
        if n.endswith(("alpha", ".scale")):
            continue
        w = p.detach().double().flatten()
        pos = torch.linspace(-1.0, 1.0, w.numel(), dtype=torch.float64, device=w.device) + 0.5
        out[n] = float(w.abs().sum()) + 1.0e3 * float((w * pos).sum())
    return out


def _unet_config(unet: nn.Module) -> dict[str, Any]:
    return json.loads(json.dumps(dict(unet.config), default=str))


def save(unet: nn.Module, path: str | os.PathLike, extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write the quantized state of ``unet`` to the directory ``path`` (atomically)."""
    state = get_state(unet)
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, layer in quant_layers(unet):
        modes = []
        for k, q in enumerate(layer.wq):
            tensors[f"{name}.wq.{k}.scale"] = q.scale
            tensors[f"{name}.wq.{k}.zero_point"] = q.zero_point
            if q.mode == "int":
                tensors[f"{name}.wq.{k}.w_int"] = q.w_int
            elif q.mode == "adaround":
                tensors[f"{name}.wq.{k}.alpha"] = q.alpha.detach()
            modes.append({"mode": q.mode, "soft": q.soft})
        layers[name] = {"weight": modes, "split": layer.split, "act": layer.aq is not None, "temporal": layer.temporal}
    acts: dict[str, str] = {}
    fsc_timesteps: list[int] | None = None
    for name, q in act_quantizers(unet):
        acts[name] = q.mode
        if q.mode == "shared":
            tensors[f"{name}.scale"] = q.scale.detach()
            tensors[f"{name}.zero_point"] = q.zero_point
        elif q.mode == "table":
            tensors[f"{name}.table_timesteps"] = q.table_timesteps
            tensors[f"{name}.table_scale"] = q.table_scale
            tensors[f"{name}.table_zero_point"] = q.table_zero_point
            fsc_timesteps = fsc_timesteps or [int(t) for t in q.table_timesteps.tolist()]
    cache = getattr(unet, "tfmq_feature_cache", None)
    cache_names = None
    if isinstance(cache, TemporalFeatureCache):
        cache_names = cache.names
        for k, v in cache.state_dict().items():
            tensors[f"tfmq_feature_cache.{k}"] = v
    cfg = state.config
    header = {
        "format": "tfmq-quantized-unet",
        "format_version": FORMAT_VERSION,
        "simulated_quantization": True,
        "method": cfg.method,
        "bits": cfg.bits_name,
        "weight_bits": cfg.weight_bits,
        "act_bits": cfg.act_bits,
        "policy": cfg.policy,
        "attention_matmul": cfg.attention_matmul,
        "fsc_scope": cfg.fsc_scope if state.recipe.activations == "fsc" and cfg.fsc else None,
        "fsc_timesteps": fsc_timesteps,
        "stages_done": list(state.stages_done),
        "config": cfg.to_dict(),
        "stats": state.stats,
        "versions": _versions(),
        "unet_class": type(unet).__name__,
        "unet_config": _unet_config(unet),
        "fp_fingerprint": fp_fingerprint(unet),
        "layers": layers,
        "act_quantizers": acts,
        "feature_cache": cache_names,
        "extra": extra_metadata or {},
    }
    with atomic_dir(path) as tmp:
        atomic_save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "tfmq-quantized-unet", "format_version": str(FORMAT_VERSION)})
        atomic_write_json(header, tmp / HEADER_NAME)
    return Path(path)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path) / HEADER_NAME
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no quantized checkpoint header here; expected a directory written by tfmq.save")
    header = json.loads(p.read_text())
    if header.get("format") != "tfmq-quantized-unet":
        raise CheckpointMismatchError(f"{p}: format={header.get('format')!r}, expected 'tfmq-quantized-unet'")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointMismatchError(
            f"{p}: format_version={header.get('format_version')!r}, this tfmq reads version {FORMAT_VERSION}; re-run the quantization"
        )
    return header


def _check_model(header: dict[str, Any], unet: nn.Module, path) -> None:
    if header["unet_class"] != type(unet).__name__:
        raise CheckpointMismatchError(
            f"{path}: checkpoint is for a {header['unet_class']}, but the model given is a {type(unet).__name__}"
        )
    cfg = _unet_config(unet)
    diff = sorted(k for k in set(cfg) | set(header["unet_config"]) if not k.startswith("_") and cfg.get(k) != header["unet_config"].get(k))
    if diff:
        k = diff[0]
        raise CheckpointMismatchError(
            f"{path}: FP model config differs from the checkpoint's at {', '.join(diff[:5])} "
            f"(e.g. {k}: model {cfg.get(k)!r} vs checkpoint {header['unet_config'].get(k)!r}); load onto the FP model it was made from"
        )
    fp = fp_fingerprint(unet)
    for name, value in header["fp_fingerprint"].items():
        if name not in fp or abs(fp[name] - value) > 1e-6 * max(1.0, abs(value)):
            raise CheckpointMismatchError(
                f"{path}: FP weights differ from those the checkpoint was made from (first at {name}); load onto the same FP checkpoint"
            )


def load(path: str | os.PathLike, fp_unet: nn.Module, device=None) -> nn.Module:
    """Rebuild the quantized model saved at ``path`` on ``fp_unet`` (modified in place)."""
    header = read_header(path)
    _check_model(header, fp_unet, path)
    tensors = load_file(str(Path(path) / WEIGHTS_NAME), device="cpu")
    config = QuantConfig.from_dict(header["config"])
    if device is not None:
        fp_unet.to(device)
    prepare_model(fp_unet, config, init=False)
    state = get_state(fp_unet)
    layers = dict(quant_layers(fp_unet))
    if set(layers) != set(header["layers"]):
        missing = sorted(set(header["layers"]) ^ set(layers))
        raise CheckpointMismatchError(f"{path}: quantized layer set differs from the model's (e.g. {missing[:3]})")
    dev = next(fp_unet.parameters()).device
    for name, layer in layers.items():
        info = header["layers"][name]
        for k, q in enumerate(layer.wq):
            q.scale.copy_(tensors[f"{name}.wq.{k}.scale"])
            q.zero_point.copy_(tensors[f"{name}.wq.{k}.zero_point"])
            mode = info["weight"][k]["mode"]
            if mode == "int":
                q.w_int = tensors[f"{name}.wq.{k}.w_int"].to(dev)
                q.mode = "int"
            elif mode == "adaround":
                q.alpha = nn.Parameter(tensors[f"{name}.wq.{k}.alpha"].to(dev))
                q.mode, q.soft = "adaround", info["weight"][k]["soft"]
        layer.invalidate_cache()
    acts = dict(act_quantizers(fp_unet))
    for name, mode in header["act_quantizers"].items():
        if name not in acts:
            raise CheckpointMismatchError(f"{path}: activation quantizer {name} does not exist in the model")
        q = acts[name]
        if mode == "shared":
            q.scale.data = tensors[f"{name}.scale"].to(dev)
            q.zero_point.data = tensors[f"{name}.zero_point"].to(dev)
        elif mode == "table":
            q.table_timesteps = tensors[f"{name}.table_timesteps"].to(dev)
            q.table_scale = tensors[f"{name}.table_scale"].to(dev)
            q.table_zero_point = tensors[f"{name}.table_zero_point"].to(dev)
            q._lookup = None
        q.mode = mode
    if header.get("feature_cache"):
        n = len(header["feature_cache"])
        cache = TemporalFeatureCache(
            tensors["tfmq_feature_cache.timesteps"].to(dev),
            tensors["tfmq_feature_cache.classes"].to(dev) if tensors["tfmq_feature_cache.classes"].numel() else None,
            [tensors[f"tfmq_feature_cache.feature_{i}"].to(dev) for i in range(n)],
            header["feature_cache"],
        )
        _attach_cache(fp_unet, cache)
    state.stages_done = list(header["stages_done"])
    state.stats = header.get("stats", {})
    if "activations" in state.stages_done:
        enable_inference(fp_unet)
    else:
        set_quant_state(fp_unet, weight=True, act=False)
    return fp_unet
