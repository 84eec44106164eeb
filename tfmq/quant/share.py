"""Weight stages shared across activation settings (docs/method.md section 12).

TIAR (stage 1) and BRECQ / round-to-nearest (stage 2) are weight-only: they run with every
activation quantizer off, so W4A8, W4A6 and W4A32 of one method reconstruct the same weights.
``weight_identity`` is the part of a ``QuantConfig`` that the two weight stages read (the recipe's
resolved ``temporal`` / ``weight_set`` / ``block_recon`` steps, the layer policy, the shortcut split,
the weight bits, the reconstruction and weight-set settings, the seed); every activation-only field
(``act_bits``, ``softmax_bits``, ``fsc``, ``fsc_scope``, ``act_recon``, ``calib.fsc_*``,
``cached_temporal_features``, the ``correction`` step) is left out. Two configs with equal identities
give bit-identical weight-stage checkpoints (tests/test_share.py checks it for every built-in recipe).

``WeightStore`` files the weight-stage checkpoints of a run under a content key: the identity, the
iteration cap of ``TFMQ_MAX_ITERS``, the bytes of the FP UNet and of the calibration set, the source
of ``tfmq`` and the torch / diffusers versions, and the device type. A later setting with the same
key loads them (``tfmq.load(..., config=its own config)``) instead of recomputing; anything that could
change the weights changes the key, so a stale entry is never used. Entries appear in one rename;
a lock per key makes a concurrent setting of the same key wait for the first one and then load.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from .config import QuantConfig, max_iters_from_env

#: QuantConfig fields only the activation stage (or nothing at all) reads
ACT_ONLY_FIELDS = ("method", "act_bits", "softmax_bits", "fsc", "fsc_scope", "cached_temporal_features", "act_recon",
                   "version")
ACT_ONLY_CALIB = ("fsc_n_per_step", "fsc_batch_size", "fsc_momentum")
#: the stages whose output is shared, in order, with the quantize task names of each
WEIGHT_STAGES = ("temporal", "blocks")


def weight_identity(config: QuantConfig) -> dict[str, Any]:
    """The fields of ``config`` (resolved against its recipe) that decide the weight stages' result.

    The ablation switch ``tiar`` enters through the resolved ``temporal`` step. The attention
    processor enters as ``attention_processor``: Q-Diffusion's matmul quantizers replace diffusers'
    attention kernel (the FP forward the weights are reconstructed against) when activations are
    quantized, so W4A8 and W4A32 of such a method are not shared.
    """
    from .prepare import resolve_config
    from .recipes import get_recipe
    from .steps import resolve_step

    resolved = resolve_config(config)
    recipe = get_recipe(config.method)
    d = resolved.to_dict()
    for k in ACT_ONLY_FIELDS + ("tiar",):
        d.pop(k, None)
    for k in ACT_ONLY_CALIB:
        d["calib"].pop(k, None)
    d["attention_matmul"] = bool(resolved.attention_matmul and config.act_bits is not None)
    d["steps"] = {"temporal": resolve_step("temporal", recipe, config), "weight_set": recipe.weight_set,
                  "block_recon": recipe.block_recon}
    return d


def same_weights(a: QuantConfig, b: QuantConfig) -> bool:
    """True when ``a`` and ``b`` share their weight stages."""
    return weight_identity(a) == weight_identity(b)


def _differences(identity, a: QuantConfig, b: QuantConfig) -> list[str]:
    from .api import _flat

    fa, fb = _flat(identity(a)), _flat(identity(b))
    return [f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]


def weight_identity_differences(a: QuantConfig, b: QuantConfig) -> list[str]:
    """``field: a vs b`` lines for every weight-identity field in which ``a`` and ``b`` differ."""
    return _differences(weight_identity, a, b)


#: the recipe steps stages 1-3 run (the ``correction`` after them is each setting's own)
ACTIVATION_STEPS = ("temporal", "weight_set", "block_recon", "activations")


def activation_identity(config: QuantConfig) -> dict[str, Any]:
    """The fields of ``config`` (resolved against its recipe) that decide stages 1-3 up to the recipe's
    ``correction``: every field but the method's name, with the recipe's steps resolved.

    Two configs with equal identities run the same TIAR, BRECQ and activation step on the same inputs,
    so one's finished model is the other's before its correction: Q-Diffusion's model is PTQD's before
    PTQD's noise correction (tests/test_share.py checks it tensor for tensor).
    """
    from .prepare import resolve_config
    from .recipes import get_recipe
    from .steps import resolve_step

    recipe = get_recipe(config.method)
    d = resolve_config(config).to_dict()
    for k in ("method", "version", "tiar", "fsc"):  # the two ablation switches enter through the resolved steps
        d.pop(k, None)
    d["steps"] = {k: resolve_step(k, recipe, config) for k in ACTIVATION_STEPS}
    return d


def same_activations(a: QuantConfig, b: QuantConfig) -> bool:
    """True when ``a`` and ``b`` run the same stages 1-3 (they may differ in the correction after them)."""
    return activation_identity(a) == activation_identity(b)


def activation_identity_differences(a: QuantConfig, b: QuantConfig) -> list[str]:
    """``field: a vs b`` lines for every activation-identity field in which ``a`` and ``b`` differ."""
    return _differences(activation_identity, a, b)


def _hash_files(h, root: Path, patterns: tuple[str, ...] = ("*",)) -> None:
    files = sorted(p for pat in patterns for p in root.rglob(pat) if p.is_file() and "__pycache__" not in p.parts)
    for p in files:
        h.update(str(p.relative_to(root)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def code_fingerprint() -> str:
    """sha256 of every ``tfmq/*.py`` source file plus the torch and diffusers versions."""
    import diffusers

    h = hashlib.sha256(f"torch={torch.__version__};diffusers={diffusers.__version__}".encode())
    _hash_files(h, Path(__file__).resolve().parents[1], ("*.py",))
    return h.hexdigest()


def weight_key(config: QuantConfig, fp_dir: str | os.PathLike, calib_dir: str | os.PathLike, device,
               upto: str = "blocks") -> tuple[str, dict]:
    """``(key, description)``: the store key of ``config``'s weight stages on these inputs.

    ``fp_dir``: the FP model folder (its ``unet/`` files are hashed, or the whole folder for a bare
    UNet). ``calib_dir``: the calibration set directory (every file hashed). ``upto``: ``blocks`` (the
    weight stages, ``weight_identity``) or ``activations`` (stages 1-3 before the correction,
    ``activation_identity``).
    """
    if upto not in ("blocks", "activations"):
        raise ValueError(f"upto={upto!r}: expected 'blocks' or 'activations'")
    fp = Path(fp_dir)
    unet_dir = fp / "unet" if (fp / "unet").is_dir() else fp
    hu, hc = hashlib.sha256(), hashlib.sha256()
    _hash_files(hu, unet_dir)
    _hash_files(hc, Path(calib_dir))
    identity = weight_identity(config) if upto == "blocks" else {"upto": upto, **activation_identity(config)}
    desc = {"identity": identity, "max_iters": max_iters_from_env(),
            "fp_unet_sha256": hu.hexdigest(), "calib_sha256": hc.hexdigest(), "code_sha256": code_fingerprint(),
            "device": torch.device(device).type}
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]
    return key, desc


class WeightStore:
    """Weight-stage checkpoints by key: ``<root>/<key>/{tib,blocks}/`` (``tfmq.save`` dirs) + ``entry.json``.

    Args:
        root: the store directory (created on first write).
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str, parts: tuple[str, ...] = ("tib", "blocks")) -> dict[str, Any] | None:
        """The entry's record (``entry.json``, with ``path``) if it is complete (every checkpoint dir of
        ``parts`` there), else ``None``."""
        d = self.entry(key)
        rec = d / "entry.json"
        if not rec.is_file() or not all((d / s / "quant_config.json").is_file() for s in parts):
            return None
        try:
            doc = json.loads(rec.read_text())
        except json.JSONDecodeError:
            return None
        return {**doc, "path": str(d)}

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Exclusive lock of ``key`` across processes (a settings' weight stages run once at a time)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{key}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def put(self, key: str, stage_dirs: dict[str, str | os.PathLike], record: dict[str, Any]) -> Path:
        """Copy the checkpoint dirs (``{name: dir}``: ``tib`` and ``blocks``, or ``model``) into the entry ``key``
        and write its record, in one rename."""
        import shutil

        from ..io import atomic_dir, atomic_write_json

        with atomic_dir(self.entry(key)) as tmp:
            for name, src in stage_dirs.items():
                shutil.copytree(src, tmp / name)
            atomic_write_json(record, tmp / "entry.json")
        return self.entry(key)
