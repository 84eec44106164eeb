"""The ``tfmq`` CLI edge: every bad input is exit code 2 and ONE stderr line naming the key or file.

In-process (``flows.cli.main``) for speed: every refusal here happens before any flow starts; one
subprocess test checks the real process (exit code, stderr) and that loading a model prints nothing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from pipeline_fixtures import REPO, params_file, subprocess_env

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _cfg(tmp_path: Path, **changes) -> str:
    return params_file(tmp_path, **changes)


def _fake_fp_dir(tmp_path: Path) -> dict:
    """A minimal pixel model folder ``<tmp>/models/fp``; returns the ``_cfg`` changes that point params at it."""
    d = tmp_path / "models" / "fp"
    (d / "unet").mkdir(parents=True)
    (d / "scheduler").mkdir()
    (d / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    return {"model__root": str(tmp_path / "models"), "model__name": "fp", "grid__models": ["fp"]}


def _refused(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("tfmq: error: ")
    return lines[0]


@pytest.mark.parametrize("bits", ["4bit", "W4", "W16A8"])
def test_bad_bits(capsys, bits):
    line = _refused(capsys, ["quantize", "--method", "tfmq", "--bits", bits])
    assert bits in line and ("W4A8" in line or "2..8" in line)


def test_unknown_method(capsys):
    line = _refused(capsys, ["evaluate", "--method", "gptq", "--bits", "W4A8"])
    assert "'gptq'" in line and "qdiffusion" in line


def test_bad_name(capsys):
    assert "--name='../x'" in _refused(capsys, ["quantize", "--name", "../x"])


def test_missing_fp_dir(capsys, tmp_path):
    cfg = _cfg(tmp_path, model__root=str(tmp_path / "nope"))
    for argv in (["quantize", "--method", "tfmq", "--bits", "W4A8"], ["check"], ["calib-data"], ["evaluate", "--fp"]):
        line = _refused(capsys, [*argv, "--config", cfg])
        assert "model.root/model.name=" in line and str(tmp_path / "nope" / "fashion_ldm") in line, argv
    line = _refused(capsys, ["quantize", "--model", "fashion_ldm_class", "--method", "tfmq", "--bits", "W4A8", "--config", cfg])
    assert "model.root/fashion_ldm_class=" in line and str(tmp_path / "nope" / "fashion_ldm_class") in line
    assert "--model='../x'" in _refused(capsys, ["calib-data", "--model", "../x"])


def test_ldm_folder_missing_a_component(capsys, tmp_path):
    """An LDMPipeline folder whose model_index.json lists vqvae/ that is not there: one line, before any work."""
    changes = _fake_fp_dir(tmp_path)
    d = tmp_path / "models" / "fp"
    (d / "model_index.json").write_text(json.dumps({"_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                                    "vqvae": ["diffusers", "VQModel"],
                                                    "scheduler": ["diffusers", "DDIMScheduler"]}))
    line = _refused(capsys, ["calib-data", "--config", _cfg(tmp_path, **changes)])
    assert "lacks vqvae/" in line and str(d) in line


def test_missing_dataset(capsys, tmp_path):
    cfg = _cfg(tmp_path, data__root=str(tmp_path / "no-idx"), data__path=str(tmp_path / "no.safetensors"),
               **_fake_fp_dir(tmp_path))
    line = _refused(capsys, ["check", "--config", cfg])
    assert "data.root=" in line and "train-images-idx3-ubyte" in line
    line = _refused(capsys, ["train-classifier", "--config", cfg])
    assert "data.path=" in line and "no.safetensors" in line and "prepare-data" in line


def test_check_refuses_missing_inception_weights(capsys, tmp_path):
    """Today's bug: this passed `check` and failed only after quantization."""
    cfg = _cfg(tmp_path, eval__extractor="inception-v3-compat", eval__inception_weights=str(tmp_path / "pt.pth"))
    line = _refused(capsys, ["check", "--config", cfg])
    assert "eval.inception_weights=" in line and "pt.pth" in line
    cfg = _cfg(tmp_path, eval__extractor="inception-v3-compat")  # null weights
    assert "eval.inception_weights=None" in _refused(capsys, ["check", "--config", cfg])
    cfg = _cfg(tmp_path, eval__extractor="resnet")
    assert "eval.extractor='resnet'" in _refused(capsys, ["check", "--config", cfg])


def test_check_success_prints_what_the_run_uses(capsys):
    assert main(["check"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "params.yaml: OK"
    assert out[1:4] == ["model fashion_ldm: models/fashion_ldm (latent, UNet2DModel)",
                        "model fashion_ldm_class: models/fashion_ldm_class (latent-class, UNet2DModel)",
                        "model fashion_sd: models/fashion_sd (latent-text, UNet2DConditionModel)"]
    assert out[5] == "extractor: efficientnet-lite0-112"
    assert out[6] == "reference: the embedded data's test split (2000 images)"  # every model makes 1x28x28: no warning
    assert out[7].startswith("settings: 45 (fashion_ldm/naive-W8A8, fashion_ldm/freeze-W8A8,")  # 36 grid + 9 studies
    assert "fashion_ldm_class/tfmq-W4A8, fashion_sd/naive-W8A8," in out[7]
    assert "fashion_sd/tfmq-W4A8, fashion_ldm/brecq-W8A8," in out[7]
    assert out[7].endswith("fashion_ldm/ptqd-eq-W4A8)")


# --- a truncated or foreign checkpoint ----------------------------------------------------------

def _eval_workspace(tmp_path: Path) -> str:
    """A params file whose evaluate inputs exist (fake FP dir, reference file, classifier dir)."""
    refdir, clf = tmp_path / "ref", tmp_path / "clf"
    refdir.mkdir()
    (refdir / "test_efficientnet-lite0-112.safetensors").write_bytes(b"x")
    clf.mkdir()
    return _cfg(tmp_path, **_fake_fp_dir(tmp_path), reference__dir=str(refdir),
                classifier__path=str(clf), quant_out__dir=str(tmp_path / "quant"))


def _checkpoint(tmp_path: Path, method: str = "tfmq", weight_bits: int = 4, act_bits: int = 8) -> Path:
    """A real checkpoint (``tfmq.save`` of a prepared tiny UNet) at the tfmq-W4A8 setting's place."""
    import tfmq
    from conftest import make_tiny_unet

    d = tmp_path / "quant" / "fp" / "tfmq-W4A8" / "model"
    unet = tfmq.prepare_model(make_tiny_unet(), tfmq.QuantConfig(method=method, weight_bits=weight_bits,
                                                                   act_bits=act_bits))
    tfmq.save(unet, d)
    return d


def _edit_header(d: Path, **changes) -> None:
    header = json.loads((d / "quant_config.json").read_text())
    (d / "quant_config.json").write_text(json.dumps({**header, **changes}))
ARGV = ["evaluate", "--method", "tfmq", "--bits", "W4A8"]


def test_truncated_checkpoint_header(capsys, tmp_path):
    cfg = _eval_workspace(tmp_path)
    d = _checkpoint(tmp_path)
    (d / "quant_config.json").write_text((d / "quant_config.json").read_text()[:300])
    line = _refused(capsys, [*ARGV, "--config", cfg])
    assert str(d / "quant_config.json") in line and "tfmq quantize --method tfmq --bits W4A8" in line


def test_truncated_checkpoint_weights(capsys, tmp_path):
    cfg = _eval_workspace(tmp_path)
    d = _checkpoint(tmp_path)
    data = (d / "quantized.safetensors").read_bytes()
    (d / "quantized.safetensors").write_bytes(data[: len(data) // 2])
    line = _refused(capsys, [*ARGV, "--config", cfg])
    assert str(d / "quantized.safetensors") in line and "unreadable safetensors file" in line
    assert "truncated or damaged" in line and "tfmq quantize --method tfmq --bits W4A8" in line


def test_foreign_checkpoint(capsys, tmp_path):
    cfg = _eval_workspace(tmp_path)
    d = _checkpoint(tmp_path)
    _edit_header(d, format="something-else")
    line = _refused(capsys, [*ARGV, "--config", cfg])
    assert str(d) in line and "something-else" in line


def test_checkpoint_of_another_setting(capsys, tmp_path):
    cfg = _eval_workspace(tmp_path)
    d = _checkpoint(tmp_path, "naive", 8, 8)
    expect = "checkpoint is naive-W8A8, expected tfmq-W4A8"
    line = _refused(capsys, [*ARGV, "--config", cfg])
    assert str(d) in line and expect in line


def test_missing_checkpoint(capsys, tmp_path):
    cfg = _eval_workspace(tmp_path)
    line = _refused(capsys, [*ARGV, "--config", cfg])
    assert str(tmp_path / "quant" / "fp" / "tfmq-W4A8" / "model") in line


# --- the real process ---------------------------------------------------------------------------

def test_process_exit_code_and_quiet_model_load(tmp_path):
    """The process exits 2 with one line; loading the FP model prints nothing (no 'install accelerate' warning)."""
    r = subprocess.run([sys.executable, "-m", "flows.cli", "quantize", "--bits", "4bit"], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["tfmq: error: bits='4bit': expected the form W<weight bits>A<activation "
                                             "bits>, e.g. W4A8 or W4A32"]
    code = "from tfmq.diffusion.models import load_fp_model; load_fp_model('models/fashion_ddpm')"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", r.stderr


def test_text_guided_inputs_refused_before_work(capsys, tmp_path):
    """A named CLIP folder that is missing, and a text-guided model's prompt file that is missing or empty:
    one line each, exit 2, before anything is loaded."""
    line = _refused(capsys, ["check", "--config", _cfg(tmp_path, eval__clip_model=str(tmp_path / "no-clip"))])
    assert "eval.clip_model=" in line and "expected a local CLIP folder" in line
    clip = tmp_path / "clip-without-processor"
    clip.mkdir()
    (clip / "config.json").write_text("{}")
    line = _refused(capsys, ["check", "--config", _cfg(tmp_path, eval__clip_model=str(clip))])
    assert "preprocessor_config.json" in line
    line = _refused(capsys, ["check", "--config", _cfg(tmp_path, eval__prompts=str(tmp_path / "none.txt"))])
    assert "eval.prompts=" in line and "one prompt per line" in line
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    line = _refused(capsys, ["calib-data", "--model", "fashion_sd", "--config",
                             _cfg(tmp_path, calib_data__prompts=str(empty))])
    assert line.startswith(f"tfmq: error: calib_data.prompts={str(empty)!r}")
