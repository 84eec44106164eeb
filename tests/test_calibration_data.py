"""tfmq.diffusion.calibration (docs/method.md section 7): one UNet call per step, exact x_t, CFG rows, selection helpers."""
import json

import pytest
from conftest import make_tiny_unet
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

from tfmq.diffusion.calibration import (
    CalibrationSet,
    all_steps,
    capture_calibration_data,
    every_kth_step,
    ptq4dm_step_counts,
    ptq4dm_timesteps,
)
from tfmq.diffusion.sampling import make_scheduler, sample


pytestmark = pytest.mark.usefixtures("one_thread")






SCHED_CFG = dict(DDPMScheduler(num_train_timesteps=100).config)


def _count_calls(unet):
    calls = []
    handle = unet.register_forward_pre_hook(lambda m, a, k: calls.append(a[0].shape[0]), with_kwargs=True)
    return calls, handle


@pytest.mark.parametrize("name,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("pndm", 0.0)])
def test_capture_records_the_sampler_trajectory(tmp_path, name, eta):
    unet, sched = make_tiny_unet(), make_scheduler(name, SCHED_CFG)
    calls, handle = _count_calls(unet)
    calib = capture_calibration_data(unet, sched, tmp_path / "c", num_samples=5, num_inference_steps=4,
                                     batch_size=2, seed=7, eta=eta, progress=False)
    handle.remove()
    steps = len(sched.timesteps)
    assert steps == (5 if name == "pndm" else 4)  # PLMS repeats one timestep: 4 + 1 UNet calls
    assert calls == [2] * steps + [2] * steps + [1] * steps  # one call per sampler step per batch
    assert calib.timesteps == sched.timesteps.tolist() and calib.num_steps == steps
    assert calib.rows_per_step == 5 and sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "meta.json", *[f"step_{i:04d}.safetensors" for i in range(steps)]]
    seen = {}
    sample(unet, make_scheduler(name, SCHED_CFG), 5, 4, batch_size=5, seed=7, eta=eta, progress=False,
           callback=lambda i, t, x: seen.__setitem__(i, x.clone()))
    for k in range(steps):
        rec = calib.load_step(k)
        assert set(rec) == {"sample", "timestep"}
        assert rec["timestep"].dtype == torch.int64 and rec["timestep"].tolist() == [calib.timesteps[k]] * 5
        torch.testing.assert_close(rec["sample"], seen[k], atol=1e-5, rtol=0)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["scheduler_class"] == type(sched).__name__ and meta["eta"] == eta and meta["seed"] == 7
    assert meta["conditioning"] == "none" and meta["num_samples"] == 5 and meta["num_inference_steps"] == 4


def test_cfg_class_labels_records_null_and_cond_rows(tmp_path):
    unet = make_tiny_unet(num_class_embeds=4)
    labels = torch.tensor([0, 1, 2])
    calls, handle = _count_calls(unet)
    calib = capture_calibration_data(unet, make_scheduler("ddim", SCHED_CFG), tmp_path / "c", 3, 3, batch_size=2,
                                     seed=0, class_labels=labels, null_class_label=3, guidance_scale=2.0,
                                     progress=False)
    handle.remove()
    assert calls == [4, 4, 4, 2, 2, 2]  # [null; cond] in ONE call per step
    assert calib.rows_per_step == 6 and calib.meta["conditioning"] == "class" and calib.cfg
    rec = calib.load_step(1)
    assert rec["class_labels"].tolist() == [3, 3, 3, 0, 1, 2]
    torch.testing.assert_close(rec["sample"][:3], rec["sample"][3:], atol=0, rtol=0)  # same x_t, both conditions
    sel = every_kth_step(calib, k=2, n_per_step=4, seed=0)
    assert sel["timestep"].tolist() == [calib.timesteps[0]] * 4 + [calib.timesteps[2]] * 4
    lab = sel["class_labels"].tolist()
    assert lab[:2] == [3, 3] and lab[4:6] == [3, 3] and set(lab[2:4]) <= {0, 1, 2}
    with pytest.raises(ValueError, match="must be even"):
        every_kth_step(calib, k=1, n_per_step=3)


def test_cfg_text_records_negative_prompt_rows(tmp_path):
    unet = make_tiny_unet("text")
    g = torch.Generator().manual_seed(0)
    cond, neg = torch.randn(3, 2, 8, generator=g), torch.randn(1, 2, 8, generator=g)
    calls, handle = _count_calls(unet)
    calib = capture_calibration_data(unet, make_scheduler("pndm", SCHED_CFG), tmp_path / "t", 3, 3, batch_size=3,
                                     seed=0, encoder_hidden_states=cond, negative_encoder_hidden_states=neg,
                                     guidance_scale=7.5, progress=False)
    handle.remove()
    assert calls == [6] * 4 and calib.meta["conditioning"] == "text"
    rec = calib.load_step(3)
    torch.testing.assert_close(rec["encoder_hidden_states"][:3], neg.expand(3, 2, 8), atol=0, rtol=0)
    torch.testing.assert_close(rec["encoder_hidden_states"][3:], cond, atol=0, rtol=0)
    with torch.no_grad():  # a stored row replays through the UNet as forward kwargs
        assert unet(**calib.load_step(0)).sample.shape == (6, 1, 8, 8)


def _flat_set(tmp_path, steps=10, n=8) -> CalibrationSet:
    return capture_calibration_data(make_tiny_unet(), make_scheduler("ddim", SCHED_CFG), tmp_path / "f", n, steps,
                                    batch_size=n, seed=0, progress=False)


def test_selection_helpers(tmp_path):
    calib = _flat_set(tmp_path)
    ts = calib.timesteps
    assert ts == [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    sel = every_kth_step(calib, k=4, n_per_step=3, seed=1)
    assert sel["timestep"].tolist() == [90] * 3 + [50] * 3 + [10] * 3 and sel["sample"].shape == (9, 1, 8, 8)
    step4 = calib.load_step(4)["sample"]
    assert all(any(torch.equal(r, s) for s in step4) for r in sel["sample"][3:6])  # real rows of step 4
    assert len({tuple(r.flatten()[:4].tolist()) for r in sel["sample"][3:6]}) == 3  # no duplicates
    full = all_steps(calib)
    assert full["sample"].shape[0] == 80 and full["timestep"].tolist() == [t for t in ts for _ in range(8)]
    assert all_steps(calib, n_per_step=2)["timestep"].tolist() == [t for t in ts for _ in range(2)]
    with pytest.raises(ValueError, match="n_per_step=9 must be in 1..8"):
        all_steps(calib, n_per_step=9)
    with pytest.raises(IndexError, match="steps 0..9"):
        calib.load_step(10)


def test_ptq4dm_ndtc_skews_to_small_t(tmp_path):
    calib = _flat_set(tmp_path)
    counts = ptq4dm_step_counts(calib, 40, mean_frac=0.2, std_frac=0.2, seed=0)
    assert sum(counts) == 40 and max(counts) <= 8
    assert sum(counts[5:]) > 2 * sum(counts[:5])  # late sampler steps = small t dominate
    sel = ptq4dm_timesteps(calib, 40, mean_frac=0.2, std_frac=0.2, seed=0)
    assert sel["timestep"].shape == (40,) and sel["timestep"].float().mean() < 45
    assert torch.equal(sel["timestep"], ptq4dm_timesteps(calib, 40, 0.2, 0.2, seed=0)["timestep"])
    assert sum(ptq4dm_step_counts(calib, 80, seed=3)) == 80  # everything, full steps get re-drawn
    with pytest.raises(ValueError, match="n_total=81"):
        ptq4dm_timesteps(calib, 81)


def test_calibration_set_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="run capture_calibration_data first"):
        CalibrationSet(tmp_path / "none")
