"""What a model folder's samples are conditioned on: class labels, classifier-free guidance, prompts.

Calibration capture and evaluation sample the same way (docs/method.md section 7: FSC tables are
keyed by the sampler's timesteps and conditioning), so both take their conditioning from here:
sample ``j`` of a run of ``n`` gets class ``j mod K`` (a trained null class is never drawn) and
prompt ``j mod P`` of the prompt source, whatever shard of the run it falls in.
"""
from __future__ import annotations

import os

import torch

from tfmq.diffusion.pipelines import ModelFamily, encode_prompts, load_text_encoder, read_family
from tfmq.diffusion.text import read_prompts


def class_labels_for(unet, n: int, family: ModelFamily | None = None) -> torch.Tensor | None:
    """Balanced class labels (sample j gets class j mod K) for class-conditional UNets, else None.

    K is the number of real classes: a trained null class (``family.null_class_label``) is never drawn."""
    k = family.num_classes if family is not None and family.conditioning == "class" else \
        getattr(unet.config, "num_class_embeds", None)
    return None if not k else torch.arange(n, dtype=torch.int64) % int(k)


def guidance_kwargs(family: ModelFamily, guidance_scale: float) -> dict:
    """``sample``/``capture`` keywords of a model's classifier-free guidance: the scale (1 = none) and null class."""
    g = family.guidance(guidance_scale)
    return {"guidance_scale": g, "null_class_label": family.null_class_label if g > 1.0 else None}


def text_conditioning(fp_dir: str | os.PathLike, prompts_path: str | None, n: int, family: ModelFamily | None = None,
                      start: int = 0, stop: int | None = None, encoder: tuple | None = None) -> dict | None:
    """A text-guided folder's conditioning of samples ``[start, stop)`` of a run of ``n``: sample j gets prompt
    ``j mod P`` of the prompt source (``tfmq.diffusion.text.read_prompts``: one prompt a line, or MS-COCO
    captions); ``None`` for any other family.

    Returns ``{"encoder_hidden_states": [stop - start, L, D], "negative_encoder_hidden_states": [1, L, D]`` (the
    ``""`` prompt of classifier-free guidance), ``"prompts": [...]}``: FP text-encoder states, as
    ``StableDiffusionPipeline`` computes them; only the UNet is ever quantized. ``encoder``: the folder's
    ``(tokenizer, text_encoder)`` if already loaded."""
    family = family or read_family(fp_dir)
    if family.conditioning != "text":
        return None
    if prompts_path is None:
        raise ValueError(f"{fp_dir} is a text-guided model; it needs a prompt source (calib_data.prompts / eval.prompts "
                         "in params.yaml: one prompt per line, or an MS-COCO captions JSON)")
    prompts = read_prompts(prompts_path)
    tokenizer, text_encoder = encoder if encoder is not None and encoder[1] is not None else load_text_encoder(fp_dir)
    if text_encoder is None:
        raise FileNotFoundError(f"{fp_dir}: a text-conditioned UNet without tokenizer/ and text_encoder/; expected a "
                                "whole Stable Diffusion pipeline folder")
    stop = n if stop is None else stop
    mine = [prompts[j % len(prompts)] for j in range(start, stop)]
    used = sorted(set(mine))
    states = encode_prompts(tokenizer, text_encoder, used + [""])
    where = {p: i for i, p in enumerate(used)}
    return {"encoder_hidden_states": states[torch.tensor([where[p] for p in mine], dtype=torch.long)],
            "negative_encoder_hidden_states": states[-1:], "prompts": mine}


def text_kwargs(text: dict | None) -> dict:
    """The ``sample`` / ``capture_calibration_data`` keywords of a ``text_conditioning`` result (``{}`` for none)."""
    return {} if text is None else {k: text[k] for k in ("encoder_hidden_states", "negative_encoder_hidden_states")}
