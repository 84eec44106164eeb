"""Self-describing quantized checkpoint: safetensors tensors + a JSON header, no pickle.

``save(unet, dir)`` writes ``dir/quantized.safetensors`` (integer weight grids as uint8, weight
scales / zero points, activation ranges or per-timestep tables, the temporal feature cache) and
``dir/quant_config.json`` (method, bits, layer policy, FSC scope and timesteps, stages done,
library versions, format version, the FP model's config and a fingerprint of its weights).
``load(dir, fp_unet)`` rebuilds the quantized model on a fresh FP model of the same kind and
refuses a mismatch with a message saying what differs. What each quantizer stores is its own
business (``export_state`` / ``restore_state``); this module only names and files it: tensors
under ``<module name>.<key>``, meta in the header's ``layers`` / ``act_quantizers`` /
``feature_cache``. A file that cannot be read raises one ``CheckpointError`` line naming it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from safetensors import SafetensorError, safe_open

from .config import FORMAT_VERSION, READ_FORMAT_VERSIONS, ConfigError, QuantConfig
from ..io import atomic_dir, atomic_save_safetensors, atomic_write_json
from .prepare import act_quantizers, enable_inference, get_state, prepare_model, quant_layers, set_quant_state
from .ptqd import MODULE as PTQD_MODULE, NoiseCorrection, attach_noise_correction, noise_correction
from .tib import CACHE_MODULE, TemporalFeatureCache, attach_feature_cache, feature_cache

WEIGHTS_NAME = "quantized.safetensors"
HEADER_NAME = "quant_config.json"
FORMAT = "tfmq-quantized-unet"
_WRITTEN_BY_SAVE = f"expected a directory written by tfmq.save (with {WEIGHTS_NAME} and {HEADER_NAME})"
_READABLE = " and ".join(map(str, READ_FORMAT_VERSIONS))
_HEADER_KEYS = {"config": dict, "layers": dict, "act_quantizers": dict, "stages_done": list, "unet_class": str,
                "unet_config": dict, "fp_fingerprint": dict}


class CheckpointError(ValueError):
    """A quantized checkpoint that cannot be used: missing, truncated, foreign, damaged or mismatching."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A file of the checkpoint directory does not exist (also a ``FileNotFoundError``)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not belong to the FP model it is being loaded onto (or to this tfmq's format)."""


def _versions() -> dict[str, str]:
    import diffusers
    import safetensors

    from ..version import __version__

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


def _export(unet: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], Any]:
    """``(tensors, layer meta, activation quantizer meta, feature cache meta)`` of a prepared ``unet``."""
    tensors: dict[str, torch.Tensor] = {}

    def put(prefix: str, owned: dict[str, torch.Tensor]) -> None:
        tensors.update({f"{prefix}.{k}": v for k, v in owned.items()})

    layers, acts = {}, {}
    for name, layer in quant_layers(unet):
        owned, layers[name] = layer.export_state()
        put(name, owned)
    for name, q in act_quantizers(unet):
        owned, acts[name] = q.export_state()
        put(name, owned)
    cache, cache_meta = feature_cache(unet), None
    if cache is not None:
        owned, cache_meta = cache.export_state()
        put(CACHE_MODULE, owned)
    corr = noise_correction(unet)
    if corr is not None:
        put(PTQD_MODULE, corr.export_state()[0])  # its meta: the header's "noise_correction"
    return tensors, layers, acts, cache_meta


def save(unet: nn.Module, path: str | os.PathLike, extra_metadata: dict[str, Any] | None = None) -> Path:
    """Write the quantized state of ``unet`` to the directory ``path`` (atomically)."""
    state = get_state(unet)
    tensors, layers, acts, cache_meta = _export(unet)
    fsc_timesteps = next((ts for _, q in act_quantizers(unet) if (ts := q.calibrated_timesteps())), None)
    cfg = state.config
    header = {
        "format": FORMAT,
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
        "feature_cache": cache_meta,
        "noise_correction": (noise_correction(unet).export_state()[1] if noise_correction(unet) is not None else None),
        "extra": extra_metadata or {},
    }
    with atomic_dir(path) as tmp:
        atomic_save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
        atomic_write_json(header, tmp / HEADER_NAME)
    return Path(path)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of the checkpoint directory ``path``, checked for format and version.

    Raises:
        CheckpointNotFoundError: no header file. CheckpointMismatchError: another format version.
        CheckpointError: the header is not JSON, not a tfmq header, or lacks a field.
    """
    p = Path(path) / HEADER_NAME
    if not p.is_file():
        raise CheckpointNotFoundError(f"{p}: no quantized checkpoint header here; {_WRITTEN_BY_SAVE}")
    try:
        header = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e}); the checkpoint header is damaged, re-save it") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise CheckpointError(f"{p}: format={found!r}, expected {FORMAT!r}; {_WRITTEN_BY_SAVE}")
    if header.get("format_version") not in READ_FORMAT_VERSIONS:
        raise CheckpointMismatchError(
            f"{p}: format_version={header.get('format_version')!r}, this tfmq reads versions {_READABLE}; re-run the quantization"
        )
    bad = [k for k, kind in _HEADER_KEYS.items() if not isinstance(header.get(k), kind)]
    if bad:
        raise CheckpointError(f"{p}: field(s) {', '.join(bad)} missing or of the wrong type; the header is damaged, re-save it")
    return header


def _open_weights(path: str | os.PathLike, read: Callable[[Any], Any]) -> Any:
    """``read(f)`` on the opened ``path/quantized.safetensors``, after checking it is a complete tfmq checkpoint file."""
    p = Path(path) / WEIGHTS_NAME
    if not p.is_file():
        raise CheckpointNotFoundError(f"{p}: no quantized weights here; {_WRITTEN_BY_SAVE}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(
                    f"{p}: safetensors metadata format={meta.get('format')!r}, expected {FORMAT!r}; not a tfmq quantized "
                    f"checkpoint (an FP model's weights?)"
                )
            if meta.get("format_version") not in [str(v) for v in READ_FORMAT_VERSIONS]:
                raise CheckpointMismatchError(
                    f"{p}: format_version={meta.get('format_version')!r}, this tfmq reads versions {_READABLE}; "
                    f"re-run the quantization"
                )
            return read(f)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{p}: unreadable safetensors file ({e}); truncated or damaged, re-save the checkpoint") from None


def _read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of ``path/quantized.safetensors`` (CPU), after checking it is a tfmq checkpoint."""
    return _open_weights(path, lambda f: {k: f.get_tensor(k) for k in f.keys()})


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check a checkpoint directory without a model and without loading its tensors; returns its header.

    The header must be a readable tfmq header of this format version and the weights file a complete
    tfmq safetensors file (a truncated file is caught here: its header no longer covers the data).
    Raises the ``CheckpointError`` family with one line naming the file, as ``load`` would.
    """
    header = read_header(path)
    _open_weights(path, lambda f: list(f.keys()))
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


def _restore(what: str, file: Path, fn, *args) -> Any:
    try:
        return fn(*args)
    except ValueError as e:  # what every restore_state / from_state raises for a bad entry
        raise CheckpointError(f"{file}: {what}: {e}; the checkpoint is damaged or from another model") from None


def _owned(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    prefix = prefix + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _flat_config(config: QuantConfig) -> dict[str, Any]:
    from .api import _flat
    from .prepare import resolve_config

    return _flat(resolve_config(config).to_dict())


def _is_act_tensor(key: str, header: dict[str, Any]) -> bool:
    """``key`` belongs to one of the checkpoint's activation quantizers."""
    return any(key.startswith(name + ".") for name in header["act_quantizers"])


def _check_weight_transfer(path, header: dict[str, Any], saved: QuantConfig, wanted: QuantConfig) -> None:
    """A checkpoint loaded with another config: only weight stages, and only when ``wanted`` shares them."""
    from .share import weight_identity_differences

    if "activations" in header["stages_done"]:
        raise CheckpointMismatchError(
            f"{path}: config differs from the checkpoint's ({saved.method} {saved.bits_name}) and the checkpoint has "
            f"calibrated activations; only a weight-stage checkpoint (stages temporal, blocks) can be loaded with "
            f"another activation setting. Pass config=None to load it as saved"
        )
    diffs = weight_identity_differences(saved, wanted)
    if diffs:
        raise CheckpointMismatchError(
            f"{path}: the weight stages of this checkpoint ({saved.method} {saved.bits_name}) are not those of the "
            f"config passed ({wanted.method} {wanted.bits_name}): {'; '.join(diffs[:4])}; quantize that config's own weights"
        )


def _check_activation_transfer(path, header: dict[str, Any], saved: QuantConfig, wanted: QuantConfig) -> None:
    """A finished checkpoint taken as another config's stages 1-3: only before a correction, and only when
    ``wanted`` runs the same stages 1-3 (``tfmq.quant.share.same_activations``)."""
    from .share import activation_identity_differences

    if "activations" not in header["stages_done"]:
        raise CheckpointMismatchError(f"{path}: its activations are not calibrated (done: {', '.join(header['stages_done'])}); "
                                      "adopt a finished checkpoint")
    if header.get("noise_correction"):
        raise CheckpointMismatchError(f"{path}: it carries a noise correction ({saved.method}); adopt the checkpoint of a "
                                      "method without a correction step (e.g. qdiffusion for ptqd)")
    diffs = activation_identity_differences(saved, wanted)
    if diffs:
        raise CheckpointMismatchError(
            f"{path}: stages 1-3 of this checkpoint ({saved.method} {saved.bits_name}) are not those of the config "
            f"passed ({wanted.method} {wanted.bits_name}): {'; '.join(diffs[:4])}; quantize that config's own activations"
        )


def load(path: str | os.PathLike, fp_unet: nn.Module, device=None, config: QuantConfig | None = None) -> nn.Module:
    """Rebuild the quantized model saved at ``path`` on ``fp_unet`` (modified in place).

    Args:
        config: ``None`` (the checkpoint's own config). Another config is accepted for a checkpoint
            saved after the weight stages only (activations not calibrated yet) whose weight stages
            that config shares (``tfmq.quant.share.same_weights``: e.g. the W4A8 weights for a W4A6
            or W4A32 run of the same method): the model is prepared with ``config`` and gets the saved
            weights; its activation quantizers are fresh. Anything else is a ``CheckpointMismatchError``
            naming the fields that differ.

    Raises:
        CheckpointError: a file is missing (``CheckpointNotFoundError``), truncated, foreign or
            damaged; ``CheckpointMismatchError``: it was made from another FP model or format version.
            The files, the header and the FP model are checked before ``fp_unet`` is touched; a
            damaged quantizer entry shows after it has been prepared (start again from a fresh one).
    """
    return _load(path, fp_unet, device, config, "weights")


def _load(path, fp_unet: nn.Module, device, config: QuantConfig | None, transfer: str) -> nn.Module:
    """``load``; ``transfer``: what a config other than the saved one may take over: ``weights`` (a
    weight-stage checkpoint, fresh activation quantizers) or ``activations`` (a finished checkpoint
    without a correction, every quantizer as saved: ``tfmq.adopt_activations``)."""
    header = read_header(path)
    hfile, wfile = Path(path) / HEADER_NAME, Path(path) / WEIGHTS_NAME
    _check_model(header, fp_unet, path)
    tensors = _read_tensors(path)
    try:
        saved_config = QuantConfig.from_dict(header["config"])
    except ConfigError as e:
        raise CheckpointError(f"{hfile}: config: {e}") from None
    other = config is not None and (transfer == "activations" or _flat_config(config) != _flat_config(saved_config))
    weights_only = other and transfer == "weights"
    if weights_only:
        _check_weight_transfer(path, header, saved_config, config)
    elif other:
        _check_activation_transfer(path, header, saved_config, config)
    else:
        config = saved_config
    if device is not None:
        fp_unet.to(device)
    prepare_model(fp_unet, config, init=False)
    state = get_state(fp_unet)
    layers, acts = dict(quant_layers(fp_unet)), dict(act_quantizers(fp_unet))
    checked = (("quantized layer", layers, header["layers"]),) if weights_only else (
        ("quantized layer", layers, header["layers"]), ("activation quantizer", acts, header["act_quantizers"]))
    for kind, mine, saved in checked:
        if set(mine) != set(saved):
            diff = sorted(set(mine) ^ set(saved))
            raise CheckpointMismatchError(f"{path}: {kind} set differs from the model's (e.g. {diff[:3]})")
    for name, layer in layers.items():
        meta = header["layers"][name]
        if weights_only and isinstance(meta, dict):  # the weight quantizers only; this config's activation quantizers stay fresh
            meta = {**meta, "act": layer.aq is not None}
        _restore(name, wfile, layer.restore_state, _owned(tensors, name), meta)
    if weights_only:
        tensors = {k: v for k, v in tensors.items() if not _is_act_tensor(k, header)}
    else:
        for name, q in acts.items():
            _restore(name, wfile, q.restore_state, _owned(tensors, name), header["act_quantizers"][name])
    if header.get("feature_cache"):
        dev = next(fp_unet.parameters()).device
        cache = _restore(CACHE_MODULE, wfile, TemporalFeatureCache.from_state, _owned(tensors, CACHE_MODULE), header["feature_cache"], dev)
        _restore(CACHE_MODULE, wfile, attach_feature_cache, fp_unet, cache)
    if header.get("noise_correction"):
        dev = next(fp_unet.parameters()).device
        corr = _restore(PTQD_MODULE, wfile, NoiseCorrection.from_state, _owned(tensors, PTQD_MODULE), header["noise_correction"], dev)
        _restore(PTQD_MODULE, wfile, attach_noise_correction, fp_unet, corr)
    described = set(_export(fp_unet)[0])
    described |= {k[: -len("w_packed")] + "w_int" for k in described if k.endswith(".w_packed")}  # version 1's name
    unused = sorted(set(tensors) - described)
    if unused:
        raise CheckpointError(f"{wfile}: {len(unused)} tensor(s) the header does not describe (e.g. {unused[:3]}); damaged or foreign")
    state.stages_done = list(header["stages_done"])
    state.stats = header.get("stats", {})
    if weights_only:
        state.stats = {**state.stats, "weights_from": {"path": str(path), "config": saved_config.to_dict()}}
    elif other:
        state.stats = {**state.stats, "activations_from": {"path": str(path), "config": saved_config.to_dict()}}
    if "activations" in state.stages_done:
        enable_inference(fp_unet)
    else:
        set_quant_state(fp_unet, weight=True, act=False)
    return fp_unet
