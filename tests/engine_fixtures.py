"""Shared helpers for the quantization-engine tests: tiny seeded UNets, calibration sets, quantized models.

Calibration sets and quantized models are built once per test session (``functools.cache``) and
shared by tests/test_engine.py and tests/test_checkpoint.py; a test that receives a cached
quantized model must only run it forward (or save it), never change it.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

import tfmq
from tfmq.diffusion.calibration import capture_calibration_data
from tfmq.diffusion.sampling import make_scheduler

from conftest import TEXT_DIM, TEXT_LEN, make_tiny_unet as tiny_unet  # noqa: F401  (re-exported for the engine tests)

SCHED_CFG = dict(DDPMScheduler(num_train_timesteps=1000).config)
STEPS = 5  # DDIM steps of calibration and of sampling
N_SAMPLES = 8  # trajectories per calibration set
KINDS = ("uncond", "class", "text")

_ROOT = Path(tempfile.mkdtemp(prefix="tfmq-engine-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


def conditioning(kind: str, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Conditioning kwargs for ``n`` samples (class labels 0..2 cycling / random text embeddings)."""
    if kind == "class":
        return {"class_labels": torch.arange(n, dtype=torch.int64) % 3}
    if kind == "text":
        g = torch.Generator().manual_seed(1000 + seed)
        return {"encoder_hidden_states": torch.randn(n, TEXT_LEN, TEXT_DIM, generator=g)}
    return {}


def scheduler():
    return make_scheduler("ddim", SCHED_CFG)


@functools.cache
def calib(kind: str = "uncond"):
    """One DDIM-5 calibration set per kind (8 trajectories, recorded from ``tiny_unet(kind)``)."""
    return capture_calibration_data(tiny_unet(kind), scheduler(), _ROOT / f"calib_{kind}", num_samples=N_SAMPLES,
                                    num_inference_steps=STEPS, batch_size=N_SAMPLES, seed=0, progress=False,
                                    **conditioning(kind, N_SAMPLES))


@functools.cache
def calib_cfg():
    """Classifier-free guidance set of the class-conditional UNet: rows [0, 4) null class 2, [4, 8) classes 0/1."""
    return capture_calibration_data(tiny_unet("class"), scheduler(), _ROOT / "calib_class_cfg", num_samples=4,
                                    num_inference_steps=STEPS, batch_size=4, seed=0, progress=False,
                                    class_labels=torch.tensor([0, 1, 0, 1]), null_class_label=2, guidance_scale=2.0)


def small_config(method: str = "tfmq", **kw) -> tfmq.QuantConfig:
    """W4A8 with few iterations (the defaults of the paper would take hours)."""
    base = dict(method=method, weight_bits=4, act_bits=8, recon=dict(iters=10, batch_size=8),
                tiar_recon=dict(iters=10, batch_size=4), act_recon=dict(iters=5, batch_size=8),
                calib=dict(every_k=2, n_per_step=8, fsc_batch_size=8))
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return tfmq.QuantConfig.from_dict(base)


def _freeze(kw: dict) -> tuple:
    return tuple(sorted((k, _freeze(v) if isinstance(v, dict) else v) for k, v in kw.items()))


def _thaw(items: tuple) -> dict:
    return {k: _thaw(v) if isinstance(v, tuple) and v and isinstance(v[0], tuple) else v for k, v in items}


@functools.cache
def _quantized(kind: str, method: str, frozen: tuple):
    unet = tiny_unet(kind)
    return tfmq.quantize(unet, calib(kind), small_config(method, **_thaw(frozen)), progress=False)


def quantized(kind: str = "uncond", method: str = "tfmq", **kw):
    """A quantized copy of ``tiny_unet(kind)`` (cached per arguments: do not modify it)."""
    return _quantized(kind, method, _freeze(kw))


def unet_inputs(kind: str, step: int = 2, n: int = 4) -> dict[str, torch.Tensor]:
    """Forward kwargs: ``n`` recorded rows of calibration step ``step``."""
    rows = calib(kind).load_step(step)
    return {k: v[:n] for k, v in rows.items()}


def run(unet, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def sample_kwargs(kind: str, n: int) -> dict[str, torch.Tensor]:
    return conditioning(kind, n, seed=1)
