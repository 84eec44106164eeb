"""params.yaml validation, the settings built from it, the results table and the deployments.

Fast tests: no torch work, no Prefect server (the end-to-end flows are in test_pipeline_e2e.py).
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.params import ParamsError, load_params
from pipeline_fixtures import REPO, subprocess_env

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _write(tmp_path: Path, d: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def test_committed_params_validate():
    params = load_params(REPO / "params.yaml")
    assert params.grid.methods == ["naive", "freeze", "ptq4dm", "qdiffusion", "ptqd", "tfmq"]
    assert params.grid.bits == ["W8A8", "W4A8"]
    assert params.grid.models == ["fashion_ldm", "fashion_ldm_class", "fashion_sd"]  # the paper's three families; pixel: full profile
    assert params.model.fp_dir == "models/fashion_ldm" and params.sampler.guidance_scale == 3.0
    assert params.studies.model == "fashion_ldm" and {"brecq-W4A8", "tfmq-notiar-W4A8", "qdiffusion-eq-W4A8",
                                                      "ptqd-eq-W4A8"} <= set(params.studies.settings)
    assert not any("W4A6" in s for s in params.studies.settings)  # activation stress: scripts/studies.py stress
    assert params.quant == PARAMS["quant"]  # the quant section exactly as written (QuantConfig is built from it)
    assert params.train_fp.betas == (0.9, 0.999) and params.eval.inception_weights is None


def test_quick_profile_differs_only_where_marked():
    """params-quick.yaml validates and differs from params.yaml in exactly the keys marked `# quick`."""
    quick_text = (REPO / "params-quick.yaml").read_text()
    quick = yaml.safe_load(quick_text)
    load_params(REPO / "params-quick.yaml")

    def leaves(d, prefix=""):  # studies.settings is one value: the quick profile runs fewer named studies
        out = {}
        for k, v in d.items():
            deeper = isinstance(v, dict) and v and f"{prefix}{k}" != "studies.settings"
            out.update(leaves(v, f"{prefix}{k}.") if deeper else {f"{prefix}{k}": v})
        return out

    a, b = leaves(PARAMS), leaves(quick)
    assert set(a) == set(b)
    changed = {k for k in a if a[k] != b[k]}
    marked = [ln for ln in quick_text.splitlines() if ln.rstrip().endswith("# quick")]
    assert len(changed) == len(marked) == 14, changed
    assert {"eval.out_dir", "quant_out.dir", "calib_data.dir", "report.path"} <= changed  # never the DVC outputs
    assert quick["grid"]["models"] == PARAMS["grid"]["models"]  # every family, fewer settings


def test_every_library_hyperparameter_is_in_params_yaml():
    """No hidden defaults: every QuantConfig / TrainConfig field is written out in params.yaml."""
    from tfmq.quant.config import QuantConfig
    from tfmq.diffusion.training import TrainConfig

    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} - {"version"}

    q = PARAMS["quant"]
    assert fields(QuantConfig) == set(q)
    for name in ("recon", "tiar_recon", "act_recon", "calib"):
        nested = type(getattr(QuantConfig(), name))
        assert fields(nested) == set(q[name]), name
    for sec in ("train_fp", "train_fp_class"):
        assert fields(TrainConfig) | {"out_dir"} == set(PARAMS[sec]), sec


@pytest.mark.parametrize(
    "path, bad_key, value",
    [
        (("eval",), "num_sample", 256),                   # typo in a pipeline section
        ((), "evals", {}),                                # typo of a whole section
        (("quant", "recon"), "iter", 10),                 # typo inside a library config
        (("train_fp",), "learning_rate", 0.1),            # typo in a dataclass-backed section
        (("quant",), "weight_bit", 4),
    ],
)
def test_unknown_key_is_named(tmp_path, path, bad_key, value):
    d = copy.deepcopy(PARAMS)
    node = d
    for k in path:
        node = node[k]
    node[bad_key] = value
    with pytest.raises(ParamsError) as e:
        load_params(_write(tmp_path, d))
    msg = str(e.value)
    assert bad_key in msg and "allowed" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "path, value, expect",
    [
        (("eval", "num_samples"), "many", "eval.num_samples"),
        (("sampler", "name"), "euler", "sampler.name"),
        (("train_fp", "steps"), 1.5, "train_fp.steps"),
        (("quant", "recon", "iters"), "10", "quant.recon.iters"),
        (("quant", "method"), "gptq", "method"),
        (("grid", "bits"), ["W4A8", "W4"], "grid.bits"),
        (("data", "check_counts"), "yes", "data.check_counts"),
        (("scale_out", "shards"), 0, "scale_out.shards=0: expected an integer >= 1"),
        (("eval", "num_samples"), -1, "eval.num_samples=-1: expected an integer >= 2"),
        (("eval", "batch_size"), 0, "eval.batch_size=0: expected an integer >= 1"),
        (("quant", "recon", "iters"), -5, "quant.recon.iters=-5: expected an integer >= 0"),
        (("quant_out", "memory_budget_mb"), -1, "quant_out.memory_budget_mb=-1.0: expected a number of MiB >= 0"),
        (("scale_out", "workers"), 0, "scale_out.workers=0"),
        (("scale_out", "address"), "localhost", "scale_out.address='localhost': expected a Dask scheduler address"),
        (("studies", "settings", "brecq-W4A8", "method"), "gptq", "studies.settings.brecq-W4A8.method"),
        (("studies", "settings", "brecq-W4A8", "bits"), "W4", "studies.settings.brecq-W4A8.bits"),
        (("studies", "settings", "tfmq-nofsc-W4A8", "quant"), {"fsc_scope": "half"}, "studies.settings.tfmq-nofsc-W4A8.quant"),
        (("studies", "settings", "tfmq-nofsc-W4A8", "quant"), {"act_bits": 4}, "studies.settings.tfmq-nofsc-W4A8.quant sets act_bits"),
        (("studies", "settings", "tfmq-W4A8"), {"method": "tfmq", "bits": "W4A8", "quant": {}},
         "studies.settings.tfmq-W4A8: fashion_ldm/tfmq-W4A8 is already a grid setting"),
    ],
)
def test_mistyped_value_is_named(tmp_path, path, value, expect):
    d = copy.deepcopy(PARAMS)
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ParamsError, match=expect.replace(".", r"\.")) as e:
        load_params(_write(tmp_path, d))
    msg = str(e.value)
    assert "\n" not in msg and "expected" in msg and f"fix" in msg and str(tmp_path) in msg, msg


def test_missing_key_is_named(tmp_path):
    d = copy.deepcopy(PARAMS)
    del d["eval"]["seed"]
    with pytest.raises(ParamsError, match=r"missing key 'eval\.seed'"):
        load_params(_write(tmp_path, d))


def test_cli_bad_params_one_line_nonzero_exit(tmp_path):
    d = copy.deepcopy(PARAMS)
    d["eval"]["num_sample"] = 1
    cfg = _write(tmp_path, d)
    r = subprocess.run([sys.executable, "-m", "flows.cli", "quantize", "--config", str(cfg), "--method", "tfmq",
                        "--bits", "W4A8"], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "eval.num_sample" in lines[0] and "allowed keys" in lines[0]
    assert "num_samples" in lines[0]  # the allowed keys are listed


@pytest.mark.parametrize("text, expect", [("quant: [\n", "is not valid YAML"), (None, "not found; pass --config")])
def test_cli_params_file_broken_or_missing_one_line_exit_2(tmp_path, text, expect):
    cfg = tmp_path / "params.yaml"
    if text is not None:
        cfg.write_text(text)
    r = subprocess.run([sys.executable, "-m", "flows.cli", "quantize", "--config", str(cfg)], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and expect in lines[0] and str(cfg) in lines[0], r.stderr


def test_cli_unknown_method_refused_before_any_flow_run():
    r = subprocess.run([sys.executable, "-m", "flows.cli", "quantize", "--method", "tfmqq", "--bits", "W4A8"],
                       cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr  # no Prefect server started, no flow run left pending
    assert "'tfmqq'" in lines[0] and "naive" in lines[0] and "qdiffusion" in lines[0]


# --- report + deployments -----------------------------------------------------------------------

def _metrics(fid: float, extractor: str = "efficientnet-lite0-112") -> dict:
    return {"fid": fid, "fid_ci_low": fid - 1, "fid_ci_high": fid + 1, "sfid": 2 * fid, "kid_mean": 0.01,
            "kid_std": 0.001, "is_mean": 5.0, "is_std": 0.1, "extractor": extractor,
            "extractor_label": "efficientnet-lite0 @112px", "sfid_label": "sFID-proxy", "is_label": "domain IS",
            "num_samples": 16, "temporal_cos_mean": 0.99, "quant_time_total_s": 12.0}


def test_report_tables(tmp_path):
    """Table 1 (unconditional, FID/sFID per model), table 2a (class-conditional, IS/FID/sFID), per-model tables;
    every cell is its metrics file's number; the latent model's autoencoder floor is a row of its own."""
    from pipeline_fixtures import table_rows
    from tasks.report import build_table

    from flows.params import Grid

    grid = Grid(models=["pix", "ldmc"], methods=["naive", "tfmq"], bits=["W4A8"])
    m = tmp_path / "metrics"
    (m / "pix").mkdir(parents=True)
    (m / "ldmc").mkdir()
    (m / "pix" / "fp.json").write_text(json.dumps({**_metrics(10.0), "family": "pixel", "conditioning": "none"}))
    (m / "pix" / "tfmq-W4A8.json").write_text(json.dumps({**_metrics(12.5), "family": "pixel", "conditioning": "none"}))
    floor = {**_metrics(3.0), "psnr_db": 23.91}
    (m / "ldmc" / "fp.json").write_text(json.dumps({**_metrics(30.0), "family": "latent-class", "conditioning": "class",
                                                    "guidance_scale": 3.0, "autoencoder_floor": floor}))
    (m / "ldmc" / "naive-W4A8.json").write_text(json.dumps({**_metrics(40.0), "family": "latent-class",
                                                            "conditioning": "class", "guidance_scale": 3.0,
                                                            "psnr_vs_fp": 31.5, "psnr_vs_fp_ci_low": 31.0,
                                                            "psnr_vs_fp_ci_high": 32.0, "fid_vs_fp": 12.25}))
    text, rows = build_table(str(tmp_path), grid)
    t1 = table_rows(text, "## Table 1")
    assert [r[0] for r in t1] == ["real images", "FP", "naive", "tfmq"]  # no autoencoder row: pix is pixel
    assert t1[0][2:] == ["not run", "not run"] and t1[1][2:] == ["10.00 [9.0, 11.0]", "20.00"]
    assert t1[2][2:] == ["not run", "not run"] and t1[3][2:] == ["12.50 [11.5, 13.5]", "25.00"]
    t2 = table_rows(text, "## Table 2a")
    assert "guidance scale 3.0" in next(ln for ln in text.splitlines() if ln.startswith("## Table 2a"))
    assert [r[0] for r in t2] == ["real images", "autoencoder recon.", "FP", "naive", "tfmq"]
    assert t2[1][2:] == ["5.00 ± 0.10", "3.00 [2.0, 4.0]", "6.00"] and t2[3][2:] == ["5.00 ± 0.10", "40.00 [39.0, 41.0]", "80.00"]
    assert t2[4][2:] == ["not run"] * 3
    detail = table_rows(text, "## ldmc")
    assert detail[0][0] == "autoencoder recon. (PSNR 23.91 dB)" and detail[0][6:] == ["-", "-", "-", "-"]
    assert detail[2][6:] == [f"{(1 - 0.99) * 1e4:.1f}", "12", "31.50 [31.00, 32.00]", "12.25"]  # paired vs FP
    assert {(r["model"], r["method"]) for r in rows} == {("pix", "FP"), ("pix", "tfmq"), ("ldmc", "autoencoder recon."),
                                                         ("ldmc", "FP"), ("ldmc", "naive")}
    assert "LPIPS" not in text  # no eval.lpips_backbone: no column
    naive = json.loads((m / "ldmc" / "naive-W4A8.json").read_text())
    (m / "ldmc" / "naive-W4A8.json").write_text(json.dumps({**naive, "lpips_vs_fp": 0.0125, "lpips_vs_fp_ci_low": 0.011,
                                                            "lpips_vs_fp_ci_high": 0.014}))
    text, _ = build_table(str(tmp_path), grid)
    assert "| FID vs FP | LPIPS vs FP |" in text
    detail = table_rows(text, "## ldmc")
    assert detail[2][-1] == "0.0125 [0.0110, 0.0140]" and detail[1][-1] == "-"  # FP has no pairing

    (m / "real.json").write_text(json.dumps(_metrics(7.25)))  # the real-data floor row, shared by every model
    text, _ = build_table(str(tmp_path), grid)
    assert table_rows(text, "## Table 1")[0][2:] == ["7.25 [6.2, 8.2]", "14.50"]
    real = table_rows(text, "## pix")[0]
    assert real[0] == "real images" and real[6:] == ["-", "-", "-", "-"]  # no temporal error, quant time, pairing

    (m / "pix" / "naive-W4A8.json").write_text(json.dumps(_metrics(20.0, extractor="inception-v3-compat-sfid")))
    with pytest.raises(ValueError, match="cannot share a table"):
        build_table(str(tmp_path), grid)


def test_serve_builds_cron_deployment(tmp_path):
    from flows.serve import build_deployments

    repro, grid = build_deployments(cron="*/30 * * * *", config=str(REPO / "params.yaml"), repo=str(REPO))
    assert repro.name == "nightly" and grid.name == "grid"
    assert [s.schedule.cron for s in repro.schedules] == ["*/30 * * * *"]
    assert grid.parameters["config"] == str(REPO / "params.yaml")


def test_mlflow_store_is_absolute_and_survives_dvc_temp_dirs(monkeypatch, tmp_path):
    from tasks.tracking import main_repo_root, tracking_uri

    exp_copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    exp_copy.mkdir(parents=True)
    assert main_repo_root(exp_copy) == tmp_path / "repo"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(exp_copy)
    section = load_params(REPO / "params.yaml").mlflow
    assert tracking_uri(section) == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking_uri(section) == "sqlite:////elsewhere/x.db"


# --- the Setting: one object per row, built once from the validated params ----------------------

def test_setting_carries_the_config_the_stages_used_to_build():
    """Same QuantConfig as the quant section with method/bits replaced (the default run's numbers stay put)."""
    from tfmq import QuantConfig
    from tasks.setting import grid_settings, quantized_setting, study_setting, unquantized_setting

    params = load_params(REPO / "params.yaml")
    s = quantized_setting(params, "qdiffusion", "W4A32", model="fashion_ddpm")
    assert s.config == QuantConfig.from_dict(dict(PARAMS["quant"], method="qdiffusion", weight_bits=4, act_bits=None))
    assert (s.name, s.method, s.bits) == ("qdiffusion-W4A32", "qdiffusion", "W4A32")
    assert (s.quant_dir, s.results_dir, s.metrics_path, s.checkpoint, s.fp_dir, s.calib_dir, s.model) == (
        "quant/fashion_ddpm/qdiffusion-W4A32", "results/fashion_ddpm/qdiffusion-W4A32",
        "results/metrics/fashion_ddpm/qdiffusion-W4A32.json", "quant/fashion_ddpm/qdiffusion-W4A32/model",
        "models/fashion_ddpm", "calib/fashion_ddpm", "fashion_ddpm")
    assert s.config.recon.iters == PARAMS["quant"]["recon"]["iters"] == 300 and s.config.calib.every_k == 2
    exp = quantized_setting(params, name="exp")  # the *_exp stages: the quant section as written
    assert exp.config == QuantConfig.from_dict(PARAMS["quant"]) and exp.bits == "W4A8"
    assert exp.quant_dir == "quant/fashion_ldm/exp"
    assert quantized_setting(params, "tfmq", "w4a64").name == "tfmq-W4A32"  # one canonical name, tfmq's
    ldm = quantized_setting(params, "tfmq", "W4A8", model="fashion_ldm_class")
    assert (ldm.fp_dir, ldm.calib_dir, ldm.quant_dir, ldm.metrics_path) == (
        "models/fashion_ldm_class", "calib/fashion_ldm_class", "quant/fashion_ldm_class/tfmq-W4A8",
        "results/metrics/fashion_ldm_class/tfmq-W4A8.json")
    grid = grid_settings(params)
    n = len(params.grid.methods)
    assert [(g.model, g.name) for g in grid[: n + 1]] == [("fashion_ldm", f"{m}-W8A8") for m in params.grid.methods] + [
        ("fashion_ldm", f"{params.grid.methods[0]}-W4A8")]
    assert len(grid) == 6 * n and [g.model for g in grid[2 * n::2 * n]] == ["fashion_ldm_class", "fashion_sd"]
    study = study_setting(params, "tfmq-notiar-W4A8")
    assert (study.model, study.name, study.method, study.bits, study.config.tiar, study.config.fsc) == (
        "fashion_ldm", "tfmq-notiar-W4A8", "tfmq", "W4A8", False, True)
    assert study.quant_dir == "quant/fashion_ldm/tfmq-notiar-W4A8"
    assert study.paired_path == "results/paired/fashion_ldm/tfmq-notiar-W4A8.safetensors"
    assert study.fp_paired_path == "results/paired/fashion_ldm/fp.safetensors"
    eq = study_setting(params, "qdiffusion-eq-W4A8").config
    assert (eq.policy, eq.attention_matmul, eq.split_shortcut, eq.recon) == ("tfmq", False, False, s.config.recon)
    with pytest.raises(ValueError, match="--study='nope': expected one of studies.settings"):
        study_setting(params, "nope")
    fp, real = unquantized_setting(params, "fp"), unquantized_setting(params, "real")
    assert (fp.method, fp.bits, fp.config, fp.checkpoint) == ("fp", "W32A32", None, None)
    assert unquantized_setting(params, "fp", model="fashion_ldm").metrics_path == "results/metrics/fashion_ldm/fp.json"
    assert (real.method, real.bits, real.metrics_path) == ("real", "data", "results/metrics/real.json")
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="--name='../x'"):
        quantized_setting(params, name="../x")


def test_claim_decisions_are_holm_corrected_and_need_replication(tmp_path):
    """Each claim comparison is judged on the deciding metric, Holm over the whole family, and demoted to marginal
    when a seed of the seed study does not repeat it; |z| ~2.2 of one test among many stays marginal."""
    import json

    from tasks.claims import Replication, _decide, _outcomes
    from tfmq.evaluation.verdicts import claim_status, two_sided_p

    def comp(a, b, diff, se, model="m"):
        z = diff / se
        return {"model": model, "a": a, "b": b, "domain_fd": {
            "diff": diff, "se": se, "p": two_sided_p(z), "ci": [diff - 1.96 * se, diff + 1.96 * se],
            "lower_is_better": True, "method": "synthetic"}}

    big = comp("qdiffusion-W4A8", "tfmq-W4A8", 10.0, 1.0)  # z 10: TFMQ (b) much better
    small = comp("ptq4dm-eq-W4A8", "tfmq-W4A8", -2.2, 1.0)  # z -2.2: the other side, p 0.028 uncorrected
    flat = comp("ptqd-eq-W4A8", "tfmq-W4A8", 0.3, 1.0)
    brecq = comp("brecq-W4A8", "freeze-W4A8", 6.0, 1.0)  # z 6 for Freeze, but seed 1 does not repeat it
    fillers = [comp(f"x{i}-W4A8", "tfmq-W4A8", 0.1, 1.0) for i in range(36)]  # a family of 40 tests
    seeds = {"comparisons": [{"a": "brecq-W4A8-s1", "b": "freeze-W4A8-s1", "domain_fd": {"diff": 1.0, "ci": [-0.5, 2.5]}},
                             {"a": "qdiffusion-W4A8-s1", "b": "tfmq-W4A8-s1", "domain_fd": {"diff": 9.0, "ci": [7.0, 11.0]}}]}
    (tmp_path / "replicate.json").write_text(json.dumps(seeds))
    by_claim = {"b": [brecq], "d": [big, small, flat, *fillers]}
    _decide(lambda model: "domain_fd", 0.05, by_claim, Replication(tmp_path / "replicate.json"), "m")
    assert big["decision"]["family"] == 40 and big["decision"]["level"] == "firm" and big["decision"]["replicated"]
    assert big["decision"]["holm_p"] == pytest.approx(min(1.0, 40 * two_sided_p(10.0)), rel=1e-9)
    assert small["decision"]["level"] == "marginal" and not small["decision"]["favours_claim"]
    assert small["decision"]["holm_p"] == 1.0  # 0.028 x (40 - its rank) > 1
    assert flat["decision"]["level"] == "none"
    assert brecq["decision"]["replicated"] is False and brecq["decision"]["level"] == "marginal"
    assert brecq["decision"]["holm_ci"][0] > 0  # the corrected interval still excludes 0: the seed study demotes it
    assert claim_status(_outcomes([big])) == "reproduced"
    assert claim_status(_outcomes([small, flat])) == "marginal (against, max |z| 2.2)"
    assert claim_status(_outcomes([brecq])) == "marginal (for, max |z| 6.0)"
    # a model outside the seed study: Holm-significant is "unreplicated"
    other = comp("qdiffusion-W8A8", "tfmq-W8A8", 10.0, 1.0, model="other")
    _decide(lambda model: "domain_fd", 0.05, {"d": [other]}, Replication(tmp_path / "none.json"), "m")
    assert other["decision"]["level"] == "unreplicated" and other["decision"]["replicated"] is None
    assert claim_status(_outcomes([other])) == "reproduced at one seed (not replicated)"