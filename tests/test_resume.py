"""Resumable block reconstruction (tfmq.quant.resume, docs/pipeline.md "Resume"): a BRECQ stage interrupted after
k units (an exception in-process, SIGKILL in a subprocess) and re-run ends bit-identical to an uninterrupted run
without redoing the finished units; progress written for another model, config or calibration set is discarded."""
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import tfmq
from engine_fixtures import N_SAMPLES, STEPS, calib, run, scheduler, small_config, tiny_unet, unet_inputs
from tfmq.diffusion.calibration import capture_calibration_data
from tfmq.quant import reconstruction
from safetensors import safe_open
from tfmq.quant.checkpoint import WEIGHTS_NAME
from tfmq.quant.prepare import quant_layers
from tfmq.quant.resume import MANIFEST_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3  # units finished before the interruption


def _config(**kw):
    return small_config("freeze", recon=dict(iters=10, batch_size=8), **kw)


def _stage1(config, unet_seed: int = 0):
    """A fresh FP model, prepared and through stage 1 (the freeze recipe: temporal layers rounded to nearest)."""
    unet = tfmq.prepare_model(tiny_unet("uncond", seed=unet_seed), config)
    tfmq.reconstruct_temporal(unet, calib("uncond"), progress=False)
    return unet


class Interrupt(RuntimeError):
    pass


def _counting(monkeypatch, stop_at: int | None = None) -> list[int]:
    """Count unit optimisations; raise on the ``stop_at``-th (the units before it have been filed)."""
    calls: list[int] = []
    real = reconstruction.optimize_rows

    def wrapped(*args, **kwargs):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise Interrupt(f"interrupted in unit {len(calls)}")
        return real(*args, **kwargs)

    monkeypatch.setattr(reconstruction, "optimize_rows", wrapped)
    return calls


@functools.cache
def _reference(tmp_root: str):
    """Uninterrupted stage 2 without resume: (model, stats, saved tensor file bytes)."""
    unet = _stage1(_config())
    stats = tfmq.reconstruct_blocks(unet, calib("uncond"), progress=False)
    return unet, stats, _tensor_bytes(tfmq.save(unet, Path(tmp_root) / "reference"))


def _tensor_bytes(checkpoint: Path) -> dict[str, tuple[str, tuple, bytes]]:
    """Every tensor of a saved checkpoint as (dtype, shape, raw bytes). Not the file's bytes: safetensors
    writes its metadata map in a per-process order."""
    with safe_open(str(checkpoint / WEIGHTS_NAME), "pt") as f:
        out = {}
        for k in f.keys():
            t = f.get_tensor(k).contiguous()
            out[k] = (str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(str(tmp_path_factory.mktemp("resume-ref")))


def _grids(unet) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in quant_layers(unet):
        for k, q in enumerate(layer.wq):
            assert q.mode == "int", f"{name}.wq.{k} is {q.mode}, expected a finalized grid"
            out[f"{name}.{k}"] = q.w_int
    return out


def test_interrupted_then_resumed_is_bit_identical_and_skips_finished_units(reference, tmp_path, monkeypatch):
    ref, ref_stats, ref_bytes = reference
    n_units = ref_stats["num_units"]
    assert n_units > K + 1
    progress = tmp_path / "blocks.partial"

    calls = _counting(monkeypatch, stop_at=K + 1)
    with pytest.raises(Interrupt):
        tfmq.reconstruct_blocks(_stage1(_config()), calib("uncond"), progress=False, resume_dir=progress)
    doc = json.loads((progress / MANIFEST_NAME).read_text())
    assert [r["index"] for r in doc["done"]] == sorted(r["index"] for r in doc["done"]) and len(doc["done"]) == K
    assert len(list(progress.glob("unit-*.safetensors"))) == K

    calls = _counting(monkeypatch)
    unet = _stage1(_config())
    stats = tfmq.reconstruct_blocks(unet, calib("uncond"), progress=False, resume_dir=progress)
    assert stats["resumed_units"] == K
    assert len(calls) == n_units - K  # the finished units were restored, not optimised again
    assert stats["num_units"] == n_units and list(stats["units"]) == list(ref_stats["units"])
    for name in list(ref_stats["units"])[:K]:
        assert stats["units"][name]["rec_loss_last"] == ref_stats["units"][name]["rec_loss_last"]

    mine, theirs = _grids(unet), _grids(ref)
    assert mine.keys() == theirs.keys() and len(mine) > 10
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k
    x = unet_inputs("uncond", step=2, n=4)
    assert torch.equal(run(unet, x), run(ref, x))
    assert _tensor_bytes(tfmq.save(unet, tmp_path / "resumed")) == ref_bytes


def test_same_seed_twice_and_resume_on_uninterrupted_are_bit_identical(reference, tmp_path):
    _, ref_stats, ref_bytes = reference
    again = _stage1(_config())
    tfmq.reconstruct_blocks(again, calib("uncond"), progress=False)
    assert _tensor_bytes(tfmq.save(again, tmp_path / "again")) == ref_bytes
    with_resume = _stage1(_config())
    stats = tfmq.reconstruct_blocks(with_resume, calib("uncond"), progress=False, resume_dir=tmp_path / "p")
    assert stats["resumed_units"] == 0
    assert len(json.loads((tmp_path / "p" / MANIFEST_NAME).read_text())["done"]) == ref_stats["num_units"]
    assert _tensor_bytes(tfmq.save(with_resume, tmp_path / "with_resume")) == ref_bytes
    # a different seed is a different result (the comparison above can fail)
    other = _stage1(_config(seed=1))
    tfmq.reconstruct_blocks(other, calib("uncond"), progress=False)
    assert _tensor_bytes(tfmq.save(other, tmp_path / "other")) != ref_bytes


@pytest.mark.parametrize("foreign, field", [
    (dict(config=_config(seed=1)), "config"),
    (dict(unet_seed=1), "fp_weights"),
    (dict(other_calib=True), "rows"),
])
def test_foreign_progress_is_discarded_with_one_log_line(tmp_path, monkeypatch, caplog, foreign, field):
    progress = tmp_path / "blocks.partial"
    _counting(monkeypatch, stop_at=K + 1)
    with pytest.raises(Interrupt):
        tfmq.reconstruct_blocks(_stage1(_config()), calib("uncond"), progress=False, resume_dir=progress)
    assert len(json.loads((progress / MANIFEST_NAME).read_text())["done"]) == K

    config = foreign.get("config", _config())
    data = calib("uncond")
    if foreign.get("other_calib"):  # the same model's trajectories from other noise
        data = capture_calibration_data(tiny_unet("uncond"), scheduler(), tmp_path / "calib", num_samples=N_SAMPLES,
                                        num_inference_steps=STEPS, batch_size=N_SAMPLES, seed=1, progress=False)
    unet = tfmq.prepare_model(tiny_unet("uncond", seed=foreign.get("unet_seed", 0)), config)
    tfmq.reconstruct_temporal(unet, data, progress=False)
    calls = _counting(monkeypatch, stop_at=1)  # stop in the first unit: it was not restored
    with caplog.at_level(logging.WARNING, logger="tfmq"), pytest.raises(Interrupt):
        tfmq.reconstruct_blocks(unet, data, progress=False, resume_dir=progress)
    lines = [r.getMessage() for r in caplog.records if "resume" in r.getMessage()]
    assert len(lines) == 1 and "discarding" in lines[0] and field in lines[0], lines
    assert len(calls) == 1 and not progress.exists()  # discarded and nothing filed since


def test_a_directory_that_is_not_progress_is_refused_untouched(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a tfmq progress directory"):
        tfmq.reconstruct_blocks(_stage1(_config()), calib("uncond"), progress=False, resume_dir=tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


CHILD = textwrap.dedent("""
    import os, sys, time, json
    sys.path.insert(0, sys.argv[1])
    import torch
    torch.set_num_threads(1)
    from conftest import make_tiny_unet
    import tfmq
    from tfmq.diffusion.calibration import CalibrationSet
    from tfmq.quant import reconstruction

    calib_dir, out, progress, slow = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    if slow:
        real = reconstruction.optimize_rows
        def paced(*a, **k):  # slows the stage down so the parent can kill it between units
            r = real(*a, **k)
            time.sleep(slow)
            return r
        reconstruction.optimize_rows = paced
    config = tfmq.QuantConfig.from_dict(json.loads(os.environ["TFMQ_TEST_CONFIG"]))
    unet = tfmq.prepare_model(make_tiny_unet("uncond"), config)
    calib = CalibrationSet(calib_dir)
    tfmq.reconstruct_temporal(unet, calib, progress=False)
    tfmq.reconstruct_blocks(unet, calib, progress=False, resume_dir=progress)
    tfmq.save(unet, out)
""")


def test_sigkill_mid_stage_then_rerun_matches_uninterrupted_tensor_bytes(reference, tmp_path):
    _, ref_stats, ref_bytes = reference
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    progress, out = tmp_path / "blocks.partial", tmp_path / "blocks"
    env = {**os.environ, "TFMQ_TEST_CONFIG": json.dumps(_config().to_dict()), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), str(Path(__file__).parent), str(calib("uncond").path), str(out), str(progress)]

    child = subprocess.Popen(args + ["0.3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline, done = time.monotonic() + 60, 0
    while time.monotonic() < deadline and child.poll() is None:
        try:
            done = len(json.loads((progress / MANIFEST_NAME).read_text())["done"])
        except (OSError, ValueError):
            done = 0
        if done >= 2:
            break
        time.sleep(0.05)
    assert child.poll() is None, child.communicate()[0].decode()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing where the finished output is expected

    # the re-run: a fresh process's worth of state (fresh FP model, stage 1 again) on the same progress
    unet = _stage1(_config())
    stats = tfmq.reconstruct_blocks(unet, calib("uncond"), progress=False, resume_dir=progress)
    assert 2 <= stats["resumed_units"] < ref_stats["num_units"]
    assert _tensor_bytes(tfmq.save(unet, out)) == ref_bytes


def test_pipeline_task_resumes_and_leaves_only_the_finished_output(reference, tmp_path, monkeypatch):
    from diffusers import DDPMScheduler

    from tasks.quantize import calibrate_activations, drop_progress, progress_dir, recon_blocks, recon_tib
    from tasks.setting import Setting

    _, ref_stats, ref_bytes = reference
    monkeypatch.setenv("TFMQ_DEVICE", "cpu")
    tiny_unet("uncond").save_pretrained(tmp_path / "fp" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "fp" / "scheduler")
    calib_dir = str(calib("uncond").path)
    setting = Setting(name="freeze-W4A8", kind="quantized", method="freeze", bits="W4A8", model="fp",
                      fp_dir=str(tmp_path / "fp"), calib_dir=calib_dir, quant_dir=str(tmp_path / "quant"),
                      results_dir=str(tmp_path / "results"), metrics_path=str(tmp_path / "metrics.json"),
                      config=_config())
    tib = recon_tib.fn(setting, calib_dir)
    partial, out = progress_dir(setting, "recon_blocks"), tmp_path / "quant" / "blocks"
    assert partial == tmp_path / ".quant.partial" / "blocks"  # beside the output dir, which dvc repro deletes

    _counting(monkeypatch, stop_at=K + 1)
    with pytest.raises(Interrupt):
        recon_blocks.fn(setting, calib_dir, tib)
    assert not out.exists() and len(json.loads((partial / MANIFEST_NAME).read_text())["done"]) == K

    calls = _counting(monkeypatch)
    assert recon_blocks.fn(setting, calib_dir, tib) == str(out)
    assert len(calls) == ref_stats["num_units"] - K
    times = json.loads((tmp_path / "quant" / "stage_times.json").read_text())
    assert times["recon_blocks"]["stats"]["resumed_units"] == K
    assert sorted(p.name for p in (tmp_path / "quant").iterdir()) == ["blocks", "stage_times.json", "tib"]
    assert _tensor_bytes(out) == ref_bytes
    # the stages' units stay until the setting is done (a crash in stage 3 re-runs stages 1-2 from them)
    assert sorted(p.name for p in partial.parent.iterdir()) == ["blocks"]  # freeze: no TIAR, EMA ranges
    calibrate_activations.fn(setting, calib_dir, str(out))
    drop_progress(setting)
    assert not partial.parent.exists()
    assert sorted(p.name for p in (tmp_path / "quant").iterdir()) == ["blocks", "model", "stage_times.json", "tib"]
