"""One Prefect flow per DVC stage: what ``dvc repro`` runs, and what the composed flows reuse.

Each flow takes the validated :class:`~flows.params.Params` (loaded once by the CLI or by
``compare``) and, for a setting's stages, its :class:`~tasks.setting.Setting`; it hands each task
that setting plus the params section the task reads, and passes file paths between tasks. With
``--no-prefect`` (``PLAIN``) the same task bodies run as plain functions, with no Prefect server at
all: the library's path for users who want neither DVC nor Prefect.
"""
from __future__ import annotations

import contextvars
from pathlib import Path
from typing import Any, Callable

from prefect import flow

from flows.checks import image_shape, real_row_model, reference_file, reference_targets
from flows.params import Params
from tasks.claims import Rules, domain_data
from tasks.setting import Setting
from tasks import autoencoder as ae_tasks
from tasks import calibration as calib_tasks
from tasks import classifier as clf_tasks
from tasks import data as data_tasks
from tasks import evaluate as eval_tasks
from tasks import quantize as quant_tasks
from tasks import real as real_tasks
from tasks import report as report_tasks
from tasks import reference as ref_tasks
from tasks import train as train_tasks
from tasks import vae as vae_tasks
from tasks.tracking import log_run

PLAIN = contextvars.ContextVar("tfmq_plain", default=False)
#: the flows take objects, already validated at the edge; Prefect only records them (as JSON)
_OBJECTS = dict(validate_parameters=False)


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


@flow(name="prepare-data", **_OBJECTS)
def prepare_data_flow(params: Params) -> str:
    return call(data_tasks.prepare_data, params.data)


@flow(name="train-fp", **_OBJECTS)
def train_fp_flow(params: Params, section: str = "train_fp") -> str:
    if section == "train_sd":  # the text-guided UNet on the VAE's latents -> a StableDiffusionPipeline folder
        return call(train_tasks.train_text, params.train_sd, params.data.path, params.vae.out_dir,
                    params.sampler.guidance_scale)
    if section.startswith("train_ldm"):  # a latent UNet on the autoencoder's latents -> an LDMPipeline folder
        return call(train_tasks.train_latent, getattr(params, section), params.data.path, section,
                    params.autoencoder.out_dir, params.sampler.guidance_scale)
    return call(train_tasks.train_fp, getattr(params, section), params.data.path, section)


@flow(name="train-autoencoder", **_OBJECTS)
def train_autoencoder_flow(params: Params) -> str:
    return call(ae_tasks.train_autoencoder, params.autoencoder, params.data.path)


@flow(name="train-vae", **_OBJECTS)
def train_vae_flow(params: Params) -> str:
    return call(vae_tasks.train_vae, params.vae, params.data.path)


@flow(name="train-classifier", **_OBJECTS)
def train_classifier_flow(params: Params) -> str:
    return call(clf_tasks.train_classifier, params.classifier, params.data.path)


@flow(name="reference-stats", **_OBJECTS)
def reference_stats_flow(params: Params) -> list[str]:
    return call(ref_tasks.reference_stats, params.reference, params.eval, params.data.path, reference_targets(params))


@flow(name="calib-data", **_OBJECTS)
def calib_data_flow(params: Params, model: str | None = None) -> str:
    """Record the FP trajectories of ``<model.root>/<model>`` (default ``model.name``) into ``<calib_data.dir>/<model>``."""
    model = model or params.model.name
    fp_dir, out_dir = str(Path(params.model.root) / model), str(Path(params.calib_data.dir) / model)
    so = params.scale_out
    if not so.sharded:
        return call(calib_tasks.calib_data, params.calib_data, params.sampler, fp_dir, out_dir)
    import shutil

    from flows.sharded import calib_shards

    scratch = Path(so.scratch) / "calib" / model
    shutil.rmtree(scratch, ignore_errors=True)
    paths = calib_shards(calib_tasks.calib_job(params.calib_data, params.sampler, fp_dir), so.shards, str(scratch),
                         so.address, so.workers, so.threads, plain=PLAIN.get())
    out = call(calib_tasks.merge_calib_shards, paths, out_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def _run_name(kind: str) -> Callable[[], str]:
    """Flow-run names ``<kind>-<model>-<setting name>``: ``quantize-fashion_ldm-tfmq-W4A8``, ``evaluate-real``."""

    def name() -> str:
        from prefect.runtime import flow_run

        s = flow_run.parameters["setting"]
        model, sname = (s.get("model"), s["name"]) if isinstance(s, dict) else (s.model, s.name)
        return f"{kind}-{model}-{sname}" if model else f"{kind}-{sname}"

    return name


@flow(name="quantize", flow_run_name=_run_name("quantize"), **_OBJECTS)
def quantize_flow(setting: Setting, params: Params, keep_progress: bool = False) -> str:
    """TIAR -> block reconstruction -> activation calibration; returns the final checkpoint path.

    With ``quant_out.shared_weights`` set, stages 1-2 are adopted from the weight store when another
    setting of the same weight key computed them, else computed here and filed there; likewise stage 3
    up to the recipe's correction (PTQD adopts Q-Diffusion's finished model and runs only its correction). The stages'
    finished units are kept (``tasks.quantize.progress_dir``) until the final checkpoint is written, or
    with ``keep_progress`` until the caller drops them.
    """
    calib = setting.calib_dir
    if not params.quant_out.shared_weights:
        tib = call(quant_tasks.recon_tib, setting, calib)
        blocks = call(quant_tasks.recon_blocks, setting, calib, tib)
    else:
        with quant_tasks.shared_weight_slot(setting, calib, params.quant_out.shared_weights) as slot:
            if slot["entry"] is not None:
                blocks = call(quant_tasks.adopt_weights, setting, slot["entry"], slot["key"])
            else:
                tib = call(quant_tasks.recon_tib, setting, calib)
                blocks = call(quant_tasks.recon_blocks, setting, calib, tib)
                call(quant_tasks.publish_weights, setting, slot["key"], slot["store"], slot["desc"])
    if not params.quant_out.shared_weights:
        out = call(quant_tasks.calibrate_activations, setting, calib, blocks)
    else:
        with quant_tasks.shared_weight_slot(setting, calib, params.quant_out.shared_weights, upto="activations") as slot:
            if slot["entry"] is not None:
                out = call(quant_tasks.adopt_activations, setting, calib, slot["entry"], slot["key"])
            else:
                out = call(quant_tasks.calibrate_activations, setting, calib, blocks)
                if quant_tasks.publishes_activations(setting):
                    call(quant_tasks.publish_activations, setting, slot["key"], slot["store"], slot["desc"])
    if not keep_progress:
        quant_tasks.drop_progress(setting)
    return out


@flow(name="evaluate", flow_run_name=_run_name("evaluate"), **_OBJECTS)
def evaluate_flow(setting: Setting, params: Params) -> str:
    """Samples (or, for the real-data row, real images) + metrics + temporal analyses of one setting, then MLflow."""
    clf = params.classifier.path
    if setting.kind == "real":
        model = real_row_model(params)
        scores = call(real_tasks.score_real, params.reference, params.eval, params.data.path,
                      reference_file(params, model), clf, setting.results_dir, image_shape(params, model))
    else:
        scores = _sample_and_score(setting, params, reference_file(params, setting.model), clf)
    floor = None
    if setting.kind == "fp" and (scores.get("family") or {}).get("space") == "latent":
        floor = call(real_tasks.score_reconstructions, setting, params.reference, params.eval, params.data.path,
                     reference_file(params, setting.model), clf,
                     image_shape(params, setting.model, idx_as_is=False))  # the autoencoder's floor of every latent row
    temporal = call(eval_tasks.temporal_analysis, setting, params.eval, params.sampler) if setting.quantized else {}
    out = call(eval_tasks.write_metrics, setting, params.eval, params.sampler, scores, temporal, floor)
    call(log_run, setting, params.mlflow, params.model_dump(exclude={"quant"}))
    return out


def _sample_and_score(setting: Setting, params: Params, ref: str, clf: str) -> dict[str, Any]:
    """A setting's samples and scores: in this process, or as ``scale_out.shards`` Dask tasks (the same numbers)."""
    import shutil
    from pathlib import Path

    so = params.scale_out
    scratch = Path(so.scratch) / "eval" / setting.model / setting.name
    if not so.sharded:
        return call(eval_tasks.sample_and_score, setting, params.eval, params.sampler, ref, clf, str(scratch))
    from flows.sharded import sample_shards

    shutil.rmtree(scratch, ignore_errors=True)
    job = eval_tasks.eval_job(setting, params.eval, params.sampler, clf)
    paths = sample_shards(job, so.shards, str(scratch), so.address, so.workers, so.threads, plain=PLAIN.get())
    scores = call(eval_tasks.score_shards, setting, params.eval, params.sampler, ref, clf, paths)
    shutil.rmtree(scratch, ignore_errors=True)
    return scores


@flow(name="report", **_OBJECTS)
def report_flow(params: Params) -> str:
    models = list(dict.fromkeys([*params.grid.models, params.studies.model]))
    references = {m: reference_file(params, m) for m in models}
    rp, q = params.report, params.quant
    rules = Rules(rp.metric, rp.fallback_metric, rp.alpha, rp.num_bootstrap, params.eval.seed,
                  f"BRECQ {q.get('recon', {}).get('iters', '?')} iterations, TIAR "
                  f"{q.get('tiar_recon', {}).get('iters', '?')}, {params.eval.num_samples} samples",
                  rp.beside_bootstrap, int(q.get("recon", {}).get("iters", 0)), int(q.get("act_recon", {}).get("iters", 0)))
    domain = {m: domain_data(params.reference, params.eval, params.data.path, params.classifier.path,
                             str(Path(params.model.root) / m)) for m in models}
    return call(report_tasks.report, params.eval.out_dir, params.grid, params.report.path, params.studies,
                references, rules, domain)
