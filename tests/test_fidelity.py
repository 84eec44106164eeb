"""Fidelity fixes found by reading the engine against the released code (issue: evaluation power).

PTQ4DM's NDTC default t / T ~ N(0.4, 0.4); the every-k row choice follows QuantConfig.seed;
Q-Diffusion's softmax bit-width is a switch (its SD runs: 16 bits). The AdaRound beta schedule's
count-from-1 is asserted in tests/test_quantizer.py.
"""
import pytest
import torch

import tfmq
from tfmq.diffusion import calibration as cd
from tfmq.quant.config import ConfigError
from tfmq.quant.layers import QuantAttnProcessor
from tfmq.quant.methods import every_k_rows, ptq4dm_rows

from engine_fixtures import calib, small_config, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_ptq4dm_default_is_the_released_normal_0p4_0p4():
    c = tfmq.QuantConfig(method="ptq4dm").calib
    assert (c.ptq4dm_t_mean, c.ptq4dm_t_std) == (0.4, 0.4)
    cs = calib()
    cfg = small_config("ptq4dm", calib={"n_per_step": 4})
    rows = ptq4dm_rows(cs, cfg)
    n_total = len(range(0, cs.num_steps, 2)) * 4
    ref = cd.ptq4dm_timesteps(cs, n_total, mean_frac=0.4, std_frac=0.4, seed=cfg.seed)
    assert torch.equal(rows["timestep"], ref["timestep"]) and torch.equal(rows["sample"], ref["sample"])
    old = cd.ptq4dm_timesteps(cs, n_total, mean_frac=0.25, std_frac=0.25, seed=cfg.seed)
    assert not torch.equal(rows["timestep"].sort().values, old["timestep"].sort().values)  # the old default differs


def test_ptq4dm_counts_follow_a_truncated_normal_of_t():
    """With many rows per step, the share of rows per sampler step matches N(0.4 T, 0.4 T) on [0, T) (3 sigma)."""
    import numpy as np

    class Flat:  # the selector only reads timesteps / rows_per_step / train steps
        timesteps = list(range(950, -1, -50))  # 20 sampler steps of a 1000-step model
        num_steps = 20
        rows_per_step = 10_000
        cfg = False
        meta = {"num_train_timesteps": 1000}
        path = "flat"

    try:
        counts = np.array(cd.ptq4dm_step_counts(Flat(), 4000, mean_frac=0.4, std_frac=0.4, seed=0))
    except AttributeError as e:  # pragma: no cover - the fixture must match the selector's reads
        pytest.fail(f"selector reads a CalibrationSet attribute the stand-in lacks: {e}")
    frac_low = counts[Flat.timesteps.index(400):].sum() / 4000  # t <= 400: at least the lower half of N(0.4, 0.4)
    # P(t/T <= 0.4 | 0 <= t/T <= 1) for N(0.4, 0.4) = (0.5 - Phi(-1)) / (Phi(1.5) - Phi(-1)) = 0.4416
    p = 0.3413447 / (0.9331928 - 0.1586553)
    nearest_slack = 25 / 1000  # t is mapped to the nearest of steps 50 apart
    assert abs(frac_low - p) < 3 * (p * (1 - p) / 4000) ** 0.5 + nearest_slack


def test_old_ptq4dm_keys_are_refused_with_the_new_names():
    with pytest.raises(ConfigError, match="unknown key.*ptq4dm_mean_frac.*ptq4dm_t_mean"):
        tfmq.QuantConfig.from_dict({"method": "ptq4dm", "calib": {"ptq4dm_mean_frac": 0.75}})


def test_every_k_row_choice_follows_the_config_seed():
    cs = calib()
    rows = {s: every_k_rows(cs, small_config("tfmq", seed=s, calib={"n_per_step": 3})) for s in (0, 3)}
    for s, r in rows.items():
        ref = cd.every_kth_step(cs, 2, 3, seed=s)
        assert torch.equal(r["sample"], ref["sample"]) and torch.equal(r["timestep"], ref["timestep"])
    assert not torch.equal(rows[0]["sample"], rows[3]["sample"])  # another seed, other rows


@pytest.mark.parametrize("softmax_bits,expected", [(None, 8), (16, 16), (6, 6)])
def test_softmax_bits_switch(softmax_bits, expected):
    cfg = small_config("qdiffusion", softmax_bits=softmax_bits)
    unet = tfmq.prepare_model(tiny_unet("uncond"), cfg)
    procs = [m.processor for m in unet.modules() if hasattr(m, "processor") and isinstance(m.processor, QuantAttnProcessor)]
    assert procs, "the tiny UNet has attention: Q-Diffusion must quantize its matmuls"
    for p in procs:
        assert [q.n_bits for q in p.quantizers()] == [8, 8, 8, expected]
        assert p.softmax_quant.unsigned


def test_softmax_bits_out_of_range_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"softmax_bits=20: expected an integer in 2\.\.16"):
        small_config("qdiffusion", softmax_bits=20)
