"""Model folders as diffusers writes them, and the family each one belongs to.

A run quantizes the UNet of a local diffusers folder, loaded unchanged:

- **pixel**: ``unet/`` + ``scheduler/`` (our embedded DDPMs; a ``DDPMPipeline`` folder);
- **latent**: a diffusers ``LDMPipeline`` folder (``model_index.json``, ``unet/``, ``vqvae/``,
  ``scheduler/``), e.g. ``CompVis/ldm-celebahq-256`` on disk or the embedded ``fashion_ldm``;
  samples are latents and :meth:`DiffusionModel.to_images` decodes them with the FP autoencoder;
- **latent, text-guided**: a ``StableDiffusionPipeline`` folder (``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``; no safety checker or feature extractor needed), e.g.
  ``CompVis/stable-diffusion-v1-4`` on disk: :meth:`DiffusionModel.encode_prompts` runs the FP text
  encoder (:func:`encode_prompts`; tokenizers and captions: ``tfmq.diffusion.text``).

The **conditioning** comes from the UNet itself: ``num_class_embeds`` makes it class-conditional
(classifier-free guidance needs a trained null class), a ``UNet2DConditionModel`` is text-guided.
Nothing here is a flag the user keeps in sync: :func:`read_family` reads it all from the folder.
An optional ``tfmq.json`` next to ``model_index.json`` (written by our training) records what the
diffusers configs cannot: the null class id and the data's image size (decoded images are cropped
to it; our autoencoder pads 28x28 to 32x32). Only the UNet is ever quantized; the autoencoder stays FP.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

FAMILY_FILE = "tfmq.json"
AUTOENCODER_KEYS = ("vqvae", "vae")  # LDMPipeline names it vqvae; Stable Diffusion folders vae
TEXT_KEYS = ("tokenizer", "text_encoder")  # what a text-guided folder needs besides unet/ and vae/


@dataclass(frozen=True)
class ModelFamily:
    """What a model folder is: pixel or latent, and what it is conditioned on.

    Attributes:
        space: ``"pixel"`` or ``"latent"``.
        conditioning: ``"none"``, ``"class"`` (``num_class_embeds``) or ``"text"`` (``UNet2DConditionModel``).
        autoencoder: subfolder of the latent model's autoencoder (``vqvae``/``vae``), else None.
        num_classes: real classes of a class-conditional UNet (the null class excluded).
        null_class_label: the class id trained as "no class" (CFG), from ``tfmq.json``; None if none was trained.
        image_size: (H, W) of the data; decoded images larger than it are centre-cropped to it.
    """

    space: str
    conditioning: str
    autoencoder: str | None = None
    num_classes: int | None = None
    null_class_label: int | None = None
    image_size: tuple[int, int] | None = None

    @property
    def latent(self) -> bool:
        return self.space == "latent"

    @property
    def name(self) -> str:
        """``pixel``, ``latent``, ``latent-class``, ``pixel-class``, ``latent-text``."""
        return self.space + ("" if self.conditioning == "none" else f"-{self.conditioning}")

    def guidance(self, guidance_scale: float) -> float:
        """The scale a sampler uses: ``guidance_scale`` for a guided model, 1 (no CFG) otherwise."""
        if self.conditioning == "class" and self.null_class_label is None:
            return 1.0
        return guidance_scale if self.conditioning != "none" else 1.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["name"] = self.name
        return d


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} ({e}); expected a diffusers save_pretrained JSON file") from e


def read_family(model_dir: str | os.PathLike) -> ModelFamily:
    """The :class:`ModelFamily` of a diffusers folder, from its files alone (no weights are loaded)."""
    d = Path(model_dir)
    index = _json(d / "model_index.json") if (d / "model_index.json").is_file() else {}
    extra = _json(d / FAMILY_FILE) if (d / FAMILY_FILE).is_file() else {}
    ae = next((k for k in AUTOENCODER_KEYS if k in index or (not index and (d / k / "config.json").is_file())), None)
    if ae is not None and not (d / ae / "config.json").is_file():
        raise FileNotFoundError(f"{d}/model_index.json lists a {ae!r} component but {d / ae}/config.json is missing; "
                                "copy the whole pipeline folder")
    for key in TEXT_KEYS:
        if key in index and not (d / key).is_dir():
            raise FileNotFoundError(f"{d}/model_index.json lists a {key!r} component but {d / key}/ is missing; "
                                    "copy the whole pipeline folder")
    unet_cfg = _json(d / "unet" / "config.json") if (d / "unet" / "config.json").is_file() else {}
    embeds = unet_cfg.get("num_class_embeds")
    null = extra.get("null_class_label")
    if unet_cfg.get("_class_name") == "UNet2DConditionModel":
        conditioning = "text"
    elif embeds:
        conditioning = "class"
    else:
        conditioning = "none"
    if null is not None and not (embeds and 0 <= int(null) < int(embeds)):
        raise ValueError(f"{d / FAMILY_FILE}: null_class_label={null} is not a class id of the UNet "
                         f"(num_class_embeds={embeds})")
    size = extra.get("image_size")
    return ModelFamily(space="latent" if ae else "pixel", conditioning=conditioning, autoencoder=ae,
                       num_classes=(int(embeds) - (null is not None)) if embeds else None,
                       null_class_label=None if null is None else int(null),
                       image_size=None if size is None else (int(size[0]), int(size[1])))


def output_shape(model_dir: str | os.PathLike, family: ModelFamily | None = None) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images a model folder makes, from its configs alone (no weights):
    a pixel UNet's ``out_channels`` x ``sample_size``; a latent model's decoder output (``out_channels`` of the
    autoencoder, the UNet's ``sample_size`` times the decoder's upsampling ``2 ** (levels - 1)``), cropped to
    ``tfmq.json``'s ``image_size`` where that is recorded. Every evaluation input (reference images, the domain
    classifier) is matched against this shape; nothing assumes 28 px grey."""
    d = Path(model_dir)
    family = family or read_family(d)
    unet = _json(d / "unet" / "config.json")
    size = unet.get("sample_size", 32)
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if family.autoencoder is None:
        channels = int(unet.get("out_channels", unet.get("in_channels", 3)))
    else:
        ae = _json(d / family.autoencoder / "config.json")
        factor = 2 ** (len(ae.get("block_out_channels", [64])) - 1)
        channels, h, w = int(ae.get("out_channels", 3)), h * factor, w * factor
    if family.image_size is not None:
        h, w = min(h, family.image_size[0]), min(w, family.image_size[1])
    return channels, int(h), int(w)


@dataclass
class DiffusionModel:
    """A loaded model folder: the (FP) UNet, its training scheduler, the FP autoencoder of a latent model."""

    unet: torch.nn.Module
    scheduler: Any
    family: ModelFamily
    autoencoder: torch.nn.Module | None = None
    tokenizer: Any = None
    text_encoder: torch.nn.Module | None = None

    def encode_prompts(self, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """``[N, L, D]`` FP text-encoder states of ``prompts`` (``""``: the null prompt of guidance)."""
        if self.text_encoder is None:
            raise ValueError(f"this {self.family.name} model has no text encoder; prompts need a text-guided "
                             "(Stable Diffusion) folder with tokenizer/ and text_encoder/")
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, batch_size=batch_size)

    def to_images(self, samples: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Sampler output -> images in [-1, 1] (float32, CPU): decoded + cropped for a latent model."""
        if self.autoencoder is None:
            return samples.float().clamp(-1, 1).cpu()
        from tfmq.diffusion.autoencoder import decode

        return decode(self.autoencoder, samples, batch_size=batch_size, crop=self.family.image_size)

    def to_latents(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Images in [-1, 1] -> what the UNet models (latents of a latent model; the images themselves otherwise)."""
        if self.autoencoder is None:
            return images
        from tfmq.diffusion.autoencoder import encode

        return encode(self.autoencoder, images, batch_size=batch_size,
                      pad_to=int(self.autoencoder.config.sample_size) if self.family.image_size else None)


def load_autoencoder(model_dir: str | os.PathLike, family: ModelFamily | None = None,
                     device: str | torch.device = "cpu") -> torch.nn.Module | None:
    """The FP autoencoder of a latent folder (eval mode, no grads), None for a pixel folder."""
    import diffusers

    family = family or read_family(model_dir)
    if family.autoencoder is None:
        return None
    sub = Path(model_dir) / family.autoencoder
    name = _json(sub / "config.json").get("_class_name", "VQModel")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{sub}/config.json names {name!r}, which diffusers {diffusers.__version__} does not provide")
    return cls.from_pretrained(sub, local_files_only=True).to(device).eval().requires_grad_(False)


def load_diffusion_model(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> DiffusionModel:
    """Load a pixel or latent diffusers folder: UNet + scheduler (``models.load_fp_model``) + FP autoencoder."""
    from tfmq.diffusion.models import load_fp_model

    family = read_family(model_dir)
    unet, scheduler = load_fp_model(model_dir, device)
    tokenizer, text_encoder = load_text_encoder(model_dir, device) if family.conditioning == "text" else (None, None)
    return DiffusionModel(unet=unet, scheduler=scheduler, family=family,
                          autoencoder=load_autoencoder(model_dir, family, device),
                          tokenizer=tokenizer, text_encoder=text_encoder)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], device=None, batch_size: int = 64) -> torch.Tensor:
    """``[len(prompts), L, D]`` text-encoder states of ``prompts`` (padded to ``model_max_length``), as
    ``StableDiffusionPipeline`` computes them; ``""`` is the null prompt of classifier-free guidance."""
    device = device or next(text_encoder.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            ids = tokenizer(prompts[i:i + batch_size], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(device)
            out.append(text_encoder(ids)[0].float().cpu())
    return torch.cat(out)


def load_text_encoder(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Any, torch.nn.Module | None]:
    """``(tokenizer, text_encoder)`` of a text-guided folder (FP, eval mode), ``(None, None)`` if it has none
    (a text-conditioned UNet alone: the caller passes ``encoder_hidden_states`` itself)."""
    import transformers

    d = Path(model_dir)
    if not all((d / k).is_dir() for k in TEXT_KEYS):
        return None, None
    index = _json(d / "model_index.json") if (d / "model_index.json").is_file() else {}
    names = {k: (index.get(k) or [None, default])[1] for k, default in zip(TEXT_KEYS, ("CLIPTokenizer", "CLIPTextModel"))}
    classes = {k: getattr(transformers, n, None) for k, n in names.items()}
    bad = [f"{k}: {names[k]!r}" for k, c in classes.items() if c is None]
    if bad:
        raise ValueError(f"{d}/model_index.json names {', '.join(bad)}, which transformers {transformers.__version__} "
                         "does not provide")
    tokenizer = classes["tokenizer"].from_pretrained(d / "tokenizer", local_files_only=True)
    encoder = classes["text_encoder"].from_pretrained(d / "text_encoder", local_files_only=True)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


def save_sd_pipeline(out_dir: str | os.PathLike, unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                     tokenizer: Any, scheduler: Any, image_size: tuple[int, int] | None = None) -> Path:
    """Write a diffusers ``StableDiffusionPipeline`` folder (``StableDiffusionPipeline.from_pretrained(dir,
    safety_checker=None)`` loads it; no safety checker or feature extractor) + ``tfmq.json``.
    ``out_dir`` is written in place (callers build it inside ``tfmq.io.atomic_dir``)."""
    from diffusers import StableDiffusionPipeline

    out = Path(out_dir)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    extra = {"image_size": None if image_size is None else list(image_size), "null_class_label": None,
             "note": "written by tfmq: the data's image size (decoded images are cropped to it); only the UNet is "
                     "ever quantized, the text encoder and the VAE stay full precision"}
    (out / FAMILY_FILE).write_text(json.dumps(extra, indent=2) + "\n")
    return out


def save_ldm_pipeline(out_dir: str | os.PathLike, unet: torch.nn.Module, vqvae: torch.nn.Module, scheduler: Any,
                      image_size: tuple[int, int] | None = None, null_class_label: int | None = None) -> Path:
    """Write a diffusers ``LDMPipeline`` folder (``LDMPipeline.from_pretrained`` loads it) + ``tfmq.json``.

    The scheduler is saved as a ``DDIMScheduler`` with the training scheduler's betas (what LDMPipeline
    declares). ``out_dir`` is written in place (callers build it inside ``tfmq.io.atomic_dir``).
    """
    from diffusers import DDIMScheduler, LDMPipeline

    out = Path(out_dir)
    ddim = DDIMScheduler.from_config(scheduler.config)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=ddim).save_pretrained(out, safe_serialization=True)
    extra = {"image_size": None if image_size is None else list(image_size), "null_class_label": null_class_label,
             "note": "written by tfmq: the data's image size (decoded images are cropped to it) and the class id "
                     "trained as 'no class' for classifier-free guidance; only the UNet is ever quantized"}
    (out / FAMILY_FILE).write_text(json.dumps(extra, indent=2) + "\n")
    return out
