"""One prepared GPU check (CUDA), library only (no Prefect / DVC / MLflow on the GPU machine).

Part A (text-guided, issue 11): the ``fashion_sd`` StableDiffusionPipeline folder, tfmq W4A8 with the
``quant`` section of params.yaml exactly as the default grid runs it: calibration capture with the
calibration prompts against "" (CFG), quantization time and peak GPU memory, then samples of the
evaluation prompts: prompt accuracy (domain classifier), FID against the reference, PSNR vs FP.

Part B (equal footing, issue 10): ``fashion_ldm`` W4A8, every method on TFMQ's layer policy (the
``*-eq-W4A8`` studies of params.yaml) at a larger reconstruction budget than the CPU default, and
``--samples`` samples per setting from the same noise: FID with its bootstrap interval, PSNR vs FP,
and the paired FID difference of each method against TFMQ on the same resampled indices.

Usage (the numbers are fake-quant simulation on CUDA: timings are calibration costs, not speed-ups):
    python benchmarks/gpu_check.py --out OUT --real REAL.safetensors [--samples 2000] [--iters auto]
REAL: uint8 ``images`` [N, 1, 28, 28] of the reference split (``reference`` section of params.yaml).
Every part writes ``OUT/gpu_check.json`` as soon as it finishes, so a run cut short keeps what it did.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import tfmq  # noqa: E402
from tfmq.diffusion.calibration import capture_calibration_data  # noqa: E402
from tfmq.diffusion.data import FASHION_MNIST_CLASSES, to_uint8  # noqa: E402
from tfmq.diffusion.pipelines import load_diffusion_model  # noqa: E402
from tfmq.diffusion.sampling import make_scheduler, sample  # noqa: E402
from tfmq.diffusion.text import class_of_prompt, read_prompts  # noqa: E402
from tfmq.evaluation.classifier import load_classifier, predict_logits  # noqa: E402
from tfmq.evaluation.metrics import compute_metrics, compute_reference_stats  # noqa: E402
from tfmq.evaluation.paired import mean_interval, paired_fid_difference, per_sample_vs_reference, verdict  # noqa: E402

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
EQUAL = ["tfmq-W4A8", "qdiffusion-eq-W4A8", "ptq4dm-eq-W4A8", "naive-eq-W4A8", "ptqd-eq-W4A8"]
METRICS = ("fid", "kid")
PAIRED_ROUNDS = 200


def merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_of(method: str, overrides: dict, iters: int | None = None) -> tfmq.QuantConfig:
    q = merged(PARAMS["quant"], overrides)
    q.update(method=method, weight_bits=4, act_bits=8)
    if iters is not None:  # a larger reconstruction budget: BRECQ/AdaRound and TIAR at `iters`, activations at iters / 4
        q = merged(q, {"recon": {"iters": iters}, "tiar_recon": {"iters": iters},
                       "act_recon": {"iters": max(50, iters // 4)}})
    return tfmq.QuantConfig.from_dict(q)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def text_states(model, prompts_file: str, n: int) -> dict:
    prompts = read_prompts(REPO / prompts_file)
    mine = [prompts[j % len(prompts)] for j in range(n)]
    used = sorted(set(mine))
    states = model.encode_prompts(used + [""])
    where = {p: i for i, p in enumerate(used)}
    return {"encoder_hidden_states": states[torch.tensor([where[p] for p in mine])],
            "negative_encoder_hidden_states": states[-1:], "prompts": mine}


def draw(unet, model, n: int, dev: str, text: dict | None = None) -> torch.Tensor:
    s = PARAMS["sampler"]
    sched = make_scheduler(s["name"], model.scheduler.config)
    kw = {}
    if text is not None:
        kw = {k: text[k].to(dev) for k in ("encoder_hidden_states", "negative_encoder_hidden_states")}
        kw["guidance_scale"] = s["guidance_scale"]
    x = sample(unet, sched, n, s["num_inference_steps"], batch_size=min(n, 500), seed=PARAMS["eval"]["seed"],
               eta=s["eta"], device=dev, progress=False, **kw)
    return to_uint8(model.to_images(x, batch_size=500))


def score(images: torch.Tensor, ref, dev: str) -> tuple[dict, np.ndarray]:
    """FID (+ bootstrap interval) and KID against ``ref``, and the FID-layer features [N, D] (float64)."""
    m = compute_metrics(images, ref, metrics=METRICS, num_bootstrap=200, device=dev, progress=False,
                        return_features=True)
    feats = m.pop("features").double().numpy()
    ext = m["extractor"]
    v = m["values"]
    return {"fid": v[f"fid/{ext}"], "fid_ci": [v.get(f"fid_ci95_low/{ext}"), v.get(f"fid_ci95_high/{ext}")],
            **({"kid_x1e3": 1e3 * v[f"kid_mean/{ext}"]} if "kid" in METRICS else {})}, feats


def quantize_timed(unet, calib, cfg, dev: str) -> tuple[torch.nn.Module, float, float]:
    torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
    sync()
    t0 = time.perf_counter()
    tfmq.quantize(unet, calib, cfg, device=dev, progress=False)
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    return unet, time.perf_counter() - t0, peak


def part_a(out: dict, ref, dev: str, tmp: Path, n_eval: int) -> None:
    model = load_diffusion_model(REPO / "models" / "fashion_sd", dev)
    c, s = PARAMS["calib_data"], PARAMS["sampler"]
    ctext = text_states(model, c["prompts"], c["num_samples"])
    sync()
    t0 = time.perf_counter()
    calib = capture_calibration_data(
        model.unet, make_scheduler(s["name"], model.scheduler.config), tmp / "calib_sd", num_samples=c["num_samples"],
        num_inference_steps=s["num_inference_steps"], batch_size=c["batch_size"], seed=c["seed"], eta=s["eta"],
        encoder_hidden_states=ctext["encoder_hidden_states"], negative_encoder_hidden_states=ctext["negative_encoder_hidden_states"],
        guidance_scale=s["guidance_scale"], device=dev, progress=False)
    sync()
    calib_s = time.perf_counter() - t0
    etext = text_states(model, PARAMS["eval"]["prompts"], n_eval)
    named = torch.tensor([class_of_prompt(p, FASHION_MNIST_CLASSES) for p in etext["prompts"]])
    clf = load_classifier(REPO / PARAMS["classifier"]["path"], dev)
    rows = {}
    fp_images = None
    for name in ("fp", "tfmq-W4A8"):
        unet = copy.deepcopy(model.unet)
        q_s = peak = None
        if name != "fp":
            unet, q_s, peak = quantize_timed(unet, calib, config_of("tfmq", {}), dev)
        sync()
        t0 = time.perf_counter()
        images = draw(unet, model, n_eval, dev, etext)
        sync()
        sample_s = time.perf_counter() - t0
        m, _ = score(images, ref, dev)
        acc = float((predict_logits(clf, images, device=dev).argmax(1) == named).float().mean())
        row = {**m, "prompt_accuracy": acc,
               "sample_seconds": round(sample_s, 2), "quant_seconds": None if q_s is None else round(q_s, 2),
               "quant_peak_gpu_mib": None if peak is None else round(peak, 1)}
        if fp_images is None:
            fp_images = images
        else:
            per = per_sample_vs_reference(fp_images, images)
            row["psnr_vs_fp"] = mean_interval(per["psnr"], 1000, 0)
        rows[name] = row
        print(f"[A] fashion_sd {name}: {json.dumps(row)}", flush=True)
    out["part_a"] = {"model": "fashion_sd", "calib_capture_seconds": round(calib_s, 2), "num_eval_samples": n_eval,
                     "rows": rows, "quant_config": "params.yaml quant section, tfmq W4A8 (the default grid's)"}


def part_b(out: dict, ref, dev: str, tmp: Path, n: int, iters: int, deadline: float, write,
           settings: list[str] = EQUAL) -> None:
    model = load_diffusion_model(REPO / "models" / "fashion_ldm", dev)
    c, s = PARAMS["calib_data"], PARAMS["sampler"]
    calib = capture_calibration_data(
        model.unet, make_scheduler(s["name"], model.scheduler.config), tmp / "calib_ldm", num_samples=c["num_samples"],
        num_inference_steps=s["num_inference_steps"], batch_size=c["batch_size"], seed=c["seed"], eta=s["eta"],
        device=dev, progress=False)
    fp = draw(model.unet, model, n, dev)
    m, _ = score(fp, ref, dev)
    rows = {"fp": m}
    feats, studies = {}, PARAMS["studies"]["settings"]
    out["part_b"] = {"model": "fashion_ldm", "num_samples": n, "recon_iters": iters, "tiar_iters": iters,
                     "act_recon_iters": max(50, iters // 4), "rows": rows, "skipped": []}
    last = 0.0
    for name in settings:
        left = deadline - time.perf_counter()
        if left < 1.3 * last + 20:
            out["part_b"]["skipped"].append(name)
            print(f"[B] {name}: skipped ({left:.0f} s left, the last setting took {last:.0f} s)", flush=True)
            continue
        t_set = time.perf_counter()
        st = studies.get(name, {"method": name.split("-")[0], "quant": {}})
        unet = copy.deepcopy(model.unet)
        unet, q_s, peak = quantize_timed(unet, calib, config_of(st["method"], st["quant"], iters), dev)
        images = draw(unet, model, n, dev)
        m, f = score(images, ref, dev)
        feats[name] = f
        per = per_sample_vs_reference(fp, images)
        row = {**m, "quant_seconds": round(q_s, 2), "quant_peak_gpu_mib": round(peak, 1),
               "psnr_vs_fp": mean_interval(per["psnr"], 1000, 0)}
        if name != "tfmq-W4A8" and "tfmq-W4A8" in feats:
            layer = ref.spec.fid_feature
            d = paired_fid_difference(f, feats["tfmq-W4A8"], ref.mu[layer], ref.sigma[layer], PAIRED_ROUNDS, 0,
                                      sigma_ref_sqrt=ref.sigma_sqrt(layer))
            row["dfid_vs_tfmq"] = {**d, "verdict": verdict(d["ci"], "fid", name, "tfmq-W4A8")}
        rows[name] = row
        last = time.perf_counter() - t_set
        print(f"[B] fashion_ldm {name}: {json.dumps(row)} ({last:.0f} s)", flush=True)
        write()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--real", required=True, help="safetensors with uint8 'images' of the reference split")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--eval-samples", type=int, default=1000, help="part A samples (evaluation prompts)")
    ap.add_argument("--iters", default="auto", help="part B reconstruction iterations, or auto (fit --budget-s)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall budget of the whole script")
    ap.add_argument("--parts", default="ab")
    ap.add_argument("--settings", default=",".join(EQUAL), help="part B settings, in order (the first is the paired base)")
    ap.add_argument("--paired-rounds", type=int, default=200, help="bootstrap rounds of the paired FID differences")
    ap.add_argument("--no-kid", action="store_true", help="FID only (KID costs ~10 s per 2 000 samples)")
    ap.add_argument("--smoke", action="store_true", help="a few seconds on CPU: 8 calibration samples, 2 iterations")
    a = ap.parse_args()
    global METRICS, PAIRED_ROUNDS
    METRICS, PAIRED_ROUNDS = (("fid",) if a.no_kid else METRICS), a.paired_rounds
    if a.smoke:
        PARAMS["calib_data"]["num_samples"] = PARAMS["calib_data"]["batch_size"] = 8
        PARAMS["quant"]["calib"]["n_per_step"] = 8
        for k in ("recon", "tiar_recon", "act_recon"):
            PARAMS["quant"][k]["iters"] = 2
    t_start = time.perf_counter()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    outdir = Path(a.out)
    outdir.mkdir(parents=True, exist_ok=True)
    out = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "torch": torch.__version__,
           "note": "simulated (fake) quantization on the accelerator: times are calibration costs, not inference speed"}

    def write() -> None:
        tmp_path = outdir / "gpu_check.json.tmp"
        tmp_path.write_text(json.dumps(out, indent=1, default=float))
        tmp_path.replace(outdir / "gpu_check.json")

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        real = load_file(a.real)["images"]
        ref = compute_reference_stats(real, tmp / "ref.safetensors", extractor=PARAMS["eval"]["extractor"],
                                      split=PARAMS["reference"]["split"], device=dev, progress=False)
        if "a" in a.parts:
            t0 = time.perf_counter()
            part_a(out, ref, dev, tmp, a.eval_samples)
            out["part_a"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
            write()
        if "b" in a.parts:
            deadline = t_start + a.budget_s
            if a.iters == "auto":  # from part A's measured cost of 100 BRECQ + 200 TIAR iterations per unit
                qa = out.get("part_a", {}).get("rows", {}).get("tfmq-W4A8", {}).get("quant_seconds")
                left = deadline - time.perf_counter() - 60  # sampling + scoring of the rows
                iters = 1000 if qa is None else int(max(200, min(5000, left / 4.5 / (qa / 110.0))) // 100 * 100)
            else:
                iters = int(a.iters)
            print(f"[B] reconstruction iterations: {iters}", flush=True)
            part_b(out, ref, dev, tmp, a.samples, iters, deadline, write, a.settings.split(","))
            write()
    out["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    write()
    print(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
