"""CLIP score for text-guided samples (docs/method.md section 9; the paper's Stable Diffusion / MS-COCO column).

Score = 100 * max(cos(image_embed, text_embed), 0), averaged over (image, prompt) pairs — the
ViT-B/32 convention of the paper and torchmetrics. The CLIP weights come from a local directory
only (``CLIPModel.save_pretrained`` layout); with none configured the result says "unavailable"
and why, and carries no number (never a 0 that could be mistaken for a score).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

CLIP_LABEL = "CLIP score (100*max(cos,0); ViT-B/32 convention)"


def unavailable(reason: str) -> dict:
    return {"available": False, "value": None, "reason": reason, "label": CLIP_LABEL}


@torch.no_grad()
def clip_score(
    images_uint8: torch.Tensor,
    prompts: Sequence[str],
    clip_dir: str | Path | None = None,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """CLIP score of images [N,1|3,H,W] uint8 against one prompt each.

    Args:
        clip_dir: local directory with a CLIP model + processor (e.g. openai/clip-vit-base-patch32
            saved with ``save_pretrained``). ``None`` or missing: returns ``available=False``.

    Returns:
        ``{"available": True, "value": mean, "std", "n", "model_dir", "model": {...}, "label"}`` or
        ``{"available": False, "value": None, "reason": ...}``.
    """
    from tqdm.auto import tqdm

    if clip_dir is None:
        return unavailable("no CLIP model directory configured (set eval.clip_model to a local CLIP ViT-B/32 folder)")
    clip_dir = Path(clip_dir)
    if not (clip_dir / "config.json").is_file():
        return unavailable(f"CLIP directory {clip_dir} has no config.json (expected a save_pretrained layout)")
    if not (torch.is_tensor(images_uint8) and images_uint8.dtype == torch.uint8 and images_uint8.dim() == 4
            and images_uint8.shape[1] in (1, 3)):
        raise ValueError(f"images must be uint8 [N,1|3,H,W]; got {getattr(images_uint8, 'shape', type(images_uint8))}")
    if len(prompts) != images_uint8.shape[0]:
        raise ValueError(f"need one prompt per image; got {len(prompts)} prompts for {images_uint8.shape[0]} images")
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).to(device).eval()
    processor = CLIPProcessor.from_pretrained(str(clip_dir), local_files_only=True)
    scores = []
    for i in tqdm(range(0, len(prompts), batch_size), disable=not progress, leave=False, desc="CLIP score"):
        imgs = images_uint8[i : i + batch_size]
        imgs = imgs.expand(-1, 3, -1, -1) if imgs.shape[1] == 1 else imgs
        inputs = processor(
            text=list(prompts[i : i + batch_size]), images=list(imgs.permute(0, 2, 3, 1).cpu().numpy()),
            return_tensors="pt", padding=True, truncation=True,
            max_length=model.config.text_config.max_position_embeddings,  # the text model's own limit (CLIP: 77)
        ).to(device)
        out = model(**inputs)
        img = out.image_embeds / out.image_embeds.norm(dim=-1, keepdim=True)
        txt = out.text_embeds / out.text_embeds.norm(dim=-1, keepdim=True)
        scores.append(100.0 * (img * txt).sum(-1).clamp(min=0).double().cpu())
    s = torch.cat(scores)
    vc = model.config.vision_config
    return {
        "available": True,
        "value": float(s.mean()),
        "std": float(s.std()) if s.numel() > 1 else 0.0,
        "n": int(s.numel()),
        "model_dir": str(clip_dir),
        "model": {"patch_size": vc.patch_size, "hidden_size": vc.hidden_size, "image_size": vc.image_size,
                  "projection_dim": model.config.projection_dim},
        "label": CLIP_LABEL,
    }
