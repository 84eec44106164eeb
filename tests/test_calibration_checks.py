"""Bad calibration data is refused at the CLI edge: one line, exit code 2, before any quantization.

A real set is recorded from the embedded latent model (2 trajectories, the run's DDIM 20 sampler), then
damaged one way per test: NaN / Inf rows, another sampler, step count or eta than params.yaml says, a
set recorded for another model (conditioning, input shape), an unreadable manifest. The good set
passes the same pre-flight check unchanged, so each refusal is caused by the one thing damaged.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from flows.checks import InputError, calib_set
from flows.cli import main
from flows.params import load_params
from pipeline_fixtures import REPO, params_file

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
MODEL = "fashion_ldm"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    from diffusers import UNet2DModel

    from tfmq.diffusion.calibration import capture_calibration_data
    from tfmq.diffusion.sampling import make_scheduler

    torch.set_num_threads(1)
    model = REPO / PARAMS["model"]["root"] / MODEL
    unet = UNet2DModel.from_pretrained(model / "unet").eval()
    s = PARAMS["sampler"]
    out = tmp_path_factory.mktemp("calib") / MODEL
    capture_calibration_data(unet, make_scheduler(s["name"], model / "scheduler"), out, num_samples=2,
                             num_inference_steps=s["num_inference_steps"], batch_size=2, seed=1, eta=s["eta"],
                             progress=False)
    return out


def _setup(tmp_path: Path, recorded: Path, model: str = MODEL, **changes) -> str:
    """Copy the recorded set to ``<tmp>/calib/<model>``; a params file pointing at it (``section__key`` changes)."""
    shutil.copytree(recorded, tmp_path / "calib" / model)
    return params_file(tmp_path, model__root=str(REPO / PARAMS["model"]["root"]),
                       calib_data__dir=str(tmp_path / "calib"), **changes)


def _refused(capsys, cfg: str, model: str = MODEL) -> str:
    code = main(["quantize", "--model", model, "--method", "tfmq", "--bits", "W4A8", "--config", cfg])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("tfmq: error: calib_data.dir=")
    assert "tfmq calib-data --model" in err[0]  # what to do about it
    return err[0]


def _damage(path: Path, step: int, key: str, row: int, value: float) -> None:
    f = path / f"step_{step:04d}.safetensors"
    t = load_file(str(f))
    t[key] = t[key].clone()
    t[key][row].view(-1)[3] = value
    save_file(t, str(f), metadata={"format": "tfmq-calibration-v1"})


def test_the_recorded_set_passes(tmp_path, recorded):
    from tasks.setting import quantized_setting

    params = load_params(_setup(tmp_path, recorded))
    calib_set(params, quantized_setting(params, "tfmq", "W4A8", None, MODEL))  # no exception
    meta = json.loads((recorded / "meta.json").read_text())
    assert meta["num_inference_steps"] == 20 and meta["scheduler_class"] == "DDIMScheduler"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_rows(capsys, tmp_path, recorded, value):
    cfg = _setup(tmp_path, recorded)
    _damage(tmp_path / "calib" / MODEL, step=7, key="sample", row=1, value=value)
    line = _refused(capsys, cfg)
    t7 = json.loads((recorded / "meta.json").read_text())["timesteps"][7]
    assert f"step 7 (t={t7}) 'sample' has 1 NaN/Inf row(s) (first: row 1)" in line


def test_another_sampler(capsys, tmp_path, recorded):
    line = _refused(capsys, _setup(tmp_path, recorded, sampler__name="ddpm"))
    assert "recorded with DDIMScheduler, the run samples with 'ddpm' (DDPMScheduler)" in line


def test_another_step_count(capsys, tmp_path, recorded):
    line = _refused(capsys, _setup(tmp_path, recorded, sampler__num_inference_steps=10))
    assert "recorded with 20 sampler steps, the run samples 10" in line


def test_another_eta(capsys, tmp_path, recorded):
    line = _refused(capsys, _setup(tmp_path, recorded, sampler__eta=1.0))
    assert "recorded at DDIM eta 0.0, the run samples at eta 1.0" in line


def test_a_set_of_another_model(capsys, tmp_path, recorded):
    """The unconditional model's set under the class-conditional model's name."""
    line = _refused(capsys, _setup(tmp_path, recorded, model="fashion_ldm_class"), model="fashion_ldm_class")
    assert "holds 'none'-conditioned rows, the model is 'class'-conditioned" in line


def test_rows_of_another_shape(capsys, tmp_path, recorded):
    cfg = _setup(tmp_path, recorded)
    f = tmp_path / "calib" / MODEL / "step_0000.safetensors"
    t = load_file(str(f))
    t["sample"] = torch.zeros(t["sample"].shape[0], 4, 16, 16)
    save_file(t, str(f))
    line = _refused(capsys, cfg)
    assert "holds rows of shape (4, 16, 16), the model's UNet takes (3, 8, 8)" in line


def test_unreadable_manifest(capsys, tmp_path, recorded):
    cfg = _setup(tmp_path, recorded)
    (tmp_path / "calib" / MODEL / "meta.json").write_text("{ not json")
    assert "unreadable:" in _refused(capsys, cfg)


def test_missing_step_file(capsys, tmp_path, recorded):
    cfg = _setup(tmp_path, recorded)
    (tmp_path / "calib" / MODEL / "step_0013.safetensors").unlink()
    assert "lacks shards for steps [13]" in _refused(capsys, cfg)


def test_input_error_is_raised_before_any_stage(tmp_path, recorded):
    """The check itself (no CLI): an InputError, and the damaged set is left as it was (nothing deleted)."""
    from tasks.setting import quantized_setting

    params = load_params(_setup(tmp_path, recorded, sampler__num_inference_steps=50))
    before = sorted(p.name for p in (tmp_path / "calib" / MODEL).iterdir())
    with pytest.raises(InputError, match="20 sampler steps, the run samples 50"):
        calib_set(params, quantized_setting(params, "tfmq", "W4A8", None, MODEL))
    assert sorted(p.name for p in (tmp_path / "calib" / MODEL).iterdir()) == before
