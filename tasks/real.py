"""The real-data row of the results table: real images scored exactly like generated samples.

``eval.num_samples`` images are drawn (seeded by ``eval.seed``) from the split the reference
statistics do not use, so they share no image with the reference. Their FID is the floor of the
metric at this N and reference: FID is biased upwards at small N (here N=256 < 1280 feature dims),
and this row shows by how much, so every other row reads as a distance above real data.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.common import logger, pipeline_task
from tasks.evaluate import _jsonable, score_images


def real_split(reference_split: str) -> str:
    """The split the real-data row draws from: the one ``reference.split`` does *not* name."""
    return "train" if reference_split == "test" else "test"


def real_images(e, data_path: str, reference_split: str):
    """The real-data row's ``eval.num_samples`` uint8 images [N, 1, H, W] (seeded by ``eval.seed``) and their split."""
    import torch

    from tfmq.diffusion.data import load_dataset

    split = real_split(reference_split)
    pool = load_dataset(data_path)[f"{split}_images"]
    if e.num_samples > len(pool):
        raise ValueError(f"eval.num_samples={e.num_samples} exceeds the {len(pool)} {split} images; "
                         "expected at most that many for the real-data row")
    idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(e.seed))[: e.num_samples]
    images = pool[idx.sort().values]
    return (images if images.dim() == 4 else images.unsqueeze(1)), split


@pipeline_task
def score_real(e, data_path: str, reference_split: str, reference: str, classifier: str,
               results_dir: str) -> dict[str, Any]:
    """FID/sFID/KID/IS (+ domain IS) of ``eval.num_samples`` real images; a grid of them under plots/."""
    from tfmq.diffusion.data import to_model_range
    from tfmq.diffusion.sampling import save_grid

    images, split = real_images(e, data_path, reference_split)
    save_grid(to_model_range(images[: e.grid_images]), Path(results_dir) / "plots" / "samples.png",
              nrow=8, scale=2)
    times: dict[str, float] = {}
    scores, domain = score_images(images, None, e, reference, classifier, times)
    logger().info("real-data row: %d %s images, metrics in %.1f s", len(images), split, times["metrics"])
    return _jsonable({"scores": scores, "domain": domain, "times": times})


@pipeline_task
def score_reconstructions(setting, e, data_path: str, reference_split: str, reference: str,
                          classifier: str) -> dict[str, Any]:
    """The floor of a latent model's rows: the real-data row's images encoded and decoded by its FP autoencoder,
    scored like samples, with the per-image PSNR (mean and 95 % interval). Grid: originals above reconstructions."""
    import torch

    from tfmq.diffusion.autoencoder import decode, encode, psnr
    from tfmq.diffusion.data import to_model_range, to_uint8
    from tfmq.diffusion.pipelines import load_autoencoder, read_family
    from tfmq.diffusion.sampling import save_grid
    from tasks.common import COMPUTE_TIMES, device, timed

    family = read_family(setting.fp_dir)
    vq = load_autoencoder(setting.fp_dir, family, device())
    if vq is None:
        raise ValueError(f"{setting.fp_dir} has no autoencoder (vqvae/ or vae/): only latent models have a "
                         "reconstruction floor")
    images, split = real_images(e, data_path, reference_split)
    x = to_model_range(images)
    pad = int(vq.config.sample_size) if family.image_size else None  # our autoencoder pads 28 -> 32
    times: dict[str, float] = {}
    with timed(times, "decode"), timed(COMPUTE_TIMES, "reconstruct"):
        r = decode(vq, encode(vq, x, pad_to=pad), crop=family.image_size)
    half = min(e.grid_images // 2, len(x))
    save_grid(torch.cat([x[:half], r[:half]]), Path(setting.results_dir) / "plots" / "reconstructions.png",
              nrow=8, scale=2)
    p = psnr(to_model_range(to_uint8(r)), x)
    se = float(p.std()) / max(len(p), 1) ** 0.5
    scores, domain = score_images(to_uint8(r), None, e, reference, classifier, times)
    logger().info("autoencoder %s: PSNR %.2f dB on %d %s images", setting.fp_dir, float(p.mean()), len(p), split)
    return _jsonable({"scores": scores, "domain": domain, "times": times, "family": family.to_json(),
                      "reconstruction": {"psnr_db": float(p.mean()), "psnr_ci_low": float(p.mean()) - 1.96 * se,
                                         "psnr_ci_high": float(p.mean()) + 1.96 * se, "psnr_n": len(p)}})
