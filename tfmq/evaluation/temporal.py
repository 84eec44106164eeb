"""Temporal-disturbance analyses of the TFMQ-DM poster (docs/method.md sections 1 and 9) for any FP/quantized UNet pair.

``temporal_report`` runs all four on the sampler's own timesteps and writes their plots, table and
JSON. The analyses live by concept and are re-exported here, where the pipeline and the tests
import them:

* ``temporal_features``: temporal feature error ``cos(emb_{t,i}, emb^q_{t,i})`` and temporal
  information mismatch ``delta_{t,i}`` (no sampling: one UNet forward per timestep);
* ``trajectory``: trajectory deviation of FP vs quantized samplers from the same noise, and the
  activation range of chosen layers per timestep (full sampler runs).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from tfmq.diffusion.temporal import TemporalInformationBlock, temporal_resnets  # noqa: F401 - re-exported
from tfmq.evaluation.temporal_features import (  # noqa: F401 - re-exported
    TemporalFeatures,
    measure_temporal_features,
    temporal_feature_error,
    temporal_mismatch,
    temporal_table,
)
from tfmq.evaluation.trajectory import activation_ranges, default_activation_layers, trajectory_deviation  # noqa: F401


def write_csv(rows: list[dict], path: str | Path) -> Path:
    import csv
    import io

    from tfmq.io import atomic_write_text

    if not rows:
        raise ValueError(f"no rows to write to {path}")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(buf.getvalue(), path)


def temporal_report(
    fp: nn.Module,
    q: nn.Module,
    scheduler,
    num_inference_steps: int,
    out_dir: str | Path,
    num_samples: int = 8,
    seed: int = 0,
    eta: float = 0.0,
    class_label: int | None = None,
    layer_names: Sequence[str] | None = None,
    unet_kwargs: dict | None = None,
    progress: bool = False,
) -> dict:
    """All four analyses on the sampler's own timesteps; writes into ``out_dir``:
    ``temporal_feature_error.png``, ``temporal_mismatch.png``, ``trajectory_deviation.png``,
    ``activation_ranges_fp.png`` / ``_q.png``, ``temporal_table.csv`` and ``temporal.json`` (summary + series).
    """
    from tfmq.evaluation.plots import plot_activation_ranges
    from tfmq.io import atomic_write_json

    out_dir = Path(out_dir)
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(num_inference_steps)
    ts = [int(t) for t in sched.timesteps]
    f = measure_temporal_features(fp, ts, class_label, "hooks", unet_kwargs)
    g = measure_temporal_features(q, ts, class_label, "hooks", unet_kwargs)
    err = temporal_feature_error(f, g, plot_path=out_dir / "temporal_feature_error.png")
    mm = temporal_mismatch(f, g, plot_path=out_dir / "temporal_mismatch.png")
    # against every training timestep (not only the sampler's, which are 1000/steps apart): the FP embedding path
    # in one batch ("direct" equals the hooks within float round-off for an FP model)
    big_t = int(getattr(scheduler.config, "num_train_timesteps", 1000))
    direct_ok = getattr(fp.config, "addition_embed_type", None) is None
    every = measure_temporal_features(fp, list(range(big_t)), class_label, "direct" if direct_ok else "hooks", unet_kwargs)
    mm_all = temporal_mismatch(f, g, candidates=every)
    labels = None if class_label is None else torch.full((num_samples,), int(class_label), dtype=torch.long)
    # the activation ranges of each model along its own trajectory are recorded on the trajectory's passes
    # (the same numbers as activation_ranges(fp) / activation_ranges(q), without sampling both twice more)
    names = list(layer_names) if layer_names is not None else default_activation_layers(fp)
    traj = trajectory_deviation(fp, q, scheduler, num_inference_steps, num_samples, seed, eta, labels, unet_kwargs,
                                out_dir / "trajectory_deviation.png", progress, range_layers=names)
    ranges = {}
    for tag, r in traj.pop("activation_ranges").items():
        plot_activation_ranges(r, out_dir / f"activation_ranges_{tag}.png")
        ranges[tag] = {"names": r["names"], "min": r["min"].tolist(), "max": r["max"].tolist()}
    write_csv(temporal_table(err, mm), out_dir / "temporal_table.csv")
    summary = {
        "temporal_cos_mean": err["mean_cos"],
        "temporal_cos_min": err["min_cos"],
        "mismatched_fraction": mm["mismatched_fraction"],
        "delta_step_mean_abs": float(mm["delta_step"].abs().double().mean()),
        "delta_all_timestep_mean_abs": float(mm_all["delta_timestep"].abs().double().mean()),
        "mismatched_fraction_all": mm_all["mismatched_fraction"],
        "trajectory_rmse_final": traj["final_rmse"],
        "trajectory_rmse_mean": float(sum(traj["rmse"]) / len(traj["rmse"])),
        "local_rmse_mean": float(sum(traj["local_rmse"]) / len(traj["local_rmse"])),
    }
    report = {"summary": summary, "timesteps": ts, "resnets": err["names"], "cos": err["cos"].tolist(),
              "delta_step": mm["delta_step"].tolist(), "delta_timestep": mm["delta_timestep"].tolist(),
              "delta_all_timestep": mm_all["delta_timestep"].tolist(),
              "trajectory": {k: v for k, v in traj.items()}, "activation_ranges": ranges,
              "index_space": mm["index_space"]}
    atomic_write_json(report, out_dir / "temporal.json")
    return report
