"""Sample-quality metrics for the TFMQ-DM evaluation (docs/method.md section 9): FID (+ bootstrap CI), sFID, KID, IS.

``compute_metrics`` embeds the generated images once and scores them against cached reference
statistics. Every number carries its extractor in its key (``"fid/<extractor>"``), so numbers from
different networks never share a column. The pieces live by concept: ``feature_metrics`` (the
arithmetic on features: Fréchet distance, bootstrap CI, KID, IS) and ``reference_stats`` (image
embedding and the reference cache); their public names are re-exported here, where the pipeline
and the tests import them.

Example::

    ref = compute_reference_stats(test_uint8, "out/ref_test.safetensors", split="test")
    res = compute_metrics(samples_uint8, ref)          # extractor taken from the reference
    res["values"]["fid/efficientnet-lite0-112"], res["metrics"]["fid"]["ci95"]
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from tfmq.evaluation.extractors import get_extractor_spec
from tfmq.evaluation.feature_metrics import (  # noqa: F401 - re-exported
    DEFAULT_KID_SUBSET_SIZE,
    DEFAULT_KID_SUBSETS,
    DEFAULT_NUM_BOOTSTRAP,
    FD_METHOD,
    bootstrap_fid,
    feature_statistics,
    frechet_distance,
    frechet_distance_eig,
    inception_score_from_logits,
    kid,
    psd_sqrt,
)
from tfmq.evaluation.reference_stats import (  # noqa: F401 - re-exported
    DEFAULT_BATCH_SIZE,
    REFERENCE_FORMAT_VERSION,
    ReferenceStats,
    UInt8ImageDataset,
    _check_images,
    compute_reference_stats,
    extract_features,
    images_sha256,
)

ALL_METRICS = ("fid", "sfid", "kid", "is")


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
    return_features: bool = False,
) -> dict:
    """FID (+95 % bootstrap CI), sFID, KID and IS of generated images against cached reference stats.

    Args:
        fake_uint8: uint8 [N,1|3,H,W] generated images.
        reference: ``ReferenceStats`` or the path written by ``compute_reference_stats``.
        extractor: optional; must equal the reference's extractor (numbers of two networks never mix).
        metrics: subset of ``("fid", "sfid", "kid", "is")``.
        num_bootstrap: bootstrap rounds for the FID CI; 0 skips it.
        return_features: also return the FID-layer features (``"features"``: float32 [N, D] tensor), for
            the paired comparisons of ``tfmq.evaluation.paired``.

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
    ext = spec.name
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
    return score_features(feats, ref, int(fake_uint8.shape[0]), wanted, num_bootstrap, bootstrap_seed, kid_subsets,
                          kid_subset_size, is_splits, progress, return_features, seconds)


def score_features(
    feats: dict[str, torch.Tensor],
    ref: ReferenceStats,
    n_fake: int,
    wanted: Iterable[str] = ALL_METRICS,
    num_bootstrap: int = DEFAULT_NUM_BOOTSTRAP,
    bootstrap_seed: int = 0,
    kid_subsets: int = DEFAULT_KID_SUBSETS,
    kid_subset_size: int = DEFAULT_KID_SUBSET_SIZE,
    is_splits: int = 10,
    progress: bool = False,
    return_features: bool = False,
    seconds: dict[str, float] | None = None,
    frechet: dict[str, tuple[float, int]] | None = None,
) -> dict:
    """The scores of ``compute_metrics`` from already extracted features (layer -> [N, D]); the same dict.

    ``frechet``: layer -> (Fréchet distance, dims) computed elsewhere (``tfmq.evaluation.shards``: from
    merged moments, whose layer has no per-sample rows here); other layers are scored from ``feats``.
    """
    spec, ext = ref.spec, ref.spec.name
    is_inception = not ext.startswith("efficientnet")
    wanted, frechet, seconds = list(wanted), frechet or {}, dict(seconds or {})
    n_ref = int(ref.meta["n"])
    values, details = {}, {}

    def fd(layer: str) -> tuple[float, int]:
        return frechet[layer] if layer in frechet else (ref.fid(feats[layer], layer), int(feats[layer].shape[1]))

    if "fid" in wanted:
        t0 = time.perf_counter()
        f, dims = fd(spec.fid_feature)
        seconds["fid"] = time.perf_counter() - t0
        values[f"fid/{ext}"] = f
        details["fid"] = {"value": f, "label": f"FID ({spec.label})", "feature": spec.fid_feature,
                          "dims": dims, "seconds": seconds["fid"], "method": FD_METHOD}
        if num_bootstrap:
            t0 = time.perf_counter()
            bs = bootstrap_fid(feats[spec.fid_feature], ref.mu[spec.fid_feature], ref.sigma[spec.fid_feature],
                               num_bootstrap, bootstrap_seed, progress=progress,
                               sigma_ref_sqrt=ref.sigma_sqrt(spec.fid_feature))
            seconds["fid_bootstrap"] = time.perf_counter() - t0
            details["fid"]["ci95"] = bs["ci"]
            details["fid"]["bootstrap"] = {**bs, "seconds": seconds["fid_bootstrap"]}
            values[f"fid_ci95_low/{ext}"], values[f"fid_ci95_high/{ext}"] = bs["ci"]
    absent: dict[str, str] = {}
    if "sfid" in wanted and spec.spatial_feature not in frechet and spec.spatial_feature not in ref.mu:
        wanted.remove("sfid")
        absent["sfid"] = (f"the reference {ref.meta.get('split')} holds FID statistics only (reference.stats); sFID "
                          "needs the real images' spatial features (reference.images)")
    if "kid" in wanted and spec.fid_feature not in ref.features:
        wanted.remove("kid")
        absent["kid"] = (f"the reference {ref.meta.get('split')} holds FID statistics only (reference.stats); KID "
                         "needs the real images' features (reference.images)")
    if "sfid" in wanted:
        t0 = time.perf_counter()
        f, dims = fd(spec.spatial_feature)
        seconds["sfid"] = time.perf_counter() - t0
        key = "sfid" if is_inception else "sfid_proxy"
        values[f"{key}/{ext}"] = f
        details["sfid"] = {"value": f, "label": spec.spatial_label, "key": key, "feature": spec.spatial_feature,
                           "dims": dims, "seconds": seconds["sfid"], "method": FD_METHOD}
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
    out_features = {"features": feats[spec.fid_feature].float().cpu()} if return_features and spec.fid_feature in feats else {}
    return {
        **out_features,
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
        "absent": absent,
    }


@dataclass(frozen=True)
class Scores:
    """The set metrics of one scored image set, read by name from ``compute_metrics`` / ``scores_from_shards``'s
    result (``None``: not computed; ``absent`` says why). FID/KID/sFID/IS are those of ``extractor``."""

    extractor: str
    extractor_label: str
    n: int
    fid: float | None = None
    fid_ci: tuple[float, float] | None = None
    sfid: float | None = None
    sfid_label: str | None = None
    kid_mean: float | None = None
    kid_std: float | None = None
    inception_score: float | None = None
    inception_score_std: float | None = None
    is_label: str | None = None
    absent: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> "Scores":
        det, ext = result["metrics"], result["extractor"]
        fid, sfid, kd, isc = (det.get(k) or {} for k in ("fid", "sfid", "kid", "is"))
        ci = fid.get("ci95")
        return cls(extractor=ext, extractor_label=result["extractor_label"], n=int(result["n_fake"]),
                   fid=fid.get("value"), fid_ci=None if ci is None else (float(ci[0]), float(ci[1])),
                   sfid=sfid.get("value"), sfid_label=sfid.get("label"), kid_mean=kd.get("mean"), kid_std=kd.get("std"),
                   inception_score=isc.get("mean"), inception_score_std=isc.get("std"), is_label=isc.get("label"),
                   absent=dict(result.get("absent") or {}))
