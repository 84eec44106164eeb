"""Quantization tasks: the three stages of a method's recipe, one checkpoint after each.

TFMQ-DM runs TIAR on the Temporal Information Block (docs/method.md section 4), then BRECQ on the remaining
blocks with the temporal layers frozen (section 6), then Finite Set Calibration of the activation
ranges (section 5); the baselines run their own recipe through the same three stages (a stage the
recipe lacks is a recorded no-op). Each task loads the FP model plus the previous stage's
checkpoint, calls ONE ``tfmq`` stage function and saves a checkpoint, so any stage can be re-run
alone and an interrupted stage never leaves a half-written checkpoint (``tfmq.save`` is atomic).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed

#: checkpoint directory (``tfmq.save``) written by each stage under quant/<setting>/
STAGE_FILES = {"recon_tib": "tib", "recon_blocks": "blocks", "calibrate_activations": "model"}


def quant_config(params: dict[str, Any], method: str, bits: str):
    """The ``tfmq.QuantConfig`` of one setting: the ``quant`` section with method and bits replaced."""
    from tfmq.quant.config import QuantConfig, parse_bits

    w, a = parse_bits(bits)
    return QuantConfig.from_dict(dict(params["quant"], method=method, weight_bits=w, act_bits=a))


def _load_stage_input(params: dict[str, Any], config, previous: str | None):
    """FP model from ``model.fp_dir``; prepared fresh (first stage) or with the previous checkpoint loaded."""
    import tfmq
    from tfmq.diffusion.models import load_fp_model

    dev = device()
    unet, _ = load_fp_model(params["model"]["fp_dir"], dev)
    if previous is None:
        return tfmq.prepare_model(unet, config)
    return tfmq.load(previous, unet, device=dev)


def _record(quant_dir: Path, stage: str, seconds: float, stats: dict[str, Any]) -> None:
    """Merge this stage's wall time and stats into ``stage_times.json`` (atomic rewrite)."""
    from tfmq.io import atomic_write_json

    path = quant_dir / "stage_times.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[stage] = {"wall_s": round(seconds, 3), "stats": json.loads(json.dumps(stats, default=str))}
    atomic_write_json(doc, path)


def _run_stage(stage: str, fn_name: str, params: dict[str, Any], method: str, bits: str, quant_dir: str,
               previous: str | None) -> str:
    import tfmq
    from tfmq.diffusion.calibration import CalibrationSet
    config = quant_config(params, method, bits)
    qdir = Path(quant_dir)
    unet = _load_stage_input(params, config, previous)
    calib = CalibrationSet(params["calib_data"]["out_dir"])
    times: dict[str, float] = {}
    with timed(times, stage), timed(COMPUTE_TIMES, stage):
        stats = getattr(tfmq, fn_name)(unet, calib, config, device=device(), progress=show_progress())
    out = qdir / STAGE_FILES[stage]
    tfmq.save(unet, out, extra_metadata={"pipeline_stage": stage})
    _record(qdir, stage, times[stage], stats)
    logger().info("%s %s-%s: %.1f s -> %s", stage, method, bits, times[stage], out)
    return str(out)


@pipeline_task
def recon_tib(params: dict[str, Any], method: str, bits: str, quant_dir: str) -> str:
    """Stage 1: TIAR on the Temporal Information Block (or the method's treatment of the temporal layers)."""
    Path(quant_dir).mkdir(parents=True, exist_ok=True)
    stale = Path(quant_dir) / "stage_times.json"
    if stale.exists():
        stale.unlink()  # a fresh run of stage 1 starts a fresh record
    return _run_stage("recon_tib", "reconstruct_temporal", params, method, bits, quant_dir, None)


@pipeline_task
def recon_blocks(params: dict[str, Any], method: str, bits: str, quant_dir: str, previous: str) -> str:
    """Stage 2: BRECQ reconstruction of the remaining blocks (temporal layers frozen for TFMQ/freeze)."""
    return _run_stage("recon_blocks", "reconstruct_blocks", params, method, bits, quant_dir, previous)


@pipeline_task
def calibrate_activations(params: dict[str, Any], method: str, bits: str, quant_dir: str, previous: str) -> str:
    """Stage 3: activation ranges (FSC per timestep for TFMQ; shared/learned ranges for the baselines)."""
    return _run_stage("calibrate_activations", "calibrate_activations", params, method, bits, quant_dir, previous)
