"""Calibration capture as a library job: one frozen, picklable object, run in-process or as a shard.

docs/method.md section 7: the FP sampler's UNet inputs at every step, recorded once per model and
shared by every method. ``CalibJob`` holds what a capture needs (model folder, rows, seed, sampler,
prompts); ``run_calibration`` runs it whole or for the trajectories ``[start, stop)`` of a shard, so
the pipeline's in-process stage and its Dask shards are the same call. ``SamplerRun`` is the sampler
every job shares (calibration, evaluation): FSC tables are keyed by its timesteps.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tfmq.diffusion.calibration import CalibrationSet, capture_calibration_data
from tfmq.diffusion.conditioning import class_labels_for, guidance_kwargs, text_conditioning, text_kwargs
from tfmq.diffusion.models import load_fp_model
from tfmq.diffusion.pipelines import read_family
from tfmq.diffusion.sampling import make_scheduler


@dataclass(frozen=True)
class SamplerRun:
    """The sampler of a run: ``name`` (ddim / ddpm / pndm), steps, DDIM ``eta`` and the classifier-free guidance
    scale (models without a trained null class or prompt ignore it)."""

    name: str = "ddim"
    num_inference_steps: int = 20
    eta: float = 0.0
    guidance_scale: float = 1.0

    def scheduler(self, train_config):
        """The inference scheduler of this sampler on a model's training scheduler config."""
        return make_scheduler(self.name, train_config)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CalibJob:
    """Record the FP trajectories of ``num_samples`` samples of the model folder ``fp_dir``.

    Attributes:
        fp_dir: a diffusers folder (pixel, ``LDMPipeline``, ``StableDiffusionPipeline``).
        num_samples: trajectories (rows per sampler step); class-conditional models cycle the classes.
        batch_size: trajectories per UNet call.
        seed: noise seed (sample j's noise depends on (seed, j) only: shards give the same rows).
        sampler: the run's :class:`SamplerRun`.
        prompts: a text-guided model's prompt source (sample j gets prompt j mod P); ignored otherwise.
    """

    fp_dir: str
    num_samples: int
    batch_size: int
    seed: int
    sampler: SamplerRun
    prompts: str | None = None


def run_calibration(job: CalibJob, out_dir: str | os.PathLike, shard: tuple[int, int] | None = None,
                    device: str = "cpu", progress: bool = False) -> CalibrationSet:
    """Capture ``job`` into ``out_dir`` (a ``CalibrationSet``); ``shard``: only trajectories ``[start, stop)``
    (``tfmq.diffusion.calibration.merge_calibration_shards`` joins shards into the set an unsharded run records).
    Latent models are calibrated in latent space; guided models record the (null, conditional) rows of every
    CFG call at ``job.sampler.guidance_scale``."""
    family = read_family(job.fp_dir)
    unet, train_sched = load_fp_model(job.fp_dir, device)
    text = text_conditioning(job.fp_dir, job.prompts, job.num_samples, family)
    s = job.sampler
    return capture_calibration_data(
        unet, s.scheduler(train_sched.config), Path(out_dir), num_samples=job.num_samples,
        num_inference_steps=s.num_inference_steps, batch_size=job.batch_size, seed=job.seed, eta=s.eta,
        class_labels=class_labels_for(unet, job.num_samples, family), device=device, progress=progress, shard=shard,
        **guidance_kwargs(family, s.guidance_scale), **text_kwargs(text))
