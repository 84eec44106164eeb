"""Resume of the other stages (tfmq.quant.resume, docs/pipeline.md "Resume"): TIAR (one unit), FSC (one unit per
timestep) and Q-Diffusion's step-size learning (one unit per block) are filed as they finish; an interrupted stage
re-run restores them and ends bit-identical to an uninterrupted run. A whole ``tfmq.quantize(resume_dir=...)`` run
is killed (SIGKILL, a real subprocess) once in BRECQ and once after FSC started, and the final re-run redoes
none of the finished units of any stage."""
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import tfmq
from engine_fixtures import STEPS, calib, small_config, tiny_unet
from tfmq.quant import fsc, reconstruction, tiar
from tfmq.quant.prepare import get_state
from tfmq.quant.resume import MANIFEST_NAME, UnitProgress
from test_resume import Interrupt, _tensor_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(method: str = "tfmq", **kw):
    return small_config(method, calib=dict(every_k=2, n_per_step=8, fsc_batch_size=4), **kw)


def _count(monkeypatch, module, name: str, stop_at: int | None = None) -> list[int]:
    """Count the calls of ``module.name``; raise ``Interrupt`` on the ``stop_at``-th."""
    calls: list[int] = []
    real = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise Interrupt(f"interrupted at call {len(calls)} of {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def _through(method: str, stages: int, config=None, **resume):
    """A fresh FP model, prepared and through the first ``stages`` stages (``resume``: resume_dir per stage)."""
    config = config or _config(method)
    unet = tfmq.prepare_model(tiny_unet("uncond"), config)
    fns = [tfmq.reconstruct_temporal, tfmq.reconstruct_blocks, tfmq.calibrate_activations]
    stats = [fn(unet, calib("uncond"), progress=False, resume_dir=resume.get(fn.__name__)) for fn in fns[:stages]]
    return unet, stats


@functools.cache
def _reference(method: str, root: str):
    unet, stats = _through(method, 3)
    return stats, _tensor_bytes(tfmq.save(unet, Path(root) / method))


@pytest.fixture(scope="module")
def ref_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("resume-stages-ref"))


def test_tiar_is_one_unit_restored_not_refitted(ref_root, tmp_path, monkeypatch):
    ref_stats, ref_bytes = _reference("tfmq", ref_root)
    progress = tmp_path / "tib"
    first, stats = _through("tfmq", 1, reconstruct_temporal=progress)
    assert stats[0]["resumed_units"] == 0 and stats[0]["iters"] == ref_stats[0]["iters"] > 0
    assert [r["name"] for r in json.loads((progress / MANIFEST_NAME).read_text())["done"]] == ["temporal information block"]

    fits = _count(monkeypatch, tiar, "optimize_rows")
    unet, stats = _through("tfmq", 1, reconstruct_temporal=progress)
    assert fits == [] and stats[0]["resumed_units"] == 1
    assert stats[0]["loss_final"] == ref_stats[0]["loss_final"]
    monkeypatch.undo()
    tfmq.reconstruct_blocks(unet, calib("uncond"), progress=False)
    tfmq.calibrate_activations(unet, calib("uncond"), progress=False)
    assert _tensor_bytes(tfmq.save(unet, tmp_path / "resumed")) == ref_bytes

    # another seed is another TIAR: the progress is discarded and TIAR fitted again
    fits = _count(monkeypatch, tiar, "optimize_rows")
    _, stats = _through("tfmq", 1, config=_config("tfmq", seed=3), reconstruct_temporal=progress)
    assert len(fits) == 1 and stats[0]["resumed_units"] == 0


def _stage3_interrupted(monkeypatch, progress: Path, method: str, module, name: str, stop_at: int) -> int:
    """Stage 3 with ``resume_dir=progress`` dies at the ``stop_at``-th call of ``module.name``; returns how
    many units it filed."""
    unet, _ = _through(method, 2)
    _count(monkeypatch, module, name, stop_at=stop_at)
    with pytest.raises(Interrupt):
        tfmq.calibrate_activations(unet, calib("uncond"), progress=False, resume_dir=progress)
    monkeypatch.undo()
    return len(json.loads((progress / MANIFEST_NAME).read_text())["done"])


def _stage3_rerun(monkeypatch, progress: Path, method: str, module, name: str):
    """A fresh model through stages 1-2, then stage 3 on ``progress``: (model, stats, calls of ``module.name``)."""
    unet, _ = _through(method, 2)
    calls = _count(monkeypatch, module, name)
    return unet, tfmq.calibrate_activations(unet, calib("uncond"), progress=False, resume_dir=progress), calls


@pytest.mark.parametrize("k", [1, STEPS - 1])
def test_fsc_interrupted_after_k_timesteps_resumes_bit_identical(ref_root, tmp_path, monkeypatch, k):
    ref_stats, ref_bytes = _reference("tfmq", ref_root)
    assert len(ref_stats[2]["fsc"]["timesteps"]) == STEPS
    # one batches() call per FSC timestep
    assert _stage3_interrupted(monkeypatch, tmp_path, "tfmq", fsc, "batches", stop_at=k + 1) == k
    unet, stats, calls = _stage3_rerun(monkeypatch, tmp_path, "tfmq", fsc, "batches")
    assert stats["fsc"]["resumed_timesteps"] == k
    shared_passes = 1 if "shared" in stats else 0
    assert len(calls) == STEPS - k + shared_passes  # the finished timesteps were not forwarded again
    assert stats["fsc"]["timesteps"] == ref_stats[2]["fsc"]["timesteps"]
    assert _tensor_bytes(tfmq.save(unet, tmp_path / "resumed")) == ref_bytes


def test_fsc_without_the_generator_state_would_differ(ref_root, tmp_path, monkeypatch):
    """The batch order of timestep k+1 depends on the generator state after k: a restore that dropped it
    gives other ranges (so the bit-identity above is not trivially true)."""
    _, ref_bytes = _reference("tfmq", ref_root)
    assert _stage3_interrupted(monkeypatch, tmp_path, "tfmq", fsc, "batches", stop_at=3) == 2
    real = UnitProgress.restore
    monkeypatch.setattr(UnitProgress, "restore", lambda self, record, layers=(), last=False, generator=None:
                        real(self, record, layers, last, None))
    unet, stats, _ = _stage3_rerun(monkeypatch, tmp_path, "tfmq", fsc, "batches")
    assert stats["fsc"]["resumed_timesteps"] == 2
    assert _tensor_bytes(tfmq.save(unet, tmp_path / "resumed")) != ref_bytes


def test_learned_step_sizes_resume_per_unit(ref_root, tmp_path, monkeypatch):
    ref_stats, ref_bytes = _reference("qdiffusion", ref_root)
    n_units = len(ref_stats[2]["learned"]["units"])
    assert n_units > 3
    assert _stage3_interrupted(monkeypatch, tmp_path, "qdiffusion", reconstruction, "optimize_rows", stop_at=3) == 2
    unet, stats, calls = _stage3_rerun(monkeypatch, tmp_path, "qdiffusion", reconstruction, "optimize_rows")
    assert stats["learned"]["resumed_units"] == 2 and len(calls) == n_units - 2
    assert _tensor_bytes(tfmq.save(unet, tmp_path / "resumed")) == ref_bytes


CHILD = textwrap.dedent("""
    import os, sys, time, json
    sys.path.insert(0, sys.argv[1])
    import torch
    from conftest import make_tiny_unet
    torch.set_num_threads(1)  # as this test runs (after conftest, which sets 2)
    import tfmq
    from tfmq.diffusion.calibration import CalibrationSet
    from tfmq.quant.resume import UnitProgress

    calib_dir, out, progress, pace = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
    real = UnitProgress.record
    def paced(self, *a, **k):  # slows every unit down so the parent can kill the run between units
        real(self, *a, **k)
        time.sleep(pace)
    UnitProgress.record = paced
    config = tfmq.QuantConfig.from_dict(json.loads(os.environ["TFMQ_TEST_CONFIG"]))
    unet = make_tiny_unet("uncond")
    tfmq.quantize(unet, CalibrationSet(calib_dir), config, progress=False, resume_dir=progress)
    tfmq.save(unet, out)
""")


def _done(progress: Path, stage: str) -> int:
    try:
        return len(json.loads((progress / stage / MANIFEST_NAME).read_text())["done"])
    except (OSError, ValueError):
        return 0


def _kill_when(args, env, ready) -> None:
    child = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None and not ready():
        time.sleep(0.05)
    assert child.poll() is None, child.communicate()[0].decode()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL


def test_quantize_killed_in_brecq_then_after_fsc_started_resumes_to_the_same_bytes(ref_root, tmp_path, monkeypatch):
    ref_stats, ref_bytes = _reference("tfmq", ref_root)
    n_blocks = ref_stats[1]["num_units"]
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    progress, out = tmp_path / "progress", tmp_path / "model"
    # the child runs with this process's environment and thread count: they decide which kernels run and
    # with them the last bits of the FSC ranges (OMP_NUM_THREADS=1 alone gives other bits at 1 torch thread)
    env = {**os.environ, "TFMQ_TEST_CONFIG": json.dumps(_config().to_dict())}
    args = [sys.executable, str(script), str(Path(__file__).parent), str(calib("uncond").path), str(out), str(progress)]

    _kill_when(args + ["0.3"], env, lambda: _done(progress, "blocks") >= 2)  # 1: in the middle of BRECQ
    blocks_at_kill = _done(progress, "blocks")
    assert _done(progress, "temporal") == 1 and 2 <= blocks_at_kill < n_blocks and not out.exists()
    _kill_when(args + ["0.3"], env, lambda: _done(progress, "activations") >= 2)  # 2: after FSC started
    assert _done(progress, "blocks") == n_blocks and 2 <= _done(progress, "activations") < STEPS and not out.exists()
    fsc_at_kill = _done(progress, "activations")

    # the final run, in this process: no TIAR fit, no BRECQ unit, only the FSC timesteps left
    fits = [_count(monkeypatch, reconstruction, "optimize_rows"), _count(monkeypatch, tiar, "optimize_rows")]
    passes = _count(monkeypatch, fsc, "batches")
    unet = tfmq.quantize(tiny_unet("uncond"), calib("uncond"), _config(), progress=False, resume_dir=progress)
    stats = get_state(unet).stats
    assert fits == [[], []] and len(passes) == STEPS - fsc_at_kill + (1 if "shared" in ref_stats[2] else 0)
    assert stats["temporal"]["resumed_units"] == 1 and stats["blocks"]["resumed_units"] == n_blocks
    assert stats["activations"]["fsc"]["resumed_timesteps"] == fsc_at_kill
    assert _tensor_bytes(tfmq.save(unet, out)) == ref_bytes


def test_a_rerun_with_other_thread_settings_resumes_with_one_warning(tmp_path, monkeypatch, caplog):
    progress = tmp_path / "tib"
    _through("tfmq", 1, reconstruct_temporal=progress)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    with caplog.at_level("WARNING", logger="tfmq"):
        _, stats = _through("tfmq", 1, reconstruct_temporal=progress)
    lines = [r.getMessage() for r in caplog.records if "last float bits" in r.getMessage()]
    assert stats[0]["resumed_units"] == 1 and len(lines) == 1 and "'OMP_NUM_THREADS': '7'" in lines[0]


def test_pipeline_rerun_after_a_crash_in_fsc_and_dvc_deleting_the_outputs(ref_root, tmp_path, monkeypatch):
    """The tasks as ``dvc repro`` runs them: stage 3 dies after 2 timesteps, DVC deletes quant/<model>/<name>/,
    the re-run restores TIAR, every BRECQ unit and the 2 timesteps from quant/<model>/.<name>.partial/."""
    import shutil

    from diffusers import DDPMScheduler

    from tasks.quantize import calibrate_activations, drop_progress, progress_dir, recon_blocks, recon_tib
    from tasks.setting import Setting

    ref_stats, ref_bytes = _reference("tfmq", ref_root)
    monkeypatch.setenv("TFMQ_DEVICE", "cpu")
    tiny_unet("uncond").save_pretrained(tmp_path / "fp" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "fp" / "scheduler")
    calib_dir, qdir = str(calib("uncond").path), tmp_path / "quant" / "tfmq-W4A8"
    setting = Setting(name="tfmq-W4A8", kind="quantized", method="tfmq", bits="W4A8", model="fp",
                      fp_dir=str(tmp_path / "fp"), calib_dir=calib_dir, quant_dir=str(qdir),
                      results_dir=str(tmp_path / "results"), metrics_path=str(tmp_path / "metrics.json"), config=_config())

    def run_all() -> str:
        return calibrate_activations.fn(setting, calib_dir, recon_blocks.fn(setting, calib_dir, recon_tib.fn(setting, calib_dir)))

    _count(monkeypatch, fsc, "batches", stop_at=3)
    with pytest.raises(Interrupt):
        run_all()
    monkeypatch.undo()
    monkeypatch.setenv("TFMQ_DEVICE", "cpu")
    assert sorted(p.name for p in progress_dir(setting).iterdir()) == ["blocks", "model", "tib"]
    shutil.rmtree(qdir)  # what dvc repro does to a stage's outputs before it runs the command again

    fits = [_count(monkeypatch, reconstruction, "optimize_rows"), _count(monkeypatch, tiar, "optimize_rows")]
    out = run_all()
    times = json.loads((qdir / "stage_times.json").read_text())
    assert fits == [[], []]
    assert times["recon_tib"]["stats"]["resumed_units"] == 1
    assert times["recon_blocks"]["stats"]["resumed_units"] == ref_stats[1]["num_units"]
    assert times["calibrate_activations"]["stats"]["fsc"]["resumed_timesteps"] == 2
    assert _tensor_bytes(Path(out)) == ref_bytes
    drop_progress(setting)
    assert not progress_dir(setting).exists() and sorted(p.name for p in qdir.iterdir()) == ["blocks", "model", "stage_times.json", "tib"]
