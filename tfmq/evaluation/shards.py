"""Sharded evaluation: per-shard sufficient statistics and an exact merge (the base of scale-out).

A setting's samples ``0..N-1`` are split into index ranges; each shard samples its range (the same
per-sample noise as an unsharded run: ``tfmq.diffusion.sampling`` seeds sample ``j`` from
``(seed, j)``), extracts features and files a ``ShardStats``:

- per Gaussian feature layer (FID, sFID): the count ``n``, the float64 mean and the float64 centred
  sum of outer products ``M2 = sum (x - mean)(x - mean)^T``. Merging uses the pairwise update of
  Chan, Golub and LeVeque (``M2 = M2_a + M2_b + d d^T n_a n_b / n``, ``d = mean_b - mean_a``), which
  equals the covariance of the concatenated features to float64 round-off and, unlike raw sums of
  outer products, does not cancel when the mean is large against the spread;
- per-sample rows that metrics need whole, concatenated in index order: the FID-layer features (KID,
  the FID bootstrap, the paired comparisons) and the logits (IS).

``merge_shards`` refuses shards that do not tile ``[0, N)`` exactly (a gap, an overlap, another
extractor or layer set) with one line naming the shard. ``metrics_from_shards`` gives FID / sFID
from the merged moments and KID / IS from the merged rows, so the shard count changes no number
beyond float64 round-off (tests/test_shards.py, against ``compute_metrics`` on the same features).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..io import atomic_dir, atomic_save_safetensors, atomic_write_json
from .feature_metrics import (
    DEFAULT_KID_SUBSET_SIZE, DEFAULT_KID_SUBSETS, inception_score_from_logits, kid,
)

SHARD_FORMAT = "tfmq-eval-shard"
SHARD_VERSION = 1
_TENSORS, _META = "stats.safetensors", "shard.json"


class ShardError(ValueError):
    """Shards that cannot be merged or read (gap, overlap, other extractor, damaged file)."""


@dataclass
class Moments:
    """Count, float64 mean and centred sum of outer products of one feature layer."""

    n: int
    mean: np.ndarray  # [D]
    m2: np.ndarray  # [D, D]

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray) -> "Moments":
        x = np.asarray(features.double().cpu().numpy() if torch.is_tensor(features) else features, np.float64)
        if x.ndim != 2 or x.shape[0] < 1:
            raise ShardError(f"features must be [N>=1, D]; got {x.shape}")
        mean = x.mean(axis=0)
        xc = x - mean
        return cls(int(x.shape[0]), mean, xc.T @ xc)

    def merged(self, other: "Moments") -> "Moments":
        n = self.n + other.n
        d = other.mean - self.mean
        return Moments(n, self.mean + d * (other.n / n), self.m2 + other.m2 + np.outer(d, d) * (self.n * other.n / n))

    def covariance(self) -> np.ndarray:
        if self.n < 2:
            raise ShardError(f"a covariance needs >= 2 samples; the merged shards hold {self.n}")
        return self.m2 / (self.n - 1)


@dataclass
class ShardStats:
    """What one shard (samples ``[start, stop)``) contributes to a setting's metrics."""

    start: int
    stop: int
    extractor: str
    moments: dict[str, Moments]
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [stop - start, ...] in index order

    @property
    def n(self) -> int:
        return self.stop - self.start


def shard_statistics(features: dict[str, torch.Tensor], start: int, extractor: str, gaussian: Iterable[str],
                     rows: Iterable[str] = (), per_sample: dict[str, torch.Tensor] | None = None) -> ShardStats:
    """``ShardStats`` of samples ``start .. start + N - 1`` from their extracted ``features`` (layer -> [N, D]).

    Args:
        gaussian: the layers whose moments are kept (FID and sFID layers).
        rows: the layers kept per sample (the FID layer for KID / bootstrap, the logits for IS), as float32.
        per_sample: other per-sample rows kept as they are (dtype included), under their own names: the
            images for grids and paired files, class labels, the domain classifier's logits, the paired
            metrics against the FP samples.
    """
    gaussian, rows, per_sample = list(gaussian), list(rows), dict(per_sample or {})
    missing = sorted(set(gaussian + rows) - set(features))
    if missing:
        raise ShardError(f"features of layer(s) {missing} missing; extracted: {sorted(features)}")
    clash = sorted(set(rows) & set(per_sample))
    if clash:
        raise ShardError(f"per-sample row name(s) {clash} are also feature layers; expected distinct names")
    n = {int(features[k].shape[0]) for k in gaussian + rows} | {int(v.shape[0]) for v in per_sample.values()}
    if len(n) != 1:
        raise ShardError(f"feature layers / per-sample rows disagree on the sample count: {sorted(n)}")
    count = n.pop()
    kept = {k: features[k].detach().float().cpu().contiguous() for k in rows}
    kept.update({k: torch.as_tensor(v).detach().cpu().contiguous() for k, v in per_sample.items()})
    return ShardStats(int(start), int(start) + count, extractor, {k: Moments.of(features[k]) for k in gaussian}, kept)


def save_shard(stats: ShardStats, path: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``stats`` to the directory ``path`` (safetensors + JSON, in one rename); ``extra``: JSON kept in
    ``shard.json`` under ``"extra"`` (e.g. the shard's timings), not read back by ``load_shard``."""
    tensors = {}
    for k, m in stats.moments.items():
        tensors[f"mean.{k}"], tensors[f"m2.{k}"] = torch.from_numpy(m.mean), torch.from_numpy(m.m2)
    tensors.update({f"rows.{k}": v for k, v in stats.rows.items()})
    meta = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "start": stats.start, "stop": stats.stop,
            "extractor": stats.extractor, "moments": {k: m.n for k, m in stats.moments.items()}, "rows": sorted(stats.rows),
            "extra": extra or {}}
    with atomic_dir(path) as tmp:
        atomic_save_safetensors(tensors, tmp / _TENSORS, metadata={"format": SHARD_FORMAT})
        atomic_write_json(meta, tmp / _META)
    return Path(path)


def shard_extra(path: str | os.PathLike) -> dict:
    """The ``extra`` JSON a shard was saved with (``{}`` if none)."""
    return json.loads((Path(path) / _META).read_text(encoding="utf-8")).get("extra") or {}


def load_shard(path: str | os.PathLike) -> ShardStats:
    """Read a directory written by ``save_shard``; a missing, foreign or damaged one is one ``ShardError`` line."""
    p = Path(path)
    try:
        meta = json.loads((p / _META).read_text(encoding="utf-8"))
        t = load_file(str(p / _TENSORS))
    except (OSError, ValueError, SafetensorError) as e:
        raise ShardError(f"{p}: not a readable evaluation shard ({e}); expected a directory written by save_shard") from None
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT or meta.get("version") != SHARD_VERSION:
        raise ShardError(f"{p}: format {meta.get('format') if isinstance(meta, dict) else meta!r} version "
                         f"{meta.get('version') if isinstance(meta, dict) else None!r}, expected {SHARD_FORMAT!r} {SHARD_VERSION}")
    try:
        moments = {k: Moments(int(n), t[f"mean.{k}"].numpy(), t[f"m2.{k}"].numpy()) for k, n in meta["moments"].items()}
        rows = {k: t[f"rows.{k}"] for k in meta["rows"]}
    except KeyError as e:
        raise ShardError(f"{p}: tensor {e} missing; the shard is damaged, recompute it") from None
    stats = ShardStats(int(meta["start"]), int(meta["stop"]), meta["extractor"], moments, rows)
    bad = [k for k, m in moments.items() if m.n != stats.n] + [k for k, r in rows.items() if r.shape[0] != stats.n]
    if bad:
        raise ShardError(f"{p}: layer(s) {bad} do not hold {stats.n} samples; the shard is damaged, recompute it")
    return stats


def merge_shards(shards: Iterable[ShardStats]) -> ShardStats:
    """One ``ShardStats`` for samples ``[0, N)`` from shards that tile it exactly (any order).

    Raises:
        ShardError: no shards, a gap or an overlap of index ranges, the first not starting at 0, or
            shards of another extractor / layer set.
    """
    todo = sorted(shards, key=lambda s: s.start)
    if not todo:
        raise ShardError("no shards to merge")
    first = todo[0]
    if first.start != 0:
        raise ShardError(f"the shards start at sample {first.start}; expected 0 (samples [0, {first.start}) missing)")
    out = ShardStats(0, first.stop, first.extractor, dict(first.moments), {k: [v] for k, v in first.rows.items()})
    for s in todo[1:]:
        if s.start != out.stop:
            what = "overlaps" if s.start < out.stop else "leaves a gap after"
            raise ShardError(f"shard [{s.start}, {s.stop}) {what} samples [0, {out.stop}); expected one starting at {out.stop}")
        if s.extractor != out.extractor or set(s.moments) != set(out.moments) or set(s.rows) != set(out.rows):
            raise ShardError(f"shard [{s.start}, {s.stop}) has extractor {s.extractor!r}, layers {sorted(s.moments)} / "
                             f"{sorted(s.rows)}; expected {out.extractor!r}, {sorted(out.moments)} / {sorted(out.rows)}")
        out.moments = {k: m.merged(s.moments[k]) for k, m in out.moments.items()}
        for k, v in s.rows.items():
            out.rows[k].append(v)
        out.stop = s.stop
    out.rows = {k: torch.cat(v) for k, v in out.rows.items()}
    return out


def frechet_from_moments(m: Moments, mu_ref: np.ndarray, sigma_ref_sqrt: np.ndarray, trace_ref: float) -> float:
    """FID of merged moments, in the form of ``frechet_distance_eig`` (the unsharded path): the eigenvalues of
    ``S_r^(1/2) S_f S_r^(1/2)``, which are those of the Gram matrix that function decomposes (with fewer
    samples than dimensions, only the ``n - 1`` largest: the others are zero up to round-off)."""
    s_f = m.covariance()
    diff = m.mean - mu_ref
    w = np.linalg.eigvalsh(sigma_ref_sqrt @ s_f @ sigma_ref_sqrt)  # ascending
    if m.n - 1 < w.size:  # rank(S_f) <= n - 1: the rest are round-off, whose square roots would add up
        w = w[w.size - (m.n - 1):]
    return float(diff @ diff + trace_ref + np.trace(s_f) - 2.0 * np.sqrt(np.clip(w, 0.0, None)).sum())


def metrics_from_shards(merged: ShardStats, reference, fid_layer: str, spatial_layer: str | None = None,
                        logits_layer: str | None = None, kid_subsets: int = DEFAULT_KID_SUBSETS,
                        kid_subset_size: int = DEFAULT_KID_SUBSET_SIZE, is_splits: int = 10) -> dict[str, float]:
    """FID / sFID from merged moments, KID from the merged FID-layer rows, IS from the merged logits.

    ``reference`` is a ``ReferenceStats`` of the same extractor. Keys as ``compute_metrics``'s
    ``values`` without the extractor suffix: ``fid``, ``sfid``, ``kid_mean``, ``kid_std``, ``is``, ``is_std``.
    """
    from .extractors import get_extractor_spec

    if get_extractor_spec(reference.meta.get("extractor")).name != get_extractor_spec(merged.extractor).name:
        raise ShardError(f"shards of extractor {merged.extractor!r} against a reference of {reference.meta.get('extractor')!r}")
    out: dict[str, float] = {}
    for key, layer in (("fid", fid_layer), ("sfid", spatial_layer)):
        if layer is None or layer not in merged.moments:
            continue
        m = merged.moments[layer]
        out[key] = frechet_from_moments(m, reference.mu[layer], reference.sigma_sqrt(layer),
                                        float(np.trace(reference.sigma[layer])))
    if fid_layer in merged.rows:
        k = kid(merged.rows[fid_layer], reference.features[fid_layer], kid_subsets, kid_subset_size)
        out["kid_mean"], out["kid_std"] = k["mean"], k["std"]
    if logits_layer is not None and logits_layer in merged.rows:
        s = inception_score_from_logits(merged.rows[logits_layer], splits=is_splits)
        out["is"], out["is_std"] = s["mean"], s["std"]
    return out


def scores_from_shards(merged: ShardStats, reference, metrics: Iterable[str] = ("fid", "sfid", "kid", "is"),
                       num_bootstrap: int = 0, bootstrap_seed: int = 0, kid_subsets: int = DEFAULT_KID_SUBSETS,
                       kid_subset_size: int = DEFAULT_KID_SUBSET_SIZE, is_splits: int = 10,
                       progress: bool = False) -> dict:
    """``compute_metrics``'s whole result (values, details, reference, ...) from merged shards.

    A layer kept per sample (the FID layer: KID and the bootstrap need its rows) is scored from its
    rows exactly as ``compute_metrics`` scores them, so its numbers do not depend on the shard count
    at all; a layer kept only as moments (sFID) is scored by ``frechet_from_moments``, equal to the
    unsharded value to float64 round-off of the merge.
    """
    from .extractors import get_extractor_spec
    from .metrics import score_features

    if get_extractor_spec(reference.meta.get("extractor")).name != get_extractor_spec(merged.extractor).name:
        raise ShardError(f"shards of extractor {merged.extractor!r} against a reference of {reference.meta.get('extractor')!r}")
    frechet = {}
    for layer, m in merged.moments.items():
        if layer not in merged.rows and layer in reference.mu:  # a stats-only reference has no spatial layer
            frechet[layer] = (frechet_from_moments(m, reference.mu[layer], reference.sigma_sqrt(layer),
                                                   float(np.trace(reference.sigma[layer]))), int(m.mean.shape[0]))
    return score_features(merged.rows, reference, merged.n, metrics, num_bootstrap, bootstrap_seed, kid_subsets,
                          kid_subset_size, is_splits, progress, frechet=frechet)
