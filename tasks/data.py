"""Data preparation task: verify the Fashion-MNIST IDX files and snapshot them as one DVC output.

The snapshot is byte-deterministic (``tfmq.diffusion.data.save_dataset``), so a fresh clone's re-run of this
stage reproduces the hash locked in dvc.lock and nothing downstream re-runs.
"""
from __future__ import annotations

from tasks.common import COMPUTE_TIMES, logger, pipeline_task, timed


@pipeline_task
def prepare_data(section) -> str:
    """Load and verify the IDX files under ``data.root``; write the snapshot to ``data.path``."""
    from tfmq.diffusion.data import FASHION_MNIST_COUNTS, load_fashion_mnist, save_dataset

    with timed(COMPUTE_TIMES, "prepare_data"):
        d = load_fashion_mnist(section.root, FASHION_MNIST_COUNTS if section.check_counts else None)
        save_dataset(d, section.path)
    logger().info("dataset: %d train / %d test images -> %s", len(d["train_labels"]), len(d["test_labels"]),
                  section.path)
    return section.path
