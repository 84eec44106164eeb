"""Paired comparisons, the poster's tables and the claims section of the report (docs/method.md section 11).

Every setting of one model sampled the same noise (and classes, prompts), so two settings are compared on the
same resampled sample indices (``tfmq.evaluation.comparisons``): the domain Fréchet distance (the domain
classifier's 128-d features), FID and KID against the real reference, label agreement with the FP samples
(McNemar), and the per-sample PSNR / SSIM against the FP samples. ONE metric decides every verdict
(``report.metric``; ``report.fallback_metric`` for a model without a domain classifier); the decision is
Holm-corrected over the family of all the claims' tests and must replicate over the seed study's seeds
(``tfmq.evaluation.verdicts``).

Tables (on ``studies.model`` unless said otherwise; a missing setting shows as "not run"):

- equal footing: every method on TFMQ's layer policy, attention matmuls and shortcut split (W4A8);
- methods' own defaults: the grid, every method against ``tfmq`` at the same bits, per model;
- inducement (poster): joint BRECQ (``brecq``) vs ``freeze`` at W8A8 and W4A8;
- ablation (poster): TFMQ without TIAR, without FSC, without both (= ``freeze``), FSC on the TIB only;
- activation stress: W4A6.

Claims (a)-(e) of the poster get a status from these numbers (``tfmq.evaluation.verdicts.claim_status``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file

from tasks.reference import Unavailable, _reference_images, real_images
from tfmq.diffusion.pipelines import output_shape, read_family
from tfmq.diffusion.text import read_prompts
from tfmq.evaluation.classifier import domain_classifier_for, load_classifier, predict_embeddings, prompt_labels
from tfmq.evaluation.comparisons import METRICS, Comparator, GaussianReference, SampleSet
from tfmq.evaluation.paired import LOWER_IS_BETTER, verdict
from tfmq.evaluation.reference_stats import ReferenceStats
from tfmq.evaluation import verdicts as V

#: (label, setting name) rows of each poster table; "{b}" is the bit setting
EQUAL_FOOTING = [("naive (RTN)", "naive-eq-W4A8"), ("PTQ4DM", "ptq4dm-eq-W4A8"), ("Q-Diffusion", "qdiffusion-eq-W4A8"),
                 ("PTQD", "ptqd-eq-W4A8"), ("joint BRECQ", "brecq-W4A8"), ("Freeze", "freeze-W4A8")]
ABLATION = [("w/o TIAR (FSC only)", "tfmq-notiar-W4A8"), ("w/o FSC (TIAR only)", "tfmq-nofsc-W4A8"),
            ("w/o both (= Freeze)", "freeze-W4A8"), ("FSC on the TIB only (paper's scope)", "tfmq-fsctib-W4A8"),
            ("w/o FSC at W4A6 (vs TFMQ-W4A6)", "tfmq-nofsc-W4A6", "tfmq-W4A6")]
STRESS = [("naive", "naive-W4A6"), ("Freeze", "freeze-W4A6"), ("Q-Diffusion", "qdiffusion-W4A6")]
METHOD_LABEL = {"naive": "naive", "freeze": "Freeze", "brecq": "joint BRECQ", "ptq4dm": "PTQ4DM",
                "qdiffusion": "Q-Diffusion", "ptqd": "PTQD", "tfmq": "TFMQ"}


@dataclass(frozen=True)
class Rules:
    """How the claims are decided: the deciding metric (``report.metric``; ``fallback_metric`` where a model has no
    domain classifier), the family-wise error ``alpha`` (Holm over all the claims' tests), the bootstrap rounds and
    seed of every paired comparison, and the budget the verdicts hold at (said in the report)."""

    metric: str = "domain_fd"
    fallback_metric: str = "kid"
    alpha: float = 0.05
    rounds: int = 2000
    seed: int = 0
    budget: str = ""
    beside_rounds: int = 300  # the set metrics shown beside the deciding one (FID, KID): informational, cheaper
    recon_iters: int = 0  # the grid's BRECQ iterations (0: not known), named where a verdict depends on them
    act_iters: int = 0  # the grid's activation step-learning iterations (0: not known)

    def rounds_of(self, deciding: str) -> dict[str, int]:
        """Rounds per set metric other than ``deciding`` (which keeps ``rounds``)."""
        return {m: min(self.beside_rounds, self.rounds) for m, (_, kind) in METRICS.items() if kind == "set" and m != deciding}

    def __post_init__(self) -> None:
        for key in ("metric", "fallback_metric"):
            if getattr(self, key) not in METRICS:
                raise ValueError(f"report.{key}={getattr(self, key)!r}: expected one of {sorted(METRICS)}")


@dataclass
class DomainData:
    """What the domain metrics of one model read: its domain classifier (``None``: none matches its images, with
    ``reason``), the classifier's reference statistics of the real images, the real-data row's images (the floor)
    and, for a text model, the class each sample's prompt names (-1: none)."""

    classifier: str | None = None
    reference: GaussianReference | None = None
    real_images: Any = None  # uint8 [N, C, H, W] tensor
    prompt_targets: np.ndarray | None = None
    reason: str | None = None


def domain_data(r, e, data_path: str, classifier: str, fp_dir: str) -> DomainData:
    """The domain data of the model in ``fp_dir`` (``r``: the reference section, ``e``: eval): the classifier
    ``eval.domain_classifier`` picks for its images, its features of the reference images and the real-data row's
    images (from ``tasks.reference``), and for a text model the class each evaluated prompt names."""
    shape = output_shape(fp_dir)
    clf, why = domain_classifier_for(e.domain_classifier, classifier, shape)
    if clf is None:
        return DomainData(reason=why)
    if r.stats is not None:
        return DomainData(reason=f"reference.stats={r.stats!r} holds FID statistics only: the domain metrics need "
                                 "the real images (reference.images)")
    images, _ = _reference_images(r, data_path, shape)
    feats, _ = predict_embeddings(load_classifier(clf), images)
    try:
        real, _ = real_images(r, e, data_path, shape)
    except Unavailable:
        real = None
    targets = None
    if read_family(fp_dir).conditioning == "text":
        labels = prompt_labels(read_prompts(e.prompts)).numpy()
        targets = labels[np.arange(e.num_samples) % len(labels)]
    return DomainData(clf, GaussianReference.of(feats.double().numpy()), real, targets)


def quant_seconds(m: dict) -> float | None:
    """A setting's quantization wall time with its weight stages counted where they ran (shared or not)."""
    return m.get("quant_time_unshared_s", m.get("quant_time_total_s"))


class PairedData:
    """The paired files of one results tree, loaded lazily, and one ``Comparator`` per model on them."""

    def __init__(self, out_dir: str, reference_path: str | dict[str, str] | None, rounds: int, seed: int,
                 domain: dict[str, DomainData] | None = None, metrics: tuple[str, ...] | None = None,
                 rules: Rules | None = None):
        """``reference_path``: the reference statistics of every model (one path, or ``model -> path`` when models
        make images of different shapes; a model without one gets no FID / KID differences). ``domain``: the
        domain data per model (none: no domain metrics). ``metrics``: the metrics ``compare`` computes (all).
        ``rules``: with them, the set metrics that do not decide a model's verdicts get ``rules.beside_rounds``."""
        self.root = Path(out_dir)
        self.rounds, self.seed, self.rules = rounds, seed, rules
        self.domain = domain or {}
        self.wanted = tuple(metrics or METRICS)
        self._sets: dict[tuple[str, str], SampleSet | None] = {}
        self._paths = reference_path
        self._refs: dict[str, Any] = {}
        self._comparators: dict[str, Comparator] = {}
        self._classifiers: dict[str, Any] = {}

    def reference(self, model: str):
        """The model's ``ReferenceStats`` (``None`` if its file is missing), loaded once per file."""
        path = self._paths.get(model) if isinstance(self._paths, dict) else self._paths
        if not path or not Path(path).is_file():
            return None
        if path not in self._refs:
            self._refs[path] = ReferenceStats.load(path)
        return self._refs[path]

    def metrics(self, model: str, name: str) -> dict[str, Any] | None:
        p = self.root / "metrics" / model / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def _embed(self, model: str, images) -> tuple[np.ndarray, np.ndarray] | None:
        d = self.domain.get(model)
        if d is None or d.classifier is None:
            return None
        if d.classifier not in self._classifiers:
            self._classifiers[d.classifier] = load_classifier(d.classifier)
        f, logits = predict_embeddings(self._classifiers[d.classifier], images)
        return f.double().numpy(), logits.argmax(1).numpy()

    def load(self, model: str, name: str) -> SampleSet | None:
        """Setting ``name``'s samples as a ``SampleSet`` (``None`` without its paired file)."""
        key = (model, name)
        if key not in self._sets:
            p = self.root / "paired" / model / f"{name}.safetensors"
            if not p.is_file():
                self._sets[key] = None
            else:
                t = load_file(str(p))
                n = int(t["images"].shape[0])
                emb = self._embed(model, t["images"])
                d = self.domain.get(model)
                targets = (t["class_labels"].numpy() if "class_labels" in t else
                           d.prompt_targets[:n] if d is not None and d.prompt_targets is not None else None)
                self._sets[key] = SampleSet(
                    name, n, features=t["features"].double().numpy(),
                    domain_features=None if emb is None else emb[0], domain_labels=None if emb is None else emb[1],
                    targets=targets,
                    per_sample={k: t[k].double().numpy() for k in ("psnr", "ssim", "lpips") if k in t})
        return self._sets[key]

    def prefetch(self, models: list[str], workers: int | None = None) -> int:
        """Every set metric of every paired sample file of ``models``, computed now on all cores
        (``Comparator.prefetch``; ``workers``: ``None`` = the cores this process may use)."""
        import os

        workers = len(os.sched_getaffinity(0)) if workers is None else workers
        n = 0
        for model in dict.fromkeys(models):
            names = sorted(p.stem for p in (self.root / "paired" / model).glob("*.safetensors"))
            sets = [s for s in (self.load(model, name) for name in names) if s is not None]
            n += self.comparator(model).prefetch(sets, workers)
        return n

    def comparator(self, model: str) -> Comparator:
        if model not in self._comparators:
            ref, gauss = self.reference(model), None
            if ref is not None:
                layer = ref.spec.fid_feature
                real = ref.features[layer].double().numpy() if ref.features else None
                gauss = GaussianReference(ref.mu[layer], ref.sigma[layer], real)
            d = self.domain.get(model)
            fp = self.load(model, "fp")
            comp = Comparator(self.rounds, self.seed, gauss, None if d is None else d.reference, fp)
            if self.rules is not None:  # before any value is computed: the deciding metric keeps every round
                deciding = self.rules.metric if fp is not None and comp.available(self.rules.metric, fp) \
                    else self.rules.fallback_metric
                comp.rounds_of = self.rules.rounds_of(deciding)
            self._comparators[model] = comp
        return self._comparators[model]

    def deciding(self, model: str, rules: Rules) -> str:
        """The metric that decides this model's verdicts: ``rules.metric`` where the model has it, else the fallback."""
        fp = self.load(model, "fp")
        return rules.metric if fp is not None and self.comparator(model).available(rules.metric, fp) \
            else rules.fallback_metric

    def floor(self, model: str, metric: str = "domain_fd") -> dict[str, Any] | None:
        """The real-data row's value of a domain metric with its interval: what the metric gives real images."""
        d = self.domain.get(model)
        if d is None or d.real_images is None or d.classifier is None:
            return None
        emb = self._embed(model, d.real_images)
        real = SampleSet("real images", int(d.real_images.shape[0]), domain_features=emb[0], domain_labels=emb[1])
        return self.comparator(model).single(metric, real)

    def single(self, model: str, name: str, metric: str) -> dict[str, Any] | None:
        s = self.load(model, name)
        return None if s is None else self.comparator(model).single(metric, s)

    def compare(self, model: str, a: str, b: str) -> dict[str, Any] | None:
        """Paired differences a - b of every available metric (``None`` if either setting is missing)."""
        la, lb = self.load(model, a), self.load(model, b)
        if la is None or lb is None or la.n != lb.n:
            return None
        out: dict[str, Any] = {"model": model, "a": a, "b": b, "n": la.n}
        cmp = self.comparator(model)
        for metric in self.wanted:
            t = cmp.compare(metric, la, lb)
            if t is not None:
                out[metric] = {**t.to_json(), "verdict": verdict(t.ci, metric, a, b)}
        return out


#: how each metric is shown: (label, digits, scale)
SHOW = {"domain_fd": ("domain FD", 2, 1.0), "fid": ("FID", 1, 1.0), "kid": ("KID x1e3", 2, 1e3),
        "label_agreement": ("label agreement", 3, 1.0), "class_accuracy": ("class accuracy", 3, 1.0),
        "prompt_accuracy": ("prompt accuracy", 3, 1.0), "psnr": ("PSNR (dB)", 2, 1.0), "ssim": ("SSIM", 3, 1.0),
        "lpips": ("LPIPS", 4, 1.0)}


def _ci(d: dict[str, Any] | None, key: str, digits: int | None = None, scale: float | None = None) -> str:
    if not d or key not in d:
        return "n/a"
    dg, sc = SHOW.get(key, ("", 2, 1.0))[1:]
    digits, scale = digits if digits is not None else dg, scale if scale is not None else sc
    v = d[key]
    return f"{v['diff'] * scale:+.{digits}f} [{v['ci'][0] * scale:+.{digits}f}, {v['ci'][1] * scale:+.{digits}f}]"


def _val(m: dict[str, Any] | None, key: str, digits: int = 2) -> str:
    return "not run" if m is None else ("n/a" if m.get(key) is None else f"{m[key]:.{digits}f}")


def _single(pd: PairedData, model: str, name: str, metric: str) -> str:
    v = pd.single(model, name, metric)
    if v is None:
        return "n/a"
    _, dg, sc = SHOW[metric]
    return f"{v['value'] * sc:.{dg}f} [{v['ci'][0] * sc:.{dg}f}, {v['ci'][1] * sc:.{dg}f}]"


def _short(v: str, a_label: str, b_label: str, a: str, b: str) -> str:
    return v.replace(f"{a} better", f"{a_label} better").replace(f"{b} better", f"{b_label} better")


def _table(pd: PairedData, rules: Rules, model: str, rows: list[tuple[str, ...]], base_label: str, base: str,
           title: str, note: str) -> tuple[list[str], list[dict[str, Any]]]:
    """One comparison table: each row (label, name[, its own base]) against ``base`` (paired differences row - base),
    with the deciding metric first."""
    dm = pd.deciding(model, rules)
    dl = SHOW[dm][0]
    bm = pd.metrics(model, base)
    lines = [title, "", note, "",
             f"| Setting | FID | {dl} [95 % CI] | PSNR vs FP (dB) | Δ{dl} vs {base_label} [95 % CI] | ΔFID [95 % CI] | "
             f"ΔKID x1e3 | Δlabel agreement | ΔPSNR (dB) | verdict ({dl}, uncorrected) |",
             "|---|---|---|---|---|---|---|---|---|---|",
             f"| **{base_label}** (`{base}`) | {_val(bm, 'fid')} | {_single(pd, model, base, dm)} | "
             f"{_val(bm, 'psnr_vs_fp')} | - | - | - | - | - | - |"]
    found = []
    for label, name, *own in rows:
        row_base = own[0] if own else base
        m = pd.metrics(model, name)
        c = pd.compare(model, name, row_base) if m is not None and pd.metrics(model, row_base) is not None else None
        if c is not None:
            found.append({**c, "label": label})
        verdict_cell = (_short(c[dm]["verdict"], label.split(" (")[0], base_label, name, row_base)
                        if c and dm in c else "n/a")
        lines.append(f"| {label} (`{name}`) | {_val(m, 'fid')} | {_single(pd, model, name, dm)} | "
                     f"{_val(m, 'psnr_vs_fp')} | {_ci(c, dm)} | {_ci(c, 'fid')} | {_ci(c, 'kid')} | "
                     f"{_ci(c, 'label_agreement')} | {_ci(c, 'psnr')} | {verdict_cell if m is not None else 'not run'} |")
    return lines + [""], found


class Replication:
    """The seed study's comparisons (``results/studies/replicate.json``): the same comparison at more calibration /
    reconstruction seeds, named ``<setting>-s<seed>``."""

    def __init__(self, path: Path):
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.by_pair = {(c["a"], c["b"]): c for c in data.get("comparisons") or [] if c}
        self.path = path

    def seeds(self, a: str, b: str, metric: str) -> list[tuple[int, dict[str, Any]]]:
        """(seed, that seed's test of ``metric``) for seeds other than 0 that the study compared."""
        out = []
        for (sa, sb), c in self.by_pair.items():
            if sa.startswith(f"{a}-s") and sb == f"{b}-s{sa.rsplit('-s', 1)[1]}" and metric in c:
                seed = int(sa.rsplit("-s", 1)[1])
                if seed != 0:
                    out.append((seed, c[metric]))
        return sorted(out, key=lambda t: t[0])

    def replicated(self, a: str, b: str, metric: str, a_better: bool) -> bool | None:
        """``True`` when every other seed's 95 % interval excludes 0 on the seed-0 side, ``False`` when one does not,
        ``None`` when the study has no seed of this comparison."""
        seeds = self.seeds(a, b, metric)
        if not seeds:
            return None
        lower = LOWER_IS_BETTER[metric]
        return all((t["ci"][1] < 0 if a_better == lower else t["ci"][0] > 0) for _, t in seeds)


def _claim_comparisons(comps: dict[str, list[dict[str, Any]]], studies) -> dict[str, list[dict[str, Any]]]:
    """The comparisons behind claims (b)-(d2); in every one the claimed winner is the b side."""
    abl = [c for c in comps.get("ablation", []) if c["a"] in ("tfmq-notiar-W4A8", "tfmq-nofsc-W4A8", "tfmq-nofsc-W4A6")]
    out = {"b": comps.get("inducement", []), "c": abl}
    for tag, key in (("d1", "own_defaults"), ("d2", "equal_footing")):
        out[tag] = [c for c in comps.get(key, []) if c["a"].split("-")[0] in ("ptq4dm", "qdiffusion", "ptqd")]
    return out


def _decide(metric_of, alpha: float, by_claim: dict[str, list[dict[str, Any]]], rep: Replication,
            studies_model: str) -> None:
    """Holm over every comparison of every claim on its deciding metric (``metric_of(model)``) at family-wise
    ``alpha``; writes ``decision`` into each comparison (the seed study judges ``studies_model``'s only)."""
    family = [(c, metric_of(c["model"])) for cs in by_claim.values() for c in cs]
    family = [(c, m) for c, m in family if m in c]
    tests = [V.PairedTest(c[m]["diff"], c[m]["se"], c[m]["p"], tuple(c[m]["ci"]), c[m]["lower_is_better"],
                          c[m]["method"]) for c, m in family]
    adjusted = V.holm([t.p for t in tests])
    intervals = V.corrected_intervals(tests, alpha)
    for (c, m), t, hp, ci in zip(family, tests, adjusted, intervals):
        rep_ok = rep.replicated(c["a"], c["b"], m, t.a_better) if c["model"] == studies_model else None
        c["decision"] = {"metric": m, "holm_p": hp, "holm_ci": list(ci), "family": len(tests),
                         "replicated": rep_ok, "seeds": [{"seed": s, **x} for s, x in rep.seeds(c["a"], c["b"], m)],
                         "level": V.comparison_level(hp, t.p, rep_ok, alpha), "z": t.z,
                         "favours_claim": not t.a_better}


def _line(c: dict[str, Any]) -> str:
    d = c.get("decision")
    head = f"`{c['a']}` - `{c['b']}` on {c['model']}"
    if d is None:
        return f"{head}: no paired data of the deciding metric"
    m = d["metric"]
    label, dg, sc = SHOW[m]
    t = c[m]
    seeds = ""
    if d["seeds"]:
        seeds = "; seeds " + ", ".join(f"{x['seed']}: {x['diff'] * sc:+.{dg}f} [{x['ci'][0] * sc:+.{dg}f}, "
                                         f"{x['ci'][1] * sc:+.{dg}f}]" for x in d["seeds"])
        seeds += " (replicates)" if d["replicated"] else " (does not replicate)"
    extra = [f"Δ{SHOW[k][0]} {_ci(c, k)}" for k in ("fid", "kid", "label_agreement", "class_accuracy", "prompt_accuracy",
                                                   "psnr") if k != m and k in c]
    return (f"{head}: Δ{label} {t['diff'] * sc:+.{dg}f} [{t['ci'][0] * sc:+.{dg}f}, {t['ci'][1] * sc:+.{dg}f}], "
            f"Holm-corrected [{d['holm_ci'][0] * sc:+.{dg}f}, {d['holm_ci'][1] * sc:+.{dg}f}] (z {d['z']:+.1f}, p "
            f"{t['p']:.2g}, Holm p {d['holm_p']:.2g} of {d['family']}) -> "
            + ("**none** (no Holm-significant difference)" if d["level"] == "none" else
               f"**{d['level']}** {'for' if d['favours_claim'] else 'against'} the claim")
            + f"{seeds}; " + "; ".join(extra))


def _outcomes(cs: list[dict[str, Any]]) -> list[V.Outcome]:
    return [V.Outcome(c["decision"]["level"], c["decision"]["favours_claim"], c["decision"]["z"])
            for c in cs if "decision" in c]


def _mechanisms(path: Path, pd_metric: str) -> dict[str, str]:
    """The 1 000-iteration study (``scripts/studies.py mechanisms``): each comparison against Freeze per seed, Holm
    over the study's own tests, and the fraction of weights AdaRound moved off nearest."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    comps = [c for c in data.get("comparisons") or [] if c and pd_metric in c]
    if not comps:
        return {}
    rows = {r["setting"]: r for r in data.get("rows", [])}
    adjusted = V.holm([c[pd_metric]["p"] for c in comps])
    label, dg, sc = SHOW[pd_metric]
    out = {}
    for method in ("brecq", "tfmq"):
        mine = [(c, hp) for c, hp in zip(comps, adjusted) if c["a"].startswith(f"{method}-")]
        if not mine:
            continue
        cells = []
        for c, hp in sorted(mine, key=lambda t: t[0]["a"]):
            t = c[pd_metric]
            seed = c["a"].rsplit("-s", 1)[1]
            off = rows.get(c["a"], {}).get("off_nearest_fraction")
            cells.append(f"seed {seed}: {t['diff'] * sc:+.{dg}f} [{t['ci'][0] * sc:+.{dg}f}, {t['ci'][1] * sc:+.{dg}f}] "
                         f"(Holm p {hp:.2g}" + (f", {100 * off:.1f} % of weights off nearest)" if off is not None else ")"))
        firm = [hp < 0.05 for _, hp in mine]
        signs = {c[pd_metric]["diff"] < 0 for c, _ in mine}
        word = ("every seed significant, one direction" if all(firm) and len(signs) == 1 else
                f"{sum(firm)} of {len(mine)} seeds significant after Holm")
        iters = mine[0][0]["a"].split("-i")[-1].split("-s")[0]
        out[method] = (f"at {iters} reconstruction iterations (`python scripts/studies.py mechanisms`), `{method}` - "
                       f"`freeze`, Δ{label}: " + "; ".join(cells) + f" -> {word}")
    return out


def _gpu_lines(root: Path) -> list[str]:
    """The GPU check's equal-footing differences (benchmarks/results/gpu-h200-run*.json), proxy FID, uncorrected."""
    out = []
    for p in sorted(root.glob("gpu-h200-run*.json")):
        b = json.loads(p.read_text()).get("part_b") or {}
        for name, r in (b.get("rows") or {}).items():
            d = r.get("dfid_vs_tfmq")
            if d:
                out.append(f"GPU check ({p.name}: {b.get('num_samples')} samples, {b.get('recon_iters')} iterations, "
                           f"{d.get('rounds')} rounds): `{name}` - `tfmq-W4A8` ΔFID {d['diff']:+.2f} "
                           f"[{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}] (uncorrected)")
    return out


def _timing(pd: PairedData, grid, studies_dir: Path, rules: Rules) -> tuple[str, list[str]]:
    """Claim (e): TFMQ / Q-Diffusion quantization time at equal budgets: every grid cell (their own defaults), the
    equal-footing pair, and the iteration study's points. Reproduced only if every ratio < 0.8."""
    pts: list[tuple[str, float, float]] = []
    for model in grid.models:
        for bits in grid.bits:
            q, t = pd.metrics(model, f"qdiffusion-{bits}"), pd.metrics(model, f"tfmq-{bits}")
            if q and t and quant_seconds(q) and quant_seconds(t):
                pts.append((f"{model} {bits}, own defaults ({rules.recon_iters or '?'} iterations)", quant_seconds(t),
                            quant_seconds(q)))
    for model in dict.fromkeys(grid.models):
        q, t = pd.metrics(model, "qdiffusion-eq-W4A8"), pd.metrics(model, "tfmq-W4A8")
        if q and t and quant_seconds(q) and quant_seconds(t):
            pts.append((f"{model} W4A8, equal footing", quant_seconds(t), quant_seconds(q)))
    it = studies_dir / "iterations.json"
    if it.is_file():
        rows = json.loads(it.read_text())["rows"]
        for n in sorted({r["iters"] for r in rows}):
            t = next((r for r in rows if r["iters"] == n and r["method"] == "tfmq" and r["seed"] == 0), None)
            q = next((r for r in rows if r["iters"] == n and r["method"] == "qdiffusion" and r["seed"] == 0), None)
            if t and q and n != rules.recon_iters:
                pts.append((f"iteration study, {n} iterations (its own runs)", t["quant_time_total_s"],
                            q["quant_time_total_s"]))
    r = [t / q for _, t, q in pts]
    status = ("not run" if not r else "reproduced" if all(x < 0.8 for x in r) else
              "refuted" if all(x > 1.25 for x in r) else "inconclusive (the ratio depends on the budget)")
    lines = [f"{what}: TFMQ {t:.0f} s vs Q-Diffusion {q:.0f} s (ratio {t / q:.2f})" for what, t, q in pts]
    lines.append("one run each, wall seconds of this machine (no interval); reproduced only if every ratio < 0.8, "
                 f"refuted if every one > 1.25. Q-Diffusion's activation step learning runs act_recon.iters "
                 f"({rules.act_iters or '?'} here, 5 000 in its release), TFMQ's FSC none: the two budgets set much of "
                 "the ratio")
    return status, lines


def claims(pd: PairedData, rules: Rules, grid, studies, comps: dict[str, list[dict[str, Any]]],
           studies_dir: Path, bench_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """The poster's claims (a)-(e), each with its status and the numbers behind it."""
    out: list[dict[str, Any]] = []
    # (a) naive disturbs temporal features: the time embedding depends on t (and the class) only, so its error
    # is exact for the given model (no sampling noise): compare naive's with TFMQ's at each bits
    rows = []
    for model in grid.models:
        for bits in grid.bits:
            n, t = pd.metrics(model, f"naive-{bits}"), pd.metrics(model, f"tfmq-{bits}")
            if n and t and n.get("temporal_cos_mean") is not None and t.get("temporal_cos_mean") is not None:
                rows.append((model, bits, (1 - n["temporal_cos_mean"]) * 1e4, (1 - t["temporal_cos_mean"]) * 1e4))
    status = "not run" if not rows else ("reproduced" if all(e_n > e_t for _, _, e_n, e_t in rows) else
                                         "refuted" if all(e_n <= e_t for _, _, e_n, e_t in rows) else "mixed")
    out.append({"claim": "(a) naive quantization disturbs the temporal features (more than TFMQ)", "status": status,
                "evidence": [f"{m} {b}: temporal error naive {e_n:.1f} vs TFMQ {e_t:.1f} (x1e4, 1 - cos; ratio "
                             f"{e_n / e_t if e_t else float('inf'):.1f}; exact for the model: the embedding depends on "
                             "t (and, for class-conditional models, the class) only; naive also quantizes "
                             "time_embedding.linear_1, which TFMQ's policy keeps in float)" for m, b, e_n, e_t in rows]})
    by_claim = _claim_comparisons(comps, studies)
    rep = Replication(studies_dir / "replicate.json")
    _decide(lambda model: pd.deciding(model, rules), rules.alpha, by_claim, rep, studies.model)
    mech = _mechanisms(studies_dir / "mechanisms.json", pd.deciding(studies.model, rules))
    texts = {"b": "(b) Freeze beats joint BRECQ (temporal layers optimised with their blocks)",
             "c": "(c) TIAR and FSC each help (TFMQ vs TFMQ without one of them)",
             "d1": "(d1) TFMQ beats PTQ4DM / Q-Diffusion / PTQD with each method's own layer policy and switches "
                   "(the grid)",
             "d2": f"(d2) TFMQ beats PTQ4DM / Q-Diffusion / PTQD on equal footing (TFMQ's layer policy for all; "
                   f"{studies.model}, W4A8)"}
    notes = {"b": [f"budget: {rules.budget}; the paper's mechanism (overfitting in long reconstruction) acts only as "
                   "far as AdaRound moves weights off nearest, which grows with the iterations (the mechanisms study "
                   "at 1 000 iterations, when run, says how far)",
                   *[v for k, v in mech.items() if k == "brecq"]],
             "c": [f"budget: {rules.budget}", *[v for k, v in mech.items() if k == "tfmq"]],
             "d1": [f"budget: {rules.budget}; Q-Diffusion and PTQD run policy `all` (conv_in / conv_out at the "
                    "grid's bits) while TFMQ keeps them in float: the W4A8 margins are mostly policy and budget. "
                    "PTQD here builds on Q-Diffusion with first / last layers at the grid's bits; as released it "
                    "builds on BRECQ with them at 8 bits, and its step-aware mixed precision is not built "
                    "(docs/method.md section 8)"],
             "d2": [f"budget: {rules.budget}", *_gpu_lines(bench_dir)]}
    for tag in ("b", "c", "d1", "d2"):
        cs = by_claim[tag]
        out.append({"claim": texts[tag], "status": V.claim_status(_outcomes(cs)),
                    "evidence": [_line(c) for c in cs], "notes": notes[tag]})
    status, lines = _timing(pd, grid, studies_dir, rules)
    out.append({"claim": "(e) TFMQ quantizes faster than Q-Diffusion (paper: 2.0x)", "status": status,
                "evidence": lines, "notes": []})
    head = ["## Claims of the poster, tested on these models", "",
            f"Deciding metric: **{SHOW[rules.metric][0]}** (`report.metric`; `{rules.fallback_metric}` for a model "
            f"without a domain classifier). Every comparison is a paired bootstrap ({rules.rounds} rounds; "
            f"{min(rules.beside_rounds, rules.rounds)} for the set metrics shown beside the deciding one) or McNemar "
            f"test on the same samples; the claims' tests form one family, Holm-corrected at {rules.alpha:g}. A "
            "comparison is *firm* when Holm-significant and, where the seed study ran it (`python scripts/studies.py "
            "replicate`), significant the same way at every seed; *unreplicated* when Holm-significant without a "
            "seed study; *marginal* when only the uncorrected 95 % interval excludes 0 (or a seed does not repeat "
            "it). A claim is *reproduced* / *refuted* only when every comparison is firm one way; *partly* when some "
            "are; *marginal* (with the largest |z|) or *inconclusive* otherwise.", ""]
    for c in out:
        head.append(f"- **{c['claim']}: {c['status']}**")
        head += [f"  - {e}" for e in c["evidence"]] or ["  - (no settings run)"]
        head += [f"  - *{n}*" for n in c.get("notes", [])]
    return head + [""], out


def resolution(pd: PairedData, rules: Rules, models: list[str], comps: dict[str, list[dict[str, Any]]],
               coverage: Path) -> list[str]:
    """What each metric can resolve at this N: its real-image floor, FP's value, the median paired standard error
    over the claims' comparisons, and the smallest effect detectable with 80 % power at 95 % uncorrected and at
    the Holm threshold of the family's smallest p."""
    lines = ["## What the metrics can resolve at this sample count", "",
             "| Model | metric | real images (floor) | FP [95 % CI] | median paired SE | detectable effect (80 % power), "
             "uncorrected | detectable effect, Bonferroni over the family |", "|---|---|---|---|---|---|---|"]
    allc = [c for cs in comps.values() for c in cs]
    m_tests = max(1, len({(c["model"], c["a"], c["b"]) for c in allc if "decision" in c}))
    z_fam = V.z_for(1 - rules.alpha / m_tests)
    for model in models:
        for metric in ("domain_fd", "fid", "kid", "label_agreement", "psnr"):
            ses = [c[metric]["se"] for c in allc if c["model"] == model and metric in c]
            if not ses:
                continue
            label, dg, sc = SHOW[metric]
            floor = pd.floor(model, metric) if metric == "domain_fd" else None
            fp = pd.single(model, "fp", metric) if metric in ("domain_fd", "fid", "kid") else None
            se = float(np.median(ses))
            fmt = lambda v: f"{v['value'] * sc:.{dg}f} [{v['ci'][0] * sc:.{dg}f}, {v['ci'][1] * sc:.{dg}f}]"  # noqa: E731
            lines.append(f"| {model} | {label} | {fmt(floor) if floor else '-'} | {fmt(fp) if fp else '-'} | "
                         f"{se * sc:.{dg + 1}f} | {(1.96 + 0.84) * se * sc:.{dg}f} | {(z_fam + 0.84) * se * sc:.{dg}f} |")
    lines += ["", f"Detectable effect = (z + 0.84) x the median paired standard error (z 1.96 uncorrected; "
              f"{z_fam:.2f} for Bonferroni over the {m_tests} tests, Holm's first step). Label agreement and PSNR are "
              "fidelity to the FP samples of the same noise, not quality."]
    if coverage.is_file():
        cov = json.loads(coverage.read_text())
        lines += ["", f"Coverage check (`python scripts/coverage.py`, {cov.get('seeds')} values of eval.seed, FP): "
                  "the spread of FP's value over the seeds against the single-row bootstrap half-width.", "",
                  "| Model | metric | mean over seeds | std over seeds | mean 95 % half-width | half-width / (1.96 std) |",
                  "|---|---|---|---|---|---|"]
        for r in cov.get("rows", []):
            label, dg, sc = SHOW.get(r["metric"], (r["metric"], 2, 1.0))
            ratio = r["half_width"] / (1.96 * r["std"]) if r["std"] else float("nan")
            lines.append(f"| {r['model']} | {label} | {r['mean'] * sc:.{dg}f} | {r['std'] * sc:.{dg}f} | "
                         f"{r['half_width'] * sc:.{dg}f} | {ratio:.2f} |")
    return lines + [""]


def temporal_section(pd: PairedData, grid) -> list[str]:
    """The poster's temporal measures at W4A8: mismatch delta (sampler steps and all training steps) and the
    trajectory deviation from FP on the same noise."""
    lines = ["## Temporal mismatch and trajectory deviation (W4A8)", "",
             "| Model | Method | temporal error x1e4 | mismatched steps (sampler) | mean abs δ, sampler steps | "
             "mismatched (all 1 000 steps) | mean abs δ, training steps | trajectory RMSE, final | mean |",
             "|---|---|---|---|---|---|---|---|---|"]
    for model in grid.models:
        for method in grid.methods:
            m = pd.metrics(model, f"{method}-W4A8")
            if not m or m.get("temporal_cos_mean") is None:
                continue
            lines.append(f"| {model} | {method} | {(1 - m['temporal_cos_mean']) * 1e4:.1f} | "
                         f"{_val(m, 'mismatched_fraction', 3)} | {_val(m, 'delta_step_mean_abs')} | "
                         f"{_val(m, 'mismatched_fraction_all', 3)} | {_val(m, 'delta_all_timestep_mean_abs')} | "
                         f"{_val(m, 'trajectory_rmse_final', 3)} | {_val(m, 'trajectory_rmse_mean', 3)} |")
    lines += ["", "δ = argmax over t' of cos(emb_t', emb^q_t) - t (section 1). One sampler step spans "
              "num_train_timesteps / num_inference_steps training steps, so δ = 0 at sampler resolution means the "
              "poster's *temporal information mismatch* is absent on these models. The trajectory here runs without "
              "guidance for one fixed class / prompt, not the evaluated sampler.", ""]
    return lines


def paired_report(out_dir: str, grid, studies, reference_path: str | dict[str, str] | None, rules: Rules,
                  domain: dict[str, DomainData] | None = None, studies_dir: str | Path = "results/studies",
                  bench_dir: str | Path = "benchmarks/results") -> tuple[list[str], dict[str, Any]]:
    """Markdown sections (equal footing, own defaults, poster tables, claims, resolution) and their data
    (``claims.json``)."""
    pd = PairedData(out_dir, reference_path, rules.rounds, rules.seed, domain, rules=rules)
    pd.prefetch([*grid.models, studies.model])
    model = studies.model
    note_eq = ("Every method with TFMQ's layer policy, no attention-matmul quantizers, no shortcut split: only the "
               "method differs. Differences are row - TFMQ on the same samples (negative ΔFID / Δdomain FD, positive "
               "ΔPSNR / Δlabel agreement = the row is better).")
    lines: list[str] = []
    comps: dict[str, list[dict[str, Any]]] = {}
    sec, comps["equal_footing"] = _table(pd, rules, model, EQUAL_FOOTING, "TFMQ", "tfmq-W4A8",
                                          f"## Equal footing, W4A8 ({model})", note_eq)
    lines += sec
    own: list[dict[str, Any]] = []
    for m in grid.models:
        for bits in grid.bits:
            rows = [(METHOD_LABEL.get(meth, meth), f"{meth}-{bits}") for meth in grid.methods if meth != "tfmq"]
            sec, found = _table(pd, rules, m, rows, "TFMQ", f"tfmq-{bits}",
                                f"## Methods' own defaults vs TFMQ, {bits} ({m})",
                                "Each method with its own layer policy and switches (the grid).")
            lines += sec
            own += found
    comps["own_defaults"] = own
    sec, comps["inducement"] = _table(pd, rules, model, [("joint BRECQ W8A8", "brecq-W8A8", "freeze-W8A8"),
                                                         ("joint BRECQ W4A8", "brecq-W4A8", "freeze-W4A8")],
                                      "Freeze", "freeze-W4A8", f"## Poster table: inducement, joint BRECQ vs Freeze ({model})",
                                      "Joint BRECQ optimises the temporal layers inside their blocks; Freeze rounds "
                                      "them to nearest and keeps them fixed. Each row against Freeze at its bits.")
    lines += sec
    # the W4A6 rows only where the studies define them (the default run keeps activation stress outside the main
    # job: scripts/studies.py stress)
    w4a6 = "tfmq-W4A6" in studies.settings
    ablation = [r for r in ABLATION if w4a6 or "W4A6" not in r[1]]
    sec, comps["ablation"] = _table(pd, rules, model, ablation, "TFMQ (TIAR + FSC)", "tfmq-W4A8",
                                    f"## Poster table: ablation, W4A8 ({model})",
                                    "Rows are TFMQ with a part switched off, against full TFMQ"
                                    + (" (the last row at W4A6, against TFMQ-W4A6)." if w4a6 else "."))
    lines += sec
    if w4a6:
        sec, comps["stress"] = _table(pd, rules, model, STRESS, "TFMQ", "tfmq-W4A6",
                                      f"## Activation stress, W4A6 ({model})",
                                      "Six-bit activations, where per-timestep ranges (FSC) have more to do.")
        lines += sec
    else:
        lines += ["Activation stress (W4A6, W8A4, W4A4) runs outside the main job: `python scripts/studies.py stress` "
                  "(dvc exp runs; table in the README).", ""]
    claim_lines, claim_data = claims(pd, rules, grid, studies, comps, Path(studies_dir), Path(bench_dir))
    res = resolution(pd, rules, list(dict.fromkeys([*grid.models, model])), comps,
                     Path(studies_dir) / "coverage.json")
    return lines + claim_lines + res + temporal_section(pd, grid), {
        "claims": claim_data, "comparisons": comps, "rules": rules.__dict__}
