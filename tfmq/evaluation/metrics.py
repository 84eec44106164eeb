"""Sample-quality metrics for the TFMQ-DM evaluation (docs/method.md section 9): FID (+ bootstrap CI), sFID, KID, IS.

Reference statistics (features, mean, covariance) are computed once per (dataset split, extractor)
and cached in one safetensors file with a JSON sidecar, so each evaluation only embeds the
generated images. Feature extraction and KID/IS go through torch-fidelity; the Fréchet distance
(float64; symmetric eigh formulation, scipy ``sqrtm`` kept as ``method="sqrtm"``), the sFID feature
and the bootstrap confidence interval are ours, because torch-fidelity has no sFID and no CI. Every number carries its extractor in its key (``"fid/<extractor>"``), so
numbers from different networks never share a column.

Example::

    ref = compute_reference_stats(test_uint8, "out/ref_test.safetensors", split="test")
    res = compute_metrics(samples_uint8, ref)          # extractor taken from the reference
    res["values"]["fid/efficientnet-lite0-112"], res["metrics"]["fid"]["ci95"]
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import scipy.linalg
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from tfmq.evaluation.extractors import ExtractorSpec, create_extractor, get_extractor_spec
from tfmq.io import atomic_save_safetensors, atomic_write_json

DEFAULT_NUM_BOOTSTRAP = 100
DEFAULT_KID_SUBSETS = 100
DEFAULT_KID_SUBSET_SIZE = 1000
DEFAULT_BATCH_SIZE = 100
ALL_METRICS = ("fid", "sfid", "kid", "is")
REFERENCE_FORMAT_VERSION = "1"
FD_METHOD = "eigh: tr((S_r^1/2 S_f S_r^1/2)^1/2), float64"


class UInt8ImageDataset(Dataset):
    """uint8 [N,1|3,H,W] tensor as the Dataset torch-fidelity expects (3xHxW uint8 per item)."""

    def __init__(self, images: torch.Tensor):
        _check_images(images)
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def _check_images(images) -> None:
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] in (1, 3)):
        got = (tuple(images.shape), images.dtype) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(
            f"images must be a uint8 tensor [N,1|3,H,W]; got {got}; fix: tfmq.diffusion.data.to_uint8(x) for x in [-1,1]"
        )
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 images for a covariance; got {images.shape[0]}; fix: generate more samples")


def images_sha256(images: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def extract_features(
    images: torch.Tensor,
    extractor: str,
    features: Sequence[str],
    weights_path: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Embed uint8 images with a registered extractor, batched (tqdm). Returns float32 CPU features."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    _check_images(images)
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} not supported by torch-fidelity's feature loop; expected cpu or cuda")
    fe = create_extractor(extractor, list(features), weights_path=weights_path, device=device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        out = get_featuresdict_from_dataset(
            UInt8ImageDataset(images), fe, batch_size, device.type == "cuda", True, progress
        )
    return {k: v.float().cpu() for k, v in out.items()}


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


# ----------------------------------------------------------------------------- reference statistics


@dataclass
class ReferenceStats:
    """Cached reference features + Gaussian statistics of one (split, extractor)."""

    path: Path
    meta: dict
    features: dict[str, torch.Tensor]  # feature layer -> [N, D] float32
    mu: dict[str, np.ndarray]
    sigma: dict[str, np.ndarray]
    _sqrt: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def sigma_sqrt(self, layer: str) -> np.ndarray:
        """``psd_sqrt(sigma[layer])``, computed once per loaded reference."""
        if layer not in self._sqrt:
            self._sqrt[layer] = psd_sqrt(self.sigma[layer])
        return self._sqrt[layer]

    def fid(self, features: torch.Tensor, layer: str) -> float:
        """FID of raw features against this reference (eigh formulation, see ``frechet_distance``)."""
        x = features.double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
        return frechet_distance_eig(x, self.mu[layer], self.sigma_sqrt(layer), float(np.trace(self.sigma[layer])))

    @property
    def spec(self) -> ExtractorSpec:
        return get_extractor_spec(self.meta["extractor"])

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference stats {path} not found; fix: run compute_reference_stats first")
        meta = json.loads(_meta_path(path).read_text())
        t = load_file(str(path))
        feats = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("features.")}
        mu = {k.split(".", 1)[1]: v.numpy() for k, v in t.items() if k.startswith("mu.")}
        sigma = {k.split(".", 1)[1]: v.numpy() for k, v in t.items() if k.startswith("sigma.")}
        return cls(path, meta, feats, mu, sigma)


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def compute_reference_stats(
    real_uint8: torch.Tensor,
    out_path: str | Path,
    extractor: str = "efficientnet-lite0",
    split: str = "test",
    weights_path: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    progress: bool = True,
    recompute: bool = False,
) -> ReferenceStats:
    """Embed the real images once and cache features, mu, sigma (float64) + JSON meta.

    Args:
        real_uint8: uint8 [N,1|3,H,W] reference images (e.g. the Fashion-MNIST test split, N=10 000).
        out_path: ``*.safetensors``; the meta goes to the same name with ``.json``.
        extractor: ``"efficientnet-lite0"`` (offline default), ``"efficientnet-lite0-224"`` or
            ``"inception-v3-compat-sfid"`` (needs ``weights_path``).
        split: name of the data split, recorded in the meta.
        recompute: ignore an existing cache file. Without it, a cache whose meta matches
            (extractor, image size, N, data sha256) is loaded instead of recomputed.
    """
    spec = get_extractor_spec(extractor)
    _check_images(real_uint8)
    out_path = Path(out_path)
    digest = images_sha256(real_uint8)
    want = {"extractor": spec.name, "image_size": spec.image_size, "n": int(real_uint8.shape[0]),
            "data_sha256": digest, "split": split, "format_version": REFERENCE_FORMAT_VERSION}
    if not recompute and out_path.is_file() and _meta_path(out_path).is_file():
        cached = ReferenceStats.load(out_path)
        if all(cached.meta.get(k) == v for k, v in want.items()):
            return cached
    t0 = time.perf_counter()
    layers = [spec.fid_feature, spec.spatial_feature, spec.logits_feature]
    feats = extract_features(real_uint8, spec.name, layers, weights_path, batch_size, device, progress)
    seconds = time.perf_counter() - t0
    mu, sigma, tensors = {}, {}, {}
    for layer in (spec.fid_feature, spec.spatial_feature):
        mu[layer], sigma[layer] = feature_statistics(feats[layer])
        tensors[f"features.{layer}"] = feats[layer]
        tensors[f"mu.{layer}"] = torch.from_numpy(mu[layer])
        tensors[f"sigma.{layer}"] = torch.from_numpy(sigma[layer])
    isc = inception_score_from_logits(feats[spec.logits_feature]) if len(real_uint8) >= 10 else None
    meta = {
        **want,
        "extractor_label": spec.label,
        "fid_feature": spec.fid_feature,
        "spatial_feature": spec.spatial_feature,
        "spatial_label": spec.spatial_label,
        "feature_dims": {k: int(v.shape[1]) for k, v in feats.items()},
        "image_shape": list(real_uint8.shape[1:]),
        "weights_path": weights_path,
        "extract_seconds": round(seconds, 3),
        "images_per_second": round(real_uint8.shape[0] / seconds, 2),
        "reference_is": isc,
    }
    atomic_save_safetensors(tensors, out_path, metadata={k: json.dumps(v) for k, v in meta.items()})
    atomic_write_json(meta, _meta_path(out_path))
    return ReferenceStats(out_path, meta, {k: feats[k] for k in (spec.fid_feature, spec.spatial_feature)}, mu, sigma)


# ----------------------------------------------------------------------------- evaluation


def compute_metrics(
    fake_uint8: torch.Tensor,
    reference: ReferenceStats | str | Path,
    extractor: str | None = None,
    metrics: Iterable[str] = ALL_METRICS,
    weights_path: str | None = None,
    num_bootstrap: int = DEFAULT_NUM_BOOTSTRAP,
    bootstrap_seed: int = 0,
    kid_subsets: int = DEFAULT_KID_SUBSETS,
    kid_subset_size: int = DEFAULT_KID_SUBSET_SIZE,
    is_splits: int = 10,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict:
    """FID (+95 % bootstrap CI), sFID, KID and IS of generated images against cached reference stats.

    Args:
        fake_uint8: uint8 [N,1|3,H,W] generated images.
        reference: ``ReferenceStats`` or the path written by ``compute_reference_stats``.
        extractor: optional; must equal the reference's extractor (numbers of two networks never mix).
        metrics: subset of ``("fid", "sfid", "kid", "is")``.
        num_bootstrap: bootstrap rounds for the FID CI; 0 skips it.

    Returns:
        ``{"values": {"fid/<ext>": ..., "fid_ci95_low/<ext>": ..., "sfid/<ext>" or "sfid_proxy/<ext>",
        "kid_mean/<ext>", "kid_std/<ext>", "is/<ext>" or "is_proxy/<ext>", "is_std/..."},
        "metrics": {name: {value, label, feature, dims, seconds, ...}}, "extractor", "extractor_label",
        "image_size", "n_fake", "n_ref", "reference", "seconds"}``.
    """
    ref = reference if isinstance(reference, ReferenceStats) else ReferenceStats.load(reference)
    spec = ref.spec
    if extractor is not None and get_extractor_spec(extractor).name != spec.name:
        raise ValueError(
            f"extractor {extractor!r} differs from the reference's {spec.name!r}; expected the same network; "
            "fix: compute reference stats for this extractor"
        )
    wanted = list(metrics)
    bad = [m for m in wanted if m not in ALL_METRICS]
    if bad:
        raise ValueError(f"unknown metrics {bad}; expected a subset of {ALL_METRICS}")
    _check_images(fake_uint8)
    weights_path = weights_path or ref.meta.get("weights_path")
    ext, is_inception = spec.name, not spec.name.startswith("efficientnet")
    layers = []
    if "fid" in wanted or "kid" in wanted:
        layers.append(spec.fid_feature)
    if "sfid" in wanted:
        layers.append(spec.spatial_feature)
    if "is" in wanted:
        layers.append(spec.logits_feature)
    t0 = time.perf_counter()
    feats = extract_features(fake_uint8, ext, layers, weights_path, batch_size, device, progress)
    seconds = {"features": time.perf_counter() - t0}
    n_fake, n_ref = int(fake_uint8.shape[0]), int(ref.meta["n"])
    values, details = {}, {}

    if "fid" in wanted:
        t0 = time.perf_counter()
        f = ref.fid(feats[spec.fid_feature], spec.fid_feature)
        seconds["fid"] = time.perf_counter() - t0
        values[f"fid/{ext}"] = f
        details["fid"] = {"value": f, "label": f"FID ({spec.label})", "feature": spec.fid_feature,
                          "dims": int(feats[spec.fid_feature].shape[1]), "seconds": seconds["fid"], "method": FD_METHOD}
        if num_bootstrap:
            t0 = time.perf_counter()
            bs = bootstrap_fid(feats[spec.fid_feature], ref.mu[spec.fid_feature], ref.sigma[spec.fid_feature],
                               num_bootstrap, bootstrap_seed, progress=progress,
                               sigma_ref_sqrt=ref.sigma_sqrt(spec.fid_feature))
            seconds["fid_bootstrap"] = time.perf_counter() - t0
            details["fid"]["ci95"] = bs["ci"]
            details["fid"]["bootstrap"] = {**bs, "seconds": seconds["fid_bootstrap"]}
            values[f"fid_ci95_low/{ext}"], values[f"fid_ci95_high/{ext}"] = bs["ci"]
    if "sfid" in wanted:
        t0 = time.perf_counter()
        f = ref.fid(feats[spec.spatial_feature], spec.spatial_feature)
        seconds["sfid"] = time.perf_counter() - t0
        key = "sfid" if is_inception else "sfid_proxy"
        values[f"{key}/{ext}"] = f
        details["sfid"] = {"value": f, "label": spec.spatial_label, "key": key, "feature": spec.spatial_feature,
                           "dims": int(feats[spec.spatial_feature].shape[1]), "seconds": seconds["sfid"],
                           "method": FD_METHOD}
    if "kid" in wanted:
        t0 = time.perf_counter()
        k = kid(feats[spec.fid_feature], ref.features[spec.fid_feature], kid_subsets, kid_subset_size)
        seconds["kid"] = time.perf_counter() - t0
        values[f"kid_mean/{ext}"], values[f"kid_std/{ext}"] = k["mean"], k["std"]
        details["kid"] = {**k, "value": k["mean"], "label": f"KID ({spec.label})", "feature": spec.fid_feature,
                          "seconds": seconds["kid"]}
    if "is" in wanted:
        t0 = time.perf_counter()
        s = inception_score_from_logits(feats[spec.logits_feature], splits=is_splits)
        seconds["is"] = time.perf_counter() - t0
        key = "is" if is_inception else "is_proxy"
        values[f"{key}/{ext}"], values[f"{key}_std/{ext}"] = s["mean"], s["std"]
        label = "IS (Inception logits)" if is_inception else "IS-proxy (efficientnet-lite0 ImageNet logits)"
        details["is"] = {**s, "value": s["mean"], "key": key, "label": label, "feature": spec.logits_feature,
                         "seconds": seconds["is"]}
    return {
        "values": values,
        "metrics": details,
        "extractor": ext,
        "extractor_label": spec.label,
        "image_size": spec.image_size,
        "n_fake": n_fake,
        "n_ref": n_ref,
        "reference": {k: ref.meta.get(k) for k in ("split", "n", "data_sha256", "extractor", "image_size")}
        | {"path": str(ref.path)},
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
    }
