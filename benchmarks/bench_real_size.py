"""Benchmark: the paper's models at their real size through the library, and the cost of the paper's settings.

The published UNet configurations of LDM-4 (LSUN / CelebA-HQ 256, unconditional), LDM-4 ImageNet 256
(class-conditional, classifier-free guidance 3.0) and Stable Diffusion v1.4 (text-guided, guidance 7.5),
each with its first-stage decoder, are built with RANDOM weights (no pretrained weights offline) and
run through the calls the pipeline makes: ``tfmq.capture_calibration_data``, ``tfmq.prepare_model``
(the per-channel weight clipping search), ``tfmq.quantize`` (TFMQ W4A8: TIAR, BRECQ, FSC; simulated
fake-quant), ``tfmq.diffusion.sampling.sample`` + decoding, and the offline feature extractor. Each model
runs in its own process (its peak RSS is its own). Measured: seconds per UNet call, per calibration row,
per reconstruction iteration of every unit kind (the engine's units: TIAR's Temporal Information Block,
resnets, attention / transformer blocks, lone layers such as samplers' convs; timed by wrapping
``optimize_rows`` / ``capture_unit_io`` at run time, the engine is not edited), the largest unit cache,
``prepare_model``, sampling and scoring per image. From those it EXTRAPOLATES the cost of the paper's
settings (20 000 iterations per unit, batch 32 / 8 for SD, the paper's calibration rows) on this machine.

    python benchmarks/bench_real_size.py --quick              # smoke test of all three (channels / 16), ~5 min
    python benchmarks/bench_real_size.py --models ldm4-256,ldm4-cin256          # ~45 min on 2 busy cores
    python benchmarks/bench_real_size.py --models sd-v1.4 --unit-sample --every-k 2 --iters 2   # ~40 min
    python benchmarks/bench_real_size.py --device cuda        # + peak GPU memory (torch.cuda.max_memory_allocated)

On 2 CPU cores most of the time goes to ``prepare_model`` (7-10 min for LDM-4, ~15-20 min for SD v1.4) and to
BRECQ's unit caches (two partial UNet passes per unit per calibration row: ~100 s per row for LDM-4). SD v1.4
with every unit would take ~20 min per row, hence ``--unit-sample`` (BRECQ on the first and the largest unit of
each kind; the rest round to nearest) for it. ``--render`` re-writes the Markdown from the JSON alone.

Rows are kept in the JSON next to ``--out`` (``benchmarks/results/real-size-cpu.json``) by model, so runs of
different models add up; the Markdown is re-rendered from every row.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel, UNet2DModel, VQModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tfmq  # noqa: E402
import tfmq.quant.reconstruction as recon_mod  # noqa: E402
import tfmq.quant.tiar as tiar_mod  # noqa: E402
from bench_memory import SD14_UNET  # noqa: E402
from tfmq.diffusion.autoencoder import decode  # noqa: E402
from tfmq.diffusion.data import to_uint8  # noqa: E402
from tfmq.diffusion.sampling import make_scheduler, sample  # noqa: E402
from tfmq.evaluation.reference_stats import extract_features  # noqa: E402
from tfmq.io import atomic_write_json, atomic_write_text  # noqa: E402
from tfmq.quant.prepare import get_state  # noqa: E402

GIB, MIB = 2**30, 2**20
PAPER_ITERS = 20000
SCORE_FEATURES = ["1280", "spatial", "logits"]  # tfmq/evaluation/extractors.py: FID, sFID-proxy, IS features


@dataclass(frozen=True)
class Paper:
    """The paper's settings a model is extrapolated to (docs/method.md sections 4, 6, 7)."""

    sampler: str
    capture_rows: int  # UNet input rows recorded by the calibration capture (trajectories x calls x {c, uc})
    weight_rows: int  # rows of the weight set (TIAR / BRECQ), each unit's cache holds this many
    fsc_rows: int  # rows FSC runs through the fake-quant model (all steps, all recorded rows)
    batch: int  # BRECQ / TIAR mini-batch
    calls_per_image: int  # UNet calls per sampled image
    why: str


@dataclass(frozen=True)
class ModelSpec:
    name: str
    unet: Callable[[bool], torch.nn.Module]
    autoencoder: Callable[[bool], torch.nn.Module]
    conditioning: str  # none | class | text
    betas: tuple[float, float]
    guidance: float
    paper: Paper
    note: str


def _ch(channels: tuple[int, ...], quick: bool) -> tuple[int, ...]:
    """--quick: channels / 16, rounded up to a multiple of 8 (GroupNorm with 8 groups); --quick also takes one
    layer per block and 16x16 latents, so the whole path runs in a minute or two."""
    return tuple(max(8, math.ceil(c / 16 / 8) * 8) for c in channels) if quick else tuple(channels)


def ldm4_unet(num_class_embeds: int | None) -> Callable[[bool], torch.nn.Module]:
    def build(quick: bool) -> torch.nn.Module:
        return UNet2DModel(
            sample_size=16 if quick else 64, in_channels=3, out_channels=3, layers_per_block=1 if quick else 2,
            block_out_channels=_ch((224, 448, 672, 896), quick), attention_head_dim=8 if quick else 32,
            norm_num_groups=8 if quick else 32, num_class_embeds=num_class_embeds,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    return build


def vq_f4(quick: bool) -> torch.nn.Module:
    """LDM-4's first stage, VQ-f4 (ch 128, ch_mult 1,2,4, 8192 codes of dim 3)."""
    return VQModel(in_channels=3, out_channels=3, latent_channels=3, block_out_channels=_ch((128, 256, 512), quick),
                   down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                   layers_per_block=2, norm_num_groups=8 if quick else 32, num_vq_embeddings=8192, vq_embed_dim=3,
                   sample_size=64 if quick else 256, scaling_factor=1.0)


def sd14_unet(quick: bool) -> torch.nn.Module:
    cfg = dict(SD14_UNET)
    if quick:
        cfg.update(sample_size=16, cross_attention_dim=32, norm_num_groups=8, layers_per_block=1,
                   block_out_channels=_ch(SD14_UNET["block_out_channels"], quick))
    return UNet2DConditionModel(**cfg)


def sd_vae(quick: bool) -> torch.nn.Module:
    """Stable Diffusion's VAE (f8, 4 latent channels)."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=_ch((128, 256, 512, 512), quick),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, norm_num_groups=8 if quick else 32, sample_size=128 if quick else 512,
                         scaling_factor=0.18215)


LDM_PAPER = Paper("DDIM 200 steps", capture_rows=256 * 200, weight_rows=20 * 256, fsc_rows=200 * 256, batch=32,
                  calls_per_image=200,
                  why="LSUN-Bedrooms/Churches, CelebA-HQ: DDIM 200 steps, every 10th step x 256 rows = 5 120 weight rows "
                      "(docs/method.md section 7); the capture records all 200 steps of 256 trajectories (51 200 rows), "
                      "which FSC runs through in full (section 5)")
CIN_PAPER = Paper("DDIM 20 steps, cfg 3.0", capture_rows=20 * 512, weight_rows=20 * 256, fsc_rows=20 * 512, batch=32,
                  calls_per_image=20,
                  why="ImageNet LDM-4: DDIM 20 steps, cfg 3.0, 32 classes x 8 x {c, uc} = 256 trajectories, 512 rows per "
                      "step (docs/method.md section 7); assumed: weight set = every one of the 20 steps x 256 rows = 5 120 "
                      "(the docs state no k for it); capture and FSC: 20 x 512 = 10 240 rows")
SD_PAPER = Paper("PLMS 50 steps, cfg 7.5", capture_rows=51 * 256, weight_rows=5 * 256, fsc_rows=51 * 256, batch=8,
                 calls_per_image=51,
                 why="SD v1.4: PLMS 50 steps (51 UNet calls, skip_prk_steps), cfg 7.5, 128 captions x {c, \"\"} = 256 rows "
                     "per call (docs/method.md section 7); weight set every 10th step x 256 = 1 280 rows (the assumption "
                     "of benchmarks/results/memory-cpu.md); capture and FSC 51 x 256 = 13 056 rows. The weight-row count "
                     "changes only the unit-cache capture and memory, not the 20 000 iterations")

MODELS = {
    "ldm4-256": ModelSpec("ldm4-256", ldm4_unet(None), vq_f4, "none", (0.0015, 0.0195), 1.0, LDM_PAPER,
                          "LDM-4 LSUN/CelebA-HQ 256 UNet (UNet2DModel, 64x64x3 latents) + VQ-f4 decoder"),
    "ldm4-cin256": ModelSpec("ldm4-cin256", ldm4_unet(1001), vq_f4, "class", (0.0015, 0.0195), 3.0, CIN_PAPER,
                             "LDM-4 cin256 analogue: the same UNet conditioned through diffusers' num_class_embeds=1001 "
                             "(1000 classes + the null class of CFG) instead of the real model's cross-attention on a "
                             "class embedder"),
    "sd-v1.4": ModelSpec("sd-v1.4", sd14_unet, sd_vae, "text", (0.00085, 0.012), 7.5, SD_PAPER,
                         "SD v1.4 UNet2DConditionModel (64x64x4 latents, cross-attention 768) + SD VAE decoder; random "
                         "encoder_hidden_states [B, 77, 768] stand in for CLIP text states (no text encoder needed: "
                         "only the UNet is quantized)"),
}


# ------------------------------------------------------------------------------------------------ one model
class Meter:
    """Wall time of phases (synchronised on CUDA) and the memory after each."""

    def __init__(self, device: torch.device):
        self.device, self.proc = device, psutil.Process()
        self.seconds: dict[str, float] = {}
        self.rss_after: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.seconds[name] = time.perf_counter() - t0
        self.rss_after[name] = self.proc.memory_info().rss / GIB
        print(f"[{name}] {self.seconds[name]:.1f} s, RSS {self.rss_after[name]:.2f} GiB", file=sys.stderr, flush=True)


class EngineTimer:
    """Per-unit seconds of every reconstruction iteration and of every unit-cache capture, by wrapping the
    engine's ``optimize_rows`` and ``capture_unit_io`` module attributes (restored on exit)."""

    def __init__(self, meter: Meter, unit_sample: bool = False):
        self.meter, self.unit_sample = meter, unit_sample
        self.unit_counts: dict[str, int] = {}  # unit kind -> how many units of it the model has
        self.optim: dict[str, dict[str, Any]] = {}
        self.capture: dict[int, dict[str, float]] = {}  # id(unit module) -> seconds, rows

    def _optimize_rows(self, orig):
        def wrapped(step_fn, n_rows, params, iters, batch_size, lr, reg_fn, desc, progress, *a, **kw):
            stamps: list[float] = []

            def timed_step(idx):
                self.meter.sync()
                stamps.append(time.perf_counter())
                return step_fn(idx)

            out = orig(timed_step, n_rows, params, iters, batch_size, lr, reg_fn, desc, progress, *a, **kw)
            self.meter.sync()
            stamps.append(time.perf_counter())
            per_iter = [b - a_ for a_, b in zip(stamps, stamps[1:])]
            if per_iter:
                steady = per_iter[1:] or per_iter  # the first iteration allocates Adam's state
                self.optim[desc] = {"iters": len(per_iter), "batch": min(batch_size, n_rows),
                                    "s_per_iter": sum(steady) / len(steady), "first_iter_s": per_iter[0],
                                    "params": sum(p.numel() for p in params)}
            return out
        return wrapped

    def _capture(self, orig):
        def wrapped(unet, unit, data, *a, **kw):
            self.meter.sync()
            t0 = time.perf_counter()
            out = orig(unet, unit, data, *a, **kw)
            self.meter.sync()
            c = self.capture.setdefault(id(unit), {"seconds": 0.0, "rows": recon_mod.num_rows(data)})
            c["seconds"] += time.perf_counter() - t0
            return out
        return wrapped

    def _discover(self, orig):
        """--unit-sample: BRECQ on the first and the largest unit of every kind only (the rest round to nearest)."""
        def wrapped(unet, *a, **kw):
            units = orig(unet, *a, **kw)
            picked: dict[str, list] = {}
            for u in units:
                kind = unit_kind(u.name, u.module)
                self.unit_counts[kind] = self.unit_counts.get(kind, 0) + 1
                picked.setdefault(kind, []).append(u)
            if not self.unit_sample:
                return units
            size = lambda u: sum(l.weight.numel() for l in u.layers() if hasattr(l, "weight"))
            keep = {id(us[0]) for us in picked.values()} | {id(max(us, key=size)) for us in picked.values()}
            return [u for u in units if id(u) in keep]
        return wrapped

    @contextlib.contextmanager
    def installed(self):
        saved = (recon_mod.optimize_rows, tiar_mod.optimize_rows, recon_mod.capture_unit_io, recon_mod.discover_units)
        recon_mod.optimize_rows = self._optimize_rows(saved[0])
        tiar_mod.optimize_rows = self._optimize_rows(saved[1])
        recon_mod.capture_unit_io = self._capture(saved[2])
        recon_mod.discover_units = self._discover(saved[3])
        try:
            yield self
        finally:
            (recon_mod.optimize_rows, tiar_mod.optimize_rows, recon_mod.capture_unit_io,
             recon_mod.discover_units) = saved


def unit_kind(name: str, module: torch.nn.Module | None) -> str:
    """The engine's unit, in the words of the table (TIAR's TIB, resnet, attention, transformer, lone layers)."""
    if name == "TIAR":
        return "TIAR (temporal information block)"
    kind = type(module).__name__ if module is not None else "?"
    if kind == "ResnetBlock2D":
        return "resnet block"
    if kind == "Attention":
        return "attention block"
    if kind == "BasicTransformerBlock":
        return "transformer block"
    for part, label in (("downsamplers", "downsampler conv"), ("upsamplers", "upsampler conv"), ("proj_in", "proj_in/proj_out"),
                        ("proj_out", "proj_in/proj_out"), ("conv_in", "conv_in/conv_out"), ("conv_out", "conv_in/conv_out")):
        if part in name:
            return label
    return f"layer ({kind})"


def _conditioning(spec: ModelSpec, unet, n: int) -> dict[str, Any]:
    """The keywords ``capture_calibration_data`` and ``sample`` get (as tasks/calibration.py passes them)."""
    kw: dict[str, Any] = {"guidance_scale": spec.guidance}
    if spec.conditioning == "class":
        kw.update(class_labels=torch.arange(n, dtype=torch.int64) % 1000, null_class_label=1000)
    elif spec.conditioning == "text":
        gen = torch.Generator().manual_seed(0)
        dim = unet.config.cross_attention_dim
        kw.update(encoder_hidden_states=torch.randn(n, 77, dim, generator=gen),
                  negative_encoder_hidden_states=torch.randn(1, 77, dim, generator=gen))
    return kw


def _unet_inputs(unet, spec: ModelSpec, rows: int, device) -> dict[str, torch.Tensor]:
    c = unet.config
    kw = {"sample": torch.randn(rows, c.in_channels, c.sample_size, c.sample_size, device=device),
          "timestep": torch.full((rows,), 500, dtype=torch.int64, device=device)}
    if spec.conditioning == "class":
        kw["class_labels"] = torch.zeros(rows, dtype=torch.int64, device=device)
    if spec.conditioning == "text":
        kw["encoder_hidden_states"] = torch.randn(rows, 77, c.cross_attention_dim, device=device)
    return kw


def measure(spec: ModelSpec, args) -> dict[str, Any]:
    """Everything measured for one model (run in a child process of its own)."""
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    load_start, wall0 = os.getloadavg()[0], time.perf_counter()
    meter = Meter(dev)
    torch.manual_seed(0)
    with meter.phase("build"):
        unet = spec.unet(args.quick).eval().requires_grad_(False).to(dev)
        vae = spec.autoencoder(args.quick).eval().requires_grad_(False).to(dev)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"{spec.name}: UNet {n_params / 1e6:.2f} M parameters, autoencoder "
          f"{sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M", file=sys.stderr, flush=True)

    with torch.no_grad():
        unet(**_unet_inputs(unet, spec, 1, dev))  # warm-up (allocator, kernels)
        for b in (1, 2):
            with meter.phase(f"unet_call_b{b}"):
                unet(**_unet_inputs(unet, spec, b, dev))

    betas = spec.betas
    train = DDPMScheduler(num_train_timesteps=1000, beta_start=betas[0], beta_end=betas[1], beta_schedule="scaled_linear",
                          clip_sample=False, steps_offset=1 if spec.conditioning == "text" else 0)
    scheduler = make_scheduler("ddim", train.config)
    cond = _conditioning(spec, unet, args.samples)
    work = Path(tempfile.mkdtemp(prefix=f"tfmq-real-size-{spec.name}-"))
    try:
        with meter.phase("capture"):
            calib = tfmq.capture_calibration_data(unet, scheduler, work / "calib", num_samples=args.samples,
                                                  num_inference_steps=args.steps, batch_size=args.samples, seed=0,
                                                  device=dev, progress=args.progress, **cond)
        capture_rows = calib.num_steps * calib.rows_per_step
        it = {"iters": args.iters, "batch_size": args.batch}
        config = tfmq.QuantConfig(method="tfmq", weight_bits=4, act_bits=8, recon=it, tiar_recon=it, act_recon=it,
                                  calib={"every_k": args.every_k, "n_per_step": None, "fsc_n_per_step": None, "fsc_batch_size": 16})
        with meter.phase("prepare_model"):
            tfmq.prepare_model(unet, config, progress=args.progress)
        timer = EngineTimer(meter, unit_sample=args.unit_sample)
        with meter.phase("quantize"), timer.installed():
            qunet = tfmq.quantize(unet, calib, config, device=dev, progress=args.progress)
        stats = get_state(qunet).stats
        modules = dict(qunet.named_modules())
        names_by_id = {id(m): n for n, m in modules.items()}
        blocks = stats["blocks"]
        weight_rows = int(blocks["rows"])
        units = []
        for desc, o in timer.optim.items():
            name = "TIAR" if desc == "TIAR" else desc
            module = modules.get(name)
            cap = timer.capture.get(id(module), {"seconds": 0.0}) if module is not None else {"seconds": 0.0}
            cache_mb = blocks["units"].get(name, {}).get("cache_mb", 0.0)
            units.append({"unit": name, "kind": unit_kind(name, module), **o, "capture_s": cap["seconds"],
                          "cache_mib_per_row": cache_mb / weight_rows if weight_rows else 0.0})
        unmatched = [k for k in timer.capture if k not in names_by_id]
        if unmatched:
            print(f"warning: {len(unmatched)} captured units not found by name", file=sys.stderr)
        fsc_rows = capture_rows  # fsc_n_per_step=None: every recorded row of every step

        with meter.phase("sampling"):
            latents = sample(qunet, scheduler, num_samples=args.samples, num_inference_steps=args.steps,
                             batch_size=args.samples, seed=0, device=dev, progress=args.progress, **cond)
        with meter.phase("decode"):
            images = to_uint8(decode(vae, latents, batch_size=args.samples))
        extract_features(images, "efficientnet-lite0", SCORE_FEATURES, device=dev, progress=False)  # loads the extractor
        with meter.phase("scoring"):
            extract_features(images, "efficientnet-lite0", SCORE_FEATURES, device=dev, progress=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    s = meter.seconds
    out = {
        "model": spec.name, "quick": args.quick, "device": str(dev), "threads": args.threads, "note": spec.note,
        "unet_params": n_params, "autoencoder_params": sum(p.numel() for p in vae.parameters()),
        "image_shape": list(images.shape[1:]), "latent_shape": list(latents.shape[1:]),
        "steps": args.steps, "samples": args.samples, "iters": args.iters, "batch": args.batch, "every_k": args.every_k,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        # CPU seconds / wall seconds of this process, and the 1-min load average: other work on the machine
        # (load above --threads) slows every figure down
        "cpu_per_wall": _cpu_seconds() / (time.perf_counter() - wall0), "loadavg_1min": [load_start, os.getloadavg()[0]],
        "rss_after_gib": meter.rss_after, "seconds": s,
        "s_per_unet_call": {"1": s["unet_call_b1"], "2": s["unet_call_b2"]},
        "capture_rows": capture_rows, "s_per_capture_row": s["capture"] / capture_rows,
        "weight_rows": weight_rows, "fsc_rows": fsc_rows,
        "stage_seconds": {k: stats[k].get("seconds") for k in ("temporal", "blocks", "activations")},
        "units": units, "unit_sample": args.unit_sample,
        "unit_counts": {"TIAR (temporal information block)": 1, **timer.unit_counts},
        "sampling_s_per_image": s["sampling"] / args.samples, "decode_s_per_image": s["decode"] / args.samples,
        "scoring_s_per_image": s["scoring"] / args.samples,
        "paper": spec.paper.__dict__,
    }
    if dev.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / GIB
    return out


def _cpu_seconds() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


# ------------------------------------------------------------------------------------------------ extrapolation
def extrapolate(r: dict[str, Any]) -> dict[str, Any]:
    """Seconds of the paper's settings on the measured machine (an EXTRAPOLATION, see the module doc).

    An iteration costs ``a + c x batch`` (``a``: AdaRound's work on the weights, batch-independent; ``c``: the
    convolutions / attention on the rows), so its cost at the paper's batch B lies between the measured one
    (``lo``: all of it ``a``) and the measured one x B / b (``hi``: all of it ``c``, linear scaling).
    """
    p = r["paper"]
    scale = lambda u: max(1.0, p["batch"] / u["batch"])
    kinds: dict[str, list[dict]] = {}
    for u in r["units"]:
        kinds.setdefault(u["kind"], []).append(u)
    # with --unit-sample, a kind's units cost the mean of its sampled ones each
    count = lambda k: r["unit_counts"].get(k, len(kinds[k])) if r.get("unit_sample") else len(kinds[k])
    mean = lambda us, f: sum(f(u) for u in us) / len(us)
    by_kind = {k: mean(us, lambda u: u["s_per_iter"] * scale(u)) * count(k) * PAPER_ITERS for k, us in kinds.items()}
    recon_hi = sum(by_kind.values())
    recon_lo = sum(mean(us, lambda u: u["s_per_iter"]) * count(k) for k, us in kinds.items()) * PAPER_ITERS
    capture = p["capture_rows"] * r["s_per_capture_row"]
    # the unit caches of a sample of units say nothing of the others' (their cost grows with the depth): not extrapolated
    unit_caches = float("nan") if r.get("unit_sample") else \
        sum(u["capture_s"] for u in r["units"]) / max(r["weight_rows"], 1) * p["weight_rows"]
    fsc = (r["stage_seconds"]["activations"] or 0.0) / max(r["fsc_rows"], 1) * p["fsc_rows"]
    rest = r["seconds"]["prepare_model"] + (0.0 if math.isnan(unit_caches) else unit_caches) + fsc
    per_image = (r["sampling_s_per_image"] / r["steps"]) * p["calls_per_image"] + r["decode_s_per_image"]
    return {"recon_hi_s": recon_hi, "recon_lo_s": recon_lo, "recon_by_kind_hi_s": by_kind, "capture_s": capture,
            "formula_hi_s": recon_hi + capture, "formula_lo_s": recon_lo + capture, "prepare_s": r["seconds"]["prepare_model"],
            "unit_cache_capture_s": unit_caches, "fsc_s": fsc,
            "total_hi_s": recon_hi + capture + rest, "total_lo_s": recon_lo + capture + rest,
            "sample_s_per_image": per_image,
            "largest_cache_gib": max((u["cache_mib_per_row"] for u in r["units"]), default=0.0) * p["weight_rows"] / 1024}


def _dur(s: float) -> str:
    if math.isnan(s):
        return "not measured (--unit-sample)"
    if s >= 2 * 86400:
        return f"{s / 86400:,.1f} days"
    if s >= 2 * 3600:
        return f"{s / 3600:,.1f} h"
    if s >= 120:
        return f"{s / 60:,.1f} min"
    return f"{s:.2f} s"


def render_model(r: dict[str, Any]) -> str:
    p, x = r["paper"], extrapolate(r)
    by_kind: dict[str, list[dict]] = {}
    for u in r["units"]:
        by_kind.setdefault(u["kind"], []).append(u)
    largest = max(r["units"], key=lambda u: u["cache_mib_per_row"], default=None)
    mem = f"{r['peak_rss_gib']:.2f}" + (f" (GPU peak {r['peak_gpu_gib']:.2f})" if "peak_gpu_gib" in r else "")
    lines = [f"\n## {r['model']}{' (--quick: shrunken channels, numbers meaningless)' if r['quick'] else ''}\n",
             f"{r['note']}. Random weights; device `{r['device']}`, {r['threads']} threads; measured at {r['steps']} DDIM "
             f"steps, {r['samples']} samples, {r['weight_rows']} weight rows (calib.every_k={r.get('every_k', 1)}), {r['iters']} "
             f"iteration(s) per unit at batch {r['batch']} (capped by the rows); quantization is TFMQ W4A8, **simulated (fake-quant)**.\n",
             "| measured | value |", "|---|---|",
             f"| UNet parameters | {r['unet_params'] / 1e6:.2f} M (autoencoder {r['autoencoder_params'] / 1e6:.1f} M) |",
             f"| peak RSS of the process (GiB) | {mem} |",
             f"| s per FP UNet call, batch 1 / batch 2 | {r['s_per_unet_call']['1']:.2f} / {r['s_per_unet_call']['2']:.2f} |",
             f"| s per calibration row (capture, {r['capture_rows']} rows) | {r['s_per_capture_row']:.2f} |",
             f"| prepare_model (weight clipping search) s | {r['seconds']['prepare_model']:.1f} |",
             f"| stages s: TIAR / BRECQ / FSC (fake-quant) | {r['stage_seconds']['temporal']:.1f} / "
             f"{r['stage_seconds']['blocks']:.1f} / {r['stage_seconds']['activations']:.1f} |"]
    for kind, us in sorted(by_kind.items(), key=lambda kv: -sum(u["s_per_iter"] for u in kv[1])):
        mean = sum(u["s_per_iter"] for u in us) / len(us)
        top = max(us, key=lambda u: u["s_per_iter"])
        n_all = r.get("unit_counts", {}).get(kind, len(us)) if r.get("unit_sample") else len(us)
        sampled = f"{len(us)} of {n_all} units sampled" if n_all != len(us) else f"{len(us)} unit{'s' if len(us) > 1 else ''}"
        lines.append(f"| s per reconstruction iteration, {kind} ({sampled}, batch "
                     f"{top['batch']}; fake-quant) | mean {mean:.3f}, max {top['s_per_iter']:.3f} (`{top['unit']}`) |")
    if largest is not None:
        lines.append(f"| largest unit cache per calibration row (inputs + FP target) | {largest['cache_mib_per_row']:.2f} MiB "
                     f"(`{largest['unit']}`) |")
    lines += [f"| unit-cache capture (2 partial forwards per unit) s per weight row"
              f"{' (sampled units only)' if r.get('unit_sample') else ''} | "
              f"{sum(u['capture_s'] for u in r['units']) / max(r['weight_rows'], 1):.1f} |",
              f"| sampling s per image ({r['steps']} steps, fake-quant UNet) / decoding to {r['image_shape'][1]}x"
              f"{r['image_shape'][2]} | {r['sampling_s_per_image']:.2f} / {r['decode_s_per_image']:.2f} |",
              f"| scoring s per image (efficientnet-lite0 features {', '.join(SCORE_FEATURES)}) | {r['scoring_s_per_image']:.3f} |",
              f"| wall time of this model's process; its CPU s per wall s; 1-min load average at start / end | "
              f"{_dur(r['wall_s'])}; {r.get('cpu_per_wall', float('nan')):.2f}; "
              f"{' / '.join(f'{v:.1f}' for v in r.get('loadavg_1min', []))} |",
              "",
              f"**Extrapolated** to the paper's settings on this machine ({p['sampler']}; {PAPER_ITERS:,} iterations per "
              f"unit at batch {p['batch']}; {p['capture_rows']:,} capture rows, {p['weight_rows']:,} weight rows, "
              f"{p['fsc_rows']:,} FSC rows). An extrapolation, not a measurement. Column *linear*: seconds per iteration "
              f"scaled linearly from the measured batch (the upper bound); column *batch-independent*: as measured (the lower "
              "bound: part of an iteration, AdaRound's work on the weights, does not grow with the batch):\n",
              "| term | linear in batch | batch-independent |", "|---|---|---|",
              f"| reconstruction: sum over {sum(r['unit_counts'].values()) if r.get('unit_sample') else len(r['units'])} units of s/iter at batch {p['batch']} x {PAPER_ITERS:,} | "
              f"{_dur(x['recon_hi_s'])} | {_dur(x['recon_lo_s'])} |",
              *[f"| &nbsp;&nbsp;of which {k} | {_dur(v)} | |" for k, v in sorted(x["recon_by_kind_hi_s"].items(), key=lambda kv: -kv[1])],
              f"| calibration capture: {p['capture_rows']:,} rows x s per row | {_dur(x['capture_s'])} | = |",
              f"| **the two together (rows x s per row + units x s per iteration x 20 000)** | **{_dur(x['formula_hi_s'])}** | **{_dur(x['formula_lo_s'])}** |",
              f"| + prepare_model (independent of the rows) | {_dur(x['prepare_s'])} | = |",
              f"| + unit-cache capture: {p['weight_rows']:,} weight rows x s per row | {_dur(x['unit_cache_capture_s'])} | = |",
              f"| + FSC: {p['fsc_rows']:,} rows through the fake-quant UNet | {_dur(x['fsc_s'])} | = |",
              f"| **quantization in all** | **{_dur(x['total_hi_s'])}** | **{_dur(x['total_lo_s'])}** |",
              f"| largest unit cache at {p['weight_rows']:,} weight rows (host memory, or spilled with memory_budget_mb) | "
              f"{x['largest_cache_gib']:.1f} GiB | |",
              f"| sampling + decoding one image at {p['calls_per_image']} UNet calls (fake-quant) | {_dur(x['sample_s_per_image'])}; "
              f"1 000 images: {_dur(1000 * x['sample_s_per_image'])} | |",
              "", f"Row counts: {p['why']}."]
    return "\n".join(lines)


def render(doc: dict[str, Any]) -> str:
    out = ["# The paper's models at real size, random weights: measured cost and extrapolation\n",
           "Written by `benchmarks/bench_real_size.py` (its docstring says what and how). Every quantized figure is "
           "**simulated (fake-quant)** quantization: float kernels with quantize-dequantize, no integer speed-up. "
           "Weights are random (no pretrained weights offline), so only costs are meaningful, not image quality. "
           "The paper-setting figures are **extrapolations** from 1-2 measured iterations per unit. "
           "Each model's table gives its process's CPU seconds per wall second and the load average: below 2 "
           "(2 threads) the cores were shared with other jobs and every seconds figure is an upper bound for "
           "a quiet machine.\n"]
    order = [m for m in MODELS if m in doc["models"]] + [m for m in doc["models"] if m not in MODELS]
    for key in order:
        out.append(render_model(doc["models"][key]))
    out.append("\n## Runs\n")
    out.append("| command | started (UTC) | wall time |")
    out.append("|---|---|---|")
    for run in doc.get("runs", []):
        out.append(f"| `{run['command']}` | {run['started']} | {_dur(run['wall_s'])} |")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------ driver
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--iters", type=int, default=1, help="reconstruction iterations per unit (TIAR, BRECQ)")
    ap.add_argument("--steps", type=int, default=2, help="DDIM steps of capture and sampling")
    ap.add_argument("--samples", type=int, default=2, help="trajectories captured / images sampled")
    ap.add_argument("--every-k", type=int, default=1, help="weight set: every k-th captured step (fewer unit-cache rows)")
    ap.add_argument("--batch", type=int, default=4, help="reconstruction mini-batch (capped by the calibration rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="channels / 16: a smoke test of the whole path")
    ap.add_argument("--progress", action="store_true", help="progress bars of the library calls (stderr)")
    ap.add_argument("--out", default=None, help="Markdown report (default benchmarks/results/real-size-cpu.md; "
                                                "--quick: a file in the temp dir); rows are kept in the .json beside it")
    ap.add_argument("--unit-sample", action="store_true",
                    help="BRECQ only the first and the largest unit of each kind (others round to nearest); the "
                         "reconstruction term is extrapolated from their mean x the kind's unit count")
    ap.add_argument("--render", action="store_true", help="only re-render the Markdown from the JSON beside --out")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: one model, a JSON line out
    args = ap.parse_args()

    if args.one:
        print("RESULT " + json.dumps(measure(MODELS[args.one], args)), flush=True)
        return

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise SystemExit(f"--models: unknown {', '.join(bad)}; expected some of {', '.join(MODELS)}")
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "real-size-quick.md" if args.quick
                                           else ROOT / "benchmarks" / "results" / "real-size-cpu.md")
    store = out.with_suffix(".json")
    doc = json.loads(store.read_text()) if store.is_file() else {"models": {}, "runs": []}
    if args.render:
        atomic_write_text(render(doc), out)
        print(render(doc))
        return
    started, t0 = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), time.perf_counter()
    for m in models:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", m, *_child_args(args)]
        m0 = time.perf_counter()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # stderr (progress, phase lines) passes through
        lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            raise SystemExit(f"{m}: the measuring process failed (exit {p.returncode}); see its output above")
        row = json.loads(lines[-1][len("RESULT "):])
        row["wall_s"] = time.perf_counter() - m0
        doc["models"][m if not args.quick else f"{m} (quick)"] = row
        print(render_model(row), flush=True)
    wall = time.perf_counter() - t0
    doc["runs"].append({"command": f"python benchmarks/bench_real_size.py --models {','.join(models)} "
                        + " ".join(_child_args(args)), "started": started, "wall_s": wall})
    atomic_write_json(doc, store)
    atomic_write_text(render(doc), out)
    print(f"\ntotal wall time of the benchmark: {_dur(wall)}; wrote {out} and {store}")


def _child_args(args) -> list[str]:
    out = ["--iters", str(args.iters), "--steps", str(args.steps), "--samples", str(args.samples), "--batch", str(args.batch),
           "--every-k", str(args.every_k),
           "--threads", str(args.threads), "--device", args.device]
    return (out + (["--quick"] if args.quick else []) + (["--progress"] if args.progress else [])
            + (["--unit-sample"] if args.unit_sample else []))


if __name__ == "__main__":
    main()
