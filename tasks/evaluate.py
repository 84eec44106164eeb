"""Evaluation tasks: samples and their FID/sFID/KID/IS, the temporal-disturbance analyses, metrics.json.

Every setting is sampled from the same seeded noise with the same sampler as the calibration
trajectories (FSC tables are keyed by that sampler's timesteps), and scored against the one cached
reference of ``reference_stats``. The temporal analyses (the poster's first section: temporal
feature error, mismatch delta, trajectory deviation, activation ranges per timestep) compare the
quantized UNet with the FP one.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from tasks.common import COMPUTE_TIMES, device, logger, pipeline_task, show_progress, timed
from tasks.setting import Setting
from tfmq.diffusion.conditioning import guidance_kwargs, text_conditioning
from tfmq.diffusion.jobs import SamplerRun
from tfmq.diffusion.models import load_fp_model
from tfmq.diffusion.pipelines import output_shape, read_family
from tfmq.diffusion.sampling import make_scheduler, save_grid
from tfmq.diffusion.text import read_prompts
from tfmq.evaluation.classifier import (
    domain_classifier_for, domain_inception_score_from_logits, load_classifier, predict_logits,
)
from tfmq.evaluation.clip_score import clip_score, unavailable
from tfmq.evaluation.job import PAIRED_ROWS, EvalJob, run_eval_shard
from tfmq.evaluation.metrics import Scores, compute_metrics
from tfmq.evaluation.paired import fid_between, mean_interval
from tfmq.evaluation.reference_stats import ReferenceStats
from tfmq.evaluation.shards import load_shard, merge_shards, scores_from_shards, shard_extra
from tfmq.evaluation.temporal import default_activation_layers, temporal_report
from tfmq.io import atomic_save_safetensors, atomic_write_json, atomic_write_text
from tfmq.quant.checkpoint import load as load_quantized


def load_unet(fp_dir: str, checkpoint: str | None):
    """FP UNet + training scheduler from ``fp_dir``; with a checkpoint, the quantized UNet on top."""
    unet, train_sched = load_fp_model(fp_dir, device())
    if checkpoint is not None:
        unet = load_quantized(checkpoint, unet, device=device())
    return unet, train_sched


def _sampler(sampler, train_sched):
    return make_scheduler(sampler.name, train_sched.config)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def sampler_run(sampler) -> SamplerRun:
    """The library's :class:`SamplerRun` of the ``sampler`` params section."""
    return SamplerRun(sampler.name, sampler.num_inference_steps, sampler.eta, sampler.guidance_scale)


def domain_classifier(setting: Setting, e, classifier: str) -> tuple[str | None, str | None]:
    """The domain classifier of this setting's images (``eval.domain_classifier``; ``classifier``: ``classifier.path``,
    what ``auto`` names) and, where there is none, why (``tfmq.evaluation.classifier.domain_classifier_for``)."""
    return domain_classifier_for(e.domain_classifier, classifier, output_shape(setting.fp_dir))


def eval_job(setting: Setting, e, sampler, classifier: str) -> EvalJob:
    """The library job of this setting's evaluation: what every shard samples, keeps and compares against."""
    fp_paired = None
    if setting.kind == "quantized" and setting.paired_path is not None:
        if Path(setting.fp_paired_path).is_file():
            fp_paired = setting.fp_paired_path
        else:
            logger().warning("paired metrics skipped: no FP samples at %s (run `tfmq evaluate --fp --model %s` first)",
                             setting.fp_paired_path, setting.model)
    return EvalJob(fp_dir=setting.fp_dir, checkpoint=setting.checkpoint, num_samples=e.num_samples, seed=e.seed,
                   batch_size=e.batch_size, sampler=sampler_run(sampler), extractor=e.extractor,
                   inception_weights=e.inception_weights, prompts=e.prompts,
                   domain_classifier=domain_classifier(setting, e, classifier)[0], fp_paired=fp_paired,
                   lpips_backbone=e.lpips_backbone, keep_images=True)


@pipeline_task
def sample_and_score(setting: Setting, e, sampler, reference: str, classifier: str, scratch: str) -> dict[str, Any]:
    """Sample ``eval.num_samples`` images (latents decoded by the FP autoencoder; guided models with classifier-free
    guidance at ``sampler.guidance_scale``), save a grid, compute FID/sFID/KID/IS (and the domain metrics where a
    domain classifier matches the images).

    In this process, as ONE shard of the library's ``run_eval_shard`` (``scratch``: where it is filed, removed after
    the merge): the same code and numbers as a run sharded over Dask (``flows.sharded.sample_shards``, then
    ``score_shards``), whatever the shard count."""
    shutil.rmtree(scratch, ignore_errors=True)
    job = eval_job(setting, e, sampler, classifier)
    with timed(COMPUTE_TIMES, "sample"):
        path = run_eval_shard(job, 0, job.num_samples, scratch, device=device(), progress=show_progress())
    out = _score_shards(setting, e, sampler, reference, classifier, [path])
    shutil.rmtree(scratch, ignore_errors=True)
    return out


@pipeline_task
def score_shards(setting: Setting, e, sampler, reference: str, classifier: str, paths: list[str]) -> dict[str, Any]:
    """Merge the evaluation shards of this setting (``run_eval_shard`` over ``[0, eval.num_samples)``) into its
    scores, grid and paired file: what ``sample_and_score`` returns."""
    return _score_shards(setting, e, sampler, reference, classifier, paths)


def _score_shards(setting: Setting, e, sampler, reference: str, classifier: str, paths: list[str]) -> dict[str, Any]:
    times: dict[str, float] = {}
    for p in paths:  # what the shards spent, summed over them (worker time, not wall time)
        for k, v in shard_extra(p).get("seconds", {}).items():
            times[k] = round(times.get(k, 0.0) + v, 4)
    t0 = time.perf_counter()
    merged = merge_shards(load_shard(p) for p in paths)
    if merged.n != e.num_samples:
        raise ValueError(f"the shards hold samples [0, {merged.n}); expected [0, {e.num_samples}) (eval.num_samples)")
    family = read_family(setting.fp_dir)
    guide = guidance_kwargs(family, sampler.guidance_scale)
    images, labels = merged.rows.pop("images"), merged.rows.pop("class_labels", None)
    named = merged.rows.pop("prompt_labels", None)
    domain_logits = merged.rows.pop("domain_logits", None)
    per = {k: merged.rows.pop(k).numpy() for k in PAIRED_ROWS if k in merged.rows}
    save_grid(images[: e.grid_images].float().div(127.5).sub(1.0), Path(setting.results_dir) / "plots" / "samples.png",
              nrow=8, scale=2)
    clf, why = domain_classifier(setting, e, classifier)
    with timed(times, "metrics"), timed(COMPUTE_TIMES, "metrics"):
        scores = scores_from_shards(merged, ReferenceStats.load(reference), num_bootstrap=e.num_bootstrap,
                                    bootstrap_seed=e.seed, progress=show_progress())
        domain = (None if domain_logits is None else
                  _domain_from_logits(load_classifier(clf, device()), domain_logits, labels, named))
        clip = _clip(setting, e, images, family)
    features = merged.rows[scores["metrics"]["fid"]["feature"]]
    with timed(times, "paired"), timed(COMPUTE_TIMES, "metrics"):
        paired = paired_against_fp(setting, images, features, labels, per, e)
    times["merge_and_score"] = round(time.perf_counter() - t0, 4)
    logger().info("sampled %d images in %d shard(s), %.1f s of sampling, metrics in %.1f s", len(images), len(paths),
                  times.get("sample", 0.0), times["metrics"])
    return _jsonable({"scores": scores, "domain": domain, "clip": clip, "times": times, "family": family.to_json(),
                      "guidance_scale": guide["guidance_scale"], "paired": paired, "shards": len(paths),
                      "absent": absent_metrics(scores, why, family, clip)})


def absent_metrics(scores: dict[str, Any] | None, domain_reason: str | None, family=None,
                   clip: dict[str, Any] | None = None, row_reason: str | None = None) -> dict[str, str]:
    """Every metric this row does not report, with its reason (``metric -> reason``): never computed on the wrong
    data, never silently missing."""
    if row_reason is not None:
        return {k: row_reason for k in ("fid", "sfid", "kid", "is")}
    out = dict((scores or {}).get("absent") or {})
    if domain_reason is not None:
        out["domain_is"] = domain_reason
        if family is not None and family.conditioning == "class":
            out["class_accuracy"] = domain_reason
        if family is not None and family.conditioning == "text":
            out["prompt_accuracy"] = domain_reason
    if clip is not None and not clip.get("available", True):
        out["clip_score"] = clip.get("reason")
    return out


def _clip(setting: Setting, e, images, family) -> dict[str, Any] | None:
    """CLIP score of a text-guided row's samples against their prompts, with the local CLIP of ``eval.clip_model``
    (``None`` for other families; ``available: false`` and the reason when no CLIP folder is named)."""
    if family.conditioning != "text":
        return None
    if e.clip_model is None:
        return unavailable("eval.clip_model is null (offline default): name a local CLIP ViT-B/32 folder for the "
                           "paper's CLIP score")
    prompts = read_prompts(e.prompts)
    return clip_score(images, [prompts[j % len(prompts)] for j in range(images.shape[0])], e.clip_model,
                      batch_size=e.batch_size, device=device(), progress=show_progress())


def paired_against_fp(setting: Setting, images, features, labels, per: dict, e) -> dict[str, Any] | None:
    """Write this row's samples + features (``setting.paired_path``); for a quantized row also its per-sample MSE,
    PSNR, SSIM and feature distance against the FP samples of the same noise (``per``, computed by the shards),
    and return their means with bootstrap intervals and the FID against the FP samples (``None`` without them)."""
    if setting.paired_path is None:
        return None
    tensors = {"images": images.contiguous(), "features": features.contiguous()}
    if labels is not None:
        tensors["class_labels"] = labels.to(torch.int64).cpu().contiguous()
    summary = None
    if setting.kind == "quantized" and per:
        tensors.update({k: torch.from_numpy(v) for k, v in per.items()})
        summary = {f"{k}_vs_fp": mean_interval(v, 1000, e.seed) for k, v in per.items()}
        fp = load_file(str(setting.fp_paired_path))
        summary["fid_vs_fp"] = fid_between(features.double().numpy(), fp["features"].double().numpy())
    atomic_save_safetensors(tensors, setting.paired_path, metadata={"setting": setting.name, "model": setting.model,
                                                                     "seed": str(e.seed)})
    return summary


def score_images(images, labels, e, reference: str, classifier: str | None, times: dict[str, float]):
    """FID/sFID/KID/IS against ``reference`` and the domain IS of ``classifier`` (``None``: none matches these images)
    of images in memory (real images, reconstructions; samples go through ``run_eval_shard``)."""
    with timed(times, "metrics"), timed(COMPUTE_TIMES, "metrics"):
        scores = compute_metrics(images, reference, extractor=e.extractor, weights_path=e.inception_weights,
                                 num_bootstrap=e.num_bootstrap, bootstrap_seed=e.seed, device=device(),
                                 progress=show_progress())
        domain = None
        if classifier is not None:
            model = load_classifier(classifier, device())
            domain = _domain_from_logits(model, predict_logits(model, images, device=device()), labels)
    return scores, domain


def _domain_from_logits(model, logits, labels, prompt_labels=None) -> dict[str, Any]:
    """Domain IS (+ class accuracy of class-conditional samples) from the domain classifier's logits of the images
    (``model``: for its recorded test accuracy); ``prompt_labels``: the class each sample's prompt names (-1: none),
    for the prompt accuracy of text rows."""
    s = domain_inception_score_from_logits(logits)
    out = {"is_mean": s["mean"], "is_std": s["std"], "label": s["label"],
           "classifier_test_accuracy": getattr(model, "test_accuracy", None)}
    if labels is not None:
        out["class_accuracy"] = float((logits.argmax(1) == labels.cpu().long()).float().mean())
    if prompt_labels is not None:
        named = prompt_labels.cpu().long() >= 0
        out["prompt_accuracy_n"] = int(named.sum())
        out["prompt_accuracy"] = (float((logits.argmax(1)[named] == prompt_labels.cpu().long()[named]).float().mean())
                                  if named.any() else None)
    return out


@pipeline_task
def temporal_analysis(setting: Setting, e, sampler) -> dict[str, Any]:
    """FP vs quantized: temporal feature cos per (t, resnet), mismatch delta, trajectory deviation, ranges; plots."""
    results_dir = setting.results_dir
    fp_unet, train_sched = load_unet(setting.fp_dir, None)
    q_unet, _ = load_unet(setting.fp_dir, setting.checkpoint)
    class_label = 0 if getattr(fp_unet.config, "num_class_embeds", None) else None  # one fixed class for every t
    text = text_conditioning(setting.fp_dir, e.prompts, 1)
    unet_kwargs = None if text is None else {"encoder_hidden_states": text["encoder_hidden_states"].to(device())}
    with timed(COMPUTE_TIMES, "temporal"):
        rep = temporal_report(fp_unet, q_unet, _sampler(sampler, train_sched), sampler.num_inference_steps,
                              Path(results_dir) / "plots", num_samples=e.temporal_samples, seed=e.seed,
                              eta=sampler.eta, class_label=class_label,
                              layer_names=default_activation_layers(fp_unet)[: e.activation_layers],
                              unet_kwargs=unet_kwargs, progress=show_progress())
    cos, delta, traj = torch.tensor(rep["cos"]), torch.tensor(rep["delta_step"]), rep["trajectory"]
    delta_all = torch.tensor(rep["delta_all_timestep"])
    rows = [{"timestep": t, "step": k, "temporal_cos": float(cos[k].mean()), "temporal_cos_min": float(cos[k].min()),
             "delta_step_mean_abs": float(delta[k].abs().double().mean()),
             "delta_all_timestep_mean_abs": float(delta_all[k].abs().double().mean()),
             "trajectory_deviation": traj["rmse"][k + 1], "local_error": traj["local_rmse"][k]}
            for k, t in enumerate(rep["timesteps"])]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buf.getvalue(), Path(results_dir) / "temporal.csv")
    return _jsonable({"summary": rep["summary"], "per_timestep": rows})


def score_fields(scored: dict[str, Any]) -> dict[str, Any]:
    """The metric fields of one scored image set (FID with interval, sFID, KID, IS and the domain IS)."""
    sc = Scores.from_result(scored["scores"])
    domain = scored.get("domain") or {}
    m: dict[str, Any] = {
        "extractor": sc.extractor, "extractor_label": sc.extractor_label,
        "fid": sc.fid, "fid_ci_low": sc.fid_ci[0] if sc.fid_ci else None,
        "fid_ci_high": sc.fid_ci[1] if sc.fid_ci else None, "sfid": sc.sfid, "sfid_label": sc.sfid_label,
        "kid_mean": sc.kid_mean, "kid_std": sc.kid_std,
        "is_imagenet_mean": sc.inception_score, "is_imagenet_std": sc.inception_score_std,
    }
    if domain.get("is_mean") is not None:  # offline: the Fashion-MNIST classifier's IS is the meaningful one
        acc = domain.get("classifier_test_accuracy")
        label = domain.get("label", "domain IS") + (f", test acc {acc:.3f}" if acc is not None else "")
        m.update(is_mean=domain["is_mean"], is_std=domain.get("is_std"), is_label=label,
                 classifier_test_accuracy=acc)
        if domain.get("class_accuracy") is not None:
            m["class_accuracy"] = domain["class_accuracy"]
        if "prompt_accuracy" in domain:  # text-guided: the class named in the prompt (never called CLIP score)
            m.update(prompt_accuracy=domain["prompt_accuracy"], prompt_accuracy_n=domain["prompt_accuracy_n"],
                     prompt_accuracy_label="prompt accuracy (domain classifier)")
    else:
        m.update(is_mean=sc.inception_score, is_std=sc.inception_score_std, is_label=sc.is_label)
    clip = scored.get("clip")
    if clip is not None:
        m.update(clip_score=clip.get("value"), clip_score_std=clip.get("std"), clip_score_label=clip.get("label"),
                 clip_score_note=None if clip.get("available") else clip.get("reason"))
    m["num_samples"] = sc.n
    if scored.get("reconstruction"):  # the autoencoder floor: PSNR of the reconstructions
        m.update(scored["reconstruction"])
    return m


@pipeline_task
def write_metrics(setting: Setting, e, sampler, scored: dict[str, Any], temporal: dict[str, Any],
                  floor: dict[str, Any] | None = None) -> str:
    """Merge scores, temporal summary and quantization wall times into one DVC metrics JSON (``setting.metrics_path``);
    ``floor``: a latent FP row's autoencoder reconstruction scores (``autoencoder_floor``)."""
    if scored.get("scores") is None:  # a row whose images cannot exist here (the real row of a stats-only reference)
        m0 = {"setting": setting.name, "method": setting.method, "bits": setting.bits, "model": setting.model,
              "fid": None, "absent": scored.get("absent") or {}}
        atomic_write_json(m0, Path(setting.metrics_path))
        logger().warning("%s: no metrics (%s)", setting.name, next(iter(m0["absent"].values()), "absent"))
        return str(setting.metrics_path)
    sc = scored["scores"]
    family = scored.get("family") or {}
    m: dict[str, Any] = {
        "setting": setting.name, "method": setting.method, "bits": setting.bits, "model": setting.model,
        "family": family.get("name"), "conditioning": family.get("conditioning"),
        "guidance_scale": scored.get("guidance_scale"),
        "autoencoder": (f"{family['autoencoder']}/ (full precision, never quantized)"
                        if family.get("autoencoder") else None),
        **score_fields(scored),
    }
    ref = sc.get("reference") or {}
    m.update({"reference": (f"{ref.get('split')} split, n={ref.get('n')}" if ref.get("split") in ("train", "test")
                            else f"{ref.get('split')}, n={ref.get('n')}"),
        "sampler": sampler.name, "num_inference_steps": sampler.num_inference_steps, "eta": sampler.eta,
        "seed": e.seed,
        "device": device(), "eval_time_sample_s": scored["times"].get("sample"),
        "eval_time_metrics_s": scored["times"].get("metrics"),
        "eval_time_decode_s": scored["times"].get("decode"),
    })
    for key, v in (scored.get("paired") or {}).items():  # per-sample metrics against the FP samples of the same noise
        if isinstance(v, dict):
            m[key], (m[f"{key}_ci_low"], m[f"{key}_ci_high"]) = v["mean"], v["ci"]
        else:
            m[key] = v
    m["absent"] = scored.get("absent") or {}  # metric -> why this row does not report it
    if floor is not None:
        m["autoencoder_floor"] = score_fields(floor) if floor.get("scores") else {"absent": floor.get("absent")}
    if temporal:
        m.update({k: v2 for k, v2 in temporal.get("summary", {}).items()})
    quant_dir = setting.quant_dir
    if quant_dir is not None and (Path(quant_dir) / "stage_times.json").is_file():
        stages = json.loads((Path(quant_dir) / "stage_times.json").read_text())
        for stage, rec in stages.items():
            m[f"quant_time_{stage}_s"] = rec["wall_s"]
        m["quant_time_total_s"] = round(sum(rec["wall_s"] for rec in stages.values()), 3)
        shared = [rec["shared"] for rec in stages.values() if rec.get("shared")]
        m["weights_shared_from"] = shared[0]["from"] if shared else None  # stages 1-2 adopted from that setting
        m["quant_time_saved_s"] = round(sum(s["computed_wall_s"] for s in shared)
                                        - sum(rec["wall_s"] for rec in stages.values() if rec.get("shared")), 3)
        # what quantizing this setting costs with its weight stages counted where they ran (method comparisons)
        m["quant_time_unshared_s"] = round(m["quant_time_total_s"] + m["quant_time_saved_s"], 3)
    out = Path(setting.metrics_path)
    atomic_write_json(m, out)
    logger().info("%s: FID %.2f sFID %.2f KID %.4f IS %.2f -> %s", setting.name, m["fid"] or float("nan"),
                  m["sfid"] or float("nan"), m["kid_mean"] or float("nan"), m["is_mean"] or float("nan"), out)
    return str(out)
