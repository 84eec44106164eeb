"""MLflow tracking: one run per evaluated setting with params, metrics, plots and provenance tags.

MLflow is logging only (research/ecosystem.md section 5): DVC owns the DAG and the caching,
MLflow keeps the comparable history. The default store is ONE sqlite file at the main repo root,
addressed by an absolute URI, so ``dvc exp run --temp/--queue`` (which runs stages in a copy of
the repo under ``.dvc/tmp/exps/``) still logs into the same store. ``MLFLOW_TRACKING_URI`` overrides.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

from tasks.common import ORCH_TIMES, logger, pipeline_task, timed
from tasks.setting import Setting

_EXP_TMP = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"


def main_repo_root(start: str | os.PathLike | None = None) -> Path:
    """The repo root, seen through a DVC temp experiment copy (``<root>/.dvc/tmp/exps/<tmp>/``)."""
    here = Path(start or os.getcwd()).resolve()
    s = str(here)
    if _EXP_TMP in s:
        return Path(s.split(_EXP_TMP)[0])
    return here


def tracking_uri(section) -> str:
    """``MLFLOW_TRACKING_URI`` > ``mlflow.tracking_uri`` in params.yaml > ``sqlite:///<repo root>/mlflow.db``."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if section.tracking_uri:
        return section.tracking_uri
    return f"sqlite:///{main_repo_root() / 'mlflow.db'}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: params.yaml keys as DVC writes them (``dvc params diff``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """HEAD's sha, with ``-dirty`` when tracked files differ; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
                             timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=20).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in flatten(metrics).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def _per_timestep(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    import csv

    with open(path, newline="") as f:
        return [row for row in csv.DictReader(f) if "timestep" in row]


@pipeline_task(io=True)
def log_run(setting: Setting, section, pipeline_params: dict[str, Any]) -> str:
    """Log one setting's metrics JSON, plots and provenance to MLflow; return the run id.

    ``section`` is params.yaml's ``mlflow``; ``pipeline_params`` every other section but ``quant``,
    logged as the run's params next to the setting's own resolved ``QuantConfig``.
    """
    with timed(ORCH_TIMES, "mlflow"), _store_lock(tracking_uri(section)):  # import included: part of what MLflow costs a stage
        return _log_run(setting, section, pipeline_params)


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """One writer at a time on a SQLite store (``<db>.lock``): stages run side by side (flows.repro) would
    otherwise meet SQLite's "database is locked" after its 5 s busy timeout. Other stores need none."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock = Path(uri[len("sqlite:///"):].split("?")[0] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _log_run(setting: Setting, section, pipeline_params: dict[str, Any]) -> str:
    import mlflow

    results, metrics_path = Path(setting.results_dir), setting.metrics_path
    metrics = json.loads(Path(metrics_path).read_text())
    mlflow.set_tracking_uri(tracking_uri(section))
    mlflow.set_experiment(section.experiment)
    tags = {
        "git_commit": git_commit(),
        "setting": setting.name,
        "model": setting.model,
        "family": str(metrics.get("family")),
        "method": setting.method,
        "bits": setting.bits,
        "extractor": str(metrics.get("extractor", "unknown")),
        "quantization": "simulated (fake-quant on CPU/GPU; no integer kernels)",
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
    }
    run_params = setting.config.to_dict() if setting.config is not None else {}
    all_params = {**flatten({k: v for k, v in pipeline_params.items() if k != "quant"}),
                  **flatten(run_params, "quant.")}
    run_name = f"{setting.model}/{setting.name}" if setting.model else setting.name
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags(tags)
        # MLflow params are immutable strings of <= 6000 chars; json keeps lists readable.
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in all_params.items()})
        mlflow.log_metrics(_numeric(metrics))
        for row in _per_timestep(results / "temporal.csv"):  # curves over the sampler's timesteps
            step = int(float(row.pop("timestep")))
            mlflow.log_metrics({f"per_t.{k}": float(v) for k, v in row.items() if v not in ("", None)}, step=step)
        mlflow.log_artifact(metrics_path)
        for sub in ("plots",):
            if (results / sub).is_dir():
                mlflow.log_artifacts(str(results / sub), artifact_path=sub)
        for extra in ("temporal.csv",):
            if (results / extra).is_file():
                mlflow.log_artifact(str(results / extra))
        run_id = run.info.run_id
    logger().info("mlflow run %s (%s) in %s", run_id, setting.name, tracking_uri(section))
    return run_id
