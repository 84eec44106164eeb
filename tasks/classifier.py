"""Classifier task: the small Fashion-MNIST classifier behind the offline "domain IS" and class accuracy.

ImageNet Inception logits say little about 28x28 garments, so the offline IS uses a classifier
trained on the domain itself (its test accuracy is recorded with it).
"""
from __future__ import annotations

from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed


@pipeline_task
def train_classifier(c, data_path: str) -> str:
    """Train the Fashion-MNIST classifier used for the domain IS and class accuracy."""
    from tfmq.diffusion.data import load_dataset
    from tfmq.evaluation.classifier import train_classifier as fit

    d = load_dataset(data_path)
    with timed(COMPUTE_TIMES, "train_classifier"):
        info = fit(d["train_images"], d["train_labels"], d["test_images"], d["test_labels"], c.path,
                   epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, width=c.width, seed=c.seed,
                   device=device(),
                   progress=show_progress())
    logger().info("classifier: test accuracy %.4f -> %s", info["test_accuracy"], c.path)
    return c.path
