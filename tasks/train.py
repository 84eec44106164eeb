"""FP training tasks: the embedded default DDPM (issue 3) and the small classifier behind the domain IS.

Training costs ~20 min of CPU, so the trained checkpoints are committed (DVC outs with
``cache: false``) and a fresh clone re-uses them; ``dvc repro -f train_fp`` re-trains.
"""
from __future__ import annotations

from typing import Any

from tasks.common import device, logger, pipeline_task, show_progress


@pipeline_task
def train_fp(params: dict[str, Any], section: str = "train_fp") -> str:
    """Train one FP DDPM (``train_fp``: unconditional, ``train_fp_class``: class-conditional)."""
    from tfmq.data import load_dataset
    from tfmq.training import TrainConfig, train_ddpm

    cfg_d = dict(params[section])
    out_dir = cfg_d.pop("out_dir")
    cfg = TrainConfig(**cfg_d)
    d = load_dataset(params["data"]["path"])
    log = train_ddpm(d["train_images"], d["train_labels"], cfg, out_dir, device=device(), progress=show_progress())
    logger().info("%s: %d steps, final loss %s -> %s", section, cfg.steps, log.get("final_loss"), out_dir)
    return out_dir


@pipeline_task
def train_classifier(params: dict[str, Any]) -> str:
    """Train the Fashion-MNIST classifier used for the domain IS and class accuracy."""
    from tfmq.data import load_dataset
    from tfmq.evaluation.classifier import train_classifier as fit

    c = params["classifier"]
    d = load_dataset(params["data"]["path"])
    info = fit(d["train_images"], d["train_labels"], d["test_images"], d["test_labels"], c["path"],
               epochs=c["epochs"], batch_size=c["batch_size"], lr=c["lr"], seed=c["seed"], device=device(),
               progress=show_progress())
    logger().info("classifier -> %s (%s)", c["path"], info)
    return c["path"]
