"""Sampling + scoring as a library job: one frozen, picklable ``EvalJob``, run whole or as shards.

docs/method.md section 9. A job says everything one evaluation samples, keeps and compares against:
the FP model folder (and the quantized checkpoint on its UNet), the run's seed, sampler and batch
sizes, the prompt source of a text-guided model, the feature extractor, the domain classifier where
one matches the model's images, and the FP samples of the same noise for the paired metrics.
``run_eval_shard`` samples the index range ``[start, stop)`` of the job, decodes, extracts features and
files a ``ShardStats`` (``tfmq.evaluation.shards``); the same call runs in the pipeline's own process
(one shard) and on Dask workers (many), and ``merge_shards`` makes their numbers identical.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from tfmq.diffusion.conditioning import class_labels_for, guidance_kwargs, text_conditioning, text_kwargs
from tfmq.diffusion.data import to_uint8
from tfmq.diffusion.jobs import SamplerRun
from tfmq.diffusion.pipelines import load_diffusion_model, output_shape
from tfmq.diffusion.sampling import initial_noise, sample
from tfmq.evaluation.classifier import load_classifier, predict_logits, prompt_labels
from tfmq.evaluation.extractors import get_extractor_spec
from tfmq.evaluation.lpips import load_lpips, lpips_distance
from tfmq.evaluation.paired import per_sample_vs_reference
from tfmq.evaluation.reference_stats import extract_features
from tfmq.evaluation.shards import save_shard, shard_statistics
from tfmq.quant.checkpoint import load as load_quantized

#: the per-sample paired metrics a shard files against the FP samples (``tfmq.evaluation.paired``)
PAIRED_ROWS = ("mse", "psnr", "ssim", "feat_dist", "lpips")


@dataclass(frozen=True)
class EvalJob:
    """One setting's evaluation: ``num_samples`` samples of a model folder, scored against a reference.

    Attributes:
        fp_dir: the FP diffusers folder (pixel, ``LDMPipeline``, ``StableDiffusionPipeline``).
        checkpoint: a tfmq checkpoint loaded onto its UNet (``None``: the FP model).
        num_samples: samples ``[0, num_samples)``; sample j's noise depends on (seed, j) only.
        seed: the noise seed (the same for every setting: paired comparisons need the same noise).
        batch_size: samples per sampler call (shards start at multiples of it: bit-identical batches).
        sampler: the run's :class:`~tfmq.diffusion.jobs.SamplerRun`.
        extractor: the feature extractor (``tfmq.evaluation.extractors``); ``inception_weights`` its local weights.
        feature_batch_size: images per extractor / classifier call (``None``: ``batch_size``).
        prompts: a text-guided model's prompt source (sample j gets prompt j mod P).
        domain_classifier: a domain classifier folder matching the model's images (``None``: no domain metrics).
        fp_paired: the FP row's paired file (images + features of the same noise) for the per-sample metrics.
        lpips_backbone: a local AlexNet file: LPIPS against the FP samples too.
        keep_images: keep the uint8 samples (and class labels / prompt classes) per sample, for grids and paired files.
    """

    fp_dir: str
    checkpoint: str | None
    num_samples: int
    seed: int
    batch_size: int
    sampler: SamplerRun
    extractor: str
    inception_weights: str | None = None
    feature_batch_size: int | None = None
    prompts: str | None = None
    domain_classifier: str | None = None
    fp_paired: str | None = None
    lpips_backbone: str | None = None
    keep_images: bool = False

    @property
    def features_batch(self) -> int:
        return self.feature_batch_size or self.batch_size

    def shard_bounds(self, num_shards: int) -> list[tuple[int, int]]:
        """``[start, stop)`` ranges tiling ``[0, num_samples)``, starting at multiples of both batch sizes."""
        return shard_bounds(self.num_samples, num_shards, math.lcm(self.batch_size, self.features_batch))

    def with_(self, **changes) -> "EvalJob":
        return replace(self, **changes)


def shard_bounds(num_samples: int, num_shards: int, align: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges tiling ``[0, num_samples)``; every start is a multiple of ``align``."""
    if num_samples < 1 or num_shards < 1 or align < 1:
        raise ValueError(f"num_samples={num_samples}, num_shards={num_shards}, align={align}: expected positive integers")
    size = math.ceil(math.ceil(num_samples / num_shards) / align) * align
    return [(a, min(a + size, num_samples)) for a in range(0, num_samples, size)]


def feature_layers(extractor: str) -> dict[str, str | None]:
    """The layers the scores read for FID/KID, sFID and IS of ``extractor``."""
    spec = get_extractor_spec(extractor)
    return {"fid": spec.fid_feature, "spatial": spec.spatial_feature, "logits": spec.logits_feature}


def run_eval_shard(job: EvalJob, start: int, stop: int, out_dir: str | Path, device: str = "cpu",
                   threads: int | None = None, progress: bool = False) -> str:
    """Samples ``[start, stop)`` of ``job`` -> ``out_dir/shard_<start>_<stop>`` (a ``ShardStats``); returns its path.

    ``threads``: torch threads of this process (``None``: leave them). Besides the feature moments and rows,
    the shard keeps per sample what the job asks for: the uint8 images (``keep_images``), the domain classifier's
    logits, and the paired metrics against the FP samples of the same noise (``fp_paired``).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    times, t0 = {}, time.perf_counter()
    model = load_diffusion_model(job.fp_dir, device)
    if job.checkpoint is not None:
        model.unet = load_quantized(job.checkpoint, model.unet, device=device)
    times["load"], t0 = time.perf_counter() - t0, time.perf_counter()
    unet, family, n = model.unet, model.family, job.num_samples
    labels = class_labels_for(unet, n, family)
    size = unet.config.sample_size
    shape = (n, unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    mine = None if labels is None else labels[start:stop]
    text = text_conditioning(job.fp_dir, job.prompts, n, family, start, stop,
                             encoder=(model.tokenizer, model.text_encoder))
    s = job.sampler
    x = sample(unet, s.scheduler(model.scheduler.config), stop - start, s.num_inference_steps, job.batch_size, job.seed,
               eta=s.eta, class_labels=mine, device=device, progress=progress,
               noise=initial_noise(job.seed, shape, start, stop), first_index=start,
               **guidance_kwargs(family, s.guidance_scale), **text_kwargs(text))
    times["sample"], t0 = time.perf_counter() - t0, time.perf_counter()
    images = to_uint8(model.to_images(x, batch_size=job.batch_size))  # decode in the batches it sampled in
    times["decode"], t0 = time.perf_counter() - t0, time.perf_counter()
    want = output_shape(job.fp_dir, family)
    if tuple(images.shape[1:]) != want:
        raise ValueError(f"{job.fp_dir}: decoded samples are {tuple(images.shape[1:])}, its configs say {want}; "
                         "expected the folder's own decoder output (tfmq.diffusion.pipelines.output_shape)")
    ext = get_extractor_spec(job.extractor).name  # the reference's name for it (e.g. efficientnet-lite0-112)
    layers = feature_layers(ext)
    feats = extract_features(images, ext, [v for v in layers.values() if v], job.inception_weights,
                             job.features_batch, "cpu", progress=False)
    times["features"], t0 = time.perf_counter() - t0, time.perf_counter()
    per_sample: dict[str, torch.Tensor] = {}
    if job.keep_images:
        per_sample["images"] = images
        if mine is not None:
            per_sample["class_labels"] = mine.to(torch.int64)
        if text is not None and job.domain_classifier is not None:  # the class each prompt names (-1: none)
            per_sample["prompt_labels"] = prompt_labels(text["prompts"])
    if job.domain_classifier is not None:
        per_sample["domain_logits"] = predict_logits(load_classifier(job.domain_classifier, device), images,
                                                     batch_size=job.features_batch, device=device)
        times["classifier"], t0 = time.perf_counter() - t0, time.perf_counter()
    if job.fp_paired is not None:
        per_sample.update(paired_rows(job.fp_paired, start, stop, n, images, feats[layers["fid"]],
                                      job.lpips_backbone, job.features_batch))
        times["paired"] = time.perf_counter() - t0
    gaussian = [v for v in (layers["fid"], layers["spatial"]) if v]
    rows = [v for v in (layers["fid"], layers["logits"]) if v]
    stats = shard_statistics(feats, start, ext, gaussian, rows, per_sample)
    out = Path(out_dir) / f"shard_{start:07d}_{stop:07d}"
    save_shard(stats, out, extra={"seconds": {k: round(v, 4) for k, v in times.items()}, "threads": threads})
    return str(out)


def paired_rows(fp_paired: str, start: int, stop: int, num_samples: int, images: torch.Tensor, features: torch.Tensor,
                lpips_backbone: str | None = None, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """MSE / PSNR / SSIM / feature distance of samples ``[start, stop)`` against those rows of the FP paired file;
    with ``lpips_backbone`` (a local AlexNet file) also their LPIPS."""
    with safe_open(fp_paired, "pt") as f:
        want = [num_samples, *images.shape[1:]]
        have = list(f.get_slice("images").get_shape())
        if have != want:
            raise ValueError(f"{fp_paired} holds {tuple(have)} FP samples but this run makes {tuple(want)}; expected "
                             "the same eval.num_samples and seed: re-run evaluate --fp")
        fp_images, fp_features = f.get_slice("images")[start:stop], f.get_slice("features")[start:stop]
    per = per_sample_vs_reference(fp_images, images, fp_features, features)
    if lpips_backbone is not None:
        per["lpips"] = lpips_distance(fp_images, images, load_lpips(lpips_backbone), batch_size)
    return {k: torch.from_numpy(per[k]) for k in PAIRED_ROWS if k in per}
