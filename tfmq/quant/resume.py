"""Resumable reconstruction and calibration (docs/method.md section 6, docs/pipeline.md "Resume"): the
state of every finished unit of work is filed atomically in a progress directory, so a stage killed
half-way continues with the next unit and ends bit-identical to an uninterrupted run.

The units: TIAR (one unit: the Temporal Information Block), every BRECQ block or layer, every FSC
timestep, every unit of Q-Diffusion's activation step-size learning. Each is computed from the state
the finished units left (their grids, ranges or tables) plus, where batches are drawn from a shared
generator (FSC), that generator's state, which is filed with the unit; the global RNG state is filed
too, for safety. A progress directory written for another model, calibration set or config (its
``identity`` differs) is discarded with one log line naming what differs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..io import atomic_save_safetensors, atomic_write_json

logger = logging.getLogger("tfmq")

PROGRESS_FORMAT = "tfmq-unit-progress"
PROGRESS_VERSION = 2  # 2: units of any stage (state tensors, meta, generator state)
MANIFEST_NAME = "progress.json"
_RNG_CPU = "__rng__.cpu"
_RNG_CUDA = "__rng__.cuda."
_RNG_GEN = "__rng__.generator"
_STATE = "__state__."


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes of ``tensors`` (sorted by name)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k]
        if not isinstance(v, torch.Tensor):
            h.update(f"{k}={v!r};".encode())
            continue
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class UnitProgress:
    """The progress directory of one BRECQ stage: ``progress.json`` + ``unit-XXXX.safetensors``.

    Args:
        path: directory to keep the progress in (created on the first finished unit).
        identity: JSON-able dict saying what the stage runs on (e.g. ``{"config": ..., "calib": ...}``);
            ``reconstruct_units`` adds the model's state, the rows and the unit list to it.

    A directory that exists but holds no progress manifest is refused (never deleted).
    """

    def __init__(self, path, identity: dict[str, Any] | None = None):
        self.path = Path(path)
        self.identity: dict[str, Any] = dict(identity or {})
        self.done: list[dict[str, Any]] = []
        self.restored = 0

    # --- opening ---------------------------------------------------------------------------
    def open(self, extra: dict[str, Any]) -> list[dict[str, Any]]:
        """Bind the full identity; return the finished units' records (``[]``: start from unit 0)."""
        self.identity = {**self.identity, **extra}
        self.done = []
        manifest = self.path / MANIFEST_NAME
        if not self.path.exists():
            return []
        if not manifest.is_file():
            if any(self.path.iterdir()):
                raise ValueError(
                    f"resume directory {self.path} exists but holds no {MANIFEST_NAME}; it is not a tfmq progress "
                    "directory: pass an empty or new path (nothing there was changed)"
                )
            return []
        try:
            doc = json.loads(manifest.read_text())
        except (OSError, ValueError) as e:
            logger.warning("resume: discarding %s: unreadable manifest (%s)", self.path, e)
            self.discard()
            return []
        if doc.get("format") != PROGRESS_FORMAT or doc.get("version") != PROGRESS_VERSION:
            logger.warning("resume: discarding %s: format %r version %r, expected %r version %d", self.path,
                           doc.get("format"), doc.get("version"), PROGRESS_FORMAT, PROGRESS_VERSION)
            self.discard()
            return []
        theirs = doc.get("identity", {})
        mine = json.loads(json.dumps(self.identity, default=str))
        diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
        if diff:
            logger.warning("resume: discarding %s: it was written for another %s; starting from the first unit",
                           self.path, ", ".join(diff))
            self.discard()
            return []
        records = doc.get("done", [])
        if not all((self.path / r["file"]).is_file() for r in records):
            logger.warning("resume: discarding %s: a unit file listed in %s is missing", self.path, MANIFEST_NAME)
            self.discard()
            return []
        if doc.get("runtime") != runtime():
            logger.warning("resume: %s was written with %s, this run has %s: the result can differ from an "
                           "uninterrupted run's in the last float bits", self.path, doc.get("runtime"), runtime())
        self.done = list(records)
        return list(records)

    def discard(self) -> None:
        """Delete this progress (only the files this class writes, then the directory if empty)."""
        if not self.path.is_dir():
            return
        for p in list(self.path.glob("unit-*.safetensors")) + [self.path / MANIFEST_NAME]:
            p.unlink(missing_ok=True)
        for p in self.path.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
        try:
            self.path.rmdir()
        except OSError:
            pass
        self.done = []

    def remove(self) -> None:
        """Delete the whole directory (after the stage's output is safely written)."""
        shutil.rmtree(self.path, ignore_errors=True)

    # --- units -----------------------------------------------------------------------------
    def record(self, index: int, name: str, stats: dict[str, Any], layers=(), tensors: dict[str, torch.Tensor] | None = None,
               meta: Any = None, generator: torch.Generator | None = None) -> None:
        """File unit ``index``: its layers' states, any other ``tensors`` / JSON ``meta`` it produced, the
        state of the ``generator`` it drew batches from and the global RNG state; then list it in the manifest."""
        out: dict[str, torch.Tensor] = {}
        metas: dict[str, Any] = {}
        for layer in layers:
            owned, metas[layer.name] = layer.export_state()
            out.update({f"{layer.name}.{k}": v for k, v in owned.items()})
        out.update({_STATE + k: v for k, v in (tensors or {}).items()})
        out[_RNG_CPU] = torch.get_rng_state()
        if generator is not None:
            out[_RNG_GEN] = generator.get_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                out[f"{_RNG_CUDA}{i}"] = s
        file = f"unit-{index:04d}.safetensors"
        atomic_save_safetensors(out, self.path / file)
        self.done.append({"index": index, "name": name, "file": file, "layers": metas, "meta": meta,
                          "stats": json.loads(json.dumps(stats))})
        atomic_write_json({"format": PROGRESS_FORMAT, "version": PROGRESS_VERSION,
                           "identity": json.loads(json.dumps(self.identity, default=str)), "runtime": runtime(),
                           "done": self.done}, self.path / MANIFEST_NAME)

    def restore(self, record: dict[str, Any], layers=(), last: bool = False, generator: torch.Generator | None = None
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor], Any]:
        """Put unit ``record``'s layer states back onto ``layers`` and its state onto ``generator``; the global
        RNG state too if it is the ``last`` finished unit. Returns ``(stats, tensors, meta)`` as recorded."""
        tensors = load_file(str(self.path / record["file"]))
        by_name = {l.name: l for l in layers}
        if set(by_name) != set(record["layers"]):
            raise ValueError(f"resume: unit {record['name']!r} has layers {sorted(by_name)}, the progress file "
                             f"{sorted(record['layers'])}; delete {self.path} and re-run")
        for name, layer in by_name.items():
            prefix = name + "."
            layer.restore_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, record["layers"][name])
        if generator is not None:
            generator.set_state(tensors[_RNG_GEN])
        if last:
            torch.set_rng_state(tensors[_RNG_CPU])
            cuda = [tensors[k] for k in sorted(tensors) if k.startswith(_RNG_CUDA)]
            if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        self.restored += 1
        own = {k[len(_STATE):]: v for k, v in tensors.items() if k.startswith(_STATE)}
        return dict(record["stats"]), own, record.get("meta")


def runtime() -> dict[str, Any]:
    """What decides the last bits of float32 results besides the inputs: torch's thread count and
    ``OMP_NUM_THREADS`` (the kernels differ even at 1 thread). Not part of the identity: a re-run with
    other threads still resumes (after one warning line) rather than throwing hours of units away."""
    import os

    return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def model_state_digest(unet) -> str:
    """Digest of a prepared model's quantization state as it stands: every layer's weight quantizers and
    every activation quantizer (what a unit's result depends on besides its rows and its settings)."""
    from .prepare import act_quantizers, quant_layers

    tensors: dict[str, torch.Tensor] = {}
    metas: dict[str, Any] = {}
    for name, module in list(quant_layers(unet)) + list(act_quantizers(unet)):
        owned, metas[name] = module.export_state()
        tensors.update({f"{name}.{k}": v for k, v in owned.items()})
    return tensor_digest(tensors) + ":" + json_digest(metas)


def stage_identity(unet, calib, config) -> dict[str, Any]:
    """What a block-reconstruction stage's result depends on besides the rows and the entering state:
    the FP weights (checkpoint fingerprint), the calibration set's ``meta.json`` and the resolved config."""
    from .checkpoint import fp_fingerprint

    meta = getattr(calib, "meta", None)
    return {
        "fp_weights": json_digest(fp_fingerprint(unet)),
        "calibration_set": json_digest(meta) if meta is not None else None,
        "config": config.to_dict(),
    }
