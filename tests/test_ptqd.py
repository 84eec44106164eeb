"""PTQD (tfmq.quant.ptqd): the correlated coefficient, bias and residual std recovered on synthetic data with known
values; the correction on a quantized tiny UNet (fit, hook, checkpoint round trip); DDIM variance absorption."""
import pytest
import torch
from diffusers import DDIMScheduler

import tfmq
from tfmq.diffusion.sampling import sample
from tfmq.quant.ptqd import NoiseCorrection, ddim_noise_scale, fit_noise_correction, noise_correction

from engine_fixtures import SCHED_CFG, calib, calib_cfg, quantized, run, small_config, tiny_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_recovers_a_known_coefficient_bias_and_residual_std():
    g = torch.Generator().manual_seed(0)
    eps = [torch.randn(512, 3, 8, 8, generator=g) for _ in range(3)]
    k_true, bias, sd = [0.2, 0.05, -0.1], torch.tensor([0.03, -0.02, 0.01]), 0.05
    q = [(1 + k) * e + bias.view(1, 3, 1, 1) + sd * torch.randn(e.shape, generator=g) for k, e in zip(k_true, eps)]
    corr, stats = fit_noise_correction(eps, q, [900, 500, 100])
    for i, k in enumerate(k_true):
        assert abs(float(corr.k[i]) - k) < 3e-3  # k_t: least squares of (eps_q - eps) on eps
        kk = max(k, 0.0)  # as the released code: a negative k is not applied
        torch.testing.assert_close(corr.bias[i], bias / (1 + kk), atol=3e-3, rtol=0)
        # what is left: ((k - kk) eps + noise) / (1 + kk): the unapplied negative k stays in the residual
        assert float(corr.sigma_q[i]) == pytest.approx(((k - kk) ** 2 + sd ** 2) ** 0.5 / (1 + kk), rel=0.03)
        row = stats["per_timestep"][i]
        assert row["timestep"] == [900, 500, 100][i] and row["err_after"] < row["err_before"]
    out = corr.correct(q[0][:4], 900)
    torch.testing.assert_close(out, q[0][:4] / (1 + corr.k[0]) - corr.bias[0].view(1, 3, 1, 1))
    assert torch.equal(corr.correct(q[2][:2], torch.tensor([100, 100])), q[2][:2] - corr.bias[2].view(1, 3, 1, 1))
    with pytest.raises(ValueError, match=r"no entry for timestep\(s\) \[7\]"):
        corr.correct(q[0][:1], 7)


def test_ddim_noise_scale_matches_ptqd_noise_fusion_by_hand():
    sched = DDIMScheduler(**{k: v for k, v in SCHED_CFG.items() if k in DDIMScheduler.__init__.__code__.co_varnames})
    sched.set_timesteps(20)
    t, prev = 500, 450
    a_t, a_p = float(sched.alphas_cumprod[t]), float(sched.alphas_cumprod[prev])
    sigma = (float(sched._get_variance(t, prev))) ** 0.5  # diffusers' own DDIM variance, eta = 1
    c = (1 - a_p - sigma ** 2) ** 0.5 - (a_p * (1 - a_t) / a_t) ** 0.5
    sq = 0.02
    assert ddim_noise_scale(sched, t, 1.0, sq) == pytest.approx((sigma ** 2 - c ** 2 * sq ** 2) ** 0.5 / sigma, rel=1e-9)
    assert ddim_noise_scale(sched, t, 0.0, sq) == 1.0  # eta = 0: nothing to absorb into
    assert ddim_noise_scale(sched, t, 1.0, 10.0) == 0.0  # more residual noise than the step adds: no noise


def _ptqd(kind="uncond"):
    return quantized(kind, "ptqd")


def test_ptqd_recipe_fits_and_corrects_a_quantized_unet(tmp_path):
    q = _ptqd()
    corr = noise_correction(q)
    assert isinstance(corr, NoiseCorrection) and corr.timesteps.tolist() == calib().timesteps
    stats = q._tfmq.stats["activations"]["correction"]
    assert stats["mode"] == "ptqd" and not stats["ptqd"]["guided_fit"]
    assert all(r["err_after"] <= r["err_before"] for r in stats["ptqd"]["per_timestep"])
    x = unet_inputs("uncond", step=2)
    corrected = run(q, x)
    corr.enabled = False
    raw = run(q, x)
    corr.enabled = True
    t = int(x["timestep"][0])
    torch.testing.assert_close(corrected, corr.correct(raw, t))
    tfmq.set_quant_state(q, weight=False, act=False)  # FP mode: no correction either
    fp = run(q, x)
    torch.testing.assert_close(fp, run(tiny_unet("uncond"), x), atol=1e-5, rtol=0)
    tfmq.enable_inference(q)
    tfmq.save(q, tmp_path / "ck")
    from tfmq.quant.checkpoint import read_header

    assert read_header(tmp_path / "ck")["noise_correction"]["kind"] == "ptqd"
    loaded = tfmq.load(tmp_path / "ck", tiny_unet("uncond"))
    assert torch.equal(run(loaded, x), corrected)
    assert torch.equal(noise_correction(loaded).k, corr.k) and torch.equal(noise_correction(loaded).bias, corr.bias)


def test_ptqd_fits_the_guided_prediction_of_a_cfg_set():
    unet = tiny_unet("class")
    q = tfmq.quantize(unet, calib_cfg(), small_config("ptqd", calib={"n_per_step": 8}), progress=False)
    stats = q._tfmq.stats["activations"]["correction"]["ptqd"]
    assert stats["guided_fit"] and len(stats["per_timestep"]) == calib_cfg().num_steps


def test_variance_absorption_only_with_eta_above_zero():
    q = _ptqd()
    corr = noise_correction(q)
    sched = lambda: DDIMScheduler(**{k: v for k, v in SCHED_CFG.items() if k in DDIMScheduler.__init__.__code__.co_varnames})  # noqa: E731
    steps = len(calib().timesteps)
    base = sample(q, sched(), 3, steps, batch_size=3, seed=5, eta=1.0, progress=False)
    saved = corr.sigma_q.clone()
    corr.sigma_q.zero_()  # nothing to absorb: the explicit-noise path must equal the generator path exactly
    plain = sample(q, sched(), 3, steps, batch_size=3, seed=5, eta=1.0, progress=False)
    corr.enabled = False
    no_corr_gen = sample(q, sched(), 3, steps, batch_size=3, seed=5, eta=1.0, progress=False)
    corr.enabled = True
    corr.sigma_q.copy_(saved)
    assert not torch.equal(base, plain)  # absorption changed the added noise
    assert not torch.equal(plain, no_corr_gen)  # the correction itself acts
    corr.sigma_q.zero_()
    corr.k.zero_()
    corr.bias.zero_()
    assert torch.equal(sample(q, sched(), 3, steps, batch_size=3, seed=5, eta=1.0, progress=False), no_corr_gen)
    corr.sigma_q.copy_(saved)
    det = sample(q, sched(), 3, steps, batch_size=3, seed=5, eta=0.0, progress=False)
    assert det.shape == base.shape


def test_variance_absorption_in_several_batches_equals_one_batch():
    """PTQD at eta > 0 over several sampler batches: sample j depends on (seed, j) only, so 3 batches of 2 equal one
    batch of 6 (the step noise once overwrote the run's initial noise, which the second batch then started from)."""
    q = _ptqd()
    sched = lambda: DDIMScheduler(**{k: v for k, v in SCHED_CFG.items() if k in DDIMScheduler.__init__.__code__.co_varnames})  # noqa: E731
    steps = len(calib().timesteps)
    assert noise_correction(q).sigma_q.abs().max() > 0  # absorption acts
    whole = sample(q, sched(), 6, steps, batch_size=6, seed=5, eta=1.0, progress=False)
    batched = sample(q, sched(), 6, steps, batch_size=2, seed=5, eta=1.0, progress=False)
    assert whole.shape == batched.shape == (6, *whole.shape[1:])
    assert torch.allclose(batched, whole, atol=1e-5, rtol=0)  # batching only reorders float sums
    assert (batched[:2] - batched[2:4]).abs().max() > 1e-3  # the batches start from different noise
