"""Studies beyond the default grid, run as `dvc exp run` of the `run_exp` stage (outside the main job).

    python scripts/studies.py iterations [300 1000]   # W4A8 freeze / qdiffusion / tfmq at these recon.iters (100 = the grid)
    python scripts/studies.py seeds [1 2]             # W4A8 freeze / qdiffusion / tfmq at these quant.seed (0 = the grid)
    python scripts/studies.py stress                  # activation stress: W4A6 / W8A4 / W4A4 (naive, qdiffusion, tfmq; W4A6 also
                                                      # freeze and tfmq without FSC), paired against tfmq at the same bits
    python scripts/studies.py eqseeds [1 2]           # equal footing at these quant.seed: each method paired with tfmq
                                                      # at the same seed (seed 0: the default run's rows)
    python scripts/studies.py replicate [1 2]         # every setting the claims compare on studies.model (W4A8) at these
                                                      # quant.seed, each paired with its claim's base at the same seed
    python scripts/studies.py mechanisms [0 1 2]      # TFMQ / Freeze / joint BRECQ at 1 000 reconstruction iterations
                                                      # (TIAR 2 000) at these seeds, paired with Freeze at the same seed
    python scripts/studies.py plot         # results/studies/iterations.png from the collected rows
    python scripts/studies.py table seeds  # the rows as a Markdown table (mean and spread per method for seeds; stress too)

Each point is one `dvc exp run -S ... run_exp` on `model.name` (its command is stored with the row);
after it, the row gets the metrics of `results/metrics/<model>/exp.json` and the fraction of weights
whose AdaRound grid differs from round-to-nearest, read from the checkpoint. The grid's own rows
(`results/metrics/<model>/<method>-W4A8.json`, iteration 100, seed 0) are read from the default run.
Rows go to `results/studies/<study>.json` (written after every point, so a killed study keeps what
it finished; a second call adds only the points the file does not have yet). TIAR's iterations follow BRECQ's at the default ratio (tiar_recon.iters = 2 x recon.iters).
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("freeze", "qdiffusion", "tfmq")
ITERS = (300, 1000)
SEEDS = (1, 2)
#: the activation-stress points: (setting name, method, bits, extra quant keys); the paired base is tfmq at the same bits
STRESS = [(f"{m}-{b}", m, b, {}) for b in ("W4A6", "W8A4", "W4A4") for m in ("naive", "qdiffusion", "tfmq")] + [
    ("freeze-W4A6", "freeze", "W4A6", {}), ("tfmq-nofsc-W4A6", "tfmq", "W4A6", {"fsc": "false"})]
#: equal footing: every method on TFMQ's layer policy, without attention matmuls and shortcut split (params.yaml studies)
EQ_FOOTING = {"policy": "tfmq", "attention_matmul": "false", "split_shortcut": "false"}
EQ_METHODS = ("naive", "ptq4dm", "qdiffusion", "ptqd")
#: the settings behind the small-effect claims (b), (c), (d2) on studies.model, W4A8: (name, method, extra quant keys,
#: the claim's base); (d1)'s own-default W4A8 margins are 100+ FID and stay unreplicated
REPLICATE = [("tfmq-W4A8", "tfmq", {}, None), ("freeze-W4A8", "freeze", {}, None),
             ("brecq-W4A8", "brecq", {}, "freeze-W4A8"),
             ("tfmq-notiar-W4A8", "tfmq", {"tiar": "false"}, "tfmq-W4A8"),
             ("tfmq-nofsc-W4A8", "tfmq", {"fsc": "false"}, "tfmq-W4A8"),
             *[(f"{m}-eq-W4A8", m, EQ_FOOTING, "tfmq-W4A8") for m in ("ptq4dm", "qdiffusion", "ptqd")]]
#: the mechanisms study: reconstruction iterations where AdaRound moves enough weights to act (TIAR: 2x)
MECHANISM_ITERS = 1000
MECHANISM_METHODS = ("freeze", "tfmq", "brecq")
KEYS = ("fid", "fid_ci_low", "fid_ci_high", "kid_mean", "psnr_vs_fp", "psnr_vs_fp_ci_low", "psnr_vs_fp_ci_high",
        "ssim_vs_fp", "fid_vs_fp", "temporal_cos_mean", "quant_time_total_s", "quant_time_recon_blocks_s")


def off_nearest_fraction(unet) -> dict:
    """Fraction of quantized weights whose integer grid differs from round-to-nearest on the same scale and zero
    point (what AdaRound changed), over every quantized layer; per layer in ``layers``."""
    import torch

    from tfmq.quant.prepare import quant_layers

    moved = total = 0
    layers = {}
    with torch.no_grad():
        for name, layer in quant_layers(unet):
            m = n = 0
            for q, w in zip(layer.wq, layer.weight_parts()):
                grid = q.integer_weight(w)
                nearest = torch.clamp(torch.round(w / q.scale) + q.zero_point, 0, 2 ** q.n_bits - 1)
                m += int((grid != nearest).sum())
                n += grid.numel()
            layers[name] = m / n
            moved, total = moved + m, total + n
    return {"fraction": moved / total, "moved": moved, "weights": total, "layers": layers}


def _checkpoint_fraction(model_dir: str, checkpoint: str) -> float:
    import tfmq
    from tfmq.diffusion.pipelines import load_diffusion_model

    unet = tfmq.load(checkpoint, load_diffusion_model(model_dir, "cpu").unet)
    return off_nearest_fraction(unet)["fraction"]


def _params() -> dict:
    import yaml

    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _row(metrics_path: Path, checkpoint: Path, model_dir: str, **extra) -> dict:
    m = json.loads(metrics_path.read_text())
    row = {**extra, **{k: m.get(k) for k in KEYS}}
    # weight stages adopted from the shared store count with what computing them took (quant_out.shared_weights)
    row["quant_time_total_s"] = m.get("quant_time_unshared_s", m.get("quant_time_total_s"))
    row["off_nearest_fraction"] = _checkpoint_fraction(model_dir, str(checkpoint)) if checkpoint.is_dir() else None
    return row


def _unique(rows: list[dict]) -> list[dict]:
    """One row per (method, iters, seed): the last one written."""
    return list({(r["method"], r["iters"], r["seed"]): r for r in rows}.values())


def _save(study: str, rows: list[dict]) -> Path:
    from tfmq.io import atomic_write_json

    out = ROOT / "results" / "studies" / f"{study}.json"
    atomic_write_json({"study": study, "rows": _unique(rows)}, out)
    return out


def run(study: str, values: tuple[int, ...] | None = None) -> Path:
    # `dvc exp run` leaves the experiment's params in the workspace's params.yaml: the file is put back after
    # every point, so each point differs from the grid only in the keys it sets (a seeds study run before an
    # iterations study once made every iteration point run at the last seed)
    grid_params = (ROOT / "params.yaml").read_text()
    try:
        return _run(study, values, grid_params)
    finally:
        (ROOT / "params.yaml").write_text(grid_params)


def _run(study: str, values: tuple[int, ...] | None, grid_params: str) -> Path:
    p = _params()
    model, out_dir, qdir = p["model"]["name"], p["eval"]["out_dir"], p["quant_out"]["dir"]
    model_dir = str(Path(p["model"]["root"]) / model)
    base_iters, base_seed = p["quant"]["recon"]["iters"], p["quant"]["seed"]
    out = ROOT / "results" / "studies" / f"{study}.json"
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    done = {(r["method"], r["iters"], r["seed"]) for r in rows}
    for method in METHODS:  # the grid's own point
        if (method, base_iters, base_seed) in done:
            continue
        rows.append(_row(ROOT / out_dir / "metrics" / model / f"{method}-W4A8.json",
                         ROOT / qdir / model / f"{method}-W4A8" / "model", model_dir, method=method,
                         iters=base_iters, seed=base_seed, command="dvc repro (the default grid)"))
    _save(study, rows)
    values = values or (ITERS if study == "iterations" else SEEDS)
    points = [(m, i, base_seed) for i in values for m in METHODS] if study == "iterations" else \
        [(m, base_iters, s) for s in values for m in METHODS]
    for method, iters, seed in points:
        if (method, iters, seed) in done:
            continue
        sets = [f"quant.method={method}", "quant.weight_bits=4", "quant.act_bits=8", f"quant.recon.iters={iters}",
                f"quant.tiar_recon.iters={2 * iters}", f"quant.seed={seed}"]
        cmd = [sys.executable, "-m", "dvc", "exp", "run", *[a for s in sets for a in ("-S", s)], "run_exp"]
        t0 = time.perf_counter()
        print(" ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
        (ROOT / "params.yaml").write_text(grid_params)
        rows.append(_row(ROOT / out_dir / "metrics" / model / "exp.json", ROOT / qdir / model / "exp" / "model",
                         model_dir, method=method, iters=iters, seed=seed, command="dvc " + " ".join(cmd[3:]),
                         wall_s=round(time.perf_counter() - t0, 1)))
        _save(study, rows)
    return _save(study, rows)


def _paired_study(study: str, points: list[tuple[str, str, str, dict]], bases: dict[str, str],
                  grid_copies: dict[str, str] | None = None, fractions: bool = False) -> Path:
    """Run ``points`` (``(name, method, bits, extra quant keys)``, each a ``dvc exp run ... run_exp``), keep each one's
    metrics and paired file under ``results/studies/<study>/`` (the paired files are not committed), then compare
    each point with its base (``bases[name]``) on the same samples (``tasks.claims.PairedData``: FID / KID / PSNR
    differences, bootstrap intervals). ``grid_copies``: ``{name: grid setting}`` rows taken from the default run
    (its metrics and paired files) instead of being run. ``fractions``: each row also gets the fraction of weights
    AdaRound moved off round-to-nearest, read from its checkpoint."""
    import shutil

    grid_params = (ROOT / "params.yaml").read_text()
    p = _params()
    model, out_dir, qdir = p["model"]["name"], p["eval"]["out_dir"], p["quant_out"]["dir"]
    model_dir = str(Path(p["model"]["root"]) / model)
    root = ROOT / "results" / "studies" / study
    out = ROOT / "results" / "studies" / f"{study}.json"
    data = json.loads(out.read_text()) if out.is_file() else {"study": study, "rows": []}

    def keep(name: str, src_name: str, method: str, bits: str, **extra) -> None:
        for sub, suffix in (("metrics", ".json"), ("paired", ".safetensors")):
            (root / sub / model).mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / out_dir / sub / model / f"{src_name}{suffix}", root / sub / model / f"{name}{suffix}")
        m = json.loads((root / "metrics" / model / f"{name}.json").read_text())
        if fractions:
            ckpt = ROOT / qdir / model / src_name / "model"
            extra["off_nearest_fraction"] = _checkpoint_fraction(model_dir, str(ckpt)) if ckpt.is_dir() else None
        data["rows"] = [r for r in data["rows"] if r["setting"] != name] + [
            {"setting": name, "method": method, "bits": bits, **{k: m.get(k) for k in KEYS}, **extra}]
        _save_study(out, data)

    def have(name: str) -> bool:
        return any(r["setting"] == name for r in data["rows"]) and (root / "paired" / model / f"{name}.safetensors").is_file()

    try:
        for name, src in (grid_copies or {}).items():
            if not have(name):
                m = json.loads((ROOT / out_dir / "metrics" / model / f"{src}.json").read_text())
                keep(name, src, m["method"], m["bits"], command=f"dvc repro (the default run's {src})")
        for name, method, bits, extra in points:
            if have(name):
                continue
            w, a = bits[1:].split("A")
            sets = [f"quant.method={method}", f"quant.weight_bits={w}", f"quant.act_bits={a}",
                    *(f"quant.{k}={v}" for k, v in extra.items())]
            cmd = [sys.executable, "-m", "dvc", "exp", "run", *[x for s_ in sets for x in ("-S", s_)], "run_exp"]
            print(" ".join(cmd[2:]), flush=True)
            t0 = time.perf_counter()
            subprocess.run(cmd, cwd=ROOT, check=True)
            (ROOT / "params.yaml").write_text(grid_params)
            keep(name, "exp", method, bits, command="dvc " + " ".join(cmd[3:]), wall_s=round(time.perf_counter() - t0, 1))
    finally:
        (ROOT / "params.yaml").write_text(grid_params)
    from flows.checks import reference_file
    from flows.params import load_params
    from tasks.claims import PairedData, domain_data

    params = load_params(ROOT / "params.yaml")
    dom = {model: domain_data(params.reference, params.eval, params.data.path, params.classifier.path,
                              str(Path(params.model.root) / model))}
    pd = PairedData(str(root), str(ROOT / reference_file(params, model)), params.report.num_bootstrap,
                    params.eval.seed, dom)
    data["comparisons"] = [pd.compare(model, name, base) for name, base in bases.items()
                           if name != base and pd.metrics(model, name) and pd.metrics(model, base)]
    return _save_study(out, data)


def stress() -> Path:
    """The ``STRESS`` points, each paired with tfmq at the same bits (tfmq without FSC with tfmq-W4A6)."""
    bases = {name: ("tfmq-W4A6" if name == "tfmq-nofsc-W4A6" else f"tfmq-{bits}") for name, _, bits, _ in STRESS}
    return _paired_study("stress", STRESS, bases)


def eqseeds(seeds: tuple[int, ...] | None = None) -> Path:
    """The equal-footing comparison (TFMQ's layer policy, no attention matmuls, no shortcut split for every method)
    at more calibration / reconstruction seeds: each ``<method>-eq-W4A8-s<seed>`` paired with ``tfmq-W4A8-s<seed>``
    (the same seed). Seed 0 is the default run's (its named studies and tfmq-W4A8)."""
    seeds = seeds or SEEDS
    points, bases = [], {}
    for s in (0, *seeds):
        for m in EQ_METHODS:
            bases[f"{m}-eq-W4A8-s{s}"] = f"tfmq-W4A8-s{s}"
    for s in seeds:
        points.append((f"tfmq-W4A8-s{s}", "tfmq", "W4A8", {"seed": s}))
        points += [(f"{m}-eq-W4A8-s{s}", m, "W4A8", {**EQ_FOOTING, "seed": s}) for m in EQ_METHODS]
    grid = {"tfmq-W4A8-s0": "tfmq-W4A8", **{f"{m}-eq-W4A8-s0": f"{m}-eq-W4A8" for m in EQ_METHODS}}
    return _paired_study("eqseeds", points, bases, grid)


def replicate(seeds: tuple[int, ...] | None = None) -> Path:
    """Every ``REPLICATE`` setting at more calibration / reconstruction seeds (``<name>-s<seed>``), each paired with
    its claim's base at the same seed; seed 0 is the default run's rows. The claims read the result
    (``tasks.claims``: a verdict must hold at every seed)."""
    seeds = seeds or SEEDS
    points, bases = [], {}
    for s in (0, *seeds):
        bases.update({f"{n}-s{s}": f"{b}-s{s}" for n, _, _, b in REPLICATE if b is not None})
    for s in seeds:
        points += [(f"{n}-s{s}", m, "W4A8", {**extra, "seed": s}) for n, m, extra, _ in REPLICATE]
    return _paired_study("replicate", points, bases, {f"{n}-s0": n for n, *_ in REPLICATE})


def mechanisms(seeds: tuple[int, ...] | None = None) -> Path:
    """TFMQ, Freeze and joint BRECQ (W4A8) at ``MECHANISM_ITERS`` reconstruction iterations (TIAR twice that) at
    ``seeds`` (default 0 1 2): the budget at which the paper's mechanisms (TIAR against overfitting, joint
    optimisation of temporal layers) can act. Each paired with Freeze at the same seed; every row records the
    fraction of weights AdaRound moved off nearest."""
    seeds = seeds or (0, *SEEDS)
    it = MECHANISM_ITERS
    points = [(f"{m}-W4A8-i{it}-s{s}", m, "W4A8", {"recon.iters": it, "tiar_recon.iters": 2 * it, "seed": s})
              for s in seeds for m in MECHANISM_METHODS]
    bases = {f"{m}-W4A8-i{it}-s{s}": f"freeze-W4A8-i{it}-s{s}" for s in seeds for m in MECHANISM_METHODS if m != "freeze"}
    return _paired_study("mechanisms", points, bases, fractions=True)


def eqseeds_table() -> str:
    """Markdown of ``results/studies/eqseeds.json``: per method, the paired FID / PSNR difference against tfmq at
    each seed, then their mean and spread over the seeds."""
    import statistics

    data = json.loads((ROOT / "results" / "studies" / "eqseeds.json").read_text())
    comps = {c["a"]: c for c in data.get("comparisons", [])}
    rows = {r["setting"]: r for r in data["rows"]}
    seeds = sorted({int(n.rsplit("-s", 1)[1]) for n in rows})
    out = ["| setting | seed | FID [95 % CI] | ΔFID vs tfmq, same seed [95 % CI] | ΔPSNR (dB) [95 % CI] | verdict (FID) |",
           "|---|---|---|---|---|---|"]
    summary = ["| method | seeds | ΔFID mean ± std | ΔPSNR (dB) mean ± std | seeds whose FID interval excludes 0 |",
               "|---|---|---|---|---|"]
    for m in ("tfmq", *EQ_METHODS):
        dfid, dpsnr, firm = [], [], 0
        for s in seeds:
            name = f"tfmq-W4A8-s{s}" if m == "tfmq" else f"{m}-eq-W4A8-s{s}"
            r, c = rows.get(name), comps.get(name)
            if r is None:
                continue
            d = q = v = "-"
            if c is not None:
                d = f"{c['fid']['diff']:+.1f} [{c['fid']['ci'][0]:+.1f}, {c['fid']['ci'][1]:+.1f}]"
                q = f"{c['psnr']['diff']:+.2f} [{c['psnr']['ci'][0]:+.2f}, {c['psnr']['ci'][1]:+.2f}]"
                v = c["fid"]["verdict"]
                dfid.append(c["fid"]["diff"])
                dpsnr.append(c["psnr"]["diff"])
                firm += c["fid"]["ci"][0] > 0 or c["fid"]["ci"][1] < 0
            out.append(f"| {name} | {s} | {r['fid']:.1f} [{r['fid_ci_low']:.1f}, {r['fid_ci_high']:.1f}] | {d} | {q} | {v} |")
        if len(dfid) > 1:
            summary.append(f"| {m} | {len(dfid)} | {statistics.mean(dfid):+.2f} ± {statistics.stdev(dfid):.2f} | "
                           f"{statistics.mean(dpsnr):+.2f} ± {statistics.stdev(dpsnr):.2f} | {firm} of {len(dfid)} |")
    return "\n".join(out + [""] + summary)


def comparisons_table(study: str) -> str:
    """Markdown of a paired study's comparisons (``replicate``, ``mechanisms``): per comparison the domain FD, proxy
    FID, label agreement and PSNR differences with their 95 % intervals (uncorrected), and for mechanisms the
    fraction of weights AdaRound moved off nearest on the row's side."""
    data = json.loads((ROOT / "results" / "studies" / f"{study}.json").read_text())
    rows = {r["setting"]: r for r in data["rows"]}

    def cell(c: dict, key: str, digits: int, scale: float = 1.0) -> str:
        if key not in c:
            return "n/a"
        v = c[key]
        return (f"{v['diff'] * scale:+.{digits}f} [{v['ci'][0] * scale:+.{digits}f}, {v['ci'][1] * scale:+.{digits}f}]"
                + (f" (p {v['p']:.2g})" if "p" in v else ""))

    out = ["| A | B | Δdomain FD [95 % CI] | ΔFID (proxy) | Δlabel agreement (McNemar) | ΔPSNR (dB) | "
           "% weights off nearest (A, B) |", "|---|---|---|---|---|---|---|"]
    for c in sorted((c for c in data.get("comparisons") or [] if c), key=lambda c: (c["a"].rsplit("-s", 1)[-1], c["a"])):
        off = [rows.get(n, {}).get("off_nearest_fraction") for n in (c["a"], c["b"])]
        offs = ", ".join("-" if o is None else f"{100 * o:.2f}" for o in off)
        out.append(f"| {c['a']} | {c['b']} | {cell(c, 'domain_fd', 2)} | {cell(c, 'fid', 1)} | "
                   f"{cell(c, 'label_agreement', 3)} | {cell(c, 'psnr', 2)} | {offs} |")
    return "\n".join(out)


def _save_study(out: Path, data: dict) -> Path:
    from tfmq.io import atomic_write_json

    atomic_write_json(data, out)
    return out


def stress_table() -> str:
    """Markdown of ``results/studies/stress.json``: each point, and its paired difference against tfmq at its bits."""
    data = json.loads((ROOT / "results" / "studies" / "stress.json").read_text())
    comps = {c["a"]: c for c in data.get("comparisons", [])}
    order = {name: i for i, (name, *_) in enumerate(sorted(STRESS, key=lambda t: (t[2], t[0])))}
    out = ["| setting | FID [95 % CI] | PSNR vs FP (dB) | ΔFID vs tfmq, same bits [95 % CI] | ΔPSNR (dB) [95 % CI] | "
           "verdict (FID) |", "|---|---|---|---|---|---|"]
    for r in sorted(data["rows"], key=lambda r: order.get(r["setting"], 99)):
        c = comps.get(r["setting"])
        d = "-" if c is None else f"{c['fid']['diff']:+.1f} [{c['fid']['ci'][0]:+.1f}, {c['fid']['ci'][1]:+.1f}]"
        q = "-" if c is None else f"{c['psnr']['diff']:+.2f} [{c['psnr']['ci'][0]:+.2f}, {c['psnr']['ci'][1]:+.2f}]"
        out.append(f"| {r['setting']} | {r['fid']:.1f} [{r['fid_ci_low']:.1f}, {r['fid_ci_high']:.1f}] | "
                   f"{r['psnr_vs_fp']:.2f} | {d} | {q} | {'-' if c is None else c['fid']['verdict']} |")
    return "\n".join(out)


def plot() -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _unique(json.loads((ROOT / "results" / "studies" / "iterations.json").read_text())["rows"])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for method in METHODS:
        r = sorted((x for x in rows if x["method"] == method), key=lambda x: x["iters"])
        it = [x["iters"] for x in r]
        axes[0].errorbar(it, [x["fid"] for x in r], yerr=[[x["fid"] - x["fid_ci_low"] for x in r],
                                                          [x["fid_ci_high"] - x["fid"] for x in r]],
                         marker="o", capsize=3, label=method)
        axes[1].plot(it, [x["psnr_vs_fp"] for x in r], marker="o", label=method)
        axes[2].plot(it, [100 * (x["off_nearest_fraction"] or 0) for x in r], marker="o", label=method)
    for ax, title in zip(axes, ("FID (95 % CI), W4A8", "PSNR vs FP samples (dB)", "% weights AdaRound moved off nearest")):
        ax.set_xscale("log")
        ax.set_xlabel("reconstruction iterations (BRECQ; TIAR 2x)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    out = ROOT / "results" / "studies" / "iterations.png"
    fig.savefig(out, dpi=110)
    return out


def table(study: str) -> str:
    """Markdown of ``results/studies/<study>.json``: one row per point; for seeds also mean +- std per method."""
    import statistics

    rows = _unique(json.loads((ROOT / "results" / "studies" / f"{study}.json").read_text())["rows"])
    rows = sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["iters"], r["seed"]))
    out = ["| method | iters | seed | FID [95 % CI] | PSNR vs FP (dB) | SSIM vs FP | % weights off nearest | quant s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        off = "n/a" if r["off_nearest_fraction"] is None else f"{100 * r['off_nearest_fraction']:.2f}"
        out.append(f"| {r['method']} | {r['iters']} | {r['seed']} | {r['fid']:.2f} [{r['fid_ci_low']:.1f}, "
                   f"{r['fid_ci_high']:.1f}] | {r['psnr_vs_fp']:.2f} | {r['ssim_vs_fp']:.3f} | {off} | "
                   f"{r['quant_time_total_s']:.0f} |")
    if study == "seeds":
        out += ["", "| method | seeds | FID mean ± std | PSNR vs FP mean ± std |", "|---|---|---|---|"]
        for m in METHODS:
            f = [r["fid"] for r in rows if r["method"] == m]
            q = [r["psnr_vs_fp"] for r in rows if r["method"] == m]
            if len(f) > 1:
                out.append(f"| {m} | {len(f)} | {statistics.mean(f):.2f} ± {statistics.stdev(f):.2f} | "
                           f"{statistics.mean(q):.2f} ± {statistics.stdev(q):.2f} |")
    return "\n".join(out)


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else ""
    if what not in ("iterations", "seeds", "stress", "eqseeds", "replicate", "mechanisms", "plot", "table"):
        print("usage: python scripts/studies.py iterations|seeds|eqseeds|replicate|mechanisms [values...] | stress | plot | "
              "table iterations|seeds|stress|eqseeds|replicate|mechanisms",
              file=sys.stderr)
        sys.exit(2)
    if what == "stress":
        print(stress())
    elif what in ("eqseeds", "replicate", "mechanisms"):
        fn = {"eqseeds": eqseeds, "replicate": replicate, "mechanisms": mechanisms}[what]
        print(fn(tuple(int(v) for v in sys.argv[2:]) or None))
    elif what == "table":
        which = sys.argv[2] if len(sys.argv) > 2 else "seeds"
        print(stress_table() if which == "stress" else eqseeds_table() if which == "eqseeds" else
              comparisons_table(which) if which in ("replicate", "mechanisms") else table(which))
    else:
        print(plot() if what == "plot" else run(what, tuple(int(v) for v in sys.argv[2:]) or None))
