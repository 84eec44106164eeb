"""Verdicts that hold (docs/method.md section 11): multiplicity-corrected paired tests and the claim-status rule.

A claim rests on several paired comparisons. Each is tested on ONE deciding metric (``report.verdicts.metric``);
its p-values are corrected over the whole family of the claims' tests (Holm 1979, step-down, which controls the
family-wise error at ``alpha`` under any dependence), and a comparison counts only when it also replicates at
every calibration / reconstruction seed the seed study ran. Anything weaker is *marginal* (with its z) or
*inconclusive*, never "better".

- ``bootstrap_test``: a paired bootstrap's values -> :class:`PairedTest` (z from the bootstrap standard error);
- ``mcnemar``: a paired test of two per-sample hit rates (exact binomial on the discordant pairs);
- ``holm``: Holm-adjusted p-values; ``corrected_intervals``: the interval each test is judged at;
- ``comparison_level`` / ``claim_status``: the status rule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence

import numpy as np

#: a comparison's evidence, strongest first: Holm-significant and replicated at every seed run; Holm-significant
#: but no seed study covers it; significant at 95 % before correction only (or not replicated); none
LEVELS = ("firm", "unreplicated", "marginal", "none")


def two_sided_p(z: float) -> float:
    """Two-sided normal p-value of ``z``."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def z_for(confidence: float) -> float:
    """The two-sided normal critical value of ``confidence`` (0.95 -> 1.95996)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


@dataclass(frozen=True)
class PairedTest:
    """One paired comparison A - B of a metric.

    Attributes:
        diff: the point estimate of metric(A) - metric(B).
        se: its standard error (bootstrap standard deviation, or McNemar's paired-proportion standard error).
        p: two-sided p-value of "no difference", uncorrected.
        ci: the uncorrected 95 % interval, from the same normal approximation as ``p`` (``diff +- 1.96 se``), so
            an interval that excludes 0 always has ``p < 0.05`` and the other way round.
        lower_is_better: whether a negative difference favours A.
        method: how ``p`` was computed.
        ci_percentile: a bootstrap's percentile interval re-centred on the point (shown beside ``ci`` where the
            bootstrap is skewed; ``None`` for McNemar).
    """

    diff: float
    se: float
    p: float
    ci: tuple[float, float]
    lower_is_better: bool
    method: str
    ci_percentile: tuple[float, float] | None = None

    @property
    def z(self) -> float:
        return self.diff / self.se if self.se > 0 else (0.0 if self.diff == 0 else math.copysign(math.inf, self.diff))

    @property
    def a_better(self) -> bool:
        """The point estimate favours A."""
        return (self.diff < 0) == self.lower_is_better and self.diff != 0

    def interval(self, confidence: float) -> tuple[float, float]:
        """The normal interval ``diff +- z * se`` at ``confidence``."""
        h = z_for(confidence) * self.se
        return (self.diff - h, self.diff + h)

    def to_json(self) -> dict:
        return {"diff": self.diff, "se": self.se, "z": self.z, "p": self.p, "ci": list(self.ci),
                "lower_is_better": self.lower_is_better, "method": self.method,
                **({} if self.ci_percentile is None else {"ci_percentile": list(self.ci_percentile)})}


def bootstrap_test(point: float, values: np.ndarray, lower_is_better: bool, confidence: float = 0.95) -> PairedTest:
    """A paired test from bootstrap values of A - B (one index vector per round for both sides).

    The standard error is the values' standard deviation; ``p`` is the normal two-sided p of ``point / se`` (stable in
    the far tail where percentile counts are not: at 2 000 rounds a Holm threshold of 0.05 / 40 leaves 2.5 rounds);
    ``ci`` is the normal interval of the same approximation (``point +- z se``), so the interval and ``p`` never
    disagree about 0; ``ci_percentile`` is the percentile interval re-centred on the point (the duplicate bias of a
    bootstrap set metric is nearly the same on both sides), kept for a skewed bootstrap.
    """
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or len(v) < 2:
        raise ValueError(f"bootstrap_test needs a 1-d array of at least 2 bootstrap values; got shape {v.shape}")
    se = float(v.std(ddof=1))
    med = float(np.median(v))
    lo, hi = np.percentile(v, [50 * (1 - confidence), 50 * (1 + confidence)])
    z = point / se if se > 0 else (0.0 if point == 0 else math.inf)
    half = z_for(confidence) * se
    return PairedTest(float(point), se, two_sided_p(z), (float(point - half), float(point + half)),
                      lower_is_better, f"paired bootstrap, {len(v)} rounds",
                      (float(point + lo - med), float(point + hi - med)))


def _binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair coin flips (the smaller tail doubled, capped at 1)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def mcnemar(a_hit: np.ndarray, b_hit: np.ndarray, confidence: float = 0.95) -> PairedTest:
    """McNemar's test of two per-sample hit rates on the same samples (e.g. label agreement with FP).

    ``diff`` = rate(A) - rate(B) = (n10 - n01) / n, where n10 counts samples A gets right and B wrong; ``p`` is the
    exact binomial test of n10 against n10 + n01 fair flips; ``se`` the paired-proportion standard error
    sqrt(n10 + n01 - (n10 - n01)^2 / n) / n, and ``ci`` the normal interval with it (higher is better).
    """
    a, b = np.asarray(a_hit, bool), np.asarray(b_hit, bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"mcnemar needs two 1-d hit vectors of one length; got {a.shape} and {b.shape}")
    n = len(a)
    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    diff = (n10 - n01) / n
    se = math.sqrt(max(n10 + n01 - (n10 - n01) ** 2 / n, 0.0)) / n
    h = z_for(confidence) * se
    return PairedTest(diff, se, _binom_two_sided(n10, n10 + n01), (diff - h, diff + h), False,
                      f"McNemar exact ({n10} vs {n01} discordant of {n})")


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order: sort ascending, p_(i) * (m - i) (i from 0), made
    non-decreasing, capped at 1. Reject a hypothesis at family-wise level ``alpha`` when its adjusted p < alpha."""
    p = [float(x) for x in pvalues]
    if any(not 0.0 <= x <= 1.0 for x in p):
        raise ValueError(f"p-values must be in [0, 1]; got {p}")
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def corrected_intervals(tests: Sequence[PairedTest], alpha: float = 0.05) -> list[tuple[float, float]]:
    """The interval each test is judged at under Holm: the test of rank i (0 = smallest p) at confidence
    1 - alpha / (m - i), normal with its standard error (Bonferroni's for the smallest p, none wider)."""
    m = len(tests)
    order = sorted(range(m), key=lambda i: tests[i].p)
    out: list[tuple[float, float]] = [(0.0, 0.0)] * m
    for rank, i in enumerate(order):
        out[i] = tests[i].interval(1.0 - alpha / (m - rank))
    return out


def comparison_level(holm_p: float, p: float, replicated: bool | None, alpha: float = 0.05) -> str:
    """A comparison's evidence (``LEVELS``): *firm* when Holm-significant and replicated at every seed run,
    *unreplicated* when Holm-significant and no seed study covers it (``replicated is None``), *marginal* when only
    the uncorrected test is significant or a seed does not repeat it, else *none*."""
    if holm_p < alpha and replicated is not False:
        return "firm" if replicated else "unreplicated"
    return "marginal" if p < alpha else "none"


@dataclass(frozen=True)
class Outcome:
    """One comparison behind a claim: its level and whether its point estimate favours the claim."""

    level: str
    favours_claim: bool
    z: float

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level {self.level!r} is not one of {LEVELS}")


def claim_status(outcomes: Sequence[Outcome]) -> str:
    """The status of a claim from its comparisons' outcomes.

    *reproduced* / *refuted*: every comparison firm, all for / all against the claim; with some merely
    unreplicated (Holm-significant, no seed study) the status says "at one seed". *mixed*: firm both ways.
    *partly reproduced* / *partly refuted*: some firm one way, the rest weaker. *marginal (max |z| ...)*: only
    uncorrected or unreplicated evidence. Else *inconclusive*.
    """
    if not outcomes:
        return "not run"
    strong = [o for o in outcomes if o.level in ("firm", "unreplicated")]
    pro, con = [o for o in strong if o.favours_claim], [o for o in strong if not o.favours_claim]
    if len(strong) == len(outcomes) and (not pro or not con):
        word = "reproduced" if pro else "refuted"
        return word if all(o.level == "firm" for o in strong) else f"{word} at one seed (not replicated)"
    if pro and con:
        return "mixed"
    if pro or con:
        word = "partly reproduced" if pro else "partly refuted"
        return word if all(o.level == "firm" for o in strong) else f"{word} at one seed (not replicated)"
    weak = [o for o in outcomes if o.level == "marginal"]
    if weak:
        z = max(abs(o.z) for o in weak)
        side = ("for" if all(o.favours_claim for o in weak) else "against" if not any(o.favours_claim for o in weak)
                else "both ways")
        return f"marginal ({side}, max |z| {z:.1f})"
    return "inconclusive"
