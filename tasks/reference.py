"""Reference feature statistics: real images embedded once per (split, extractor), reused by every evaluation.

FID/sFID/KID of every setting compare against this one file, so all rows of the results table
share the same reference and the same network (docs/method.md section 9).
"""
from __future__ import annotations

from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed


@pipeline_task
def reference_stats(r, e, data_path: str, out: str) -> str:
    """Embed ``reference.num_images`` real images of ``reference.split`` and cache their statistics in ``out``."""
    import torch

    from tfmq.diffusion.data import load_dataset
    from tfmq.evaluation.metrics import compute_reference_stats

    images = load_dataset(data_path)[f"{r.split}_images"]
    if r.num_images < len(images):  # a seeded subset: same images on every machine
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(r.seed))[: r.num_images]
        images = images[idx.sort().values]
    images = images if images.dim() == 4 else images.unsqueeze(1)
    with timed(COMPUTE_TIMES, "reference_stats"):
        ref = compute_reference_stats(images, out, extractor=e.extractor, split=r.split,
                                      weights_path=e.inception_weights, device=device(),
                                      progress=show_progress(), recompute=True)
    logger().info("reference stats: %d %s images, %s -> %s", ref.meta["n"], r.split, ref.meta["extractor"], out)
    return str(out)
