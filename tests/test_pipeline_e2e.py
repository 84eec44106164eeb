"""End to end on the micro config: the Prefect flows, MLflow records, and a real ``dvc repro``.

One Prefect test server for the module (``prefect_test_harness``); the DVC stage processes report
to the same server through PREFECT_API_URL, exactly as they do under the served deployment.
"""
from __future__ import annotations

import json
import re
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline_fixtures import make_workspace, micro_params, subprocess_env, table_rows, write_idx_dataset

GRID = (["naive", "tfmq"], ["W4A8"])


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect server + DB for this module; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_idx_dataset(tmp_path_factory.mktemp("idx"))


@pytest.fixture(scope="module")
def compared(prefect_api, data_root, tmp_path_factory):
    """Run the ``compare`` flow on the micro grid in-process; returns the workspace."""
    import os

    ws = tmp_path_factory.mktemp("ws")
    params = micro_params(data_root, f"sqlite:///{ws / 'mlflow.db'}", *GRID, models=list(MODELS))
    make_workspace(ws, params)
    import torch

    old, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(ws)
    torch.set_num_threads(1)  # micro tensors: 1 thread is as fast, and robust when other jobs share the cores
    try:
        from flows.pipeline import compare

        table = compare(config="params.yaml")
    finally:
        os.chdir(old)
        torch.set_num_threads(threads)
    return ws, table


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


MODELS = ("fashion_ddpm", "fashion_ldm", "fashion_ldm_class", "fashion_sd")  # pixel, latent, class-conditional latent
# (CFG), text-guided latent (a StableDiffusionPipeline folder, CFG against the "" prompt)


def _metrics(ws: Path, model: str, name: str) -> dict:
    path = ws / "results" / "metrics" / (f"{name}.json" if name == "real" else f"{model}/{name}.json")
    return json.loads(path.read_text())


def test_compare_flow_writes_every_output(compared):
    ws, table_path = compared
    assert table_path == "results/results.md"
    real = _metrics(ws, "", "real")
    assert real["method"] == "real" and "temporal_cos_mean" not in real
    for model in MODELS:
        for name in ("fp", "naive-W4A8", "tfmq-W4A8"):
            m = _metrics(ws, model, name)
            for key in ("fid", "sfid", "kid_mean", "is_mean"):
                assert _finite(m[key]), (model, name, key, m[key])
            assert m["extractor"].startswith("efficientnet-lite0") and m["num_samples"] == 16
            assert m["model"] == model and (ws / "results" / model / name / "plots" / "samples.png").is_file()
            assert m["fid"] >= 0 and m["kid_std"] >= 0 and m["is_mean"] >= 1.0  # IS >= 1 by definition
            assert m["fid"] > real["fid"]  # real images are the floor: a 2-step micro model is far from them
            if name != "fp":
                # quantization moves the temporal features, but not to noise: strictly below 1, well above 0
                assert 0.5 < m["temporal_cos_mean"] < 1.0 - 1e-6, m["temporal_cos_mean"]
                assert m["quant_time_total_s"] == pytest.approx(sum(m[f"quant_time_{s}_s"] for s in
                                                                    ("recon_tib", "recon_blocks", "calibrate_activations")), abs=2e-3)
                times = json.loads((ws / "quant" / model / name / "stage_times.json").read_text())
                assert set(times) == {"recon_tib", "recon_blocks", "calibrate_activations"}
                for ckpt in ("tib", "blocks", "model"):
                    assert (ws / "quant" / model / name / ckpt).is_dir()
                assert (ws / "results" / model / name / "temporal.csv").read_text().startswith("timestep")
    # the family is read from each folder; the latent rows carry their FP autoencoder and its floor
    fams = {model: _metrics(ws, model, "tfmq-W4A8") for model in MODELS}
    assert [(f["family"], f["guidance_scale"]) for f in fams.values()] == [("pixel", 1.0), ("latent", 1.0),
                                                                          ("latent-class", 3.0), ("latent-text", 3.0)]
    assert fams["fashion_ddpm"]["autoencoder"] is None and "never quantized" in fams["fashion_ldm"]["autoencoder"]
    for model in ("fashion_ldm", "fashion_ldm_class", "fashion_sd"):
        floor = _metrics(ws, model, "fp")["autoencoder_floor"]
        assert _finite(floor["fid"]) and floor["num_samples"] == 16 and 0 < floor["psnr_db"] < 60
        assert floor["psnr_ci_low"] < floor["psnr_db"] < floor["psnr_ci_high"]
        assert (ws / "results" / model / "fp" / "plots" / "reconstructions.png").is_file()
    assert "autoencoder_floor" not in _metrics(ws, "fashion_ddpm", "fp")
    assert 0 <= _metrics(ws, "fashion_ldm_class", "tfmq-W4A8")["class_accuracy"] <= 1
    # CFG calibration: (null, conditional) rows of every guided call, null class = the 11th embedding
    meta = json.loads((ws / "calib" / "fashion_ldm_class" / "meta.json").read_text())
    assert (meta["cfg"], meta["null_class_label"], meta["guidance_scale"], meta["rows_per_step"]) == (True, 10, 3.0, 16)
    assert json.loads((ws / "calib" / "fashion_ldm" / "meta.json").read_text())["cfg"] is False
    # text-guided: the calibration prompts against "", the evaluation prompts' classes scored by the domain classifier
    meta = json.loads((ws / "calib" / "fashion_sd" / "meta.json").read_text())
    assert (meta["cfg"], meta["conditioning"], meta["guidance_scale"], meta["rows_per_step"]) == (True, "text", 3.0, 16)
    for name in ("fp", "tfmq-W4A8"):
        m = _metrics(ws, "fashion_sd", name)
        assert m["prompt_accuracy_n"] == 16 and 0 <= m["prompt_accuracy"] <= 1
        assert m["prompt_accuracy_label"] == "prompt accuracy (domain classifier)" and m["clip_score"] is None
        assert "eval.clip_model is null" in m["clip_score_note"] and "class_accuracy" not in m
    table = (ws / "results" / "results.md").read_text()
    rows = table_rows(table, "## Table 2b: text-guided generation (FID / sFID / prompt acc. (domain classifier)")
    assert [r[:2] for r in rows] == [["real images", "-"], ["autoencoder recon.", "FP"], ["FP", "W32A32"],
                                     ["naive", "W4A8"], ["tfmq", "W4A8"]]
    fp = _metrics(ws, "fashion_sd", "fp")
    assert rows[2][4] == f"{fp['prompt_accuracy']:.3f}" and rows[0][4] == "n/a"



def test_paired_metrics_studies_and_claims(compared):
    """Every quantized row is compared image by image with the FP samples of the same noise; the study row ran with
    its override; the report has the poster's tables and the claims, with their data in claims.json."""
    import numpy as np
    from safetensors.torch import load_file

    from tfmq.evaluation.paired import per_sample_vs_reference

    ws, table_path = compared
    for model in MODELS:
        fp = load_file(str(ws / "results" / "paired" / model / "fp.safetensors"))
        assert fp["images"].dtype == torch.uint8 and tuple(fp["images"].shape) == (16, 1, 28, 28)
        assert fp["features"].shape[0] == 16 and "psnr" not in fp
        for name in ("naive-W4A8", "tfmq-W4A8"):
            m = _metrics(ws, model, name)
            q = load_file(str(ws / "results" / "paired" / model / f"{name}.safetensors"))
            assert q["features"].shape == fp["features"].shape and q["psnr"].shape == (16,)
            again = per_sample_vs_reference(fp["images"], q["images"], fp["features"], q["features"])
            for key in ("psnr", "ssim", "mse", "feat_dist"):  # the stored per-sample values are these images'
                np.testing.assert_allclose(q[key].numpy(), again[key], rtol=1e-12)
                assert m[f"{key}_vs_fp"] == pytest.approx(float(again[key].mean()), rel=1e-12)
                assert m[f"{key}_vs_fp_ci_low"] <= m[f"{key}_vs_fp"] <= m[f"{key}_vs_fp_ci_high"]
            assert -1.0 <= m["ssim_vs_fp"] < 1.0 and m["fid_vs_fp"] > 0 and m["psnr_vs_fp"] > 0
            assert m["delta_all_timestep_mean_abs"] >= 0 and 0 <= m["mismatched_fraction_all"] <= 1
    study = _metrics(ws, "fashion_ldm", "tfmq-nofsc-W4A8")
    header = json.loads((ws / "quant" / "fashion_ldm" / "tfmq-nofsc-W4A8" / "model" / "quant_config.json").read_text())
    assert (study["method"], study["bits"], header["config"]["fsc"], header["fsc_scope"]) == ("tfmq", "W4A8", False, None)
    # the study's weight stages are the grid's tfmq-W4A8 ones (FSC only acts on activations): adopted, not recomputed
    assert study["weights_shared_from"] == "fashion_ldm/tfmq-W4A8" and study["quant_time_saved_s"] > 0
    assert study["quant_time_unshared_s"] == pytest.approx(study["quant_time_total_s"] + study["quant_time_saved_s"])
    times = json.loads((ws / "quant" / "fashion_ldm" / "tfmq-nofsc-W4A8" / "stage_times.json").read_text())
    assert times["recon_blocks"]["shared"]["from"] == "fashion_ldm/tfmq-W4A8"
    assert _metrics(ws, "fashion_ldm", "tfmq-W4A8")["weights_shared_from"] is None
    own, borrowed = (load_file(str(ws / "quant" / "fashion_ldm" / n / "blocks" / "quantized.safetensors"))
                     for n in ("tfmq-W4A8", "tfmq-nofsc-W4A8"))
    assert set(own) == set(borrowed) and all(torch.equal(own[k], borrowed[k]) for k in own)
    table = (ws / table_path).read_text()
    assert "## Claims of the poster" in table and "## Poster table: ablation, W4A8 (fashion_ldm)" in table
    abl = {r[0]: r for r in table_rows(table, "## Poster table: ablation")}
    row = abl["w/o FSC (TIAR only) (`tfmq-nofsc-W4A8`)"]
    assert row[1] == f"{study['fid']:.2f}" and row[4].count("[") == 1  # a paired FID difference with its interval
    claims = json.loads((ws / "results" / "claims.json").read_text())
    assert [c["claim"].split(" ")[0] for c in claims["claims"]] == ["(a)", "(b)", "(c)", "(d1)", "(d2)", "(e)"]
    allowed = re.compile(r"(reproduced|refuted|partly reproduced|partly refuted)( at one seed \(not replicated\))?$"
                         r"|mixed$|inconclusive|not run$|marginal \((for|against|both ways), max \|z\| \d+\.\d\)$")
    assert all(allowed.match(c["status"]) for c in claims["claims"]), [c["status"] for c in claims["claims"]]
    assert claims["rules"]["metric"] == "domain_fd" and "Deciding metric: **domain FD**" in table
    decided = [c for cs in claims["comparisons"].values() for c in cs if "decision" in c]
    assert decided and all(c["decision"]["metric"] == "domain_fd" and 0 <= c["decision"]["holm_p"] <= 1 for c in decided)
    assert all(c["decision"]["holm_p"] >= c["domain_fd"]["p"] for c in decided)  # Holm never lowers a p-value
    (c_abl,) = [c for c in claims["comparisons"]["ablation"] if c["a"] == "tfmq-nofsc-W4A8"]
    assert c_abl["n"] == 16 and c_abl["fid"]["ci"][0] <= c_abl["fid"]["diff"] <= c_abl["fid"]["ci"][1]
    assert c_abl["fid"]["diff"] == pytest.approx(study["fid"] - _metrics(ws, "fashion_ldm", "tfmq-W4A8")["fid"], rel=1e-6)


def test_report_numbers_are_the_metrics_files(compared):
    """Each table cell is its metrics JSON's number, formatted: a report that mixed rows up would fail here."""
    ws, table_path = compared
    table = (ws / table_path).read_text()
    for model in MODELS:
        rows = {r[0].split(" (PSNR")[0]: r for r in table_rows(table, f"## {model} ")}
        expect = [("real images", "real"), ("FP", "fp"), ("naive", "naive-W4A8"), ("tfmq", "tfmq-W4A8")]
        if model != "fashion_ddpm":
            expect.append(("autoencoder recon.", "floor"))
        if model == "fashion_ldm":  # studies.model: its named studies follow the grid
            expect.append(("study tfmq-nofsc-W4A8", "tfmq-nofsc-W4A8"))
        assert set(rows) == {label for label, _ in expect}
        for label, name in expect:
            m = _metrics(ws, model, "fp")["autoencoder_floor"] if name == "floor" else _metrics(ws, model, name)
            cells = rows[label]
            assert cells[2] == f"{m['fid']:.2f} [{m['fid_ci_low']:.1f}, {m['fid_ci_high']:.1f}]", (label, cells)
            assert cells[3] == f"{m['sfid']:.2f}"
            assert cells[4] == f"{m['kid_mean'] * 1e3:.2f} ± {m['kid_std'] * 1e3:.2f}"
            assert cells[5] == f"{m['is_mean']:.2f} ± {m['is_std']:.2f}"
            if name not in ("fp", "real", "floor"):
                assert cells[6] == f"{(1 - m['temporal_cos_mean']) * 1e4:.1f}" and float(cells[6]) > 0
                shared = " (shared)" if m.get("weights_shared_from") else ""  # stages 1-2 adopted: counted where they ran
                assert cells[7] == f"{m.get('quant_time_unshared_s', m['quant_time_total_s']):.0f}{shared}"
                assert cells[8] == f"{m['psnr_vs_fp']:.2f} [{m['psnr_vs_fp_ci_low']:.2f}, {m['psnr_vs_fp_ci_high']:.2f}]"
                assert cells[9] == f"{m['fid_vs_fp']:.2f}"
    t1, t2 = table_rows(table, "## Table 1"), table_rows(table, "## Table 2a")
    tf = _metrics(ws, "fashion_ldm", "tfmq-W4A8")
    assert next(r for r in t1 if r[0] == "tfmq")[4:6] == [f"{tf['fid']:.2f} [{tf['fid_ci_low']:.1f}, {tf['fid_ci_high']:.1f}]",
                                                        f"{tf['sfid']:.2f}"]  # the fashion_ldm column group
    tc = _metrics(ws, "fashion_ldm_class", "tfmq-W4A8")
    assert next(r for r in t2 if r[0] == "tfmq")[2] == f"{tc['is_mean']:.2f} ± {tc['is_std']:.2f}"
    assert len(t1[0]) == 2 + 2 * 2 and len(t2[0]) == 2 + 3


def test_cli_without_prefect(compared):
    """``--no-prefect``: the same task bodies as plain functions (no server), e.g. re-writing the table."""
    ws, _ = compared
    (ws / "results" / "results.md").unlink()
    r = subprocess.run([sys.executable, "-m", "flows.cli", "report", "--no-prefect", "--config", "params.yaml"],
                       cwd=ws, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| tfmq | W4A8 |" in r.stdout and (ws / "results" / "results.md").is_file()


def test_flow_and_task_runs_recorded(compared, prefect_api):
    import asyncio

    from prefect.client.orchestration import get_client

    async def runs():
        async with get_client() as client:
            return await client.read_flow_runs(), await client.read_task_runs()

    flow_runs, task_runs = asyncio.run(runs())
    names = {r.name for r in flow_runs}
    assert {"fashion_ddpm-naive-W4A8", "fashion_ldm_class-tfmq-W4A8", "quantize-fashion_ddpm-tfmq-W4A8",
            "evaluate-fashion_ldm-tfmq-W4A8", "evaluate-fashion_ldm-fp", "evaluate-real"} <= names
    assert all(r.state.is_completed() for r in flow_runs if r.name in names)
    task_names = {r.name.rsplit("-", 1)[0] for r in task_runs}
    assert {"recon_tib", "recon_blocks", "calibrate_activations", "sample_and_score", "log_run"} <= task_names


def test_mlflow_run_per_setting(compared):
    import mlflow

    ws, _ = compared
    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["micro"], output_format="list")
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"real", "fashion_ldm/tfmq-nofsc-W4A8"} | {f"{m}/{n}" for m in MODELS
                                                                    for n in ("fp", "naive-W4A8", "tfmq-W4A8")}
    assert by_name["real"].data.tags["method"] == "real" and "temporal_cos_mean" not in by_name["real"].data.metrics
    r = by_name["fashion_ddpm/tfmq-W4A8"]
    assert by_name["fashion_ldm_class/tfmq-W4A8"].data.tags["family"] == "latent-class"
    assert by_name["fashion_ldm/fp"].data.metrics["autoencoder_floor.psnr_db"] > 0
    for name, run in by_name.items():  # every numeric value of the metrics JSON, as logged
        m = _metrics(ws, *name.split("/")) if "/" in name else _metrics(ws, "", name)
        numeric = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        assert {"fid", "sfid", "kid_mean", "is_mean"} <= set(numeric)
        for key, value in numeric.items():
            assert run.data.metrics[key] == pytest.approx(value, rel=1e-9), (name, key)
    assert r.data.metrics["temporal_cos_mean"] < 1.0
    assert r.data.tags["method"] == "tfmq" and r.data.tags["bits"] == "W4A8"
    assert r.data.tags["extractor"].startswith("efficientnet-lite0") and r.data.tags["git_commit"]
    assert r.data.params["quant.method"] == "tfmq" and r.data.params["quant.weight_bits"] == "4"
    micro = yaml.safe_load((ws / "params.yaml").read_text())["quant"]  # the section, with the grid's method/bits
    assert r.data.params["quant.recon.iters"] == str(micro["recon"]["iters"]) == "2"
    assert r.data.params["quant.act_bits"] == "8" and r.data.params["quant.fsc_scope"] == micro["fsc_scope"]
    assert r.data.params["sampler.num_inference_steps"] == "4"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id, "plots")}
    assert "plots/samples.png" in artifacts
    history = mlflow.MlflowClient().get_metric_history(r.info.run_id, "per_t.temporal_cos")
    assert len(history) == 4  # one point per sampler timestep
    import csv

    with open(ws / "results" / "fashion_ddpm" / "tfmq-W4A8" / "temporal.csv") as f:
        curve = {int(float(row["timestep"])): float(row["temporal_cos"]) for row in csv.DictReader(f)}
    assert {h.step: h.value for h in history} == pytest.approx(curve)


def test_cli_run_one_setting(compared):
    """``tfmq run``: quantize + evaluate one more setting (plain mode) next to the compared grid."""
    ws, _ = compared
    r = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--no-prefect", "--model", "fashion_ldm_class",
                        "--method", "naive", "--bits", "W8A8"], cwd=ws, env=subprocess_env(TFMQ_TORCH_THREADS="1"), capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "results/metrics/fashion_ldm_class/naive-W8A8.json"
    m = _metrics(ws, "fashion_ldm_class", "naive-W8A8")
    assert (m["setting"], m["method"], m["bits"], m["family"]) == ("naive-W8A8", "naive", "W8A8", "latent-class")
    assert 0.5 < m["temporal_cos_mean"] < 1.0 and m["fid"] >= 0
    header = json.loads((ws / "quant" / "fashion_ldm_class" / "naive-W8A8" / "model" / "quant_config.json").read_text())
    assert (header["method"], header["weight_bits"], header["act_bits"]) == ("naive", 8, 8)
    assert header["config"]["recon"]["iters"] == 2  # the micro params' value reached the library


def _offline() -> list[str]:
    """``unshare -n`` (a network namespace with only a downed loopback) where this user may create one, else []."""
    import shutil

    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-n"]
    return []


def test_shared_weights_leave_the_metrics_unchanged(compared):
    """The study that adopted tfmq-W4A8's weight stages, run again computing its own (shared_weights: null, other
    output dirs): the same metrics to the last digit, only the timings differ. The rerun has no network (where
    ``unshare -n`` is allowed, as for root here): quantization and evaluation need none."""
    import shutil

    ws, _ = compared
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["quant_out"].update(dir="quant-unshared", shared_weights=None)
    params["eval"]["out_dir"] = "results-unshared"
    (ws / "params-unshared.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fp_paired = ws / "results-unshared" / "paired" / "fashion_ldm" / "fp.safetensors"
    fp_paired.parent.mkdir(parents=True)
    shutil.copy(ws / "results" / "paired" / "fashion_ldm" / "fp.safetensors", fp_paired)
    offline = _offline()
    if offline:  # the namespace really has no route out
        probe = subprocess.run([*offline, sys.executable, "-c", "import socket; s = socket.socket(); s.settimeout(3); "
                                "print(s.connect_ex(('1.1.1.1', 80)))"], capture_output=True, text=True, timeout=60)
        assert probe.stdout.strip() not in ("", "0"), probe
    r = subprocess.run([*offline, sys.executable, "-m", "flows.cli", "run", "--no-prefect", "--config",
                        "params-unshared.yaml", "--study", "tfmq-nofsc-W4A8"], cwd=ws,
                       env=subprocess_env(TFMQ_TORCH_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    shared = _metrics(ws, "fashion_ldm", "tfmq-nofsc-W4A8")
    own = json.loads((ws / "results-unshared" / "metrics" / "fashion_ldm" / "tfmq-nofsc-W4A8.json").read_text())
    assert own["weights_shared_from"] is None and own["quant_time_saved_s"] == 0
    timing = {k for k in own if "time" in k} | {"weights_shared_from"}
    assert len(own) > 40 and {k: v for k, v in own.items() if k not in timing} == {
        k: v for k, v in shared.items() if k not in timing}


def _dvc(ws: Path, env: dict, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ws, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"dvc {' '.join(args)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def _git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, capture_output=True, text=True, check=True).stdout


def test_dvc_repro_micro_pipeline(prefect_api, data_root, tmp_path):
    ws = tmp_path / "repo"
    params = micro_params(data_root, f"sqlite:///{tmp_path / 'mlflow.db'}", ["tfmq"], ["W4A8"],
                          models=["fashion_ddpm", "fashion_ldm"])
    params["mlflow"]["experiment"] = "micro-dvc"
    make_workspace(ws, params)
    env = subprocess_env(PREFECT_API_URL=prefect_api, PREFECT_HOME=str(tmp_path / ".prefect"), TFMQ_TORCH_THREADS="1")
    _git(ws, "init", "-q")
    _git(ws, "config", "user.email", "ci@example.com")
    _git(ws, "config", "user.name", "ci")
    _dvc(ws, env, "init", "-q")
    _dvc(ws, env, "config", "core.analytics", "false")
    (ws / ".gitignore").write_text("__pycache__/\n*.pyc\n")
    _git(ws, "add", "-A")
    _git(ws, "commit", "-qm", "micro pipeline")

    # train_fp_class is not upstream of the report; everything else runs for real, through `tfmq repro`
    # (the flow the nightly deployment runs), which runs `dvc repro` as a Prefect task.
    r = subprocess.run([sys.executable, "-m", "flows.cli", "repro", "report"], cwd=ws, env=env, capture_output=True,
                       text=True, timeout=1800)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    assert "Running stage 'run@fashion_ldm-tfmq-W4A8'" in r.stdout + r.stderr
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert {"prepare_data", "train_fp", "train_autoencoder", "train_ldm", "calib_data@fashion_ddpm",
            "calib_data@fashion_ldm", "run@fashion_ddpm-tfmq-W4A8", "run@fashion_ldm-tfmq-W4A8",
            "evaluate_fp@fashion_ldm", "evaluate_real", "run_exp", "report", "train_classifier",
            "run_study@tfmq-nofsc-W4A8"} <= set(lock)
    assert lock["run_study@tfmq-nofsc-W4A8"]["params"]["params.yaml"]["studies.settings.tfmq-nofsc-W4A8"]["quant"] == {
        "fsc": False}
    assert "train_ldm_class" not in lock  # not in this grid, so not upstream of the report
    assert lock["run@fashion_ldm-tfmq-W4A8"]["params"]["params.yaml"]["quant.recon"]["iters"] == 2
    from diffusers import LDMPipeline

    assert type(LDMPipeline.from_pretrained(ws / "models" / "fashion_ldm").vqvae).__name__ == "VQModel"
    table = (ws / "results" / "results.md").read_text()
    assert "| tfmq | W4A8 |" in table and "| FP | W32A32 |" in table and "## Table 1" in table
    again = _dvc(ws, env, "repro", "report")
    assert "Running stage" not in again.stdout

    # The dataset snapshot is byte-deterministic: a forced re-run leaves the locked hash as it was.
    data_md5 = lock["prepare_data"]["outs"][0]["md5"]
    _dvc(ws, env, "repro", "-f", "-s", "prepare_data")
    assert yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["prepare_data"]["outs"][0]["md5"] == data_md5

    _git(ws, "add", "-A")
    _git(ws, "commit", "-qm", "micro results")
    # An experiment on the quant section: only the *_exp stages re-run, then metrics diff shows it.
    exp = _dvc(ws, env, "exp", "run", "-S", "quant.weight_bits=4", "-S", "quant.act_bits=8", "run_exp")
    assert "Running stage 'run_exp'" in exp.stdout and "run@" not in exp.stdout
    diff = _dvc(ws, env, "metrics", "diff", "--json")
    changed = json.loads(diff.stdout)
    assert any(path.endswith("exp.json") for path in changed), changed

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["micro-dvc"], output_format="list")
    names = [r.info.run_name for r in runs]
    assert sorted(names) == sorted(["real", "fashion_ddpm/fp", "fashion_ldm/fp", "fashion_ddpm/tfmq-W4A8",
                                    "fashion_ldm/tfmq-W4A8", "fashion_ldm/tfmq-nofsc-W4A8", "fashion_ldm/exp",
                                    "fashion_ldm/exp"]), names
    assert all("fid" in r.data.metrics for r in runs)
    assert {r.data.tags["dvc_stage"] for r in runs} >= {"run@fashion_ldm-tfmq-W4A8", "run_exp",
                                                         "run_study@tfmq-nofsc-W4A8"}


def test_text_row_with_a_local_clip_folder(compared, tmp_path):
    """``eval.clip_model`` set: the text-guided FP row gets a CLIP score from the local folder (a tiny CLIP built
    offline) in [0, 100], and keeps its prompt accuracy; the results go to another ``eval.out_dir``."""
    import yaml
    from test_evaluation import _tiny_clip_dir

    ws, _ = compared
    _tiny_clip_dir(tmp_path / "clip")
    p = yaml.safe_load((ws / "params.yaml").read_text())
    p["eval"].update(clip_model=str(tmp_path / "clip"), out_dir="results-clip")
    (ws / "params-clip.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    r = subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", "--no-prefect", "--fp", "--model", "fashion_sd",
                        "--config", "params-clip.yaml"], cwd=ws, env=subprocess_env(TFMQ_TORCH_THREADS="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((ws / "results-clip" / "metrics" / "fashion_sd" / "fp.json").read_text())
    assert _finite(m["clip_score"]) and 0.0 <= m["clip_score"] <= 100.0 and m["clip_score_note"] is None
    assert "CLIP" in m["clip_score_label"] and 0 <= m["prompt_accuracy"] <= 1 and m["prompt_accuracy_n"] == 16
