"""The engine's side of the Temporal Information Block (docs/method.md section 3).

The block itself (``h`` and every ``g_i``) is computed by ``tfmq.diffusion.temporal``; here are
``temporal_features`` of a model as it stands (quantized: the per-timestep quantizers read the
current t) and the TPAMI extension's cache of FP features served at inference.
"""
from __future__ import annotations

import torch
from torch import nn

from ..diffusion.temporal import TemporalInformationBlock, temporal_resnets
from .prepare import get_state, set_quant_state

__all__ = [
    "TemporalInformationBlock", "TemporalFeatureCache", "attach_feature_cache", "feature_cache", "install_feature_cache",
    "temporal_features", "temporal_resnets",
]
CACHE_MODULE = "tfmq_feature_cache"  # the cache's name as a submodule of the UNet


def temporal_features(
    unet: nn.Module, timesteps, class_labels: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """The temporal features ``emb_{t,i}`` of ``unet`` (FP or quantized, as it stands) for ``timesteps``.

    Args:
        timesteps: int sequence or int64 tensor ``[B]``.
        class_labels: ``[B]`` for class-conditional UNets.
    Returns:
        list over resnets (down/mid/up order) of ``[B, C_i]`` tensors.
    """
    device = next(unet.parameters()).device
    t = torch.as_tensor(timesteps, dtype=torch.int64, device=device).reshape(-1)
    c = None if class_labels is None else class_labels.to(device)
    state = getattr(unet, "_tfmq", None)
    if state is not None:  # per-timestep quantizers and the feature cache read the current t
        state.ctx.timesteps, state.ctx.class_labels = t, c
    with torch.no_grad():
        return TemporalInformationBlock(unet).features(t, c)


class TemporalFeatureCache(nn.Module):
    """Cache-based temporal feature maintenance (the TPAMI extension of TFMQ-DM).

    Because ``emb_{t,i}`` depends on t (and the class) alone, the FP features of every calibrated
    timestep are stored and returned by each ``time_emb_proj`` instead of computing them, so the
    quantized TIB's error vanishes at the cost of a ``[T, K, C_i]`` table per resnet.
    """

    def __init__(self, timesteps: torch.Tensor, classes: torch.Tensor | None, features: list[torch.Tensor], names: list[str]):
        super().__init__()
        self.names = names
        self.register_buffer("timesteps", timesteps)
        self.register_buffer("classes", classes if classes is not None else torch.zeros(0, dtype=torch.int64))
        for i, f in enumerate(features):
            self.register_buffer(f"feature_{i}", f)

    # --- checkpoint -------------------------------------------------------------------------
    def export_state(self) -> tuple[dict[str, torch.Tensor], list[str]]:
        """``(tensors, meta)``: ``timesteps``, ``classes`` (empty: unconditional) and ``feature_<i>``
        ``[T, K, C_i]``; meta is the list of hooked ``time_emb_proj`` module names (JSON)."""
        return dict(self.state_dict()), list(self.names)

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], meta: list[str], device=None) -> "TemporalFeatureCache":
        """Inverse of ``export_state``.

        Raises:
            ValueError: a tensor is missing or its shape does not fit the others.
        """
        if not isinstance(meta, list) or not all(isinstance(n, str) for n in meta):
            raise ValueError(f"feature cache names={meta!r}, expected a list of module names")
        missing = [k for k in ["timesteps", "classes"] + [f"feature_{i}" for i in range(len(meta))] if k not in tensors]
        if missing:
            raise ValueError(f"tensor(s) {missing[:3]} missing")
        ts, classes = tensors["timesteps"], tensors["classes"]
        feats = [tensors[f"feature_{i}"] for i in range(len(meta))]
        k = max(1, classes.numel())
        for i, f in enumerate(feats):
            if f.dim() != 3 or tuple(f.shape[:2]) != (ts.numel(), k):
                raise ValueError(f"tensor 'feature_{i}' has shape {tuple(f.shape)}, expected [{ts.numel()}, {k}, C]")
        to = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        return cls(to(ts), to(classes) if classes.numel() else None, [to(f) for f in feats], list(meta))

    def lookup(self, i: int, t: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        from .quantizer import UncalibratedTimestepError

        feats = getattr(self, f"feature_{i}")
        ti = torch.searchsorted(self.timesteps, t)
        ti = ti.clamp(max=len(self.timesteps) - 1)
        if not bool((self.timesteps[ti] == t).all()):
            bad = sorted(set(t[self.timesteps[ti] != t].tolist()))
            raise UncalibratedTimestepError(f"timestep(s) {bad[:5]} are not in the temporal feature cache")
        if self.classes.numel() == 0:
            return feats[ti, 0]
        if c is None:
            raise ValueError("this temporal feature cache is per class: the UNet call needs class_labels")
        ci = torch.searchsorted(self.classes, c).clamp(max=len(self.classes) - 1)
        if not bool((self.classes[ci] == c).all()):
            raise UncalibratedTimestepError(f"class label(s) {sorted(set(c.tolist()))[:5]} are not in the temporal feature cache")
        return feats[ti, ci]


def feature_cache(unet: nn.Module) -> TemporalFeatureCache | None:
    """The temporal feature cache attached to ``unet``, if any."""
    cache = getattr(unet, CACHE_MODULE, None)
    return cache if isinstance(cache, TemporalFeatureCache) else None


def attach_feature_cache(unet: nn.Module, cache: TemporalFeatureCache) -> None:
    """Serve ``cache`` from every hooked ``time_emb_proj`` of the prepared ``unet`` (replacing any earlier one)."""
    state = get_state(unet)
    names = dict(unet.named_modules())
    missing = [n for n in cache.names if n not in names]
    if missing:
        raise ValueError(f"module(s) {missing[:3]} to serve cached temporal features from are not in this model")
    for h in state.cache_hooks:
        h.remove()
    state.cache_hooks = []
    unet.add_module(CACHE_MODULE, cache)
    for i, name in enumerate(cache.names):
        module = names[name]

        def hook(m, args, out, i=i):
            return cache.lookup(i, state.ctx.timesteps, state.ctx.class_labels).to(out.dtype)

        state.cache_hooks.append(module.register_forward_hook(hook))


def install_feature_cache(unet: nn.Module, timesteps: torch.Tensor, class_labels: torch.Tensor | None) -> dict:
    """Compute FP ``emb_{t,i}`` for the finite set and serve them from a cache at inference."""
    state = get_state(unet)
    tib = TemporalInformationBlock(unet)
    device = next(unet.parameters()).device
    ts = torch.unique(timesteps).to(device)
    classes = None if class_labels is None else torch.unique(class_labels).to(device)
    k = 1 if classes is None else len(classes)
    set_quant_state(unet, weight=False, act=False)
    with torch.no_grad():
        t_grid = ts.repeat_interleave(k)
        c_grid = None if classes is None else classes.repeat(len(ts))
        state.ctx.timesteps, state.ctx.class_labels = t_grid, c_grid
        feats = [f.reshape(len(ts), k, -1).clone() for f in tib.features(t_grid, c_grid)]
    names = [f"{n}.time_emb_proj" for n in tib.names]
    attach_feature_cache(unet, TemporalFeatureCache(ts, classes, feats, names))
    return {"timesteps": len(ts), "classes": k, "resnets": len(names)}
