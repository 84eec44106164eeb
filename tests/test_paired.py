"""tfmq.evaluation.paired: per-sample metrics against FP, paired bootstrap differences, verdicts."""
import math

import numpy as np
import pytest
import torch

from tfmq.evaluation.feature_metrics import frechet_distance
from tfmq.evaluation.paired import (
    fid_between,
    mean_interval,
    paired_difference,
    paired_fid_difference,
    paired_kid_difference,
    per_sample_vs_reference,
    ssim,
    verdict,
)


def _u8(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.uint8)


def test_psnr_mse_and_feature_distance_by_hand():
    ref = _u8(np.full((2, 1, 12, 12), 100))
    img = ref.clone()
    img[0] += 1  # every pixel one level off
    img[1, 0, 0, 0] = 110  # one pixel ten levels off
    out = per_sample_vs_reference(ref, img, torch.zeros(2, 3), torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]]))
    assert out["mse"][0] == pytest.approx((1 / 255) ** 2, rel=1e-12)
    assert out["mse"][1] == pytest.approx((10 / 255) ** 2 / 144, rel=1e-12)
    assert out["psnr"][0] == pytest.approx(20 * math.log10(255), rel=1e-12)  # 48.13 dB
    assert out["psnr"][1] == pytest.approx(10 * math.log10(144 * 255 ** 2 / 100), rel=1e-12)
    assert out["feat_dist"].tolist() == [5.0, 1.0]
    same = per_sample_vs_reference(ref, ref)
    assert same["psnr"].tolist() == [100.0, 100.0] and same["ssim"].tolist() == [1.0, 1.0]


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.2, 0.6
    out = ssim(np.full((1, 1, 11, 11), a), np.full((1, 1, 11, 11), b))
    c1 = 0.01 ** 2
    assert out[0] == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)


def test_ssim_matches_a_direct_windowed_float64_reference():
    rng = np.random.default_rng(0)
    a = rng.random((2, 1, 13, 14))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    x = np.arange(11) - 5.0
    g = np.exp(-x ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    ref = []
    for n in range(2):
        vals = []
        for i in range(13 - 10):
            for j in range(14 - 10):
                pa, pb = a[n, 0, i:i + 11, j:j + 11], b[n, 0, i:i + 11, j:j + 11]
                ma, mb = (w * pa).sum(), (w * pb).sum()
                va, vb = (w * pa * pa).sum() - ma ** 2, (w * pb * pb).sum() - mb ** 2
                cov = (w * pa * pb).sum() - ma * mb
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
        ref.append(np.mean(vals))
    np.testing.assert_allclose(ssim(a, b), ref, rtol=1e-10)
    assert 0.3 < ref[0] < 0.99  # a real, partial similarity


def test_paired_bootstrap_finds_a_known_difference_and_covers_zero_without_one():
    rng = np.random.default_rng(1)
    base = rng.standard_normal(256) * 5.0  # large per-sample spread that the pairing cancels
    a = base + 0.3 + 0.1 * rng.standard_normal(256)
    d = paired_difference(a, base, num_bootstrap=2000, seed=0)
    assert d["ci"][0] < 0.3 < d["ci"][1] and d["ci"][0] > 0.0
    assert verdict(d["ci"], "mse", "A", "B") == "B better" and verdict(d["ci"], "psnr", "A", "B") == "A better"
    unpaired = mean_interval(a, 2000, 0)["ci"][0] - mean_interval(base, 2000, 0)["ci"][1]
    assert unpaired < 0  # the two means' own intervals overlap: only the pairing decides
    c = base + 0.1 * rng.standard_normal(256)
    e = base + 0.1 * rng.standard_normal(256)
    n = paired_difference(c, e, num_bootstrap=2000, seed=0)
    assert n["ci"][0] < 0.0 < n["ci"][1] and verdict(n["ci"], "mse") == "inconclusive"
    with pytest.raises(ValueError, match="same samples"):
        paired_difference(a, base[:10])


def test_paired_fid_difference_of_a_mean_shift_is_exact():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((400, 6))
    mu, sigma = ref.mean(0), np.cov(ref, rowvar=False)
    fb = rng.standard_normal((64, 6)) * 1.3 + 0.2
    delta = np.array([0.5, -0.2, 0.0, 0.1, 0.0, 0.3])
    fa = fb + delta
    d = paired_fid_difference(fa, fb, mu, sigma, num_bootstrap=200, seed=0)
    fid_a = frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), mu, sigma)
    fid_b = frechet_distance(fb.mean(0), np.cov(fb, rowvar=False), mu, sigma)
    assert d["diff"] == pytest.approx(fid_a - fid_b, rel=1e-8, abs=1e-9)
    # a mean shift leaves the covariance unchanged: the difference is 2 delta.(mu_b - mu) + |delta|^2
    assert d["diff"] == pytest.approx(2 * delta @ (fb.mean(0) - mu) + delta @ delta, rel=1e-8)
    assert d["ci"][0] <= d["diff"] <= d["ci"][1]
    z = paired_fid_difference(fb, fb, mu, sigma, num_bootstrap=50, seed=0)
    assert z["diff"] == 0.0 and z["ci"] == [0.0, 0.0] and verdict(z["ci"], "fid") == "inconclusive"


def test_fid_between_a_set_and_itself_is_zero_and_matches_the_reference_formula():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((50, 8)), rng.standard_normal((70, 8)) + 0.5
    assert abs(fid_between(x, x)) < 1e-9
    ref = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert fid_between(x, y) == pytest.approx(ref, rel=1e-8)


def test_paired_kid_difference_matches_a_direct_unbiased_mmd():
    rng = np.random.default_rng(4)
    ref = rng.standard_normal((30, 5))
    fa, fb = rng.standard_normal((40, 5)) + 1.5, rng.standard_normal((40, 5))

    def mmd(x, y):
        k = lambda u, v: (u @ v / 5 + 1.0) ** 3  # noqa: E731
        n, m = len(x), len(y)
        xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
        yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
        xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
        return xx + yy - 2 * xy

    d = paired_kid_difference(fa, fb, ref, num_bootstrap=100, seed=0)
    assert d["diff"] == pytest.approx(mmd(fa, ref) - mmd(fb, ref), rel=1e-10)
    assert d["ci"][0] > 0 and verdict(d["ci"], "kid", "A", "B") == "B better"  # a mean shift away from the reference
