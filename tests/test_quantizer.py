"""tfmq.quant.quantizer / tfmq.quant.layers / tfmq.quant.config (docs/method.md section 2): exact integer grids, the clipping
search against a brute force, AdaRound, the beta schedule, activation observers, config validation."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tfmq
from tfmq.quant.config import ConfigError, QuantConfig, parse_bits
from tfmq.quant.layers import QuantLayer
from tfmq.quant.quantizer import (
    GAMMA,
    ZETA,
    ActQuantizer,
    TimestepContext,
    WeightQuantizer,
    beta_schedule,
    fake_quant,
    minmax_qparams,
    mse_clip_search,
)
from tfmq.quant.reconstruction import lp_loss, optimize_rows, rounding_regularizer


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------
# 1. uniform affine grid
def test_minmax_qparams_2bit_and_4bit_exact():
    s, z = minmax_qparams(torch.tensor(-1.0), torch.tensor(2.0), 2)  # 3 / (2^2 - 1) = 1, z = round(1 / 1)
    assert float(s) == 1.0 and float(z) == 1.0
    s, z = minmax_qparams(torch.tensor(-0.25), torch.tensor(0.5), 4)  # 0.75 / 15 = 0.05, z = round(0.25 / 0.05) = 5
    assert float(s) == pytest.approx(0.05, rel=1e-7) and float(z) == 5.0
    s, z = minmax_qparams(torch.tensor(-3.0), torch.tensor(5.0), 8)  # 8 / 255, z = round(3 * 255 / 8) = round(95.625)
    assert float(s) == pytest.approx(8 / 255, rel=1e-7) and float(z) == 96.0


def test_minmax_qparams_forces_zero_into_the_range():
    s, z = minmax_qparams(torch.tensor(0.5), torch.tensor(2.0), 2)  # min clamped to 0
    assert float(s) == pytest.approx(2 / 3, rel=1e-7) and float(z) == 0.0
    s, z = minmax_qparams(torch.tensor(-3.0), torch.tensor(-1.0), 2)  # max clamped to 0 -> z = 2^b - 1
    assert float(s) == 1.0 and float(z) == 3.0
    s, z = minmax_qparams(torch.tensor(0.0), torch.tensor(0.0), 8)  # degenerate: the minimum scale, not 0 / nan
    assert float(s) == pytest.approx(1e-8) and float(z) == 0.0
    for lo, hi, b in [(-1.3, 0.7, 4), (-0.01, 5.0, 8), (0.2, 0.9, 3)]:
        s, z = minmax_qparams(torch.tensor(lo), torch.tensor(hi), b)
        assert float(fake_quant(torch.zeros(1), s, z, b)) == 0.0  # 0 is exactly representable


def test_fake_quant_2bit_grid_and_clamp():
    s, z = torch.tensor(1.0), torch.tensor(1.0)  # levels {0,1,2,3} -> values {-1, 0, 1, 2}
    x = torch.tensor([-7.0, -1.2, -0.7, -0.2, 0.3, 0.6, 1.4, 1.6, 2.4, 9.0])
    expected = torch.tensor([-1.0, -1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    assert torch.equal(fake_quant(x, s, z, 2), expected)


def test_fake_quant_4bit_grid_matches_hand_computed_integers():
    s, z = minmax_qparams(torch.tensor(-0.25), torch.tensor(0.5), 4)  # s = 0.05, z = 5: values (q - 5) * 0.05, q in 0..15
    x = torch.tensor([-1.0, -0.26, -0.11, 0.0, 0.012, 0.33, 0.49, 0.52, 3.0])
    q = torch.tensor([0, 0, 3, 5, 5, 12, 15, 15, 15], dtype=torch.float32)  # clamp(round(x/s) + 5, 0, 15)
    torch.testing.assert_close(fake_quant(x, s, z, 4), (q - 5) * 0.05, rtol=0, atol=1e-7)
    # every output lies on the grid
    y = fake_quant(torch.linspace(-1, 1, 101), s, z, 4)
    k = y / s + z
    assert torch.allclose(k, k.round(), atol=1e-4) and float(k.min()) >= 0 and float(k.max()) <= 15


def test_fake_quant_straight_through_gradient():
    s, z = torch.tensor(0.1), torch.tensor(8.0)  # 4 bit: range [-0.8, 0.7]
    x = torch.tensor([-2.0, -0.87, -0.61, -0.04, 0.26, 0.53, 0.76, 3.0], requires_grad=True)
    fake_quant(x, s, z, 4).sum().backward()
    inside = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # round: identity gradient; clamp: 0 outside
    assert torch.equal(x.grad, inside)


# --------------------------------------------------------------------------------------------
# 2. clipping search == brute force
def _brute_force_candidates(w: torch.Tensor, bits: int) -> list[list[tuple[float, float, int]]]:
    """Per output channel, ``(mean |x_hat - x|^2.4, scale, zero point)`` of every clipping candidate, in float64."""
    levels = 2**bits - 1
    out = []
    for row in w.reshape(w.shape[0], -1).double().tolist():
        lo, hi = min(row), max(row)
        cands = []
        for i in range(80):
            c_lo, c_hi = lo * (1 - 0.01 * i), hi * (1 - 0.01 * i)
            s = max((c_hi - c_lo) / levels, 1e-8)
            z = round(-c_lo / s)
            err = sum(abs((min(max(round(v / s) + z, 0), levels) - z) * s - v) ** 2.4 for v in row) / len(row)
            cands.append((err, s, z))
        out.append(cands)
    return out


# float32 scores of a correct search are off by ~1e-6 relative, so it may pick a candidate whose float64 loss is
# that much above the best one (a near-tie); the closest runner-up in these weights is 4e-4 away, so any real
# mistake still fails.
CLIP_LOSS_RTOL = 1e-5


@pytest.mark.parametrize("bits,shape", [(2, (5, 3, 3, 3)), (4, (6, 40)), (3, (4, 2, 3, 3))])
def test_mse_clip_search_picks_a_brute_force_optimum(bits, shape):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(shape, generator=g) * torch.linspace(0.05, 2.0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    w[0].add_(0.3)  # a channel that is not centred
    s, z = mse_clip_search(w, bits)
    assert s.shape == (shape[0],) + (1,) * (len(shape) - 1) and z.shape == s.shape
    cands = _brute_force_candidates(w, bits)
    assert len(cands) == shape[0] and all(len(c) == 80 for c in cands)
    for r, (s_r, z_r, row) in enumerate(zip(s.flatten().tolist(), z.flatten().tolist(), cands)):
        # the chosen scale is one of the candidates (they are >= 1% apart, so the nearest one is unambiguous)
        i = min(range(len(row)), key=lambda j: abs(row[j][1] - s_r))
        err, s_i, z_i = row[i]
        assert abs(s_r - s_i) <= 1e-6 * s_i, (r, s_r, s_i)
        # its zero point is that candidate's, unless -c_min / s sits on a rounding boundary
        c_lo = min(w.reshape(shape[0], -1)[r].double().tolist()) * (1 - 0.01 * i)
        on_boundary = abs((-c_lo / s_i) % 1.0 - 0.5) < 1e-4
        assert z_r == z_i or (on_boundary and abs(z_r - z_i) == 1), (r, z_r, z_i)
        best = min(e for e, _, _ in row)
        assert err <= best * (1 + CLIP_LOSS_RTOL), (r, i, err, best)
    # the search actually clips: at 2-4 bits some channel prefers a narrower range than its min-max
    full = (w.reshape(shape[0], -1).amax(1) - w.reshape(shape[0], -1).amin(1)) / (2**bits - 1)
    assert bool((s.flatten() < full * 0.999).any())


def test_weight_quantizer_nearest_is_rtn_on_the_searched_grid():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g)
    q = WeightQuantizer(w, 4)
    s, z = mse_clip_search(w, 4)
    assert torch.equal(q.scale, s) and torch.equal(q.zero_point, z)
    assert torch.equal(q(w), (torch.clamp(torch.round(w / s) + z, 0, 15) - z) * s)
    assert not torch.allclose(q(w), w, atol=1e-3)  # 4-bit rounding moved the weights


# --------------------------------------------------------------------------------------------
# 3. AdaRound
def test_adaround_init_h_equals_fractional_part():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 4, 3, 3, generator=g)
    q = WeightQuantizer(w, 4)
    q.init_adaround(w)
    w_s = w / q.scale
    torch.testing.assert_close(q.h(), w_s - torch.floor(w_s), rtol=0, atol=1e-5)
    # soft AdaRound at init reproduces the float weight wherever it is not clipped
    inside = (torch.floor(w_s) + q.zero_point >= 0) & (torch.floor(w_s) + 1 + q.zero_point <= 15)
    torch.testing.assert_close(q(w)[inside], w[inside], rtol=0, atol=1e-5)
    assert [n for n, _ in q.named_parameters()] == ["alpha"]  # only alpha learns: s and z are buffers


def test_round_regularizer_values():
    w = torch.randn(3, 5)
    q = WeightQuantizer(w, 4)
    q.init_adaround(w)
    with torch.no_grad():
        q.alpha.copy_(torch.where(torch.rand(3, 5) > 0.5, 8.0, -8.0))  # h clamped to exactly 0 or 1
    assert set(q.h().unique().tolist()) <= {0.0, 1.0}
    for beta in (20.0, 7.3, 2.0):
        assert float(q.round_regularizer(beta).detach()) == 0.0
    with torch.no_grad():
        q.alpha.zero_()  # h = sigmoid(0) (zeta - gamma) + gamma = 0.5: every term is 1 - 0^beta = 1
    assert float(q.h().detach().mean()) == pytest.approx(0.5)
    assert float(q.round_regularizer(2.0).detach()) == pytest.approx(15.0)


def test_adaround_optimise_harden_finalize():
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    layer = QuantLayer(lin, "blk.lin", 3, None, TimestepContext())
    layer.set_quant_state(weight=True, act=False)
    x = torch.randn(64, 12)
    target = lin(x).detach()
    rtn = float(lp_loss(layer(x), target).detach())
    layer.init_adaround()
    cfg = tfmq.ReconConfig(iters=120, batch_size=32, lr=1e-2)
    stats = optimize_rows(lambda idx: lp_loss(layer(x[idx]), target[idx]), 64, layer.adaround_parameters(), cfg.iters,
                      cfg.batch_size, cfg.lr, rounding_regularizer([layer], cfg, cfg.iters), "t", False)
    assert stats["iters"] == 120
    q = layer.wq[0]
    w_s = lin.weight.detach() / q.scale
    q.harden()
    grid = q.integer_weight(lin.weight.detach())
    rounding = grid - torch.floor(w_s) - q.zero_point
    unclipped = (grid > 0) & (grid < 7)
    assert set(rounding[unclipped].unique().tolist()) <= {0.0, 1.0}  # hard rounding is floor + {0, 1}
    assert torch.equal(rounding[unclipped], (q.alpha >= 0).float()[unclipped])
    hard_out = layer(x).detach()
    layer.finalize()
    assert q.mode == "int" and q.alpha is None and q.w_int.dtype == torch.uint8
    assert int(q.w_int.min()) >= 0 and int(q.w_int.max()) <= 7
    assert torch.equal(q.w_int.float(), grid)
    assert torch.equal(layer(x), hard_out)  # finalizing does not change the output
    assert q.w_int.unique().numel() >= 6 and float(lp_loss(hard_out, target).detach()) > 0  # a real 3-bit grid, not FP
    assert float(lp_loss(layer(x), target).detach()) <= rtn * 1.05  # learned rounding is no worse than nearest


@pytest.mark.parametrize("iters,warmup", [(100, 0.2), (10, 0.2), (40, 0.25), (10, 0.25)])
def test_beta_schedule(iters, warmup):
    # the released code counts iterations from 1: the regulariser is on once count = step + 1 >= warmup * iters
    start = next(s for s in range(iters) if s + 1 >= warmup * iters)
    betas = [beta_schedule(s, iters, warmup, 20.0, 2.0) for s in range(iters)]
    assert all(b is None for b in betas[:start]) and betas[start] is not None
    assert betas[start] == pytest.approx(20.0) if float(start + 1) == warmup * iters else betas[start] < 20.0
    assert betas[-1] == pytest.approx(2.0)  # beta reaches beta_end on the last optimisation step
    decay = betas[start:]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing, linear
    diffs = [a - b for a, b in zip(decay, decay[1:])]
    assert max(diffs) == pytest.approx(min(diffs), rel=1e-9)


def test_beta_schedule_matches_released_linear_temp_decay():
    """BRECQ's LinearTempDecay(t_max=iters, rel_start_decay=warmup) at count = step + 1, written out by hand."""
    iters, warmup, b0, b1 = 100, 0.2, 20.0, 2.0
    assert beta_schedule(18, iters, warmup, b0, b1) is None  # count 19 < 20: warm-up
    assert beta_schedule(19, iters, warmup, b0, b1) == pytest.approx(20.0)  # count 20: on, rel_t = 0
    assert beta_schedule(59, iters, warmup, b0, b1) == pytest.approx(2.0 + 18.0 * (1 - 40 / 80))  # count 60
    assert beta_schedule(99, iters, warmup, b0, b1) == pytest.approx(2.0)  # count 100 = t_max


# --------------------------------------------------------------------------------------------
# activation quantizer: observers
def test_act_quantizer_minmax_and_ema_observers():
    ctx = TimestepContext()
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([-3.0, 1.0]), torch.tensor([-0.5, 4.0])]
    q = ActQuantizer(8, ctx)
    q.enabled = True
    q.start_observing(None)
    for b in batches:
        q(b)
    q.commit_shared()
    s, z = minmax_qparams(torch.tensor(-3.0), torch.tensor(4.0), 8)
    assert q.mode == "shared" and torch.equal(q.scale.data, s) and torch.equal(q.zero_point, z)
    q = ActQuantizer(8, ctx)
    q.enabled = True
    q.start_observing(0.9)
    for b in batches:
        q(b)
    q.commit_shared()
    lo = 0.9 * (0.9 * -1.0 + 0.1 * -3.0) + 0.1 * -0.5
    hi = 0.9 * (0.9 * 2.0 + 0.1 * 1.0) + 0.1 * 4.0
    s, z = minmax_qparams(torch.tensor(lo), torch.tensor(hi), 8)
    torch.testing.assert_close(q.scale.data, s, rtol=1e-6, atol=0)
    assert torch.equal(q.zero_point, z)


def test_act_quantizer_table_selects_entry_by_timestep():
    ctx = TimestepContext()
    q = ActQuantizer(4, ctx)
    q.enabled = True
    for t, amp in ((999, 8.0), (500, 2.0), (1, 0.5)):
        q.start_observing(0.95)
        q(torch.tensor([-amp, amp]))
        q.commit_timestep(t)
    q.commit_table()
    assert q.mode == "table" and q.table_timesteps.tolist() == [1, 500, 999]
    x = torch.tensor([0.3, -0.4, 1.7])
    for t, amp in ((999, 8.0), (500, 2.0), (1, 0.5)):
        ctx.timesteps = torch.tensor([t, t, t])
        s, z = minmax_qparams(torch.tensor(-amp), torch.tensor(amp), 4)
        torch.testing.assert_close(q(x), fake_quant(x, s, z, 4), rtol=0, atol=1e-7)
    ctx.timesteps = torch.tensor([1, 999, 500])  # mixed batch: row r uses its own timestep's entry
    rows = [fake_quant(x[i : i + 1], *minmax_qparams(torch.tensor(-a), torch.tensor(a), 4), 4) for i, a in enumerate((0.5, 8.0, 2.0))]
    torch.testing.assert_close(q(x), torch.cat(rows), rtol=0, atol=1e-7)
    ctx.timesteps = torch.tensor([17])
    with pytest.raises(tfmq.UncalibratedTimestepError, match="timestep 17 "):
        q(x)


# --------------------------------------------------------------------------------------------
# 7 (unit). split shortcut layer
def test_split_layer_equals_unsplit_when_disabled_and_quantizes_halves_separately():
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 8, 1)
    ctx = TimestepContext()
    split = QuantLayer(conv, "up_blocks.0.resnets.0.conv_shortcut", 4, 8, ctx, split=16)
    plain = QuantLayer(conv, "up_blocks.0.resnets.0.conv_shortcut", 4, 8, ctx)
    assert len(split.wq) == 2 and len(split.aq) == 2 and split.wq[0].scale.shape == (8, 1, 1, 1)
    x = torch.cat([torch.randn(2, 16, 4, 4) * 5.0, torch.randn(2, 8, 4, 4) * 0.1], dim=1)
    split.set_quant_state(False, False)
    plain.set_quant_state(False, False)
    assert torch.equal(split(x), conv(x)) and torch.equal(plain(x), conv(x))
    # weights: each half has its own per-channel grid from its own clipping search
    split.set_quant_state(True, False)
    s0, z0 = mse_clip_search(conv.weight[:, :16], 4)
    s1, z1 = mse_clip_search(conv.weight[:, 16:], 4)
    assert torch.equal(split.wq[0].scale, s0) and torch.equal(split.wq[1].scale, s1)
    w_hat = torch.cat([split.wq[0](conv.weight[:, :16]), split.wq[1](conv.weight[:, 16:])], 1)
    torch.testing.assert_close(split(x), F.conv2d(x, w_hat, conv.bias), rtol=0, atol=1e-5)
    # activations: each channel group gets its own range
    split.set_quant_state(False, True)
    for q in split.aq:
        q.start_observing(None)
    split(x)
    for q in split.aq:
        q.commit_shared()
    assert float(split.aq[0].scale) > 20 * float(split.aq[1].scale)
    s_a, z_a = minmax_qparams(x[:, 16:].min(), x[:, 16:].max(), 8)
    assert torch.equal(split.aq[1].scale.data, s_a) and torch.equal(split.aq[1].zero_point, z_a)


# --------------------------------------------------------------------------------------------
# 11. config
def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="unknown key.*weight_bitz"):
        QuantConfig.from_dict({"method": "tfmq", "weight_bitz": 4})
    with pytest.raises(ConfigError, match=r"quant\.recon.*iterz"):
        QuantConfig.from_dict({"recon": {"iters": 3, "iterz": 3}})
    with pytest.raises(ConfigError, match=r"quant\.calib.*every_kk"):
        QuantConfig.from_dict({"calib": {"every_kk": 3}})
    cfg = QuantConfig.from_dict({"method": "qdiffusion", "weight_bits": 8, "act_bits": None, "recon": {"iters": 7}})
    assert (cfg.method, cfg.weight_bits, cfg.act_bits, cfg.recon.iters, cfg.recon.batch_size) == ("qdiffusion", 8, None, 7, 32)
    assert cfg.bits_name == "W8A32"
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("bad,name", [
    ({"weight_bits": 1}, "weight_bits"),
    ({"weight_bits": 9}, "weight_bits"),
    ({"act_bits": 1}, "act_bits"),
    ({"method": "foo"}, "method"),
    ({"fsc_scope": "x"}, "fsc_scope"),
    ({"policy": "some"}, "policy"),
    ({"tiar_timesteps": "half"}, "tiar_timesteps"),
    ({"tiar": "yes"}, "tiar"),
    ({"recon": {"iters": -1}}, "recon.iters"),
    ({"recon": {"warmup": 1.0}}, "recon.warmup"),
    ({"tiar_recon": {"batch_size": 0}}, "tiar_recon.batch_size"),
    ({"calib": {"fsc_momentum": 1.0}}, "calib.fsc_momentum"),
])
def test_config_rejects_bad_values(bad, name):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        QuantConfig.from_dict(bad)


def test_parse_bits():
    assert parse_bits("W4A8") == (4, 8)
    assert parse_bits("w8a32") == (8, None)
    assert parse_bits("W8A32") == (8, None)
    assert parse_bits(" W2A4 ") == (2, 4)
    for bad in ("4/8", "W4", "A8", "W4A", "W4A8x", ""):
        with pytest.raises(ConfigError, match="W<weight bits>A<activation bits>"):
            parse_bits(bad)
