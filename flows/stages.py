"""One Prefect flow per DVC stage: what ``dvc repro`` runs, and what the composed flows reuse.

Each flow reads params.yaml, calls its tasks in order and passes file paths between them. With
``plain=True`` (CLI ``--no-prefect``) the same task bodies run as plain functions, with no Prefect
server at all: the library's path for users who want neither DVC nor Prefect.
"""
from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any, Callable

from prefect import flow

from flows.params import load_params, setting_name
from tasks import calibration as calib_tasks
from tasks import classifier as clf_tasks
from tasks import data as data_tasks
from tasks import evaluate as eval_tasks
from tasks import quantize as quant_tasks
from tasks import real as real_tasks
from tasks import report as report_tasks
from tasks import reference as ref_tasks
from tasks import train as train_tasks
from tasks.tracking import log_run

PLAIN = contextvars.ContextVar("tfmq_plain", default=False)


def call(task_, *args: Any, **kwargs: Any) -> Any:
    """Run a task through Prefect (a task run in the UI) or, in plain mode, as its bare function."""
    if PLAIN.get():
        return task_.fn(*args, **kwargs)
    return task_(*args, **kwargs)


def run_flow(flow_, *args: Any, **kwargs: Any) -> Any:
    """Call a flow (or, in plain mode, its bare function) - subflows of composed flows use this too."""
    if PLAIN.get():
        return flow_.fn(*args, **kwargs)
    return flow_(*args, **kwargs)


def setting_dirs(params: dict[str, Any], name: str) -> tuple[str, str]:
    """``(quant/<name>, results/<name>)``: where a setting's checkpoints and results (plots, csv) go."""
    return str(Path(params["quant_out"]["dir"]) / name), str(Path(params["eval"]["out_dir"]) / name)


def metrics_path(params: dict[str, Any], name: str) -> str:
    """``results/metrics/<name>.json``: one DVC metrics file per setting, all in the dir the report reads."""
    return str(Path(params["eval"]["out_dir"]) / "metrics" / f"{name}.json")


@flow(name="prepare-data")
def prepare_data_flow(config: str = "params.yaml") -> str:
    return call(data_tasks.prepare_data, load_params(config))


@flow(name="train-fp")
def train_fp_flow(section: str = "train_fp", config: str = "params.yaml") -> str:
    return call(train_tasks.train_fp, load_params(config), section)


@flow(name="train-classifier")
def train_classifier_flow(config: str = "params.yaml") -> str:
    return call(clf_tasks.train_classifier, load_params(config))


@flow(name="reference-stats")
def reference_stats_flow(config: str = "params.yaml") -> str:
    return call(ref_tasks.reference_stats, load_params(config))


@flow(name="calib-data")
def calib_data_flow(config: str = "params.yaml") -> str:
    return call(calib_tasks.calib_data, load_params(config))


def _run_name(kind: str) -> Callable[[], str]:
    """Flow-run names ``<kind>-<setting>``: ``--name`` when given (``quantize-exp``), else ``<method>-<bits>``."""

    def name() -> str:
        from prefect.runtime import flow_run

        p = flow_run.parameters
        if p.get("name"):
            return f"{kind}-{p['name']}"
        if p.get("method") in ("fp", "real"):
            return f"{kind}-{p['method']}"
        return f"{kind}-{setting_name(p['method'], p['bits'])}"

    return name


@flow(name="quantize", flow_run_name=_run_name("quantize"))
def quantize_flow(method: str, bits: str, config: str = "params.yaml", name: str | None = None) -> str:
    """TIAR -> block reconstruction -> activation calibration; returns the final checkpoint path."""
    params = load_params(config)
    quant_dir, _ = setting_dirs(params, name or setting_name(method, bits))
    tib = call(quant_tasks.recon_tib, params, method, bits, quant_dir)
    blocks = call(quant_tasks.recon_blocks, params, method, bits, quant_dir, tib)
    return call(quant_tasks.calibrate_activations, params, method, bits, quant_dir, blocks)


@flow(name="evaluate", flow_run_name=_run_name("evaluate"))
def evaluate_flow(method: str = "fp", bits: str = "FP32", config: str = "params.yaml", name: str | None = None) -> str:
    """Samples + metrics + temporal analyses of one setting, then MLflow.

    ``method="fp"``: the FP model; ``method="real"``: real images instead of samples (the table's floor).
    """
    params = load_params(config)
    fp, real = method == "fp", method == "real"
    unquantized = fp or real
    name = name or (method if unquantized else setting_name(method, bits))
    quant_dir, results_dir = setting_dirs(params, name)
    checkpoint = None if unquantized else str(Path(quant_dir) / quant_tasks.STAGE_FILES["calibrate_activations"])
    if real:
        scores = call(real_tasks.score_real, params, results_dir)
    else:
        scores = call(eval_tasks.sample_and_score, params, checkpoint, results_dir)
    temporal = {} if unquantized else call(eval_tasks.temporal_analysis, params, checkpoint, results_dir)
    row_method, row_bits = ("real", "data") if real else (None, None) if fp else (method, bits)
    out = call(eval_tasks.write_metrics, params, name, row_method, row_bits, None if unquantized else quant_dir,
               metrics_path(params, name), scores, temporal)
    run_params = None if unquantized else quant_tasks.quant_config(params, method, bits).to_dict()
    call(log_run, params, name, row_method, row_bits, out, results_dir, run_params)
    return out


@flow(name="report")
def report_flow(config: str = "params.yaml") -> str:
    return call(report_tasks.report, load_params(config))
