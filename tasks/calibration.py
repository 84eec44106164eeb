"""Calibration data task: the FP sampler's trajectories, recorded once and shared by every method.

Spec section 7: one pass per seed records the UNet inputs ``(x_t, t, cond)`` at every sampler step
(O(T) model calls). Each method then selects its rows: every k-th step (Q-Diffusion/TFMQ weight
set), all steps (FSC), or PTQ4DM's normal-distributed timesteps.
"""
from __future__ import annotations


from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed


def class_labels_for(unet, n: int, family=None):
    """Balanced class labels (sample j gets class j mod K) for class-conditional UNets, else None.

    K is the number of real classes: a trained null class (``family.null_class_label``) is never drawn."""
    import torch

    k = family.num_classes if family is not None and family.conditioning == "class" else \
        getattr(unet.config, "num_class_embeds", None)
    return None if not k else torch.arange(n, dtype=torch.int64) % int(k)


def guidance_kwargs(family, guidance_scale: float) -> dict:
    """``sample``/``capture`` keywords of a model's classifier-free guidance: the scale (1 = none) and null class."""
    g = family.guidance(guidance_scale)
    return {"guidance_scale": g, "null_class_label": family.null_class_label if g > 1.0 else None}


def text_conditioning(fp_dir: str, prompts_path: str | None, n: int, family=None, start: int = 0,
                      stop: int | None = None, encoder: tuple | None = None) -> dict | None:
    """A text-guided folder's conditioning of samples ``[start, stop)`` of a run of ``n``: sample j gets prompt
    ``j mod P`` of the prompt file (P prompts); ``None`` for any other family.

    Returns ``{"encoder_hidden_states": [stop - start, L, D], "negative_encoder_hidden_states": [1, L, D]`` (the
    ``""`` prompt of classifier-free guidance), ``"prompts": [...]}``: FP text-encoder states, as
    ``StableDiffusionPipeline`` computes them; only the UNet is ever quantized. ``encoder``: the folder's
    ``(tokenizer, text_encoder)`` if already loaded."""
    import torch

    from tfmq.diffusion.pipelines import encode_prompts, load_text_encoder, read_family
    from tfmq.diffusion.text import read_prompts

    family = family or read_family(fp_dir)
    if family.conditioning != "text":
        return None
    if prompts_path is None:
        raise ValueError(f"{fp_dir} is a text-guided model; it needs a prompt file (calib_data.prompts / eval.prompts "
                         "in params.yaml: one prompt per line)")
    prompts = read_prompts(prompts_path)
    tokenizer, encoder = encoder if encoder is not None and encoder[1] is not None else load_text_encoder(fp_dir)
    if encoder is None:
        raise FileNotFoundError(f"{fp_dir}: a text-conditioned UNet without tokenizer/ and text_encoder/; expected a "
                                "whole Stable Diffusion pipeline folder")
    stop = n if stop is None else stop
    mine = [prompts[j % len(prompts)] for j in range(start, stop)]
    used = sorted(set(mine))
    states = encode_prompts(tokenizer, encoder, used + [""])
    where = {p: i for i, p in enumerate(used)}
    return {"encoder_hidden_states": states[torch.tensor([where[p] for p in mine], dtype=torch.long)],
            "negative_encoder_hidden_states": states[-1:], "prompts": mine}


def prompt_labels(prompts: list[str]):
    """The domain classifier's class each prompt names (``tfmq.diffusion.text.class_of_prompt``), -1 where none."""
    import torch

    from tfmq.diffusion.data import FASHION_MNIST_CLASSES
    from tfmq.diffusion.text import class_of_prompt

    found = (class_of_prompt(p, FASHION_MNIST_CLASSES) for p in prompts)
    return torch.tensor([-1 if c is None else c for c in found], dtype=torch.int64)


def _text_kwargs(text: dict | None) -> dict:
    return {} if text is None else {k: text[k] for k in ("encoder_hidden_states", "negative_encoder_hidden_states")}


@pipeline_task
def calib_data(c, s, fp_dir: str, out_dir: str) -> str:
    """Record the FP sampler's UNet inputs at every step (the set every method selects from); ``c``: calib_data,
    ``s``: sampler. Latent models are calibrated in latent space; a guided model records the (null, conditional)
    rows of every CFG call at ``sampler.guidance_scale``; a text-guided one samples the prompts of
    ``calib_data.prompts`` against ``""``."""
    from tfmq.diffusion.calibration import capture_calibration_data
    from tfmq.diffusion.models import load_fp_model
    from tfmq.diffusion.pipelines import read_family
    from tfmq.diffusion.sampling import make_scheduler

    dev = device()
    family = read_family(fp_dir)
    unet, train_sched = load_fp_model(fp_dir, dev)
    scheduler = make_scheduler(s.name, train_sched.config)
    text = text_conditioning(fp_dir, c.prompts, c.num_samples, family)
    with timed(COMPUTE_TIMES, "calib_data"):
        calib = capture_calibration_data(
            unet, scheduler, out_dir, num_samples=c.num_samples, num_inference_steps=s.num_inference_steps,
            batch_size=c.batch_size, seed=c.seed, eta=s.eta,
            class_labels=class_labels_for(unet, c.num_samples, family), device=dev, progress=show_progress(),
            **guidance_kwargs(family, s.guidance_scale), **_text_kwargs(text))
    logger().info("calibration set (%s): %d steps x %d rows -> %s", family.name, calib.num_steps, calib.rows_per_step,
                  out_dir)
    return out_dir


def calib_shard(fp_dir: str, c: dict, s: dict, start: int, stop: int, out_dir: str, threads: int | None = 1) -> str:
    """Trajectories ``[start, stop)`` of ``calib_data``'s capture -> ``out_dir/shard_<start>_<stop>`` (a Dask task:
    plain arguments, ``c`` / ``s`` the calib_data / sampler sections as dicts; ``merge_calib_shards`` joins them)."""
    import os

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pathlib import Path

    from tfmq.diffusion.calibration import capture_calibration_data
    from tfmq.diffusion.models import load_fp_model
    from tfmq.diffusion.pipelines import read_family
    from tfmq.diffusion.sampling import make_scheduler

    family = read_family(fp_dir)
    unet, train_sched = load_fp_model(fp_dir, device())
    out = Path(out_dir) / f"shard_{start:07d}_{stop:07d}"
    capture_calibration_data(
        unet, make_scheduler(s["name"], train_sched.config), out, num_samples=c["num_samples"],
        num_inference_steps=s["num_inference_steps"], batch_size=c["batch_size"], seed=c["seed"], eta=s["eta"],
        class_labels=class_labels_for(unet, c["num_samples"], family), device=device(), progress=False,
        shard=(start, stop), **guidance_kwargs(family, s["guidance_scale"]),
        **_text_kwargs(text_conditioning(fp_dir, c.get("prompts"), c["num_samples"], family)))
    return str(out)


@pipeline_task
def merge_calib_shards(paths: list[str], out_dir: str) -> str:
    """Join the calibration shards of ``calib_shard`` into ``out_dir``: the set an unsharded capture records."""
    from tfmq.diffusion.calibration import merge_calibration_shards

    with timed(COMPUTE_TIMES, "calib_data"):
        calib = merge_calibration_shards(paths, out_dir)
    logger().info("calibration set from %d shards: %d steps x %d rows -> %s", len(paths), calib.num_steps,
                  calib.rows_per_step, out_dir)
    return out_dir
