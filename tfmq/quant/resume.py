"""Resumable BRECQ (docs/method.md section 6, docs/pipeline.md "Resume"): the state of every
finished reconstruction unit is filed atomically in a progress directory, so a stage killed half-way
continues with the next unit and ends bit-identical to an uninterrupted run.

Each unit is optimised with its own generator (``seed + unit index``) on inputs computed from the
units before it, so the grids of the finished units (plus the global RNG state, for safety) are all
the next unit depends on. A progress directory written for another model, calibration set or config
(its ``identity`` differs) is discarded with one log line naming what differs.
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
PROGRESS_VERSION = 1
MANIFEST_NAME = "progress.json"
_RNG_CPU = "__rng__.cpu"
_RNG_CUDA = "__rng__.cuda."


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
    def record(self, index: int, name: str, layers, stats: dict[str, Any]) -> None:
        """File unit ``index``'s layer states (and the RNG state after it), then list it in the manifest."""
        tensors: dict[str, torch.Tensor] = {}
        metas: dict[str, Any] = {}
        for layer in layers:
            owned, metas[layer.name] = layer.export_state()
            tensors.update({f"{layer.name}.{k}": v for k, v in owned.items()})
        tensors[_RNG_CPU] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"{_RNG_CUDA}{i}"] = s
        file = f"unit-{index:04d}.safetensors"
        atomic_save_safetensors(tensors, self.path / file)
        self.done.append({"index": index, "name": name, "file": file, "layers": metas,
                          "stats": json.loads(json.dumps(stats))})
        atomic_write_json({"format": PROGRESS_FORMAT, "version": PROGRESS_VERSION,
                           "identity": json.loads(json.dumps(self.identity, default=str)), "done": self.done},
                          self.path / MANIFEST_NAME)

    def restore(self, record: dict[str, Any], layers, last: bool) -> dict[str, Any]:
        """Put unit ``record``'s layer states back onto ``layers``; the RNG state too if it is the ``last``."""
        tensors = load_file(str(self.path / record["file"]))
        by_name = {l.name: l for l in layers}
        if set(by_name) != set(record["layers"]):
            raise ValueError(f"resume: unit {record['name']!r} has layers {sorted(by_name)}, the progress file "
                             f"{sorted(record['layers'])}; delete {self.path} and re-run")
        for name, layer in by_name.items():
            prefix = name + "."
            layer.restore_state({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, record["layers"][name])
        if last:
            torch.set_rng_state(tensors[_RNG_CPU])
            cuda = [tensors[k] for k in sorted(tensors) if k.startswith(_RNG_CUDA)]
            if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
        self.restored += 1
        return dict(record["stats"])


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
