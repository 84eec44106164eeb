"""Quantization tasks: the three stages of a method's recipe, one checkpoint after each.

TFMQ-DM runs TIAR on the Temporal Information Block (docs/method.md section 4), then BRECQ on the remaining
blocks with the temporal layers frozen (section 6), then Finite Set Calibration of the activation
ranges (section 5); the baselines run their own recipe through the same three stages (a stage the
recipe lacks is a recorded no-op). Each task loads the FP model plus the previous stage's
checkpoint, calls ONE ``tfmq`` stage function and saves a checkpoint, so any stage can be re-run
alone and an interrupted stage never leaves a half-written checkpoint (``tfmq.save`` is atomic). BRECQ
files each finished unit (TIAR, every BRECQ unit, every FSC timestep) under ``quant/<model>/.<name>.partial/``; a
re-run after a crash (also by ``dvc repro``, which deletes ``quant/<model>/<name>/`` first) continues from
there. The flow deletes it once the setting's model (for ``run``: its metrics) is written.
The tasks take the run's ``tasks.setting.Setting`` (its ``QuantConfig``, built once, and its paths).

Shared weight stages (``quant_out.shared_weights``, docs/method.md section 12): stages 1 and 2 are
weight-only, so a setting whose weight identity, FP model, calibration set and code match an earlier
one's (``tfmq.quant.share.weight_key``) adopts that setting's two checkpoints (``adopt_weights``)
instead of recomputing them; the first one computes them and files them (``publish_weights``). In
the same way a setting whose stages 1-3 equal an earlier one's up to its recipe's correction adopts
that setting's finished model and runs only its correction (``adopt_activations``: PTQD on
Q-Diffusion's model); every setting without a correction files its model (``publish_activations``).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

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


def _record(quant_dir: Path, stage: str, seconds: float, stats: dict[str, Any], shared: dict | None = None) -> None:
    """Merge this stage's wall time and stats into ``stage_times.json`` (atomic rewrite); ``shared``: where
    adopted weights came from and what computing them took there."""
    from tfmq.io import atomic_write_json

    path = quant_dir / "stage_times.json"
    doc = json.loads(path.read_text()) if path.is_file() else {}
    doc[stage] = {"wall_s": round(seconds, 3), "stats": json.loads(json.dumps(stats, default=str))}
    if shared is not None:
        doc[stage]["shared"] = shared
    atomic_write_json(doc, path)


def progress_dir(setting: Setting, stage: str | None = None) -> Path:
    """``quant/<model>/.<name>.partial/[<stage output>/]``: where the stages keep their finished units
    (TIAR, BRECQ units, FSC timesteps, step-size units) until the setting is done. It sits beside the
    setting's directory, not in it, because ``dvc repro`` deletes a stage's outputs before it runs the
    command: a killed stage re-run by DVC finds its finished units there."""
    q = Path(setting.quant_dir)
    root = q.parent / f".{q.name}.partial"
    return root if stage is None else root / STAGE_FILES[stage]


def drop_progress(setting: Setting) -> None:
    """Delete the setting's progress, once what it leads to (the quantized model, or the evaluated
    setting for ``run``) is safely written."""
    shutil.rmtree(progress_dir(setting), ignore_errors=True)


def _run_stage(stage: str, fn_name: str, setting: Setting, calib_dir: str, previous: str | None) -> str:
    import tfmq
    from tfmq.diffusion.calibration import CalibrationSet

    qdir = Path(setting.quant_dir)
    unet = _load_stage_input(setting, previous)
    calib = CalibrationSet(calib_dir)
    times: dict[str, float] = {}
    memory = {}
    if stage != "recon_tib":  # the unit caches (TIAR has none); a killed run's spill files go first
        spill = progress_dir(setting) / "spill"
        shutil.rmtree(spill, ignore_errors=True)
        spill.mkdir(parents=True)
        memory = {"memory_budget_mb": setting.memory_budget_mb, "spill_dir": spill}
    try:
        with timed(times, stage), timed(COMPUTE_TIMES, stage):
            stats = getattr(tfmq, fn_name)(unet, calib, setting.config, device=device(), progress=show_progress(),
                                           resume_dir=progress_dir(setting, stage), **memory)
    finally:
        if memory:
            shutil.rmtree(memory["spill_dir"], ignore_errors=True)
    out = qdir / STAGE_FILES[stage]
    tfmq.save(unet, out, extra_metadata={"pipeline_stage": stage})  # temp dir + one rename
    _record(qdir, stage, times[stage], stats)
    logger().info("%s %s: %.1f s -> %s", stage, setting.name, times[stage], out)
    return str(out)


def _fresh_record(setting: Setting) -> None:
    Path(setting.quant_dir).mkdir(parents=True, exist_ok=True)
    stale = Path(setting.quant_dir) / "stage_times.json"
    if stale.exists():
        stale.unlink()  # a fresh run of stage 1 starts a fresh record


@pipeline_task
def recon_tib(setting: Setting, calib_dir: str) -> str:
    """Stage 1: TIAR on the Temporal Information Block (or the method's treatment of the temporal layers)."""
    _fresh_record(setting)
    return _run_stage("recon_tib", "reconstruct_temporal", setting, calib_dir, None)


WEIGHT_STAGE_TASKS = ("recon_tib", "recon_blocks")


def store_root(shared_weights: str) -> Path:
    """``quant_out.shared_weights`` as a path; a relative one is under the main repo root (also from a
    ``dvc exp`` temp copy, so experiments share the main workspace's entries)."""
    from tasks.tracking import main_repo_root

    p = Path(shared_weights)
    return p if p.is_absolute() else main_repo_root() / p


@contextlib.contextmanager
def shared_weight_slot(setting: Setting, calib_dir: str, shared_weights: str, upto: str = "blocks") -> Iterator[dict[str, Any]]:
    """Hold the store lock of this setting's key; yields ``{"key", "store", "entry", "desc"}`` (``entry``:
    the stored record, or ``None`` when this setting must compute and publish them). ``upto``: ``blocks``
    (the weight stages) or ``activations`` (stages 1-3 before the recipe's correction)."""
    from tfmq.quant.share import WeightStore, weight_key

    t0 = time.perf_counter()
    key, desc = weight_key(setting.config, setting.fp_dir, calib_dir, device(), upto=upto)
    store = WeightStore(store_root(shared_weights))
    what = "weight stages" if upto == "blocks" else "stages 1-3"
    with store.lock(key):
        entry = store.get(key, ("tib", "blocks") if upto == "blocks" else (ACT_PART,))
        logger().info("%s of %s: key %s, %s (%.2f s to hash the inputs)", what, setting.name, key,
                      f"shared from {entry['computed_by']}" if entry else "computed here", time.perf_counter() - t0)
        yield {"key": key, "store": str(store.root), "entry": entry, "desc": desc}


#: the name of the finished (pre-correction) model in an activation entry of the store
ACT_PART = "model"


def publishes_activations(setting: Setting) -> bool:
    """True when this setting's final checkpoint is its stages 1-3 as such (its recipe has no correction),
    so another setting may adopt it (``adopt_activations``)."""
    from tfmq.quant.recipes import get_recipe
    from tfmq.quant.steps import resolve_step

    return resolve_step("correction", get_recipe(setting.config.method), setting.config) == "none"


@pipeline_task
def adopt_activations(setting: Setting, calib_dir: str, entry: dict[str, Any], key: str) -> str:
    """Stage 3 from the store: another setting's finished model with this setting's config, then only this
    setting's correction (``tfmq.adopt_activations``; PTQD on Q-Diffusion's model)."""
    import tfmq
    from tfmq.diffusion.calibration import CalibrationSet
    from tfmq.diffusion.models import load_fp_model

    qdir = Path(setting.quant_dir)
    t0 = time.perf_counter()
    unet, _ = load_fp_model(setting.fp_dir, device())
    with timed(COMPUTE_TIMES, "calibrate_activations"):
        stats = tfmq.adopt_activations(Path(entry["path"]) / ACT_PART, unet, CalibrationSet(calib_dir), setting.config,
                                       device=device(), progress=show_progress())
    out = qdir / STAGE_FILES["calibrate_activations"]
    tfmq.save(unet, out, extra_metadata={"pipeline_stage": "calibrate_activations",
                                         "activations_shared_from": entry["computed_by"], "activations_key": key})
    seconds = time.perf_counter() - t0
    _record(qdir, "calibrate_activations", seconds, stats,
            shared={"from": entry["computed_by"], "key": key,
                    "computed_wall_s": round(entry["wall_s"]["calibrate_activations"] + stats["correction_s"], 3)})
    logger().info("stages 1-3 of %s adopted from %s (key %s); correction %.1f s", setting.name, entry["computed_by"],
                  key, stats["correction_s"])
    return str(out)


@pipeline_task
def publish_activations(setting: Setting, key: str, store: str, desc: dict[str, Any]) -> str:
    """File this setting's final checkpoint (stages 1-3, no correction) under ``key`` (one rename)."""
    from tfmq.quant.share import WeightStore

    qdir = Path(setting.quant_dir)
    times = json.loads((qdir / "stage_times.json").read_text())
    record = {"computed_by": f"{setting.model}/{setting.name}", "key": key, "inputs": desc,
              "wall_s": {"calibrate_activations": times["calibrate_activations"]["wall_s"]}}
    return str(WeightStore(store).put(key, {ACT_PART: qdir / STAGE_FILES["calibrate_activations"]}, record))


@pipeline_task
def adopt_weights(setting: Setting, entry: dict[str, Any], key: str) -> str:
    """Stages 1-2 from the store: each checkpoint loaded with this setting's config and saved as its own."""
    import tfmq
    from tfmq.diffusion.models import load_fp_model

    _fresh_record(setting)
    qdir = Path(setting.quant_dir)
    out = ""
    for stage in WEIGHT_STAGE_TASKS:
        t0 = time.perf_counter()
        unet, _ = load_fp_model(setting.fp_dir, device())
        unet = tfmq.load(Path(entry["path"]) / STAGE_FILES[stage], unet, device=device(), config=setting.config)
        out = str(qdir / STAGE_FILES[stage])
        tfmq.save(unet, out, extra_metadata={"pipeline_stage": stage, "weights_shared_from": entry["computed_by"],
                                             "weights_key": key})
        seconds = time.perf_counter() - t0
        stats = dict(tfmq.read_header(out)["stats"].get({"recon_tib": "temporal", "recon_blocks": "blocks"}[stage], {}))
        _record(qdir, stage, seconds, stats, shared={"from": entry["computed_by"], "key": key,
                                                     "computed_wall_s": entry["wall_s"][stage]})
    logger().info("weight stages of %s adopted from %s (key %s)", setting.name, entry["computed_by"], key)
    return out


@pipeline_task
def publish_weights(setting: Setting, key: str, store: str, desc: dict[str, Any]) -> str:
    """File this setting's freshly computed stage 1-2 checkpoints under ``key`` (one rename)."""
    from tfmq.quant.share import WeightStore

    qdir = Path(setting.quant_dir)
    times = json.loads((qdir / "stage_times.json").read_text())
    record = {"computed_by": f"{setting.model}/{setting.name}", "key": key, "inputs": desc,
              "wall_s": {s: times[s]["wall_s"] for s in WEIGHT_STAGE_TASKS}}
    path = WeightStore(store).put(key, {STAGE_FILES[s]: qdir / STAGE_FILES[s] for s in WEIGHT_STAGE_TASKS}, record)
    return str(path)


@pipeline_task
def recon_blocks(setting: Setting, calib_dir: str, previous: str) -> str:
    """Stage 2: BRECQ reconstruction of the remaining blocks (temporal layers frozen for TFMQ/freeze)."""
    return _run_stage("recon_blocks", "reconstruct_blocks", setting, calib_dir, previous)


@pipeline_task
def calibrate_activations(setting: Setting, calib_dir: str, previous: str) -> str:
    """Stage 3: activation ranges (FSC per timestep for TFMQ; shared/learned ranges for the baselines)."""
    return _run_stage("calibrate_activations", "calibrate_activations", setting, calib_dir, previous)
