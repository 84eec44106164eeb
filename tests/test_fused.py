"""tfmq.quant.fused (docs/method.md section 6): the fused soft rounding, regulariser gradient and learnable fake-quant
against the plain autograd expressions in float64, and the fused reconstruction loop against the reference loop."""
import pytest
import torch
from torch import nn

import tfmq
from tfmq.quant.fused import GAMMA, ZETA, fake_quant_learnable, reference_autograd, soft_rounding, soft_rounding_terms
from tfmq.quant.layers import QuantLayer
from tfmq.quant.quantizer import ActQuantizer, TimestepContext, WeightQuantizer, fake_quant
from tfmq.quant.reconstruction import lp_loss, optimize_rows, rounding_regularizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_soft(alpha, w_floor, zp, scale, levels, coef, beta):
    """The unfused expressions: AdaRound's soft weight and the rounding regulariser (plain autograd)."""
    h = torch.clamp(torch.sigmoid(alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
    w_hat = (torch.clamp(w_floor + h + zp, 0, levels) - zp) * scale
    return w_hat, coef * (1 - (2 * h - 1).abs().pow(beta)).sum()


def _grid_case(n_bits: int, seed: int = 0):
    """float64 weights whose floor(W / s) + z covers the grid's ends (-2 .. L + 1) and alphas that clamp h."""
    g = torch.Generator().manual_seed(seed)
    levels = 2**n_bits - 1
    scale = torch.rand(6, 1, generator=g, dtype=torch.float64) * 0.1 + 0.01
    zp = torch.full((6, 1), float(levels // 2), dtype=torch.float64)
    w_floor = torch.randint(-2 - levels // 2, levels - levels // 2 + 2, (6, 40), generator=g).double()
    alpha = torch.randn(6, 40, generator=g, dtype=torch.float64) * 4  # |alpha| > 2.4: h clamped to 0 or 1
    return alpha, w_floor, zp, scale, levels


@pytest.mark.parametrize("n_bits", [4, 8])
@pytest.mark.parametrize("coef,beta", [(0.0, 2.0), (0.01, 20.0), (0.3, 2.0), (0.05, 3.7)])
def test_soft_rounding_value_and_gradient_match_autograd_in_float64(n_bits, coef, beta):
    alpha, w_floor, zp, scale, levels = _grid_case(n_bits)
    assert ((w_floor + zp) < 0).any() and ((w_floor + zp) > levels - 1).any()  # both clamped ends are exercised
    upstream = torch.randn(alpha.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a_ref = alpha.clone().requires_grad_(True)
    w_ref, reg_ref = _reference_soft(a_ref, w_floor, zp, scale, levels, coef, beta)
    (g_ref,) = torch.autograd.grad((w_ref * upstream).sum() + reg_ref, a_ref)
    a = alpha.clone().requires_grad_(True)
    w_hat = soft_rounding(a, soft_rounding_terms(w_floor + zp, scale, zp, n_bits), coef, beta)
    (g,) = torch.autograd.grad((w_hat * upstream).sum(), a)  # the regulariser's gradient comes with the weight's
    torch.testing.assert_close(w_hat, w_ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert (g == 0).any() and (g != 0).sum() > alpha.numel() // 4  # clamped entries get none, the rest do


def test_soft_rounding_passes_torch_gradcheck():
    alpha, w_floor, zp, scale, levels = _grid_case(4, seed=3)
    alpha = (alpha / 4).requires_grad_(True)  # away from the clamp's kinks, where finite differences are exact
    terms = soft_rounding_terms(w_floor + zp, scale, zp, 4)
    assert torch.autograd.gradcheck(lambda a: soft_rounding(a, terms, 0.0, 2.0), (alpha,))


def test_weight_quantizer_fused_forward_equals_reference_within_float32_roundoff():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3)
    q = WeightQuantizer(w, 4)
    q.init_adaround(w)
    with torch.no_grad():
        q.alpha.add_(torch.randn_like(q.alpha))
    fused = q(w)
    with reference_autograd():
        ref = q(w)
    assert not torch.equal(q.alpha, torch.zeros_like(q.alpha))
    torch.testing.assert_close(fused, ref, rtol=0, atol=4 * float(q.scale.max()) * 2**-23 * 16)
    q.harden()  # the hard grid takes the exact path in both
    with reference_autograd():
        hard_ref = q(w)
    assert torch.equal(q(w), hard_ref)


@pytest.mark.parametrize("n_bits", [4, 8])
def test_fake_quant_learnable_matches_autograd_in_float64(n_bits):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 3)
    scale = torch.tensor(0.05 if n_bits == 4 else 0.01, dtype=torch.float64)
    zp = torch.tensor(float(2 ** (n_bits - 1)), dtype=torch.float64)
    upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
    x1, s1 = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    ref = fake_quant(x1, s1, zp, n_bits)
    gx_ref, gs_ref = torch.autograd.grad((ref * upstream).sum(), (x1, s1))
    x2, s2 = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    out = fake_quant_learnable(x2, s2, zp, n_bits)
    gx, gs = torch.autograd.grad((out * upstream).sum(), (x2, s2))
    assert torch.equal(out.detach(), ref.detach())
    outside = (x / scale).round() + zp
    assert ((outside < 0) | (outside > 2**n_bits - 1)).any()  # both regimes of the step-size gradient
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-10, atol=1e-10)


def test_act_quantizer_inference_path_is_bit_identical_to_fake_quant():
    ctx = TimestepContext()
    q = ActQuantizer(8, ctx)
    x = torch.randn(8, 4, 6, 6) * 5
    q.enabled = True
    q.start_observing(None)
    q(x)
    q.commit_shared()
    with torch.no_grad():
        fast = q(x)
    assert torch.equal(fast, fake_quant(x, q.scale.detach(), q.zero_point, 8))
    halves = torch.arange(-600, 600, dtype=torch.float32) * 0.5 * q.scale.detach()  # ties of round(x / s)
    with torch.no_grad():
        assert torch.equal(q(halves), fake_quant(halves, q.scale.detach(), q.zero_point, 8))


def _fit(fused: bool, iters: int = 300):
    """A seeded conv + linear unit reconstructed with AdaRound: (alphas, rec losses), fused or reference."""
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16, 16)
    ctx = TimestepContext()
    layers = [QuantLayer(conv, "u.conv", 4, None, ctx), QuantLayer(lin, "u.lin", 4, None, ctx)]
    x = torch.randn(128, 8, 6, 6)
    with torch.no_grad():
        target = lin(conv(x).mean((2, 3)))
    for l in layers:
        l.set_quant_state(weight=True, act=False)
        l.init_adaround()
    cfg = tfmq.ReconConfig(iters=iters, batch_size=32, lr=1e-2)
    params = [p for l in layers for p in l.adaround_parameters()]

    def step(idx):
        return lp_loss(layers[1](layers[0](x[idx]).mean((2, 3))), target[idx])

    def run():
        return optimize_rows(step, 128, params, iters, 32, cfg.lr, rounding_regularizer(layers, cfg, iters), "t", False, seed=3)

    if fused:
        stats = run()
    else:
        with reference_autograd():
            stats = run()
    return [p.detach().clone() for p in params], stats


def test_fused_loop_makes_the_reference_loops_rounding_decisions():
    a_fused, s_fused = _fit(True)
    a_ref, s_ref = _fit(False)
    total = sum(a.numel() for a in a_ref)
    flips = sum(int(((a >= 0) != (b >= 0)).sum()) for a, b in zip(a_fused, a_ref))
    moved = sum(int(((a >= 0) != (b >= 0)).sum()) for a, b in zip(a_ref, _initial_alphas()))
    assert moved > total // 50  # the reconstruction really changes decisions (so agreeing is not trivial)
    assert flips <= total // 500, f"{flips} of {total} rounding decisions differ"  # bound: 0.2 % (float round-off)
    assert s_fused["rec_loss_first"] == pytest.approx(s_ref["rec_loss_first"], rel=1e-5)
    assert s_fused["rec_loss_last"] == pytest.approx(s_ref["rec_loss_last"], rel=2e-2)


def _initial_alphas():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(8, 16, 3, padding=1), nn.Linear(16, 16)
    ctx = TimestepContext()
    layers = [QuantLayer(conv, "u.conv", 4, None, ctx), QuantLayer(lin, "u.lin", 4, None, ctx)]
    for l in layers:
        l.init_adaround()
    return [p.detach() for l in layers for p in l.adaround_parameters()]


def test_fused_regulariser_state_is_cleared_when_the_grid_is_final():
    torch.manual_seed(0)
    layer = QuantLayer(nn.Linear(6, 4), "l", 4, None, TimestepContext())
    layer.init_adaround()
    cfg = tfmq.ReconConfig(iters=10, batch_size=4, lr=1e-2)
    reg = rounding_regularizer([layer], cfg, 10)
    assert reg(9) is None and layer.wq[0].reg == (0.01, 2.0)  # the last step: beta_end, coefficient on
    assert reg(0) is None and layer.wq[0].reg[0] == 0.0  # warm-up: off
    reg(9)
    layer.finalize()
    assert layer.wq[0].reg == (0.0, 2.0) and layer.wq[0]._terms is None
    with reference_autograd():
        value = rounding_regularizer([QuantLayer(nn.Linear(6, 4), "m", 4, None, TimestepContext())], cfg, 10)
        assert value(0) is None  # warm-up: nothing to add
