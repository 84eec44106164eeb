"""Paired evaluation: every setting samples from the same noise (and classes) as the FP model, so compare
image by image, and compare two settings on the same resampled indices (docs/method.md section 11).

Per-sample metrics against the FP samples (``per_sample_vs_reference``): MSE and PSNR of the decoded
images in [0, 1], SSIM (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, valid positions only, as
Wang et al. 2004), and the L2 distance of the extractor's pooled features. A setting's summary is the
mean with a bootstrap interval (``mean_interval``); ``fid_between`` is the FID of the quantized samples
against the FP samples themselves.

Two settings A, B on the same noise (``paired_difference`` of per-sample metrics,
``paired_fid_difference`` / ``paired_kid_difference`` of set metrics against the real reference):
each bootstrap round draws ONE index vector and evaluates both settings on it, so the noise that
both share cancels. ``verdict`` says "A better" / "B better" only when the interval excludes 0.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from tfmq.evaluation.feature_metrics import _trace_sqrt_of_gram, psd_sqrt

#: metric -> True when lower is better (the per-sample metrics against FP and the set metrics)
LOWER_IS_BETTER = {"mse": True, "psnr": False, "ssim": False, "feat_dist": True, "lpips": True, "fid": True, "kid": True,
                   "domain_fd": True, "label_agreement": False, "class_accuracy": False, "prompt_accuracy": False}


def _unit(images: torch.Tensor) -> np.ndarray:
    """uint8 [N,C,H,W] -> float64 in [0, 1]."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W]; got {getattr(images, 'dtype', type(images))} "
                         f"{tuple(getattr(images, 'shape', ()))}")
    return images.double().numpy() / 255.0


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 2-D filter over the last two axes, valid positions only."""
    k = len(g)
    h = sum(g[i] * x[..., i:x.shape[-2] - k + 1 + i, :] for i in range(k))
    return sum(g[i] * h[..., :, i:x.shape[-1] - k + 1 + i] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03,
         data_range: float = 1.0) -> np.ndarray:
    """Per-image SSIM of float images [N, C, H, W] (channels averaged); H, W >= ``window``."""
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim: expected two [N, C, H, W] arrays of one shape; got {a.shape} and {b.shape}")
    if min(a.shape[-2:]) < window:
        raise ValueError(f"ssim: images {a.shape[-2:]} are smaller than the {window}-pixel window")
    g = _gaussian_window(window, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    s_aa = _filter_valid(a * a, g) - mu_a ** 2
    s_bb = _filter_valid(b * b, g) - mu_b ** 2
    s_ab = _filter_valid(a * b, g) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
    return m.mean(axis=(1, 2, 3))


def psnr_from_mse(mse: np.ndarray, data_range: float = 1.0, cap_db: float = 100.0) -> np.ndarray:
    """PSNR in dB; identical images (MSE 0) get ``cap_db`` so that means stay finite."""
    mse = np.asarray(mse, np.float64)
    with np.errstate(divide="ignore"):
        out = 10.0 * np.log10(data_range ** 2 / mse)
    return np.where(mse > 0, np.minimum(out, cap_db), cap_db)


def per_sample_vs_reference(ref_images: torch.Tensor, images: torch.Tensor, ref_features: torch.Tensor | None = None,
                            features: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Per-sample MSE, PSNR, SSIM (and feature L2 distance) of ``images`` against ``ref_images``, row by row."""
    a, b = _unit(ref_images), _unit(images)
    if a.shape != b.shape:
        raise ValueError(f"paired metrics need the same samples: reference {a.shape} vs {b.shape}")
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))
    out = {"mse": mse, "psnr": psnr_from_mse(mse), "ssim": ssim(a, b)}
    if ref_features is not None and features is not None:
        fa, fb = np.asarray(ref_features, np.float64), np.asarray(features, np.float64)
        if fa.shape != fb.shape:
            raise ValueError(f"feature shapes differ: {fa.shape} vs {fb.shape}")
        out["feat_dist"] = np.sqrt(((fa - fb) ** 2).sum(axis=1))
    return out


def _interval(vals: np.ndarray, point: float, confidence: float) -> list[float]:
    lo, hi = np.percentile(vals, [50 * (1 - confidence), 50 * (1 + confidence)])
    return [float(lo), float(hi)]


def mean_interval(x: np.ndarray, num_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Mean of per-sample values with a percentile bootstrap interval."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(num_bootstrap, len(x)))
    means = x[idx].mean(axis=1)
    return {"mean": float(x.mean()), "ci": _interval(means, float(x.mean()), confidence), "n": int(len(x))}


def _check_pair(a, b) -> None:
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs the same samples on both sides; got {len(a)} and {len(b)}")


def paired_difference(a: np.ndarray, b: np.ndarray, num_bootstrap: int = 1000, seed: int = 0,
                      confidence: float = 0.95) -> dict:
    """Mean of ``a - b`` over paired samples with a bootstrap interval (one index vector per round for both)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    _check_pair(a, b)
    return mean_interval(a - b, num_bootstrap, seed, confidence)


def _paired_set_difference(stat_a: Callable[[np.ndarray], float], stat_b: Callable[[np.ndarray], float], n: int,
                           num_bootstrap: int, seed: int, confidence: float) -> dict:
    full = np.arange(n)
    point = stat_a(full) - stat_b(full)
    rng = np.random.default_rng(seed)
    vals = np.empty(num_bootstrap)
    for r in range(num_bootstrap):
        idx = rng.integers(0, n, size=n)
        vals[r] = stat_a(idx) - stat_b(idx)
    med = float(np.median(vals))
    lo, hi = _interval(vals, point, confidence)
    # re-centred on the point estimate, as the FID interval of one setting (bootstrap_fid): duplicates bias
    # both sides' bootstrap FIDs upwards by about the same amount; the width is what decides
    return {"diff": float(point), "ci": [point + lo - med, point + hi - med], "rounds": num_bootstrap, "seed": seed}


class FidAgainst:
    """FID of any index subset of a feature matrix against fixed reference statistics (cheap when N < D)."""

    def __init__(self, features: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                 sigma_ref_sqrt: np.ndarray | None = None):
        self.x = np.asarray(features, np.float64)
        self.z = self.x @ (psd_sqrt(sigma_ref) if sigma_ref_sqrt is None else sigma_ref_sqrt)
        self.mu_ref, self.tr_ref = np.asarray(mu_ref, np.float64), float(np.trace(sigma_ref))

    def __call__(self, idx: np.ndarray) -> float:
        n = len(idx)
        u, counts = np.unique(idx, return_counts=True)
        if len(u) == n:  # no duplicates (the full set): the plain formula
            xb, zb = self.x[idx], self.z[idx]
            mu = xb.mean(axis=0)
            xc, zc = xb - mu, zb - zb.mean(axis=0)
        else:  # a bootstrap resample (~63 % unique rows): row i weighted by its count, the same moments, and the
            # Gram matrix shrinks from n x n to unique x unique (~4x less eigendecomposition at n = 256)
            w = counts.astype(np.float64)
            xu, zu = self.x[u], self.z[u]
            mu = w @ xu / n
            root = np.sqrt(w)[:, None]
            xc, zc = (xu - mu) * root, (zu - w @ zu / n) * root
        diff = mu - self.mu_ref
        return float(diff @ diff + self.tr_ref + (xc * xc).sum() / (n - 1) - 2.0 * _trace_sqrt_of_gram(zc, n))


def fid_between(features: np.ndarray, ref_features: np.ndarray) -> float:
    """FID of one sample set against another (e.g. quantized samples against the FP samples)."""
    r = np.asarray(ref_features, np.float64)
    return FidAgainst(features, r.mean(axis=0), np.cov(r, rowvar=False))(np.arange(len(features)))


def paired_fid_difference(features_a: np.ndarray, features_b: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray,
                          num_bootstrap: int = 200, seed: int = 0, confidence: float = 0.95,
                          sigma_ref_sqrt: np.ndarray | None = None) -> dict:
    """FID(A) - FID(B) against one reference, both recomputed on the same resampled sample indices."""
    _check_pair(features_a, features_b)
    sq = psd_sqrt(sigma_ref) if sigma_ref_sqrt is None else sigma_ref_sqrt
    fa, fb = FidAgainst(features_a, mu_ref, sigma_ref, sq), FidAgainst(features_b, mu_ref, sigma_ref, sq)
    return _paired_set_difference(fa, fb, len(features_a), num_bootstrap, seed, confidence)


class KidAgainst:
    """Unbiased MMD^2 with the KID kernel (x.y / D + 1)^3 of any index subset against fixed reference features."""

    def __init__(self, features: np.ndarray, ref_features: np.ndarray):
        x, y = np.asarray(features, np.float64), np.asarray(ref_features, np.float64)
        d = x.shape[1]
        self.kxx = (x @ x.T / d + 1.0) ** 3
        self.kxy_mean = ((x @ y.T / d + 1.0) ** 3).mean(axis=1)  # per fake sample: mean kernel to the reference
        kyy = (y @ y.T / d + 1.0) ** 3
        m = len(y)
        self.yy = float((kyy.sum() - np.trace(kyy)) / (m * (m - 1)))

    def __call__(self, idx: np.ndarray) -> float:
        n = len(idx)
        k = self.kxx[np.ix_(idx, idx)]
        xx = (k.sum() - np.trace(k)) / (n * (n - 1))
        return float(xx + self.yy - 2.0 * self.kxy_mean[idx].mean())


def paired_kid_difference(features_a: np.ndarray, features_b: np.ndarray, ref_features: np.ndarray,
                          num_bootstrap: int = 200, seed: int = 0, confidence: float = 0.95) -> dict:
    """KID(A) - KID(B) (full-set unbiased MMD^2) against one reference, on the same resampled indices."""
    _check_pair(features_a, features_b)
    ka, kb = KidAgainst(features_a, ref_features), KidAgainst(features_b, ref_features)
    return _paired_set_difference(ka, kb, len(features_a), num_bootstrap, seed, confidence)


def verdict(ci: list[float], metric: str, a: str = "A", b: str = "B") -> str:
    """``"<a> better"`` / ``"<b> better"`` when the interval of (a - b) excludes 0, else ``"inconclusive"``."""
    lo, hi = ci
    if lo <= 0.0 <= hi:
        return "inconclusive"
    a_lower = hi < 0.0
    return f"{a} better" if a_lower == LOWER_IS_BETTER[metric] else f"{b} better"
