"""Quantization tasks: the three stages of a method's recipe, one checkpoint after each.

TFMQ-DM runs TIAR on the Temporal Information Block (docs/method.md section 4), then BRECQ on the remaining
blocks with the temporal layers frozen (section 6), then Finite Set Calibration of the activation
ranges (section 5); the baselines run their own recipe through the same three stages (a stage the
recipe lacks is a recorded no-op). Each task loads the FP model plus the previous stage's
checkpoint, calls ONE ``tfmq`` stage function and saves a checkpoint, so any stage can be re-run
alone and an interrupted stage never leaves a half-written checkpoint (``tfmq.save`` is atomic). BRECQ
files each finished unit under ``quant/<name>/blocks.partial/``; a re-run after a crash continues from there.
The tasks take the run's ``tasks.setting.Setting`` (its ``QuantConfig``, built once, and its paths).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed
from tasks.setting import STAGE_FILES, Setting


def _load_stage_input(setting: Setting, previous: str | None):
    """FP model from ``setting.fp_dir``; prepared fresh (first stage) or with the previous checkpoint loaded."""
    import tfmq
    from tfmq.diffusion.models import load_fp_model

    dev = device()
    unet, _ = load_fp_model(setting.fp_dir, dev)
    if previous is None:
        return tfmq.prepare_model(unet, setting.config)
    return tfmq.load(previous, unet, device=dev)


def _record(quant_dir: Path, stage: str, seconds: float, stats: dict[str, Any]) -> None:
    """Merge this stage's wall time and stats into ``stage_times.json`` (atomic rewrite)."""
    from tfmq.io import atomic_write_json

    path = quant_dir / "stage_times.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[stage] = {"wall_s": round(seconds, 3), "stats": json.loads(json.dumps(stats, default=str))}
    atomic_write_json(doc, path)


RESUMABLE = {"recon_blocks"}  # stages whose tfmq function takes resume_dir= (finished units survive a crash)


def progress_dir(setting: Setting, stage: str) -> Path:
    """``quant/<name>/<stage output>.partial/``: the resumable stage's progress until its output is saved."""
    return Path(setting.quant_dir) / f"{STAGE_FILES[stage]}.partial"


def _run_stage(stage: str, fn_name: str, setting: Setting, calib_dir: str, previous: str | None) -> str:
    import shutil

    import tfmq
    from tfmq.diffusion.calibration import CalibrationSet

    qdir = Path(setting.quant_dir)
    unet = _load_stage_input(setting, previous)
    calib = CalibrationSet(calib_dir)
    kwargs = {"resume_dir": progress_dir(setting, stage)} if stage in RESUMABLE else {}
    times: dict[str, float] = {}
    with timed(times, stage), timed(COMPUTE_TIMES, stage):
        stats = getattr(tfmq, fn_name)(unet, calib, setting.config, device=device(), progress=show_progress(), **kwargs)
    out = qdir / STAGE_FILES[stage]
    tfmq.save(unet, out, extra_metadata={"pipeline_stage": stage})  # temp dir + one rename
    if kwargs:
        shutil.rmtree(kwargs["resume_dir"], ignore_errors=True)  # only once the finished output is in place
    _record(qdir, stage, times[stage], stats)
    logger().info("%s %s: %.1f s -> %s", stage, setting.name, times[stage], out)
    return str(out)


@pipeline_task
def recon_tib(setting: Setting, calib_dir: str) -> str:
    """Stage 1: TIAR on the Temporal Information Block (or the method's treatment of the temporal layers)."""
    Path(setting.quant_dir).mkdir(parents=True, exist_ok=True)
    stale = Path(setting.quant_dir) / "stage_times.json"
    if stale.exists():
        stale.unlink()  # a fresh run of stage 1 starts a fresh record
    return _run_stage("recon_tib", "reconstruct_temporal", setting, calib_dir, None)


@pipeline_task
def recon_blocks(setting: Setting, calib_dir: str, previous: str) -> str:
    """Stage 2: BRECQ reconstruction of the remaining blocks (temporal layers frozen for TFMQ/freeze)."""
    return _run_stage("recon_blocks", "reconstruct_blocks", setting, calib_dir, previous)


@pipeline_task
def calibrate_activations(setting: Setting, calib_dir: str, previous: str) -> str:
    """Stage 3: activation ranges (FSC per timestep for TFMQ; shared/learned ranges for the baselines)."""
    return _run_stage("calibrate_activations", "calibrate_activations", setting, calib_dir, previous)
