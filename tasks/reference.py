"""Reference data tasks: real images embedded once per (source, image shape, extractor), and the real images a row
is scored on.

FID/sFID/KID of every setting of a model compare against one file, so all rows of a model share the same
reference and network (docs/method.md section 9). The source is the user's: the embedded IDX data's split
(``reference.images: null``), an image folder or a guided-diffusion ``.npz`` batch (``reference.images``, brought
to each model's output shape by centre crop + resize as the ADM evaluator does), or precomputed FID statistics
(``reference.stats``: FID alone; no real-data row). The real-data row and a latent model's autoencoder floor
draw images the reference does not hold.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed
from tfmq.diffusion.data import load_dataset
from tfmq.evaluation.reference_data import center_crop_resize, load_fid_stats, load_reference_images, reference_count
from tfmq.evaluation.reference_stats import compute_reference_stats, fid_stats_reference

IDX_SHAPE = (1, 28, 28)


class Unavailable(ValueError):
    """Real images a row needs cannot come from this reference source (the row's metrics are absent, with this reason)."""


def real_split(reference_split: str) -> str:
    """The IDX split the real-data row draws from: the one ``reference.split`` does *not* name."""
    return "train" if reference_split == "test" else "test"


def _perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def to_shape(images: torch.Tensor, shape: tuple[int, int, int] | None) -> torch.Tensor:
    """uint8 [N, C, H, W] brought to ``shape`` (C, H, W) the way folder images are (``center_crop_resize``; grey
    repeated to RGB, RGB to PIL's L); unchanged when it already has that shape (the embedded 28 px grey models)."""
    if shape is None or tuple(images.shape[1:]) == tuple(shape):
        return images
    c, h, w = shape
    mode = "RGB" if c == 3 else "L"
    out = []
    for x in images:
        arr = x.permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).convert(mode)
        a = np.asarray(center_crop_resize(img, (h, w)))
        out.append(torch.from_numpy(a.reshape(h, w, c).copy()).permute(2, 0, 1))
    logger().warning("reference: %d IDX images resized from %s to %dx%dx%d (centre crop + resize, as the ADM "
                     "evaluator)", len(out), tuple(images.shape[1:]), c, h, w)
    return torch.stack(out)


def _split_pool(r, n_total: int, num_real: int) -> tuple[list[int], list[int] | None]:
    """A folder / npz pool: ``reference.num_images`` images (seeded by ``reference.seed``) for the reference and the
    next ``num_real`` of the same permutation for the real-data row (``None`` when the pool is too small)."""
    perm = _perm(n_total, r.seed).tolist()
    ref = sorted(perm[: min(r.num_images, n_total)])
    rest = perm[r.num_images:]
    return ref, (sorted(rest[:num_real]) if len(rest) >= num_real else None)


@pipeline_task
def reference_stats(r, e, data_path: str, targets: dict[str, tuple[int, int, int] | None]) -> list[str]:
    """Reference statistics for every ``out path -> image shape`` of ``targets``: ``reference.num_images`` real images
    of the source, embedded with ``eval.extractor``; precomputed statistics are checked and cached as they are."""
    out = []
    for path, shape in targets.items():
        with timed(COMPUTE_TIMES, "reference_stats"):
            if r.stats is not None:
                mu, sigma = load_fid_stats(r.stats)
                ref = fid_stats_reference(mu, sigma, path, e.extractor, r.stats)
            else:
                images, label = _reference_images(r, data_path, shape)
                ref = compute_reference_stats(images, path, extractor=e.extractor, split=label,
                                              weights_path=e.inception_weights, device=device(),
                                              progress=show_progress(), recompute=True)
        logger().info("reference stats: %s images of %s, %s -> %s", ref.meta["n"], ref.meta["split"],
                      ref.meta["extractor"], path)
        out.append(str(path))
    return out


def _reference_images(r, data_path: str, shape) -> tuple[torch.Tensor, str]:
    if r.images is None:
        images = load_dataset(data_path)[f"{r.split}_images"]
        if r.num_images < len(images):  # a seeded subset: same images on every machine
            images = images[_perm(len(images), r.seed)[: r.num_images].sort().values]
        return to_shape(images if images.dim() == 4 else images.unsqueeze(1), shape), r.split
    ref, _ = _split_pool(r, reference_count(r.images), 0)
    c, h, w = shape
    images, info = load_reference_images(r.images, (h, w), c, indices=ref, progress=show_progress())
    return images, f"{Path(r.images).name} ({info['n']} of {info['n_total']} images)"


def real_images(r, e, data_path: str, shape: tuple[int, int, int] | None) -> tuple[torch.Tensor, str]:
    """``eval.num_samples`` real images [N, C, H, W] uint8 that the reference does not hold, at ``shape``, and their
    origin: the other IDX split (seeded by ``eval.seed``), or the folder / npz images after the reference's.

    Raises:
        Unavailable: a statistics-only reference, or a pool smaller than the reference plus the row.
    """
    if r.stats is not None:
        raise Unavailable(f"reference.stats={r.stats!r} holds statistics only: no real images to score")
    if r.images is None:
        split = real_split(r.split)
        pool = load_dataset(data_path)[f"{split}_images"]
        if e.num_samples > len(pool):
            raise ValueError(f"eval.num_samples={e.num_samples} exceeds the {len(pool)} {split} images; "
                             "expected at most that many for the real-data row")
        images = pool[_perm(len(pool), e.seed)[: e.num_samples].sort().values]
        return to_shape(images if images.dim() == 4 else images.unsqueeze(1), shape), split
    n_total = reference_count(r.images)
    _, real = _split_pool(r, n_total, e.num_samples)
    if real is None:
        raise Unavailable(f"reference.images={r.images!r} holds {n_total} images; the real-data row needs "
                          f"reference.num_images + eval.num_samples = {r.num_images + e.num_samples} (none shared "
                          "with the reference)")
    c, h, w = shape
    images, _ = load_reference_images(r.images, (h, w), c, indices=real, progress=show_progress())
    return images, f"{Path(r.images).name} (held out of the reference)"
