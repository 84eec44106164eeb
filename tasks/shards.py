"""Shard tasks of a sharded evaluation: sample an index range, decode, extract features, file its statistics.

Plain functions of plain arguments (paths, ints, dicts) so that any Dask worker can run them: a worker
loads the model folder (and the quantized checkpoint) itself, and returns the path of the shard it
wrote. ``shard_bounds`` cuts ``[0, N)`` at multiples of the sampling and feature batch sizes, so every
batch of a shard is a batch of the unsharded run and its images and features are bit-identical to it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


def shard_bounds(num_samples: int, num_shards: int, align: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges tiling ``[0, num_samples)``; every start is a multiple of ``align``."""
    if num_samples < 1 or num_shards < 1 or align < 1:
        raise ValueError(f"num_samples={num_samples}, num_shards={num_shards}, align={align}: expected positive integers")
    size = math.ceil(math.ceil(num_samples / num_shards) / align) * align
    return [(a, min(a + size, num_samples)) for a in range(0, num_samples, size)]


def feature_layers(extractor: str) -> dict[str, str | None]:
    """The layers ``compute_metrics`` reads for FID/KID, sFID and IS of ``extractor``."""
    from tfmq.evaluation.extractors import get_extractor_spec

    spec = get_extractor_spec(extractor)
    return {"fid": spec.fid_feature, "spatial": spec.spatial_feature, "logits": spec.logits_feature}


def sample_shard(fp_dir: str, checkpoint: str | None, start: int, stop: int, num_samples: int, e: dict[str, Any],
                 sampler: dict[str, Any], out_dir: str, threads: int | None = 1, classifier: str | None = None,
                 fp_paired: str | None = None, keep_images: bool = False, progress: bool = False) -> str:
    """Samples ``[start, stop)`` of the setting's run -> ``out_dir/shard_<start>_<stop>`` (a ``ShardStats``).

    ``e``: ``seed``, ``batch_size``, ``extractor``, ``inception_weights`` (optional ``feature_batch_size``,
    default ``batch_size``; ``prompts``: the prompt file of a text-guided model, sample j gets line j mod P); ``sampler``: ``name``, ``num_inference_steps``, ``eta``, ``guidance_scale``.
    ``threads``: torch threads of this process (``None``: leave them). Per-sample rows the evaluate stage
    needs: ``keep_images`` (uint8 samples, for grids and the paired file; with them the class labels),
    ``classifier`` (the domain classifier's logits: domain IS, class accuracy), ``fp_paired`` (the FP
    row's paired file: MSE / PSNR / SSIM / feature distance, and LPIPS with ``e["lpips_backbone"]``, of these
    samples against the FP samples of the same noise, read for this range only).
    """
    import time

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tasks.calibration import _text_kwargs, class_labels_for, guidance_kwargs, prompt_labels, text_conditioning
    from tasks.common import device
    from tasks.evaluate import load_model
    from tfmq.diffusion.data import to_uint8
    from tfmq.diffusion.sampling import initial_noise, make_scheduler, sample
    from tfmq.evaluation.extractors import get_extractor_spec
    from tfmq.evaluation.reference_stats import extract_features
    from tfmq.evaluation.shards import save_shard, shard_statistics

    times, t0 = {}, time.perf_counter()
    model = load_model(fp_dir, checkpoint)
    times["load"], t0 = time.perf_counter() - t0, time.perf_counter()
    unet = model.unet
    labels = class_labels_for(unet, num_samples, model.family)
    size = unet.config.sample_size
    shape = (num_samples, unet.config.in_channels, size, size)
    sched = make_scheduler(sampler["name"], model.scheduler.config)
    mine = None if labels is None else labels[start:stop]
    text = text_conditioning(fp_dir, e.get("prompts"), num_samples, model.family, start, stop,
                             encoder=(model.tokenizer, model.text_encoder))
    x = sample(unet, sched, stop - start, sampler["num_inference_steps"], e["batch_size"], e["seed"],
               eta=sampler.get("eta", 0.0), class_labels=mine, device=device(), progress=progress,
               noise=initial_noise(e["seed"], shape, start, stop), first_index=start,
               **guidance_kwargs(model.family, sampler.get("guidance_scale", 1.0)), **_text_kwargs(text))
    times["sample"], t0 = time.perf_counter() - t0, time.perf_counter()
    images = to_uint8(model.to_images(x, batch_size=e["batch_size"]))  # decode in the batches it sampled in
    times["decode"], t0 = time.perf_counter() - t0, time.perf_counter()
    ext = get_extractor_spec(e["extractor"]).name  # the reference's name for it (e.g. efficientnet-lite0-112)
    layers = feature_layers(ext)
    feats = extract_features(images, ext, [v for v in layers.values() if v], e.get("inception_weights"),
                             e.get("feature_batch_size", e["batch_size"]), "cpu", progress=False)
    times["features"], t0 = time.perf_counter() - t0, time.perf_counter()
    per_sample: dict[str, torch.Tensor] = {}
    if keep_images:
        per_sample["images"] = images
        if mine is not None:
            per_sample["class_labels"] = mine.to(torch.int64)
        if text is not None:  # the class each prompt names (-1: none): prompt accuracy of the domain classifier
            per_sample["prompt_labels"] = prompt_labels(text["prompts"])
    if classifier is not None:
        from tfmq.evaluation.classifier import load_classifier, predict_logits

        per_sample["domain_logits"] = predict_logits(load_classifier(classifier, device()), images,
                                                     batch_size=e.get("feature_batch_size", e["batch_size"]),
                                                     device=device())
        times["classifier"], t0 = time.perf_counter() - t0, time.perf_counter()
    if fp_paired is not None:
        per_sample.update(_paired_rows(fp_paired, start, stop, num_samples, images, feats[layers["fid"]],
                                       e.get("lpips_backbone"), e.get("feature_batch_size", e["batch_size"])))
        times["paired"] = time.perf_counter() - t0
    gaussian = [v for v in (layers["fid"], layers["spatial"]) if v]
    rows = [v for v in (layers["fid"], layers["logits"]) if v]
    stats = shard_statistics(feats, start, ext, gaussian, rows, per_sample)
    out = Path(out_dir) / f"shard_{start:07d}_{stop:07d}"
    save_shard(stats, out, extra={"seconds": {k: round(v, 4) for k, v in times.items()}, "threads": threads})
    return str(out)


#: the per-sample paired metrics a shard files against the FP samples (``tfmq.evaluation.paired``)
PAIRED_ROWS = ("mse", "psnr", "ssim", "feat_dist", "lpips")


def _paired_rows(fp_paired: str, start: int, stop: int, num_samples: int, images, features,
                 lpips_backbone: str | None = None, batch_size: int = 64) -> dict:
    """MSE / PSNR / SSIM / feature distance of samples ``[start, stop)`` against those rows of the FP paired file;
    with ``lpips_backbone`` (a local AlexNet file, ``eval.lpips_backbone``) also their LPIPS."""
    import torch
    from safetensors import safe_open

    from tfmq.evaluation.paired import per_sample_vs_reference

    with safe_open(fp_paired, "pt") as f:
        want = [num_samples, *images.shape[1:]]
        have = list(f.get_slice("images").get_shape())
        if have != want:
            raise ValueError(f"{fp_paired} holds {tuple(have)} FP samples but this run makes {tuple(want)}; expected "
                             "the same eval.num_samples and seed: re-run evaluate --fp")
        fp_images, fp_features = f.get_slice("images")[start:stop], f.get_slice("features")[start:stop]
    per = per_sample_vs_reference(fp_images, images, fp_features, features)
    if lpips_backbone is not None:
        from tfmq.evaluation.lpips import load_lpips, lpips_distance

        per["lpips"] = lpips_distance(fp_images, images, load_lpips(lpips_backbone), batch_size)
    return {k: torch.from_numpy(per[k]) for k in PAIRED_ROWS if k in per}


def merged_metrics(paths: list[str], reference: str, extractor: str, kid_subsets: int, kid_subset_size: int) -> dict:
    """Merge the shard files and score them: ``metrics_from_shards`` against the cached reference."""
    from tfmq.evaluation.reference_stats import ReferenceStats
    from tfmq.evaluation.shards import load_shard, merge_shards, metrics_from_shards

    import time

    from tfmq.evaluation.shards import shard_extra

    t0 = time.perf_counter()
    layers = feature_layers(extractor)
    merged = merge_shards(load_shard(p) for p in paths)
    values = metrics_from_shards(merged, ReferenceStats.load(reference), layers["fid"], layers["spatial"],
                                 layers["logits"], kid_subsets=kid_subsets, kid_subset_size=kid_subset_size)
    seconds: dict[str, float] = {}
    for p in paths:
        for k, v in shard_extra(p).get("seconds", {}).items():
            seconds[k] = seconds.get(k, 0.0) + v
    seconds["merge_and_score"] = time.perf_counter() - t0
    return {"n": merged.n, "shards": len(paths), **values, "shard_seconds": seconds}
