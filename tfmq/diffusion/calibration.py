"""Calibration data, docs/method.md section 7: the UNet inputs recorded along full FP sampler trajectories.

One pass per seed records ``(x_t, t, conditioning)`` at every sampler step -- O(T) UNet calls, not
the O(T^2) of the released generator -- by hooking the UNet's forward, so what is stored is exactly
what the UNet saw (with classifier-free guidance: the null-conditional AND the conditional rows).
Selection helpers then build the per-method sets: every k-th step (Q-Diffusion / TFMQ weights),
all steps (FSC) and PTQ4DM's normally distributed timesteps (NDTC).
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from tfmq.io import atomic_dir, atomic_save_safetensors, atomic_write_json
from tfmq.diffusion.sampling import make_scheduler, sample

FORMAT = "tfmq-calibration-v1"
UNET_KWARGS = ("sample", "timestep", "class_labels", "encoder_hidden_states")


def _step_file(root: Path, i: int) -> Path:
    return root / f"step_{i:04d}.safetensors"


class CalibrationSet:
    """A captured calibration set on disk: ``meta.json`` + one ``step_XXXX.safetensors`` per sampler step.

    Attributes:
        timesteps: list[int], the scheduler's timesteps in sampler order (first = noisiest).
        num_steps: number of sampler steps (= UNet calls per trajectory).
        num_samples: trajectories recorded.
        rows_per_step: rows per shard: ``num_samples`` (x2 with CFG: rows ``[0, N)`` are the null
            condition, ``[N, 2N)`` the condition; sample j sits at rows j and N + j).
        meta: the whole ``meta.json`` dict.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no calibration set at {self.path} (missing meta.json); run capture_calibration_data first")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} has format {self.meta.get('format')!r}, expected {FORMAT!r}; re-capture the set")
        self.timesteps: list[int] = [int(t) for t in self.meta["timesteps"]]
        self.num_steps: int = len(self.timesteps)
        self.num_samples: int = int(self.meta["num_samples"])
        self.rows_per_step: int = int(self.meta["rows_per_step"])
        self.cfg: bool = bool(self.meta["cfg"])
        missing = [i for i in range(self.num_steps) if not _step_file(self.path, i).is_file()]
        if missing:
            raise FileNotFoundError(f"calibration set {self.path} lacks shards for steps {missing[:5]}...; re-capture it")

    def load_step(self, i: int) -> dict[str, torch.Tensor]:
        """UNet forward kwargs of sampler step ``i``: ``sample`` [R,C,H,W], ``timestep`` int64 [R], conditioning."""
        if not 0 <= i < self.num_steps:
            raise IndexError(f"step {i} out of range; this calibration set has steps 0..{self.num_steps - 1}")
        return load_file(str(_step_file(self.path, i)))

    def __repr__(self) -> str:
        return (f"CalibrationSet({str(self.path)!r}, steps={self.num_steps}, rows_per_step={self.rows_per_step}, "
                f"conditioning={self.meta['conditioning']!r})")


class CalibrationSetError(ValueError):
    """A calibration set that does not fit the run (another sampler, step count, model) or holds NaN/Inf rows."""


def verify_calibration_set(
    calib: CalibrationSet,
    sampler: str | None = None,
    num_inference_steps: int | None = None,
    eta: float | None = None,
    guidance_scale: float | None = None,
    unet_config: dict[str, Any] | None = None,
    scan: bool = True,
) -> None:
    """Raise :class:`CalibrationSetError` (one line: what differs, what was expected) when ``calib`` was
    recorded with another sampler / step count / eta / guidance scale than the run's, for a UNet of
    another input shape or conditioning than ``unet_config`` (a diffusers UNet ``config.json`` dict), or,
    with ``scan``, when any stored row is NaN or Inf (every step file is read once, tensor by tensor).

    Arguments left ``None`` are not checked. ``eta`` is compared for DDIM only and ``guidance_scale``
    only for a guided (CFG) set: an unguided set records the scale it ignored.
    """
    m = calib.meta
    where = f"calibration set {calib.path}"
    if sampler is not None:
        expected = type(make_scheduler(sampler, m["scheduler_config"])).__name__
        if m.get("scheduler_class") != expected:
            raise CalibrationSetError(f"{where} was recorded with {m.get('scheduler_class')}, the run samples with "
                                      f"{sampler!r} ({expected})")
    if num_inference_steps is not None and int(m.get("num_inference_steps", -1)) != int(num_inference_steps):
        raise CalibrationSetError(f"{where} was recorded with {m.get('num_inference_steps')} sampler steps, the run "
                                  f"samples {num_inference_steps}")
    if eta is not None and m.get("scheduler_class") == "DDIMScheduler" and float(m.get("eta", 0.0)) != float(eta):
        raise CalibrationSetError(f"{where} was recorded at DDIM eta {m.get('eta')}, the run samples at eta {eta}")
    if guidance_scale is not None and calib.cfg and float(m.get("guidance_scale", 1.0)) != float(guidance_scale):
        raise CalibrationSetError(f"{where} was recorded at guidance scale {m.get('guidance_scale')}, the run "
                                  f"samples at {guidance_scale}")
    if unet_config is not None:
        want = "text" if unet_config.get("cross_attention_dim") and unet_config.get("_class_name") == "UNet2DConditionModel" \
            else "class" if unet_config.get("num_class_embeds") else "none"
        if m.get("conditioning") != want:
            raise CalibrationSetError(f"{where} holds {m.get('conditioning')!r}-conditioned rows, the model is "
                                      f"{want!r}-conditioned: it was recorded for another model")
        first = calib.load_step(0)["sample"]
        size = unet_config.get("sample_size")
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        shape = (unet_config.get("in_channels"), *size)
        if tuple(first.shape[1:]) != shape:
            raise CalibrationSetError(f"{where} holds rows of shape {tuple(first.shape[1:])}, the model's UNet takes "
                                      f"{shape}: it was recorded for another model")
    if scan:
        for i in range(calib.num_steps):
            for key, v in calib.load_step(i).items():
                if v.is_floating_point():
                    bad = ~torch.isfinite(v.reshape(v.shape[0], -1)).all(dim=1) if v.ndim else ~torch.isfinite(v)
                    if bad.any():
                        rows = bad.nonzero().reshape(-1).tolist()
                        raise CalibrationSetError(f"{where}: step {i} (t={calib.timesteps[i]}) {key!r} has "
                                                  f"{len(rows)} NaN/Inf row(s) (first: row {rows[0]}); expected "
                                                  "finite rows (a damaged file, or an FP model that diverges)")


class _UNetInputRecorder:
    """Forward pre-hook that writes each UNet call's inputs to a per-(step, batch) part file."""

    def __init__(self, unet: torch.nn.Module, parts: Path):
        self.signature = inspect.signature(unet.forward)
        self.parts = parts
        self.batch, self.step, self.calls = -1, -1, 0
        self.recorded: list[tuple[int, int]] = []
        self.timesteps_seen: dict[int, int] = {}

    def on_step(self, step_index: int, t: int, x_t: torch.Tensor) -> None:
        if step_index == 0:
            self.batch += 1
        if self.step >= 0 and self.calls != 1:
            raise RuntimeError(f"sampler step {self.step} of batch {self.batch} made {self.calls} UNet calls, expected 1")
        self.step, self.calls = step_index, 0

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError(f"sampler step {self.step} of batch {self.batch} made a second UNet call; "
                               "calibration capture expects exactly one call per step (CFG in one batch)")
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        x = bound["sample"]
        t = torch.as_tensor(bound["timestep"]).to(torch.int64).reshape(-1).cpu()
        rows = {"sample": x.detach().cpu(), "timestep": t.expand(x.shape[0]).clone() if t.numel() == 1 else t}
        for key in ("class_labels", "encoder_hidden_states"):
            if bound.get(key) is not None:
                rows[key] = bound[key].detach().cpu()
        self.timesteps_seen[self.step] = int(rows["timestep"][0])
        atomic_save_safetensors(rows, self.parts / f"step_{self.step:04d}" / f"batch_{self.batch:05d}.safetensors")
        self.recorded.append((self.batch, self.step))

    def finish(self) -> None:
        if self.step >= 0 and self.calls != 1:
            raise RuntimeError(f"sampler step {self.step} of batch {self.batch} made {self.calls} UNet calls, expected 1")


def _concat_rows(parts: list[dict[str, torch.Tensor]], cfg: bool) -> dict[str, torch.Tensor]:
    """One step's rows of consecutive batches (or shards) in trajectory order; with CFG every part's null rows
    first, then every part's conditional rows."""
    if not cfg:
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    halves = {key: [p[key].chunk(2) for p in parts] for key in parts[0]}
    return {key: torch.cat([h[0] for h in hs] + [h[1] for h in hs]) for key, hs in halves.items()}


def _merge_step(part_dir: Path, out_file: Path, cfg: bool) -> int:
    """Concatenate one step's batch parts; with CFG put all null rows first, then all conditional rows."""
    merged = _concat_rows([load_file(str(p)) for p in sorted(part_dir.glob("batch_*.safetensors"))], cfg)
    atomic_save_safetensors(merged, out_file, metadata={"format": FORMAT})
    shutil.rmtree(part_dir)
    return merged["sample"].shape[0]


def capture_calibration_data(
    unet: torch.nn.Module,
    scheduler: Any,
    out_dir: str | os.PathLike,
    num_samples: int,
    num_inference_steps: int,
    batch_size: int,
    seed: int,
    eta: float = 0.0,
    class_labels: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    negative_encoder_hidden_states: torch.Tensor | None = None,
    null_class_label: int | None = None,
    guidance_scale: float = 1.0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    shard: tuple[int, int] | None = None,
) -> CalibrationSet:
    """Run FP trajectories with ``tfmq.diffusion.sampling.sample`` and store every UNet call's inputs.

    Args:
        unet: the FP UNet; a forward pre-hook records its inputs (removed afterwards).
        scheduler: DDIM / DDPM / PNDM (PLMS) from ``sampling.make_scheduler``.
        out_dir: replaced as a whole: ``meta.json`` + ``step_XXXX.safetensors`` (one per sampler step). Each
            batch is written as a part file at once and parts are merged step by step at the end, so at most
            one step's rows are in memory.
        num_samples, num_inference_steps, batch_size, seed, eta: sampler settings (see ``sampling.sample``).
        class_labels: int64 [num_samples] (class-conditional UNets).
        encoder_hidden_states / negative_encoder_hidden_states: [num_samples or 1, L, D] text conditioning.
        null_class_label: the null class id for CFG with class labels.
        guidance_scale: > 1 records both the null and the conditional rows of each CFG call.
        shard: ``(start, stop)``: record only trajectories ``[start, stop)`` of the run of ``num_samples``
            (the same noise and per-sample generators as the whole run; ``class_labels`` / text rows are
            the whole run's). ``merge_calibration_shards`` joins shards that tile ``[0, num_samples)``
            into the set the whole run records; with boundaries on multiples of ``batch_size`` it is
            bit-identical.

    Returns:
        The :class:`CalibrationSet` at ``out_dir``.

    Example:
        >>> calib = capture_calibration_data(unet, make_scheduler("ddim", sched), "calib", 256, 50, 64, seed=0)
        >>> weight_set = every_kth_step(calib, k=5, n_per_step=64)
    """
    cfg = guidance_scale > 1.0
    conditioning = "text" if encoder_hidden_states is not None else "class" if class_labels is not None else "none"
    total, shard_kw = num_samples, {}
    if shard is not None:
        from .sampling import initial_noise

        start, stop = int(shard[0]), int(shard[1])
        if not 0 <= start < stop <= total:
            raise ValueError(f"shard={shard}: expected 0 <= start < stop <= num_samples={total}")
        c = unet.config
        shard_kw = {"first_index": start, "noise": initial_noise(seed, (total, c.in_channels, c.sample_size, c.sample_size),
                                                                 start, stop)}
        num_samples = stop - start
        if class_labels is not None:
            class_labels = torch.as_tensor(class_labels)[start:stop]
        def rows(v):  # per-sample text rows of the whole run -> this shard's; one shared row stays
            return v[start:stop] if v is not None and v.dim() == 3 and v.shape[0] == total else v

        encoder_hidden_states, negative_encoder_hidden_states = rows(encoder_hidden_states), rows(negative_encoder_hidden_states)
    with atomic_dir(out_dir) as tmp:
        recorder = _UNetInputRecorder(unet, tmp / "parts")
        handle = unet.register_forward_pre_hook(recorder, with_kwargs=True)
        try:
            sample(unet, scheduler, num_samples, num_inference_steps, batch_size, seed, eta=eta,
                   class_labels=class_labels, device=device, progress=progress, callback=recorder.on_step,
                   encoder_hidden_states=encoder_hidden_states,
                   negative_encoder_hidden_states=negative_encoder_hidden_states,
                   null_class_label=null_class_label, guidance_scale=guidance_scale, **shard_kw)
            recorder.finish()
        finally:
            handle.remove()
        timesteps = [int(t) for t in scheduler.timesteps]
        n_batches = -(-num_samples // batch_size)
        if len(recorder.recorded) != n_batches * len(timesteps):
            raise RuntimeError(f"recorded {len(recorder.recorded)} UNet calls, expected {n_batches} batches x "
                               f"{len(timesteps)} steps; is the forward pre-hook bypassed?")
        if [recorder.timesteps_seen[i] for i in range(len(timesteps))] != timesteps:
            raise RuntimeError("timesteps the UNet received differ from scheduler.timesteps; the sampler is inconsistent")
        rows = [_merge_step(tmp / "parts" / f"step_{i:04d}", _step_file(tmp, i), cfg) for i in range(len(timesteps))]
        shutil.rmtree(tmp / "parts", ignore_errors=True)
        sched_config = json.loads(scheduler.to_json_string())
        atomic_write_json({
            "format": FORMAT,
            "timesteps": timesteps,
            "num_steps": len(timesteps),
            "num_samples": num_samples,
            "rows_per_step": rows[0],
            "row_layout": ("null-condition rows [0, N), condition rows [N, 2N); sample j at rows j and N + j"
                           if cfg else "row j = sample j"),
            "cfg": cfg,
            "guidance_scale": guidance_scale,
            "conditioning": conditioning,
            "null_class_label": null_class_label,
            "scheduler_class": type(scheduler).__name__,
            "scheduler_config": sched_config,
            "num_train_timesteps": int(sched_config.get("num_train_timesteps", 1000)),
            "num_inference_steps": num_inference_steps,
            "eta": eta,
            "seed": seed,
            "batch_size": batch_size,
            "unet_class": type(unet).__name__,
            **({"shard": [int(shard[0]), int(shard[1])], "shard_of": total} if shard is not None else {}),
        }, tmp / "meta.json")
    return CalibrationSet(out_dir)


def merge_calibration_shards(shard_dirs: list[str | os.PathLike], out_dir: str | os.PathLike) -> CalibrationSet:
    """Join calibration shards (``capture_calibration_data(shard=...)``) that tile ``[0, N)`` into one set.

    Rows are concatenated in trajectory order per step (with CFG: every shard's null rows, then every
    shard's conditional rows, the layout of an unsharded capture); the meta is the unsharded run's.
    Raises ``ValueError`` (one line) for a gap, an overlap or shards recorded with other settings.
    """
    metas = []
    for d in shard_dirs:
        meta = json.loads((Path(d) / "meta.json").read_text())
        if "shard" not in meta:
            raise ValueError(f"{d}: not a calibration shard (no 'shard' in meta.json); expected capture_calibration_data(shard=...)")
        metas.append((meta["shard"][0], meta["shard"][1], Path(d), meta))
    metas.sort(key=lambda m: m[0])
    if not metas:
        raise ValueError("no calibration shards to merge")
    first = metas[0][3]
    same = {k: v for k, v in first.items() if k not in ("shard", "num_samples", "rows_per_step")}
    end = 0
    for start, stop, d, meta in metas:
        if start != end:
            raise ValueError(f"{d}: shard [{start}, {stop}) {'overlaps' if start < end else 'leaves a gap after'} "
                             f"trajectories [0, {end}); expected one starting at {end}")
        diff = sorted(k for k in same if meta.get(k) != same[k])
        if diff:
            raise ValueError(f"{d}: recorded with other settings than {metas[0][2]} ({', '.join(diff[:4])})")
        end = stop
    if end != first["shard_of"]:
        raise ValueError(f"the shards cover trajectories [0, {end}) of {first['shard_of']}; the rest is missing")
    with atomic_dir(out_dir) as tmp:
        rows = 0
        for i in range(first["num_steps"]):
            merged = _concat_rows([load_file(str(_step_file(d, i))) for _, _, d, _ in metas], first["cfg"])
            atomic_save_safetensors(merged, _step_file(tmp, i), metadata={"format": FORMAT})
            rows = int(merged["sample"].shape[0])
        meta = {k: v for k, v in first.items() if k not in ("shard", "shard_of")}
        atomic_write_json({**meta, "num_samples": first["shard_of"], "rows_per_step": rows}, tmp / "meta.json")
    return CalibrationSet(out_dir)


def _pick_rows(calib: CalibrationSet, n_rows: int | None, gen: torch.Generator) -> torch.Tensor:
    """Row indices of one step: n_rows random rows (CFG: n_rows/2 samples, each with both rows), sorted."""
    if n_rows is None:
        return torch.arange(calib.rows_per_step)
    if n_rows > calib.rows_per_step or n_rows < 1:
        raise ValueError(f"n_per_step={n_rows} must be in 1..{calib.rows_per_step} (rows per step of {calib.path})")
    if calib.cfg:
        if n_rows % 2:
            raise ValueError(f"n_per_step={n_rows} must be even for a CFG set (each sample has a null and a cond row)")
        samples = torch.randperm(calib.num_samples, generator=gen)[: n_rows // 2].sort().values
        return torch.cat([samples, samples + calib.num_samples])
    return torch.randperm(calib.rows_per_step, generator=gen)[:n_rows].sort().values


def select_steps(calib: CalibrationSet, step_indices: list[int], rows_per_step: list[int | None] | int | None,
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """Concatenate rows of the given sampler steps into one dict of UNet forward kwargs (steps in the given order)."""
    counts = rows_per_step if isinstance(rows_per_step, list) else [rows_per_step] * len(step_indices)
    gen = torch.Generator().manual_seed(seed)
    chunks: dict[str, list[torch.Tensor]] = {}
    for step, n in zip(step_indices, counts):
        if n == 0:
            continue
        data = calib.load_step(step)
        rows = _pick_rows(calib, n, gen)
        for key, value in data.items():
            chunks.setdefault(key, []).append(value[rows])
    return {k: torch.cat(v) for k, v in chunks.items()}


def every_kth_step(calib: CalibrationSet, k: int, n_per_step: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Q-Diffusion / TFMQ weight-calibration set: sampler steps 0, k, 2k, ..., ``n_per_step`` random rows each.

    Args:
        k: stride in sampler steps (paper: 200 DDIM steps, k = 10 -> 20 steps).
        n_per_step: rows per selected step (paper: 256); ``None`` = all rows. With CFG it must be even
            and each chosen sample contributes its null and its conditional row.
        seed: row choice.

    Returns:
        ``sample`` [S*n, C, H, W], ``timestep`` int64 [S*n], and conditioning keys if present.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1 (stride in sampler steps)")
    return select_steps(calib, list(range(0, calib.num_steps, k)), n_per_step, seed)


def all_steps(calib: CalibrationSet, n_per_step: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """FSC set: every sampler step, ``n_per_step`` random rows each (``None`` = all rows)."""
    return select_steps(calib, list(range(calib.num_steps)), n_per_step, seed)


def ptq4dm_step_counts(calib: CalibrationSet, n_total: int, mean_frac: float = 0.4, std_frac: float = 0.4,
                       seed: int = 0) -> list[int]:
    """Rows per sampler step for PTQ4DM's NDTC; see :func:`ptq4dm_timesteps`."""
    if not 0 < std_frac:
        raise ValueError(f"std_frac={std_frac} must be > 0")
    unit = 2 if calib.cfg else 1
    if n_total % unit or not 0 < n_total <= calib.rows_per_step * calib.num_steps:
        raise ValueError(f"n_total={n_total} must be in 1..{calib.rows_per_step * calib.num_steps}"
                         + (" and even (CFG set)" if calib.cfg else ""))
    rng = np.random.default_rng(seed)
    ts = np.asarray(calib.timesteps, dtype=np.float64)
    big_t = float(calib.meta["num_train_timesteps"])
    capacity = calib.rows_per_step // unit
    counts = np.zeros(calib.num_steps, dtype=np.int64)
    need = n_total // unit
    while need:  # truncated normal by rejection; a draw on a full step is drawn again
        frac = rng.normal(mean_frac, std_frac, size=4 * need + 16)
        frac = frac[(frac >= 0.0) & (frac <= 1.0)]
        for f in frac:
            s = int(np.abs(ts - f * (big_t - 1)).argmin())
            if counts[s] < capacity:
                counts[s] += 1
                need -= 1
                if not need:
                    break
    return [int(c) * unit for c in counts]


def ptq4dm_timesteps(calib: CalibrationSet, n_total: int, mean_frac: float = 0.4, std_frac: float = 0.4,
                     seed: int = 0) -> dict[str, torch.Tensor]:
    """PTQ4DM NDTC set: timesteps drawn from a normal distribution skewed toward small t.

    Each draw is ``t = frac * (T_train - 1)`` with ``frac ~ N(mean_frac, std_frac)`` truncated to [0, 1]
    (PTQ4DM's defaults: mean 0.4, std 0.4 of T), mapped to the sampler step whose timestep is nearest;
    small t = late sampler steps. A draw on a step whose rows are used up is drawn again.

    Args:
        n_total: total rows (CFG: even; each drawn sample brings its null and its conditional row).
        mean_frac, std_frac: mean and std of t / T_train.
        seed: seeds both the timestep draws and the row choice.

    Returns:
        UNet forward kwargs with ``n_total`` rows, steps in sampler order.
    """
    counts = ptq4dm_step_counts(calib, n_total, mean_frac, std_frac, seed)
    return select_steps(calib, list(range(calib.num_steps)), counts, seed)
