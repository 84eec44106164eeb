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


@pipeline_task
def score_real(e, data_path: str, reference_split: str, reference: str, classifier: str,
               results_dir: str) -> dict[str, Any]:
    """FID/sFID/KID/IS (+ domain IS) of ``eval.num_samples`` real images; a grid of them under plots/."""
    import torch

    from tfmq.diffusion.data import load_dataset, to_model_range
    from tfmq.diffusion.sampling import save_grid

    split = real_split(reference_split)
    pool = load_dataset(data_path)[f"{split}_images"]
    if e.num_samples > len(pool):
        raise ValueError(f"eval.num_samples={e.num_samples} exceeds the {len(pool)} {split} images; "
                         "expected at most that many for the real-data row")
    idx = torch.randperm(len(pool), generator=torch.Generator().manual_seed(e.seed))[: e.num_samples]
    images = pool[idx.sort().values]
    images = images if images.dim() == 4 else images.unsqueeze(1)
    save_grid(to_model_range(images[: e.grid_images]), Path(results_dir) / "plots" / "samples.png",
              nrow=8, scale=2)
    times: dict[str, float] = {}
    scores, domain = score_images(images, None, e, reference, classifier, times)
    logger().info("real-data row: %d %s images, metrics in %.1f s", len(images), split, times["metrics"])
    return _jsonable({"scores": scores, "domain": domain, "times": times})
