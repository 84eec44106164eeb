"""The stage verbs' contract (docs/method.md section 8): a config passed to a stage must be the one the
model was prepared with; calibration defaults fit what was captured; ``TFMQ_MAX_ITERS`` caps visibly;
``quant_summary`` counts; ``tfmq.capture_calibration_data`` as exported by the package."""
import logging

import pytest
import torch
from torch import nn

import tfmq
from engine_fixtures import STEPS, N_SAMPLES, calib, quantized, scheduler, small_config, tiny_unet
from tfmq.quant.methods import weight_calibration_rows
from tfmq.quant.config import ConfigError, cap_stage_iters
from tfmq.quant.layers import QuantAttnProcessor, QuantLayer
from tfmq.quant.prepare import get_state

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# a stage never drops a config silently
def test_stage_refuses_a_different_config_naming_every_field_and_both_values():
    unet = tfmq.prepare_model(tiny_unet("uncond"), small_config("naive"))
    c = calib("uncond")
    other = small_config("naive", weight_bits=8, seed=3, recon={"iters": 7}, calib={"every_k": 1}, fsc=False)
    for stage in (tfmq.reconstruct_temporal, tfmq.reconstruct_blocks, tfmq.calibrate_activations):
        with pytest.raises(ValueError) as err:
            stage(unet, c, other, progress=False)
        msg = str(err.value)
        for field, passed, prepared in (("weight_bits", 8, 4), ("seed", 3, 0), ("recon.iters", 7, 10),
                                        ("calib.every_k", 1, 2), ("fsc", False, True)):
            assert f"{field}: passed {passed!r}, prepared with {prepared!r}" in msg, (field, msg)
        assert "5 field(s)" in msg and "config=None" in msg and "prepare_model" in msg
    assert get_state(unet).stages_done == []  # nothing ran
    with pytest.raises(ValueError, match=r"method: passed 'tfmq', prepared with 'naive'"):
        tfmq.reconstruct_temporal(unet, c, small_config("tfmq"), progress=False)
    # an explicit value that differs from what the recipe resolved is a difference too
    with pytest.raises(ValueError, match=r"policy: passed 'tfmq', prepared with 'all'"):
        tfmq.reconstruct_temporal(unet, c, small_config("naive", policy="tfmq"), progress=False)


def test_stage_accepts_the_same_user_config_or_its_resolved_form():
    """prepare_model resolves policy/attention_matmul/split_shortcut from the recipe: the user's config
    (None there) and the resolved one are both the prepared config."""
    user = small_config("naive")
    assert user.policy is None and user.attention_matmul is None
    unet = tfmq.prepare_model(tiny_unet("uncond"), user)
    c = calib("uncond")
    tfmq.reconstruct_temporal(unet, c, user, progress=False)
    tfmq.reconstruct_blocks(unet, c, small_config("naive", policy="all", attention_matmul=False, split_shortcut=False),
                            progress=False)
    tfmq.calibrate_activations(unet, c, tfmq.QuantConfig.from_dict(user.to_dict()), progress=False)
    assert get_state(unet).stages_done == ["temporal", "blocks", "activations"]


def test_quantize_on_a_prepared_model_refuses_a_different_config():
    unet = tfmq.prepare_model(tiny_unet("uncond"), small_config("naive"))
    with pytest.raises(ValueError, match=r"act_bits: passed None, prepared with 8"):
        tfmq.quantize(unet, calib("uncond"), small_config("naive", act_bits=None), progress=False)
    assert get_state(unet).stages_done == []


# --------------------------------------------------------------------------------------------
# calibration rows: defaults that work with what was captured
def test_default_n_per_step_takes_every_recorded_row():
    c = calib("uncond")  # 5 steps x 8 rows
    cfg = tfmq.QuantConfig(method="brecq", calib={"every_k": 2})
    assert cfg.calib.n_per_step is None
    rows = weight_calibration_rows(c, cfg, "every_k")
    assert rows["timestep"].tolist() == [t for t in c.timesteps[::2] for _ in range(N_SAMPLES)]
    torch.testing.assert_close(rows["sample"][:N_SAMPLES], c.load_step(0)["sample"], rtol=0, atol=0)
    ptq4dm = weight_calibration_rows(c, tfmq.QuantConfig(method="ptq4dm", calib={"every_k": 2}), "ptq4dm")
    assert ptq4dm["sample"].shape[0] == 3 * N_SAMPLES  # the every-k set's size


@pytest.mark.parametrize("field", ["n_per_step", "fsc_n_per_step"])
def test_rows_per_step_above_what_was_recorded_names_the_field_to_change(field):
    cfg = small_config("naive", calib={field: N_SAMPLES + 1})
    unet = tfmq.prepare_model(tiny_unet("uncond"), cfg)
    c = calib("uncond")
    with pytest.raises(ConfigError) as err:
        if field == "n_per_step":
            weight_calibration_rows(c, cfg, "every_k")
        else:
            tfmq.reconstruct_temporal(unet, c, progress=False)
            tfmq.reconstruct_blocks(unet, c, progress=False)
            tfmq.calibrate_activations(unet, c, progress=False)
    msg = str(err.value)
    assert f"calib.{field}={N_SAMPLES + 1}" in msg and f"recorded {N_SAMPLES} rows per step" in msg
    assert f'QuantConfig(calib={{"{field}": {N_SAMPLES}}})' in msg and "256" in msg


# --------------------------------------------------------------------------------------------
# TFMQ_MAX_ITERS
def test_max_iters_env_caps_every_stage_visibly(monkeypatch, caplog):
    """The README example's config (paper iteration counts, default rows) on a small capture."""
    monkeypatch.setenv("TFMQ_MAX_ITERS", "2")
    cfg = tfmq.QuantConfig(method="qdiffusion", weight_bits=4, act_bits=8)
    assert (cfg.recon.iters, cfg.tiar_recon.iters, cfg.act_recon.iters) == (20000, 20000, 5000)
    with caplog.at_level(logging.WARNING, logger="tfmq"):
        q = tfmq.quantize(tiny_unet("uncond"), calib("uncond"), cfg, progress=False)
    stats = get_state(q).stats
    units = stats["blocks"]["units"]
    assert units and {u["iters"] for u in units.values()} == {2}
    assert {u["iters"] for u in stats["activations"]["learned"]["units"].values()} == {2}
    assert stats["blocks"]["iters_capped"] == {"recon.iters": {"configured": 20000, "ran": 2, "by": "TFMQ_MAX_ITERS"}}
    assert stats["activations"]["iters_capped"] == {"act_recon.iters": {"configured": 5000, "ran": 2, "by": "TFMQ_MAX_ITERS"}}
    lines = [r.getMessage() for r in caplog.records if "TFMQ_MAX_ITERS" in r.getMessage()]
    assert len(lines) == 3 and all("\n" not in line for line in lines), lines  # one line per stage
    assert any("recon.iters 20000 -> 2" in line for line in lines)
    assert get_state(q).config.recon.iters == 20000  # the stored config keeps what was configured


def test_max_iters_env_unset_or_above_has_no_effect(monkeypatch):
    cfg = small_config("tfmq")
    monkeypatch.delenv("TFMQ_MAX_ITERS", raising=False)
    assert cap_stage_iters(cfg, "blocks") == (cfg, {}) and cap_stage_iters(cfg, "blocks")[0] is cfg
    monkeypatch.setenv("TFMQ_MAX_ITERS", "")
    assert cap_stage_iters(cfg, "temporal")[0] is cfg
    monkeypatch.setenv("TFMQ_MAX_ITERS", "10")  # == recon.iters of small_config
    assert cap_stage_iters(cfg, "blocks")[0] is cfg
    monkeypatch.setenv("TFMQ_MAX_ITERS", "3")
    capped, info = cap_stage_iters(cfg, "temporal")
    assert capped.tiar_recon.iters == 3 and capped.recon.iters == 10 and cfg.tiar_recon.iters == 10
    assert info == {"tiar_recon.iters": {"configured": 10, "ran": 3, "by": "TFMQ_MAX_ITERS"}}
    for bad in ("ten", "-1", "2.5"):
        monkeypatch.setenv("TFMQ_MAX_ITERS", bad)
        with pytest.raises(ConfigError, match=rf"TFMQ_MAX_ITERS='{bad}': expected a non-negative integer"):
            cap_stage_iters(cfg, "blocks")


# --------------------------------------------------------------------------------------------
# quant_summary: the values, counted independently
@pytest.mark.parametrize("kind,method", [("uncond", "tfmq"), ("uncond", "qdiffusion"), ("text", "qdiffusion")])
def test_quant_summary_counts(kind, method):
    fp = tiny_unet(kind)
    convs = [n for n, m in fp.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    float_under_tfmq = {"conv_in", "conv_out", "time_embedding.linear_1"} | {
        n for n in convs if n.endswith("conv_shortcut") or ".downsamplers." in n}
    resnets_with_t = sum(1 for m in fp.modules() if getattr(m, "time_emb_proj", None) is not None)
    q = quantized(kind, method)
    s = tfmq.quant_summary(q)
    expected_layers = len(convs) - (len(float_under_tfmq) if method == "tfmq" else 0)
    layers = [m for m in q.modules() if isinstance(m, QuantLayer)]
    n_act = sum(len(l.aq) for l in layers if l.aq is not None) + sum(
        len(list(m.quantizers())) for m in q.modules() if isinstance(m, QuantAttnProcessor))
    assert s == {
        "method": method, "bits": "W4A8", "policy": "tfmq" if method == "tfmq" else "all",
        "quantized_layers": expected_layers, "act_quantizers": n_act, "tib_resnets": resnets_with_t,
        "stages_done": ["temporal", "blocks", "activations"], "simulated": True,
    }
    assert resnets_with_t == 8 and len(layers) == expected_layers
    if method == "qdiffusion":  # q/k/v/softmax quantizers add to the per-layer input quantizers
        assert n_act > sum(len(l.aq) for l in layers if l.aq is not None)


# --------------------------------------------------------------------------------------------
# the package's lazy export of calibration capture
def test_capture_calibration_data_as_exported_by_tfmq(tmp_path):
    from tfmq.diffusion import calibration

    assert "capture_calibration_data" in tfmq.__all__ and "CalibrationSet" in tfmq.__all__
    assert tfmq.capture_calibration_data is calibration.capture_calibration_data
    assert tfmq.CalibrationSet is calibration.CalibrationSet
    with pytest.raises(AttributeError, match="no attribute 'capture_calibration'"):
        tfmq.capture_calibration  # noqa: B018
    unet, sched = tiny_unet("uncond"), scheduler()
    c = tfmq.capture_calibration_data(unet, sched, tmp_path / "calib", num_samples=2, num_inference_steps=STEPS,
                                      batch_size=2, seed=0, progress=False)
    assert isinstance(c, tfmq.CalibrationSet) and c.num_steps == STEPS and c.rows_per_step == 2
    sched.set_timesteps(STEPS)
    assert c.timesteps == [int(t) for t in sched.timesteps]
    # each recorded x_t is the sampler's update of the previous one (DDIM, eta = 0: deterministic)
    for i in range(STEPS - 1):
        rows = c.load_step(i)
        assert rows["timestep"].tolist() == [c.timesteps[i]] * 2
        with torch.no_grad():
            eps = unet(rows["sample"], rows["timestep"]).sample
        nxt = sched.step(eps, c.timesteps[i], rows["sample"]).prev_sample
        torch.testing.assert_close(c.load_step(i + 1)["sample"], nxt, rtol=1e-5, atol=1e-5)
