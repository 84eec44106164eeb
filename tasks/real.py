"""The real-data row of the results table, and a latent model's autoencoder floor: real images scored like samples.

``eval.num_samples`` real images the reference does not hold (``tasks.reference.real_images``: the other IDX
split, or the folder / npz images after the reference's), at the model's output shape. Their FID is the floor
of the metric at this N and reference: FID is biased upwards at small N (here N=256 < 1280 feature dims), and
this row shows by how much, so every other row reads as a distance above real data. A reference of statistics
alone has no real images: the row is written with its metrics absent and the reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, timed
from tasks.evaluate import _jsonable, absent_metrics, score_images
from tasks.reference import Unavailable, real_images
from tfmq.diffusion.autoencoder import decode, encode, psnr
from tfmq.diffusion.data import to_model_range, to_uint8
from tfmq.diffusion.pipelines import load_autoencoder, read_family
from tfmq.diffusion.sampling import save_grid
from tfmq.evaluation.classifier import domain_classifier_for


@pipeline_task
def score_real(r, e, data_path: str, reference: str, classifier: str, results_dir: str,
               shape: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """FID/sFID/KID/IS (+ domain IS where the classifier matches) of ``eval.num_samples`` real images at ``shape``
    (``None``: as the IDX data has them); a grid of them under plots/."""
    try:
        images, split = real_images(r, e, data_path, shape)
    except Unavailable as why:
        return {"absent": absent_metrics(None, None, row_reason=str(why))}
    save_grid(to_model_range(images[: e.grid_images]), Path(results_dir) / "plots" / "samples.png", nrow=8, scale=2)
    clf, why = domain_classifier_for(e.domain_classifier, classifier, tuple(images.shape[1:]))
    times: dict[str, float] = {}
    scores, domain = score_images(images, None, e, reference, clf, times)
    logger().info("real-data row: %d %s images, metrics in %.1f s", len(images), split, times["metrics"])
    return _jsonable({"scores": scores, "domain": domain, "times": times, "absent": absent_metrics(scores, why)})


@pipeline_task
def score_reconstructions(setting, r, e, data_path: str, reference: str, classifier: str,
                          shape: tuple[int, int, int]) -> dict[str, Any]:
    """The floor of a latent model's rows: the real-data row's images (at the model's output ``shape``) encoded and
    decoded by its FP autoencoder, scored like samples, with the per-image PSNR (mean and 95 % interval). Grid:
    originals above reconstructions."""
    family = read_family(setting.fp_dir)
    vq = load_autoencoder(setting.fp_dir, family, device())
    if vq is None:
        raise ValueError(f"{setting.fp_dir} has no autoencoder (vqvae/ or vae/): only latent models have a "
                         "reconstruction floor")
    try:
        images, split = real_images(r, e, data_path, shape)
    except Unavailable as why:
        return {"absent": absent_metrics(None, None, row_reason=str(why))}
    x = to_model_range(images)
    pad = int(vq.config.sample_size) if family.image_size else None  # our autoencoder pads 28 -> 32
    times: dict[str, float] = {}
    with timed(times, "decode"), timed(COMPUTE_TIMES, "reconstruct"):
        rec = decode(vq, encode(vq, x, pad_to=pad), crop=family.image_size)
    half = min(e.grid_images // 2, len(x))
    save_grid(torch.cat([x[:half], rec[:half]]), Path(setting.results_dir) / "plots" / "reconstructions.png",
              nrow=8, scale=2)
    p = psnr(to_model_range(to_uint8(rec)), x)
    se = float(p.std()) / max(len(p), 1) ** 0.5
    clf, why = domain_classifier_for(e.domain_classifier, classifier, tuple(images.shape[1:]))
    scores, domain = score_images(to_uint8(rec), None, e, reference, clf, times)
    logger().info("autoencoder %s: PSNR %.2f dB on %d %s images", setting.fp_dir, float(p.mean()), len(p), split)
    return _jsonable({"scores": scores, "domain": domain, "times": times, "family": family.to_json(),
                      "absent": absent_metrics(scores, why),
                      "reconstruction": {"psnr_db": float(p.mean()), "psnr_ci_low": float(p.mean()) - 1.96 * se,
                                         "psnr_ci_high": float(p.mean()) + 1.96 * se, "psnr_n": len(p)}})
