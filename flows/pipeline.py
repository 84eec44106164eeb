"""Composed flows: one setting end to end, the method x bits comparison, and the scheduled ``dvc repro``.

``compare`` runs the whole grid in ONE process (one Prefect server connection, one torch import),
for users without DVC; ``repro`` is what the cron deployment runs: DVC decides which stages are
stale and each stage reports its own flow run to the same Prefect server (PREFECT_API_URL is
inherited by the stage processes).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import flow

from flows.params import Params, load_params
from tasks.setting import Setting, grid_settings, study_settings, unquantized_setting
from flows.stages import (
    _OBJECTS,
    calib_data_flow,
    evaluate_flow,
    prepare_data_flow,
    quantize_flow,
    reference_stats_flow,
    report_flow,
    run_flow,
    train_autoencoder_flow,
    train_classifier_flow,
    train_fp_flow,
    train_vae_flow,
)
from flows.params import TRAIN_SECTIONS
from tasks.common import logger, pipeline_task


@flow(name="quantize-and-evaluate", flow_run_name="{setting.model}-{setting.name}", **_OBJECTS)
def quantize_and_evaluate(setting: Setting, params: Params) -> str:
    """Quantize one setting and evaluate it; returns its metrics.json path. The quantize stages' finished
    units are kept until the metrics are written: ``dvc repro`` deletes this stage's outputs (the
    checkpoints too) before re-running a ``run`` killed during evaluation, which then restores them."""
    from tasks.quantize import drop_progress

    run_flow(quantize_flow, setting, params, keep_progress=True)
    out = run_flow(evaluate_flow, setting, params)
    drop_progress(setting)
    return out


def _missing(path: str) -> bool:
    p = Path(path)
    return not p.exists() or (p.is_dir() and not any(p.iterdir()))


@flow(name="compare")
def compare(methods: list[str] | None = None, bits: list[str] | None = None, config: str = "params.yaml",
            rebuild: bool = False, models: list[str] | None = None) -> str:
    """The model x method x bits grid plus the real-data, FP and autoencoder rows and the named studies (when
    neither ``methods`` nor ``bits`` narrows the grid), then the results tables; upstream outputs are built
    when missing (a model folder by the training section whose out_dir it is).

    The deployment's entry point: it takes the params file's path, validates it and builds every
    setting once, before any work starts.
    """
    params = load_params(config)
    grid_models = models or params.grid.models
    studies = study_settings(params, models) if methods is None and bits is None else []
    settings = grid_settings(params, methods, bits, grid_models) + studies
    models = list(dict.fromkeys([*grid_models, *(s.model for s in studies)]))  # + the studies' FP row and calib set
    trains = {str(Path(getattr(params, sec).out_dir)): sec for sec in TRAIN_SECTIONS}
    upstream = [(params.data.path, prepare_data_flow, ())]
    for model in models:
        fp_dir = str(Path(params.model.root) / model)
        if fp_dir in trains and trains[fp_dir].startswith("train_ldm"):
            upstream.append((params.autoencoder.out_dir, train_autoencoder_flow, ()))
        if fp_dir in trains and trains[fp_dir] == "train_sd":
            upstream.append((params.vae.out_dir, train_vae_flow, ()))
        if fp_dir in trains:
            upstream.append((fp_dir, train_fp_flow, (trains[fp_dir],)))
    upstream += [(params.classifier.path, train_classifier_flow, ()), (params.reference.dir, reference_stats_flow, ())]
    upstream += [(str(Path(params.calib_data.dir) / m), calib_data_flow, (m,)) for m in models]
    done: set[str] = set()
    for out, flow_, args in upstream:
        if out not in done and (rebuild or _missing(out)):
            run_flow(flow_, params, *args)
        done.add(out)
    run_flow(evaluate_flow, unquantized_setting(params, "real"), params)
    for model in models:
        run_flow(evaluate_flow, unquantized_setting(params, "fp", model=model), params)
    for setting in settings:
        logger().info("setting %s/%s", setting.model, setting.name)
        run_flow(quantize_and_evaluate, setting, params)
    return run_flow(report_flow, params)


@pipeline_task
def dvc_repro(targets: list[str], force: bool, cwd: str) -> int:
    """Run ``dvc repro`` (stage output streams to this log); fail the task when DVC fails."""
    cmd = [sys.executable, "-m", "dvc", "repro", *(["--force"] if force else []), *targets]
    logger().info("%s (in %s)", " ".join(cmd), cwd)
    rc = subprocess.run(cmd, cwd=cwd, env=os.environ.copy()).returncode
    if rc != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` exited with {rc}")
    return rc


@flow(name="tfmq-repro")
def repro(targets: list[str] | None = None, force: bool = False, repo: str | None = None) -> int:
    """``dvc repro`` of the pipeline (all stages by default): the scheduled rebuild of every result."""
    from flows.stages import call

    return call(dvc_repro, list(targets or []), force, repo or os.getcwd())
