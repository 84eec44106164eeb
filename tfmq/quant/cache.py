"""Bounded-memory caches of a reconstruction unit's inputs and targets (docs/method.md section 6, "Memory").

BRECQ and Q-Diffusion's step-size learning optimise each unit on cached tensors: the unit's inputs
(positional and keyword arguments, e.g. the hidden states and the temporal embedding of a resnet) and
its FP output, one row per calibration row. ``RowCache`` keeps them on the CPU, never on the
accelerator, and hands each mini-batch to the device; with a memory budget, a unit whose cache would
exceed it is written to files as it is captured and each mini-batch is read back row by row, so the
resident memory of the stage stays at the budget plus one batch (the OS page cache aside). The rows,
their order and the values are the same either way: where the cache lives never changes a result.

``unit_cache_bytes`` gives the same numbers without computing anything: bytes per calibration row of
every unit, from one forward pass on the ``meta`` device (the formula of the SD v1.4 extrapolation).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


def _is_row(leaf: Any, rows: int) -> bool:
    return isinstance(leaf, torch.Tensor) and leaf.dim() > 0 and leaf.shape[0] == rows


class RowCache:
    """Rows of one nested structure of tensors (tuples / lists / dicts of tensors and constants).

    Args:
        rows: the number of rows that will be appended in all.
        budget_bytes: ``None`` (keep everything in memory, on the CPU) or the most bytes this cache may
            hold in memory; decided on the first batch from its per-row size: over the budget, every row
            tensor goes to a file under ``spill_dir``.
        spill_dir: where spilled files go (default: the system temp dir); they are deleted by ``close``.

    Leaves whose first dimension is the batch's row count are per-row; other leaves (constants,
    ``None``, a scale) are kept from the first batch.
    """

    def __init__(self, rows: int, budget_bytes: int | None = None, spill_dir=None):
        self.rows, self.budget, self.spill_dir = int(rows), budget_bytes, spill_dir
        self.spec = None
        self.leaves: list[Any] = []  # per leaf: a CPU tensor [rows, ...] / an open file / a constant
        self.row_shapes: list[tuple[int, ...] | None] = []
        self.dtypes: list[torch.dtype | None] = []
        self.filled = 0
        self.on_disk = False
        self._files: dict[int, Path] = {}  # leaf index -> its spill file

    # --- filling ---------------------------------------------------------------------------
    def _start(self, leaves: list[Any], n: int) -> None:
        per_row = sum(l[0].numel() * l.element_size() for l in leaves if _is_row(l, n))
        self.on_disk = self.budget is not None and per_row * self.rows > self.budget
        for l in leaves:
            if not _is_row(l, n):
                self.leaves.append(l)
                self.row_shapes.append(None)
                self.dtypes.append(None)
                continue
            self.row_shapes.append(tuple(l.shape[1:]))
            self.dtypes.append(l.dtype)
            if self.on_disk:
                fd, name = tempfile.mkstemp(prefix="tfmq-unit-cache-", suffix=".bin", dir=self.spill_dir)
                self._files[len(self.leaves)] = Path(name)
                self.leaves.append(os.fdopen(fd, "w+b", buffering=0))
            else:
                self.leaves.append(torch.empty((self.rows, *l.shape[1:]), dtype=l.dtype))

    def append(self, tree: Any) -> None:
        """Add the next batch of rows (a structure like the first batch's)."""
        leaves, spec = tree_flatten(tree)
        n = next((int(l.shape[0]) for l in leaves if isinstance(l, torch.Tensor) and l.dim() > 0), 0)
        if self.spec is None:
            self.spec = spec
            self._start(leaves, n)
        for k, l in enumerate(leaves):
            if self.row_shapes[k] is None:
                continue
            t = l.detach().to("cpu", copy=False).contiguous()
            if self.on_disk:
                f = self.leaves[k]
                f.seek(self.filled * self.row_bytes(k))
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                self.leaves[k][self.filled:self.filled + n] = t
        self.filled += n

    def row_bytes(self, k: int) -> int:
        shape = self.row_shapes[k]
        return int(torch.Size(shape).numel()) * torch.empty((), dtype=self.dtypes[k]).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of the row tensors (in memory or on disk)."""
        return sum(self.row_bytes(k) * self.rows for k, s in enumerate(self.row_shapes) if s is not None)

    # --- reading ---------------------------------------------------------------------------
    def take(self, idx: torch.Tensor, device=None) -> Any:
        """Rows ``idx`` (in that order) as the original structure, on ``device``."""
        if self.filled != self.rows:
            raise RuntimeError(f"unit cache holds {self.filled} of {self.rows} rows")
        out = []
        for k, leaf in enumerate(self.leaves):
            if self.row_shapes[k] is None:
                out.append(leaf)
                continue
            if self.on_disk:
                t = torch.empty((len(idx), *self.row_shapes[k]), dtype=self.dtypes[k])
                buf, size = t.view(len(idx), -1).view(torch.uint8).numpy(), self.row_bytes(k)
                for j, i in enumerate(idx.tolist()):
                    got = os.preadv(leaf.fileno(), [buf[j]], i * size)
                    if got != size:
                        raise OSError(f"unit cache file {self._files[k]}: read {got} of {size} bytes of row {i}")
            else:
                t = leaf[idx]
            out.append(t.to(device) if device is not None else t)
        return tree_unflatten(out, self.spec)

    def all(self, device=None) -> Any:
        return self.take(torch.arange(self.rows), device)

    def close(self) -> None:
        for leaf in self.leaves:
            if hasattr(leaf, "close"):
                leaf.close()
        for p in self._files.values():
            p.unlink(missing_ok=True)
        self.leaves, self._files = [], {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


@dataclass(frozen=True)
class MemoryPolicy:
    """Where a stage keeps its unit caches: ``budget_mb`` (``None``: every unit's cache in memory) is the
    most MiB one unit's inputs + targets may hold in memory; the part over it goes to ``spill_dir``."""

    budget_mb: float | None = None
    spill_dir: str | None = None

    def __post_init__(self):
        if self.budget_mb is not None and not self.budget_mb >= 0:
            raise ValueError(f"memory budget {self.budget_mb!r} MiB, expected None or a number >= 0")

    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget_mb is None else int(self.budget_mb * 2**20)

    def left_after(self, cache: RowCache) -> int | None:
        """The budget left for a unit's second cache once ``cache`` is filled."""
        if self.budget_bytes is None:
            return None
        return max(0, self.budget_bytes - (0 if cache.on_disk else cache.nbytes))

    @staticmethod
    def describe(*caches: RowCache) -> dict[str, Any]:
        """``cache_mb`` (the unit's cached bytes) and ``cache_spilled`` (how many of its caches went to disk)."""
        return {"cache_mb": round(sum(c.nbytes for c in caches) / 2**20, 4), "cache_spilled": sum(c.on_disk for c in caches)}


def unit_cache_bytes(unet: torch.nn.Module, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Bytes per calibration row that BRECQ caches for each unit of ``unet`` (FP, or on the ``meta``
    device: nothing is computed), from one forward pass on ``inputs`` (batch 1).

    Units as ``tfmq.quant.reconstruction.discover_units`` finds them (resnets, transformer blocks,
    attention outside one); the lone layers are left out (their caches are smaller than their
    block's). Returns ``[{"unit", "kind", "input_bytes", "output_bytes"}]`` in execution order.
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    from .reconstruction import _main_output

    blocks: list[str] = []
    found: dict[str, dict[str, Any]] = {}
    handles = []
    for name, m in unet.named_modules():
        if isinstance(m, (ResnetBlock2D, BasicTransformerBlock)) or (
            isinstance(m, Attention) and not any(name.startswith(b + ".") for b in blocks)
        ):
            blocks.append(name)

            def pre(mod, args, kwargs, name=name):
                if name not in found:
                    leaves, _ = tree_flatten((args, kwargs))
                    found[name] = {"unit": name, "kind": type(mod).__name__,
                                   "input_bytes": sum(l[0].numel() * l.element_size() for l in leaves if _is_row(l, 1))}

            def post(mod, args, kwargs, out, name=name):
                o = _main_output(out)
                found[name].setdefault("output_bytes", o[0].numel() * o.element_size())

            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            unet(**inputs)
    finally:
        for h in handles:
            h.remove()
    return list(found.values())
