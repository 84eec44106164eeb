"""The Temporal Information Block as the FP model computes it (docs/method.md section 3).

``emb_{t,i} = g_i(h(t))``: ``h`` = ``time_proj`` -> ``time_embedding`` (+ the class embedding of
class-conditional models), ``g_i`` = ``time_emb_proj(nonlinearity(.))`` of the i-th residual block
in down / mid / up order. The one place that walks the resnets and rebuilds the time embedding:
the engine (TIAR targets, feature cache) and the evaluation (temporal analyses) both use it, and
neither depends on the other. Works for ``UNet2DModel`` and ``UNet2DConditionModel``.
"""
from __future__ import annotations

import torch
from torch import nn


def temporal_resnets(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every residual block with a ``time_emb_proj``, in down -> mid -> up order.

    Duck-typed on the ``time_emb_proj`` attribute, so diffusers' ``ResnetBlock2D`` and wrappers
    around it both count. Raises ``ValueError`` when the UNet has none.
    """
    out = []
    for prefix in ("down_blocks", "mid_block", "up_blocks"):
        part = getattr(unet, prefix, None)
        if part is None:
            continue
        for name, m in part.named_modules(prefix=prefix):
            if isinstance(getattr(m, "time_emb_proj", None), nn.Module):
                out.append((name, m))
    if not out:
        raise ValueError(
            f"{type(unet).__name__} has no residual block with time_emb_proj under down_blocks/mid_block/up_blocks; "
            "expected a diffusers UNet2DModel or UNet2DConditionModel"
        )
    return out


class TemporalInformationBlock:
    """``h`` and every ``g_i`` of one UNet, computed without running the image path.

    The modules stay where they are and the UNet's forward is unchanged; this is a view.
    """

    def __init__(self, unet: nn.Module):
        self.unet = unet
        cfg = unet.config
        if getattr(cfg, "addition_embed_type", None):
            raise NotImplementedError(
                f"addition_embed_type={cfg.addition_embed_type!r} (e.g. SDXL) makes the time embedding depend on the "
                "prompt, so it is no longer a finite temporal block; only UNets without an addition embedding are supported"
            )
        self.resnets = temporal_resnets(unet)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.resnets]

    def layer_names(self) -> list[str]:
        """Names of the TIB's Linear layers (``time_embedding.*`` then every ``time_emb_proj``)."""
        return ["time_embedding.linear_1", "time_embedding.linear_2"] + [f"{n}.time_emb_proj" for n in self.names]

    def embedding(self, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``h(t)`` (+ class embedding, + ``time_embed_act``): the ``emb`` the UNet feeds its resnets.

        Args:
            timesteps: int64 ``[B]`` on the UNet's device.
            class_labels: ``[B]``; required for class-conditional UNets.
        """
        unet = self.unet
        p = next(unet.parameters())
        timesteps = timesteps.to(p.device)
        if hasattr(unet, "get_time_embed"):  # UNet2DConditionModel: diffusers' own helpers
            dummy = torch.zeros(timesteps.shape[0], 1, device=p.device, dtype=p.dtype)
            emb = unet.time_embedding(unet.get_time_embed(sample=dummy, timestep=timesteps), None)
            if getattr(unet, "class_embedding", None) is not None and class_labels is None:
                raise ValueError("this UNet is class-conditional: pass class_labels with the timesteps")
            class_emb = unet.get_class_embed(sample=dummy, class_labels=class_labels)
            if class_emb is not None:
                emb = torch.cat([emb, class_emb], -1) if unet.config.class_embeddings_concat else emb + class_emb
            if getattr(unet, "time_embed_act", None) is not None:
                emb = unet.time_embed_act(emb)
            return emb
        emb = unet.time_embedding(unet.time_proj(timesteps).to(p.dtype))
        if getattr(unet, "class_embedding", None) is not None:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional: pass class_labels with the timesteps")
            labels = class_labels.to(p.device)
            if unet.config.class_embed_type == "timestep":
                labels = unet.time_proj(labels).to(p.dtype)
            emb = emb + unet.class_embedding(labels).to(p.dtype)
        return emb

    def features(self, timesteps: torch.Tensor, class_labels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``[emb_{t,1}, ..., emb_{t,n}]``, each ``[B, C_i]`` (the ``time_emb_proj`` outputs)."""
        emb = self.embedding(timesteps, class_labels)
        feats = []
        for _, r in self.resnets:
            temb = emb if getattr(r, "skip_time_act", False) else r.nonlinearity(emb)
            feats.append(r.time_emb_proj(temb))
        return feats
