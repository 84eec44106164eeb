"""FID (float64 Fréchet distance + bootstrap CI), KID and IS computed from features (docs/method.md section 9).

The arithmetic half of the sample-quality metrics: everything here takes feature or logit arrays and
returns numbers, with no image, network or file in sight (``reference_stats`` embeds images and caches
the reference side; ``metrics.compute_metrics`` ties both together). The Fréchet distance is ours
(symmetric eigh formulation, scipy ``sqrtm`` kept as ``method="sqrtm"``), and so is the bootstrap
interval, because torch-fidelity has neither; KID and IS call torch-fidelity's own formulas.
"""
from __future__ import annotations

import numpy as np
import scipy.linalg
import torch

DEFAULT_NUM_BOOTSTRAP = 100
DEFAULT_KID_SUBSETS = 100
DEFAULT_KID_SUBSET_SIZE = 1000
FD_METHOD = "eigh: tr((S_r^1/2 S_f S_r^1/2)^1/2), float64"

# ----------------------------------------------------------------------------- Fréchet distance


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance in float64."""
    x = np.asarray(features.double().numpy() if torch.is_tensor(features) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be [N>=2, D]; got {x.shape}; fix: pass more samples")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    method: str = "eigh",
    eps: float = 1e-6,
    imag_tol: float = 1e-3,
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64.

    ``||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``.

    Args:
        method: ``"eigh"`` (default) uses ``tr((S1 S2)^(1/2)) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``, a
            symmetric PSD problem: exact for covariances, stable when N < D, and 20-50x faster than
            ``sqrtm`` on 1280-d features on our 2-core CPU. ``"sqrtm"`` is the pytorch-fid /
            guided-diffusion computation with ``scipy.linalg.sqrtm``: if the product is singular
            enough for non-finite values, ``eps*I`` is added to both covariances; round-off
            imaginary parts are dropped when the largest imaginary diagonal entry is below
            ``imag_tol`` times the largest real one, otherwise this raises.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}; "
            "expected statistics of the same feature layer"
        )
    diff = mu1 - mu2
    if method == "eigh":
        a = psd_sqrt(s1)
        w = np.linalg.eigvalsh(a @ s2 @ a)
        tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    elif method == "sqrtm":
        covmean = scipy.linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
        if np.iscomplexobj(covmean):
            diag = np.diagonal(covmean)
            worst, scale = np.abs(diag.imag).max(), max(np.abs(diag.real).max(), 1e-300)
            if worst > imag_tol * scale:
                raise ValueError(
                    f"sqrtm(S1 S2) has imaginary diagonal {worst:.3g} (> {imag_tol} x {scale:.3g}); expected a "
                    "PSD product; fix: use more samples than feature dims or method='eigh'"
                )
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise ValueError(f"method must be 'eigh' or 'sqrtm'; got {method!r}")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(np.asarray(sigma, np.float64))
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _trace_sqrt_of_gram(y_centered: np.ndarray, n: int) -> float:
    # tr((A S A)^(1/2)) with S = Yc^T Yc / (n-1): the nonzero eigenvalues of Yc^T Yc and Yc Yc^T agree,
    # so use whichever side is smaller.
    g = y_centered @ y_centered.T if y_centered.shape[0] <= y_centered.shape[1] else y_centered.T @ y_centered
    w = np.linalg.eigvalsh(g / (n - 1))
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance_eig(features: np.ndarray, mu_ref: np.ndarray, sigma_ref_sqrt: np.ndarray, trace_ref: float) -> float:
    """Same FID as ``frechet_distance`` from raw fake features and ``psd_sqrt(sigma_ref)``.

    Uses ``tr((S_r S_f)^(1/2)) = tr((S_r^(1/2) S_f S_r^(1/2))^(1/2))``; cheap when N < D, so the
    bootstrap can afford 100+ rounds.
    """
    x = np.asarray(features, np.float64)
    n = x.shape[0]
    mu = x.mean(axis=0)
    xc = x - mu
    diff = mu - mu_ref
    tr_fake = float((xc * xc).sum() / (n - 1))
    return float(diff @ diff + trace_ref + tr_fake - 2.0 * _trace_sqrt_of_gram(xc @ sigma_ref_sqrt, n))


def bootstrap_fid(
    fake_features: torch.Tensor | np.ndarray,
    mu_ref: np.ndarray,
    sigma_ref: np.ndarray,
    num_rounds: int = DEFAULT_NUM_BOOTSTRAP,
    seed: int = 0,
    confidence: float = 0.95,
    progress: bool = False,
    sigma_ref_sqrt: np.ndarray | None = None,
) -> dict:
    """95 % (``confidence``) bootstrap interval of FID over the generated samples (reference held fixed).

    Each round resamples the N fake features with replacement and recomputes FID. Duplicated samples
    lower the effective sample count, so bootstrap FIDs sit *above* the point estimate (``bias``
    below; ~+20 % at N=300 on 1280-d features). The raw percentile interval can therefore miss the
    point estimate altogether; we report it (``ci_percentile_raw``) but use the percentile interval
    re-centred on the point estimate, ``point + (q_lo - median, q_hi - median)``: its width is the
    bootstrap estimate of the sampling spread of FID at this N, the thing that decides whether two
    settings evaluated with the same N and reference differ.
    """
    from tqdm.auto import tqdm

    if num_rounds < 2:
        raise ValueError(f"num_rounds must be >= 2; got {num_rounds}; fix: use e.g. 100 (or 0 to skip the CI)")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    x = np.asarray(fake_features.double().numpy() if torch.is_tensor(fake_features) else fake_features, np.float64)
    n = x.shape[0]
    a = psd_sqrt(sigma_ref) if sigma_ref_sqrt is None else sigma_ref_sqrt
    tr_ref = float(np.trace(sigma_ref))
    z = x @ a  # per round we only re-index and re-centre these

    def fid_of(idx):
        xb, zb = x[idx], z[idx]
        mu = xb.mean(axis=0)
        xc, zc = xb - mu, zb - zb.mean(axis=0)
        diff = mu - mu_ref
        return diff @ diff + tr_ref + (xc * xc).sum() / (n - 1) - 2.0 * _trace_sqrt_of_gram(zc, n)

    point = float(fid_of(np.arange(n)))
    rng = np.random.default_rng(seed)
    vals = np.empty(num_rounds)
    for r in tqdm(range(num_rounds), disable=not progress, leave=False, desc="FID bootstrap"):
        vals[r] = fid_of(rng.integers(0, n, size=n))
    lo, med, hi = np.percentile(vals, [50 * (1 - confidence), 50, 50 * (1 + confidence)])
    return {
        "point": point,
        "ci": [float(point + lo - med), float(point + hi - med)],
        "ci_percentile_raw": [float(lo), float(hi)],
        "bias": float(vals.mean() - point),
        "std": float(vals.std(ddof=1)),
        "confidence": confidence,
        "rounds": num_rounds,
        "seed": seed,
        "method": "bootstrap over generated samples (reference fixed), percentile interval re-centred on the point",
    }


# ----------------------------------------------------------------------------- KID / IS


def kid(
    features_1: torch.Tensor,
    features_2: torch.Tensor,
    subsets: int = DEFAULT_KID_SUBSETS,
    subset_size: int = DEFAULT_KID_SUBSET_SIZE,
    seed: int = 2020,
) -> dict:
    """Unbiased polynomial-kernel MMD^2 (degree 3, gamma 1/D, coef 1) over random subsets (torch-fidelity)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    size = min(subset_size, len(features_1), len(features_2))
    if size < 2:
        raise ValueError(f"KID needs >= 2 samples per side; got {len(features_1)} and {len(features_2)}")
    out = kid_features_to_metric(
        features_1.float(), features_2.float(), kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False
    )
    return {"mean": out["kernel_inception_distance_mean"], "std": out["kernel_inception_distance_std"],
            "subsets": subsets, "subset_size": size}


def inception_score_from_logits(logits: torch.Tensor, splits: int = 10, shuffle: bool = True, seed: int = 2020) -> dict:
    """IS formula ``exp(E_x KL(p(y|x) || p(y)))`` on softmax(logits), mean/std over ``splits`` (torch-fidelity)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    if logits.dim() != 2 or logits.shape[0] < splits:
        raise ValueError(f"logits must be [N>={splits}, classes]; got {tuple(logits.shape)}; fix: more samples or fewer splits")
    out = isc_features_to_metric(logits.float().cpu(), splits=splits, shuffle=shuffle, rng_seed=seed)
    return {"mean": out["inception_score_mean"], "std": out["inception_score_std"], "splits": splits}
