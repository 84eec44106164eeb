"""Paired comparisons of settings sampled from the same noise, on every metric, with shared bootstrap rounds
(docs/method.md section 11).

Every setting of one model sampled the same noise (and classes, prompts), so sample i of setting A and sample i
of setting B differ only by what the settings do. :class:`Comparator` draws ONE set of ``rounds`` index vectors
per sample count and evaluates every setting on it once (a setting's bootstrap values are cached): the difference
of two settings' values is the paired bootstrap of their difference, and a setting compared ten times costs one
evaluation. Metrics (``METRICS``):

- ``fid`` / ``kid``: the extractor's features against the real reference (the proxy FID of section 9);
- ``domain_fd``: the Fréchet distance of the domain classifier's 128-d penultimate features against the same
  classifier's features of the reference images (N = 256 > D = 128: a full-rank covariance, domain semantics);
- ``label_agreement``: per sample, the domain classifier's label equals the FP sample's label (same noise);
  ``class_accuracy`` / ``prompt_accuracy``: it equals the class asked for (McNemar, ``tfmq.evaluation.verdicts``);
- ``psnr`` / ``ssim`` / ``lpips``: the per-sample fidelity to the FP samples (bootstrap of the mean difference).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tfmq.evaluation.feature_metrics import psd_sqrt
from tfmq.evaluation.paired import FidAgainst, KidAgainst
from tfmq.evaluation.verdicts import PairedTest, bootstrap_test, mcnemar

#: metric -> (lower is better, kind): ``set`` metrics are recomputed per round, ``mean`` ones average per-sample
#: values, ``hits`` ones compare per-sample hit vectors (McNemar)
METRICS = {
    "domain_fd": (True, "set"), "fid": (True, "set"), "kid": (True, "set"),
    "label_agreement": (False, "hits"), "class_accuracy": (False, "hits"), "prompt_accuracy": (False, "hits"),
    "psnr": (False, "mean"), "ssim": (False, "mean"), "lpips": (True, "mean"),
}


@dataclass
class SampleSet:
    """One setting's samples, as the comparisons read them (all arrays row-aligned with the FP samples).

    Attributes:
        name: the setting's name (the key of its cached bootstrap values: unique per comparator).
        n: the number of samples.
        features: the extractor's FID-layer features [N, D] (``None``: no FID / KID).
        domain_features: the domain classifier's penultimate features [N, 128] (``None``: no domain metrics).
        domain_labels: the domain classifier's labels [N].
        targets: the class each sample was asked for [N] (-1: none; ``None``: unconditional).
        per_sample: per-sample fidelity to FP (``psnr``, ``ssim``, ``lpips``), quantized rows only.
    """

    name: str
    n: int
    features: np.ndarray | None = None
    domain_features: np.ndarray | None = None
    domain_labels: np.ndarray | None = None
    targets: np.ndarray | None = None
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class GaussianReference:
    """Mean and covariance of real images' features (the Fréchet distance's reference), and the real features
    themselves where KID needs them."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None

    @classmethod
    def of(cls, features: np.ndarray, keep: bool = False) -> "GaussianReference":
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise ValueError(f"reference features must be [N >= 2, D]; got {f.shape}")
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), f if keep else None)


class Comparator:
    """Paired tests between settings of one model on shared bootstrap index vectors.

    Args:
        rounds: bootstrap rounds (the same index vectors for every setting with the same sample count).
        seed: the index vectors' seed.
        reference: the extractor's real reference (``fid``; ``kid`` too when it holds real features).
        domain_reference: the domain classifier's reference (``domain_fd``).
        fp: the FP samples of the same noise (``label_agreement``).
        rounds_of: fewer rounds for some set metrics (``{"fid": 300}``): they use the first rows of the same index
            vectors, so their tests stay paired with everything else; for the metrics shown beside the deciding one,
            whose resampled Frechet distances of 1 280-d features are the report's main cost.
    """

    def __init__(self, rounds: int, seed: int, reference: GaussianReference | None = None,
                 domain_reference: GaussianReference | None = None, fp: SampleSet | None = None,
                 rounds_of: dict[str, int] | None = None):
        if rounds < 2 or any(r < 2 for r in (rounds_of or {}).values()):
            raise ValueError(f"rounds must be >= 2; got {rounds} and {rounds_of}")
        self.rounds, self.seed = rounds, seed
        self.rounds_of = dict(rounds_of or {})
        self.reference, self.domain_reference, self.fp = reference, domain_reference, fp
        self._idx: dict[int, np.ndarray] = {}
        self._values: dict[tuple[str, str], tuple[float, np.ndarray]] = {}
        self._sqrt: dict[str, np.ndarray] = {}

    def indices(self, n: int) -> np.ndarray:
        """The ``rounds`` x ``n`` resampled indices every setting of ``n`` samples is evaluated on."""
        if n not in self._idx:
            self._idx[n] = np.random.default_rng(self.seed).integers(0, n, size=(self.rounds, n))
        return self._idx[n]

    def available(self, metric: str, s: SampleSet) -> bool:
        if metric == "fid":
            return s.features is not None and self.reference is not None
        if metric == "kid":
            return s.features is not None and self.reference is not None and self.reference.features is not None
        if metric == "domain_fd":
            return s.domain_features is not None and self.domain_reference is not None
        if metric == "label_agreement":
            return s.domain_labels is not None and self.fp is not None and self.fp.domain_labels is not None
        if metric in ("class_accuracy", "prompt_accuracy"):
            return s.domain_labels is not None and s.targets is not None and bool((s.targets >= 0).any())
        return metric in s.per_sample

    def _statistic(self, metric: str, s: SampleSet):
        if metric in ("fid", "domain_fd"):
            ref = self.reference if metric == "fid" else self.domain_reference
            if metric not in self._sqrt:
                self._sqrt[metric] = psd_sqrt(ref.sigma)
            feats = s.features if metric == "fid" else s.domain_features
            return FidAgainst(feats, ref.mu, ref.sigma, self._sqrt[metric])
        return KidAgainst(s.features, self.reference.features)

    def set_values(self, metric: str, s: SampleSet) -> tuple[float, np.ndarray]:
        """(the set metric on all samples, its value on every round's resample), computed once per setting."""
        key = (metric, s.name)
        if key not in self._values:
            stat = self._statistic(metric, s)
            idx = self.indices(s.n)[: self.rounds_of.get(metric, self.rounds)]
            self._values[key] = (stat(np.arange(s.n)), np.array([stat(i) for i in idx]))
        return self._values[key]

    def prefetch(self, sets: list[SampleSet], workers: int = 1) -> int:
        """Compute ``set_values`` of every set metric of every set in ``sets`` now, ``workers`` processes at a time
        (forked; each with one BLAS thread); the values are those a lazy ``set_values`` computes, bit for bit
        (the same arithmetic on the same arrays). Returns how many were computed.

        The report's resampled Frechet distances (one eigendecomposition per round and setting) are most of its
        time; they are independent, so the report hands them to all cores while it runs alone.
        """
        todo = [(m, s) for s in sets for m, (_, kind) in METRICS.items()
                if kind == "set" and (m, s.name) not in self._values and self.available(m, s)]
        if workers <= 1 or len(todo) < 2:
            for m, s in todo:
                self.set_values(m, s)
            return len(todo)
        import multiprocessing as mp

        for m, s in todo:  # the reference square roots and the index vectors, once, before the fork
            if m in ("fid", "domain_fd") and m not in self._sqrt:
                self._statistic(m, s)
            self.indices(s.n)
        global _PREFETCH
        _PREFETCH = (self, todo)
        try:
            with mp.get_context("fork").Pool(min(workers, len(todo)), initializer=_one_blas_thread) as pool:
                for (m, s), value in zip(todo, pool.imap(_prefetch_one, range(len(todo)))):
                    self._values[(m, s.name)] = value
        finally:
            _PREFETCH = None
        return len(todo)

    def hits(self, metric: str, s: SampleSet) -> np.ndarray:
        """Per-sample hits of ``label_agreement`` / ``class_accuracy`` / ``prompt_accuracy`` (only samples whose prompt
        names a class count for the latter)."""
        if metric == "label_agreement":
            return np.asarray(s.domain_labels) == np.asarray(self.fp.domain_labels)
        return np.asarray(s.domain_labels) == np.asarray(s.targets)

    def single(self, metric: str, s: SampleSet, confidence: float = 0.95) -> dict | None:
        """One setting's value of ``metric`` with its bootstrap interval (``None`` where it is not available)."""
        if not self.available(metric, s):
            return None
        lower, kind = METRICS[metric]
        if kind == "set":
            point, vals = self.set_values(metric, s)
        else:
            x = self.hits(metric, s).astype(np.float64) if kind == "hits" else np.asarray(s.per_sample[metric])
            if metric == "prompt_accuracy":
                x = x[np.asarray(s.targets) >= 0]
            point, vals = float(x.mean()), x[np.random.default_rng(self.seed).integers(0, len(x), (self.rounds, len(x)))].mean(1)
        med = float(np.median(vals))
        lo, hi = np.percentile(vals, [50 * (1 - confidence), 50 * (1 + confidence)])
        return {"value": float(point), "ci": [float(point + lo - med), float(point + hi - med)], "rounds": len(vals)}

    def compare(self, metric: str, a: SampleSet, b: SampleSet) -> PairedTest | None:
        """The paired test of metric(A) - metric(B) (``None`` where either side lacks it)."""
        if a.n != b.n:
            raise ValueError(f"paired comparison needs the same samples on both sides; got {a.n} and {b.n}")
        if not (self.available(metric, a) and self.available(metric, b)):
            return None
        lower, kind = METRICS[metric]
        if kind == "set":
            pa, va = self.set_values(metric, a)
            pb, vb = self.set_values(metric, b)
            return bootstrap_test(pa - pb, va - vb, lower)
        if kind == "hits":
            ha, hb = self.hits(metric, a), self.hits(metric, b)
            if metric == "prompt_accuracy":
                keep = np.asarray(a.targets) >= 0
                ha, hb = ha[keep], hb[keep]
            return mcnemar(ha, hb)
        d = np.asarray(a.per_sample[metric], np.float64) - np.asarray(b.per_sample[metric], np.float64)
        return bootstrap_test(float(d.mean()), d[self.indices(a.n)].mean(axis=1), lower)


_PREFETCH: tuple[Comparator, list[tuple[str, SampleSet]]] | None = None  # what the forked workers of prefetch read


def _one_blas_thread() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)


def _prefetch_one(i: int) -> tuple[float, np.ndarray]:
    comp, todo = _PREFETCH
    metric, s = todo[i]
    return comp.set_values(metric, s)
