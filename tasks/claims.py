"""Paired comparisons, the poster's tables and the claims section of the report (docs/method.md section 11).

Every setting of one model sampled the same noise (and classes), so two settings are compared on the
same resampled sample indices (``tfmq.evaluation.paired``): FID and KID against the real reference,
and the per-sample PSNR / SSIM against the FP samples. "A better than B" is written only when the
95 % interval of the difference excludes 0; otherwise the comparison is inconclusive.

Tables (on ``studies.model`` unless said otherwise; a missing setting shows as "not run"):

- equal footing: every method on TFMQ's layer policy, attention matmuls and shortcut split (W4A8);
- methods' own defaults: the grid, every method against ``tfmq`` at the same bits, per model;
- inducement (poster): joint BRECQ (``brecq``) vs ``freeze`` at W8A8 and W4A8;
- ablation (poster): TFMQ without TIAR, without FSC, without both (= ``freeze``), FSC on the TIB only;
- activation stress: W4A6.

Claims (a)-(e) of the poster are marked reproduced / refuted / inconclusive from these numbers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: (label, setting name) rows of each poster table; "{b}" is the bit setting
EQUAL_FOOTING = [("naive (RTN)", "naive-eq-W4A8"), ("PTQ4DM", "ptq4dm-eq-W4A8"), ("Q-Diffusion", "qdiffusion-eq-W4A8"),
                 ("PTQD", "ptqd-eq-W4A8"), ("joint BRECQ", "brecq-W4A8"), ("Freeze", "freeze-W4A8")]
ABLATION = [("w/o TIAR (FSC only)", "tfmq-notiar-W4A8"), ("w/o FSC (TIAR only)", "tfmq-nofsc-W4A8"),
            ("w/o both (= Freeze)", "freeze-W4A8"), ("FSC on the TIB only (paper's scope)", "tfmq-fsctib-W4A8"),
            ("w/o FSC at W4A6 (vs TFMQ-W4A6)", "tfmq-nofsc-W4A6", "tfmq-W4A6")]
STRESS = [("naive", "naive-W4A6"), ("Freeze", "freeze-W4A6"), ("Q-Diffusion", "qdiffusion-W4A6")]
METHOD_LABEL = {"naive": "naive", "freeze": "Freeze", "brecq": "joint BRECQ", "ptq4dm": "PTQ4DM",
                "qdiffusion": "Q-Diffusion", "ptqd": "PTQD", "tfmq": "TFMQ"}


@dataclass
class _Loaded:
    images_n: int
    features: Any  # float64 [N, D]
    per_sample: dict[str, Any]  # psnr / ssim / mse / feat_dist (/ lpips) arrays (quantized rows)


def quant_seconds(m: dict) -> float | None:
    """A setting's quantization wall time with its weight stages counted where they ran (shared or not)."""
    return m.get("quant_time_unshared_s", m.get("quant_time_total_s"))


class PairedData:
    """The paired files of one results tree, loaded lazily, and the set-metric evaluators per setting."""

    def __init__(self, out_dir: str, reference_path: str | dict[str, str] | None, rounds: int, seed: int):
        """``reference_path``: the reference statistics of every model (one path, or ``model -> path`` when models
        make images of different shapes; a model without one gets no FID / KID differences)."""
        self.root = Path(out_dir)
        self.rounds, self.seed = rounds, seed
        self._files: dict[tuple[str, str], _Loaded | None] = {}
        self._fid: dict[tuple[str, str], Any] = {}
        self._kid: dict[tuple[str, str], Any] = {}
        self._paths = reference_path
        self._refs: dict[str, Any] = {}

    def reference(self, model: str):
        """The model's ``ReferenceStats`` (``None`` if its file is missing), loaded once per file."""
        path = self._paths.get(model) if isinstance(self._paths, dict) else self._paths
        if not path or not Path(path).is_file():
            return None
        if path not in self._refs:
            from tfmq.evaluation.reference_stats import ReferenceStats

            self._refs[path] = ReferenceStats.load(path)
        return self._refs[path]

    def metrics(self, model: str, name: str) -> dict[str, Any] | None:
        p = self.root / "metrics" / model / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def load(self, model: str, name: str) -> _Loaded | None:
        key = (model, name)
        if key not in self._files:
            p = self.root / "paired" / model / f"{name}.safetensors"
            if not p.is_file():
                self._files[key] = None
            else:
                from safetensors.torch import load_file

                t = load_file(str(p))
                per = {k: t[k].double().numpy() for k in ("mse", "psnr", "ssim", "feat_dist", "lpips") if k in t}
                self._files[key] = _Loaded(int(t["images"].shape[0]), t["features"].double().numpy(), per)
        return self._files[key]

    def _set_metric(self, kind: str, model: str, name: str):
        from tfmq.evaluation.paired import FidAgainst, KidAgainst

        cache = self._fid if kind == "fid" else self._kid
        if (model, name) not in cache:
            f = self.load(model, name).features
            ref = self.reference(model)
            layer = ref.spec.fid_feature
            cache[(model, name)] = (FidAgainst(f, ref.mu[layer], ref.sigma[layer], ref.sigma_sqrt(layer))
                                    if kind == "fid" else KidAgainst(f, ref.features[layer].double().numpy()))
        return cache[(model, name)]

    def compare(self, model: str, a: str, b: str) -> dict[str, Any] | None:
        """Paired differences a - b (FID, KID vs the reference; PSNR, SSIM vs FP); ``None`` if either is missing."""
        from tfmq.evaluation.paired import _paired_set_difference, paired_difference, verdict

        la, lb = self.load(model, a), self.load(model, b)
        if la is None or lb is None or la.images_n != lb.images_n:
            return None
        out: dict[str, Any] = {"model": model, "a": a, "b": b, "n": la.images_n}
        ref = self.reference(model)
        if ref is not None:
            for kind in ("fid", "kid") if ref.features else ("fid",):  # KID needs the real images' features
                d = _paired_set_difference(self._set_metric(kind, model, a), self._set_metric(kind, model, b),
                                           la.images_n, self.rounds, self.seed, 0.95)
                out[kind] = {**d, "verdict": verdict(d["ci"], kind, a, b)}
        for k in ("psnr", "ssim", "lpips"):  # lpips: only with eval.lpips_backbone
            if k in la.per_sample and k in lb.per_sample:
                d = paired_difference(la.per_sample[k], lb.per_sample[k], self.rounds * 5, self.seed)
                out[k] = {"diff": d["mean"], "ci": d["ci"], "verdict": verdict(d["ci"], k, a, b)}
        return out


def _ci(d: dict[str, Any] | None, key: str, digits: int, scale: float = 1.0) -> str:
    if not d or key not in d:
        return "n/a"
    v = d[key]
    return f"{v['diff'] * scale:+.{digits}f} [{v['ci'][0] * scale:+.{digits}f}, {v['ci'][1] * scale:+.{digits}f}]"


def _val(m: dict[str, Any] | None, key: str, digits: int = 2) -> str:
    return "not run" if m is None else ("n/a" if m.get(key) is None else f"{m[key]:.{digits}f}")


def _short(v: str, a_label: str, b_label: str, a: str, b: str) -> str:
    return v.replace(f"{a} better", f"{a_label} better").replace(f"{b} better", f"{b_label} better")


def _table(pd: PairedData, model: str, rows: list[tuple[str, ...]], base_label: str, base: str, title: str,
           note: str) -> tuple[list[str], list[dict[str, Any]]]:
    """One comparison table: each row (label, name[, its own base]) against ``base`` (paired differences row - base)."""
    bm = pd.metrics(model, base)
    lines = [title, "", note, "",
             f"| Setting | FID | PSNR vs FP (dB) | SSIM vs FP | ΔFID vs {base_label} [95 % CI] | ΔKID x1e3 | ΔPSNR (dB) | verdict (FID) |",
             "|---|---|---|---|---|---|---|---|",
             f"| **{base_label}** (`{base}`) | {_val(bm, 'fid')} | {_val(bm, 'psnr_vs_fp')} | {_val(bm, 'ssim_vs_fp', 3)} | - | - | - | - |"]
    found = []
    for label, name, *own in rows:
        row_base = own[0] if own else base
        m = pd.metrics(model, name)
        c = pd.compare(model, name, row_base) if m is not None and pd.metrics(model, row_base) is not None else None
        if c is not None:
            found.append({**c, "label": label})
        verdict_cell = (_short(c["fid"]["verdict"], label.split(" (")[0], base_label, name, row_base)
                        if c and "fid" in c else "n/a")
        lines.append(f"| {label} (`{name}`) | {_val(m, 'fid')} | {_val(m, 'psnr_vs_fp')} | {_val(m, 'ssim_vs_fp', 3)} | "
                     f"{_ci(c, 'fid', 1)} | {_ci(c, 'kid', 2, 1e3)} | {_ci(c, 'psnr', 2)} | "
                     f"{verdict_cell if m is not None else 'not run'} |")
    return lines + [""], found


def _status(winners: list[str], winner: str, loser: str) -> str:
    """Per comparison, who is better on FID (``_winner``): *reproduced* if ``winner`` in every one, *refuted* if
    ``loser`` in every one, *mixed* if both occur, *partly reproduced* / *partly refuted* if only one of them occurs
    next to inconclusive comparisons, else *inconclusive*."""
    if not winners:
        return "not run"
    won, lost = winner in winners, loser in winners
    if all(w == winner for w in winners):
        return "reproduced"
    if all(w == loser for w in winners):
        return "refuted"
    if won and lost:
        return "mixed"
    return "partly reproduced" if won else "partly refuted" if lost else "inconclusive"


def _fid_line(c: dict[str, Any]) -> str:
    return (f"`{c['a']}` - `{c['b']}` on {c['model']}: ΔFID {c['fid']['diff']:+.1f} [{c['fid']['ci'][0]:+.1f}, "
            f"{c['fid']['ci'][1]:+.1f}], ΔPSNR {c['psnr']['diff']:+.2f} dB [{c['psnr']['ci'][0]:+.2f}, "
            f"{c['psnr']['ci'][1]:+.2f}] ({c['fid']['verdict']})" if "fid" in c and "psnr" in c else
            f"`{c['a']}` - `{c['b']}` on {c['model']}: no paired data")


def claims(pd: PairedData, grid, studies, comps: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[dict[str, Any]]]:
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
    # exact numbers (no sampling noise), so the test is the sign on every row; the ratio shows how large it is
    status = "not run" if not rows else ("reproduced" if all(e_n > e_t for _, _, e_n, e_t in rows) else
                                         "refuted" if all(e_n <= e_t for _, _, e_n, e_t in rows) else "mixed")
    out.append({"claim": "(a) naive quantization disturbs the temporal features (more than TFMQ)", "status": status,
                "evidence": [f"{m} {b}: temporal error naive {e_n:.1f} vs TFMQ {e_t:.1f} (x1e4, 1 - cos; ratio "
                             f"{e_n / e_t if e_t else float('inf'):.1f}; exact: the embedding depends on t and the class only)"
                             for m, b, e_n, e_t in rows]})
    ind = comps.get("inducement", [])
    out.append({"claim": "(b) Freeze beats joint BRECQ (temporal layers optimised with their blocks)",
                "status": _status([_winner(c) for c in ind], "freeze", "brecq"),
                "evidence": [_fid_line(c) for c in ind]})
    abl = [c for c in comps.get("ablation", []) if c["a"] in ("tfmq-notiar-W4A8", "tfmq-nofsc-W4A8", "tfmq-nofsc-W4A6")]
    out.append({"claim": "(c) TIAR and FSC each help (TFMQ vs TFMQ without one of them)",
                "status": _status([_winner(c) for c in abl], "tfmq", "ablated"),
                "evidence": [_fid_line(c) for c in abl]})
    for tag, key, what in (("(d1)", "own_defaults", "with each method's own layer policy and switches (the grid)"),
                           ("(d2)", "equal_footing", f"on equal footing (TFMQ's layer policy for all; {studies.model}, W4A8)")):
        vs = [c for c in comps.get(key, []) if c["a"].split("-")[0] in ("ptq4dm", "qdiffusion", "ptqd")]
        out.append({"claim": f"{tag} TFMQ beats PTQ4DM / Q-Diffusion / PTQD {what}",
                    "status": _status([_winner(c) for c in vs], "tfmq", "other"),
                    "evidence": [_fid_line(c) for c in vs]})
    ratios = []
    for model in grid.models:
        for bits in grid.bits:
            q, t = pd.metrics(model, f"qdiffusion-{bits}"), pd.metrics(model, f"tfmq-{bits}")
            if q and t and quant_seconds(q) and quant_seconds(t):
                ratios.append((model, bits, quant_seconds(t), quant_seconds(q)))
    r = [t / q for _, _, t, q in ratios]
    status = ("not run" if not r else "reproduced" if all(x < 0.8 for x in r) else
              "refuted" if all(x > 1.25 for x in r) else "inconclusive")
    out.append({"claim": "(e) TFMQ quantizes faster than Q-Diffusion (paper: 2.0x)", "status": status,
                "evidence": [f"{m} {b}: TFMQ {t:.0f} s vs Q-Diffusion {q:.0f} s (ratio {t / q:.2f}; one run each, "
                             "same machine; reproduced below 0.8, refuted above 1.25)" for m, b, t, q in ratios]})
    lines = ["## Claims of the poster, tested on these models", "",
             "Status from the paired FID differences (95 % bootstrap interval over the shared samples; a claim is "
             "*reproduced* only when every comparison behind it excludes 0 in its favour, *refuted* when every one "
             "excludes 0 against it, *mixed* when both occur, *partly reproduced* / *partly refuted* when only one "
             "direction occurs beside inconclusive ones, else *inconclusive*). PSNR against the FP samples of "
             "the same noise is shown beside it.", ""]
    for c in out:
        lines.append(f"- **{c['claim']}: {c['status']}**")
        lines += [f"  - {e}" for e in c["evidence"]] or ["  - (no settings run)"]
    return lines + [""], out


def _winner(c: dict[str, Any]) -> str:
    """'tfmq' / 'freeze' when the comparison's b side (the claimed winner) is better on FID, the a side's family
    ('brecq', 'ablated', 'other') when a is, else 'inconclusive'."""
    if "fid" not in c:
        return "missing"
    v = c["fid"]["verdict"]
    if v == f"{c['b']} better":
        return c["b"].split("-")[0]
    if v == f"{c['a']} better":
        return {"brecq": "brecq"}.get(c["a"].split("-")[0], "ablated" if c["a"].startswith("tfmq-") else "other")
    return "inconclusive"


def paired_report(out_dir: str, grid, studies, reference_path: str | None, rounds: int, seed: int
                  ) -> tuple[list[str], dict[str, Any]]:
    """Markdown sections (equal footing, own defaults, poster tables, claims) and their data (``claims.json``)."""
    pd = PairedData(out_dir, reference_path, rounds, seed)
    model = studies.model
    note_eq = ("Every method with TFMQ's layer policy, no attention-matmul quantizers, no shortcut split: only the "
               "method differs. Differences are row - TFMQ on the same samples (negative ΔFID / positive ΔPSNR = the "
               "row is better).")
    lines: list[str] = []
    comps: dict[str, list[dict[str, Any]]] = {}
    sec, comps["equal_footing"] = _table(pd, model, EQUAL_FOOTING, "TFMQ", "tfmq-W4A8",
                                          f"## Equal footing, W4A8 ({model})", note_eq)
    lines += sec
    own: list[dict[str, Any]] = []
    for m in grid.models:
        for bits in grid.bits:
            rows = [(METHOD_LABEL.get(meth, meth), f"{meth}-{bits}") for meth in grid.methods if meth != "tfmq"]
            sec, found = _table(pd, m, rows, "TFMQ", f"tfmq-{bits}", f"## Methods' own defaults vs TFMQ, {bits} ({m})",
                                "Each method with its own layer policy and switches (the grid).")
            lines += sec
            own += found
    comps["own_defaults"] = own
    comps["inducement"] = []
    lines += [f"## Poster table: inducement, joint BRECQ vs Freeze ({model})", "",
              "Joint BRECQ optimises the temporal layers inside their blocks; Freeze rounds them to nearest and keeps "
              "them fixed. Differences are joint BRECQ - Freeze.", "",
              "| Bits | joint BRECQ FID | Freeze FID | ΔFID [95 % CI] | ΔPSNR vs FP (dB) | verdict (FID) |", "|---|---|---|---|---|---|"]
    for bits in ("W8A8", "W4A8"):
        a, b = pd.metrics(model, f"brecq-{bits}"), pd.metrics(model, f"freeze-{bits}")
        c = pd.compare(model, f"brecq-{bits}", f"freeze-{bits}") if a and b else None
        if c:
            comps["inducement"].append(c)
        v = _short(c["fid"]["verdict"], "joint BRECQ", "Freeze", f"brecq-{bits}", f"freeze-{bits}") if c and "fid" in c else "n/a"
        lines.append(f"| {bits} | {_val(a, 'fid')} | {_val(b, 'fid')} | {_ci(c, 'fid', 1)} | {_ci(c, 'psnr', 2)} | {v} |")
    lines.append("")
    # the W4A6 rows only where the studies define them (the default run keeps activation stress outside the main
    # job: scripts/studies.py stress)
    w4a6 = "tfmq-W4A6" in studies.settings
    ablation = [r for r in ABLATION if w4a6 or "W4A6" not in r[1]]
    sec, comps["ablation"] = _table(pd, model, ablation, "TFMQ (TIAR + FSC)", "tfmq-W4A8",
                                    f"## Poster table: ablation, W4A8 ({model})",
                                    "Rows are TFMQ with a part switched off, against full TFMQ"
                                    + (" (the last row at W4A6, against TFMQ-W4A6)." if w4a6 else "."))
    lines += sec
    if w4a6:
        sec, comps["stress"] = _table(pd, model, STRESS, "TFMQ", "tfmq-W4A6", f"## Activation stress, W4A6 ({model})",
                                      "Six-bit activations, where per-timestep ranges (FSC) have more to do.")
        lines += sec
    else:
        lines += ["Activation stress (W4A6, W8A4, W4A4) runs outside the main job: `python scripts/studies.py stress` "
                  "(dvc exp runs; table in the README).", ""]
    claim_lines, claim_data = claims(pd, grid, studies, comps)
    return lines + claim_lines, {"claims": claim_data, "comparisons": comps, "rounds": rounds, "seed": seed}
