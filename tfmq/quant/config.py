"""Quantization configuration: one validated dataclass per concern, paper values as defaults.

`QuantConfig` is the single object a user passes to `tfmq.quantize` (torchao style). Every
field has the value of the TFMQ-DM / Q-Diffusion papers as its default (docs/method.md sections 2-8);
the embedded pipeline overrides the iteration counts from params.yaml. `from_dict` rejects
unknown keys so that a typo in a params file fails loudly.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .registry import RECIPES

FORMAT_VERSION = 2  # the checkpoint layout written; 2: weight grids of <= 4 bits packed two per byte
READ_FORMAT_VERSIONS = (1, 2)  # the layouts read (1: every grid as uint8 ``w_int``)
POLICIES = ("tfmq", "all")
FSC_SCOPES = ("tib", "all")
MAX_ITERS_ENV = "TFMQ_MAX_ITERS"
logger = logging.getLogger("tfmq")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names it and says what is expected."""


@dataclass
class ReconConfig:
    """BRECQ / AdaRound block reconstruction (docs/method.md sections 2 and 6)."""

    iters: int = 20000  # paper: 20 000 per block
    batch_size: int = 32  # paper: 32 (8 for Stable Diffusion)
    lr: float = 1e-3  # Adam on AdaRound alpha
    warmup: float = 0.2  # fraction of iterations with the rounding regulariser off
    beta_start: float = 20.0
    beta_end: float = 2.0
    round_weight: float = 0.01  # w of the rounding regulariser

    def validate(self, where: str) -> None:
        _positive_int(self.iters, f"{where}.iters", allow_zero=True)
        _positive_int(self.batch_size, f"{where}.batch_size")
        _positive(self.lr, f"{where}.lr")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"{where}.warmup={self.warmup!r}: expected a fraction in [0, 1)")
        _positive(self.beta_start, f"{where}.beta_start")
        _positive(self.beta_end, f"{where}.beta_end")
        if self.round_weight < 0:
            raise ConfigError(f"{where}.round_weight={self.round_weight!r}: expected >= 0")


@dataclass
class TiarConfig:
    """Temporal Information Aware Reconstruction (docs/method.md section 4); regulariser as in `recon`."""

    iters: int = 20000
    batch_size: int = 32
    lr: float = 1e-3

    def validate(self, where: str) -> None:
        _positive_int(self.iters, f"{where}.iters", allow_zero=True)
        _positive_int(self.batch_size, f"{where}.batch_size")
        _positive(self.lr, f"{where}.lr")


@dataclass
class ActReconConfig:
    """Q-Diffusion's activation step-size learning (docs/method.md section 8)."""

    iters: int = 5000
    batch_size: int = 32
    lr: float = 4e-4  # Adam, cosine to 0
    p: float = 2.4  # loss |.|^p

    def validate(self, where: str) -> None:
        _positive_int(self.iters, f"{where}.iters", allow_zero=True)
        _positive_int(self.batch_size, f"{where}.batch_size")
        _positive(self.lr, f"{where}.lr")
        _positive(self.p, f"{where}.p")


@dataclass
class CalibConfig:
    """Which calibration rows each step uses (docs/method.md sections 5 and 7)."""

    every_k: int = 10  # weight/TIAR/BRECQ set: every k-th sampler step ...
    n_per_step: int | None = None  # ... with this many rows each (None: every recorded row; paper: 256 -> 5 120 rows)
    fsc_n_per_step: int | None = None  # FSC rows per step (None: all recorded rows)
    fsc_batch_size: int = 16
    fsc_momentum: float = 0.95
    ptq4dm_n_total: int | None = None  # PTQ4DM NDTC rows (None: same count as the every-k set)
    ptq4dm_t_mean: float = 0.4  # NDTC: t ~ N(0.4 T, 0.4 T), skewed to small t (PTQ4DM's released scripts)
    ptq4dm_t_std: float = 0.4

    def validate(self, where: str) -> None:
        _positive_int(self.every_k, f"{where}.every_k")
        if self.n_per_step is not None:
            _positive_int(self.n_per_step, f"{where}.n_per_step")
        if self.fsc_n_per_step is not None:
            _positive_int(self.fsc_n_per_step, f"{where}.fsc_n_per_step")
        _positive_int(self.fsc_batch_size, f"{where}.fsc_batch_size")
        if not 0.0 <= self.fsc_momentum < 1.0:
            raise ConfigError(f"{where}.fsc_momentum={self.fsc_momentum!r}: expected a value in [0, 1)")
        if self.ptq4dm_n_total is not None:
            _positive_int(self.ptq4dm_n_total, f"{where}.ptq4dm_n_total")
        if not 0.0 <= self.ptq4dm_t_mean <= 1.0:
            raise ConfigError(f"{where}.ptq4dm_t_mean={self.ptq4dm_t_mean!r}: expected a fraction of T in [0, 1]")
        _positive(self.ptq4dm_t_std, f"{where}.ptq4dm_t_std")


_NESTED = {"recon": ReconConfig, "tiar_recon": TiarConfig, "act_recon": ActReconConfig, "calib": CalibConfig}


@dataclass
class QuantConfig:
    """Everything that defines one quantization run.

    Args:
        method: recipe name: ``naive``, ``brecq``, ``freeze``, ``ptq4dm``, ``qdiffusion``, ``tfmq`` or
            one added with ``tfmq.register_recipe``.
        weight_bits: weight bit-width (per output channel, asymmetric), 2..8.
        act_bits: activation bit-width (per tensor, asymmetric), or ``None`` for weight-only (W*A32).
        policy: which layers stay float: ``tfmq`` (released TFMQ code) or ``all`` (Q-Diffusion:
            every Conv2d/Linear). ``None`` takes the method's default.
        attention_matmul: also quantize q, k, v and the softmax output (Q-Diffusion). ``None``:
            method default.
        split_shortcut: Q-Diffusion's split quantizers for up-block ``conv_shortcut``. ``None``:
            method default.
        softmax_bits: bits of the attention-probability quantizer when ``attention_matmul`` is on.
            ``None``: the activation bits (Q-Diffusion's LDM scripts); Q-Diffusion's Stable Diffusion
            runs keep the softmax at 16 bits (``softmax_bits=16``).
        tiar: run TIAR (only meaningful for ``tfmq``; the ablation switch).
        fsc: per-timestep activation ranges (only for ``tfmq``; the ablation switch).
        fsc_scope: ``tib`` (paper) or ``all`` (released code and its author).
        tiar_timesteps: ``all`` (every sampler timestep once: the finite set of the paper) or
            ``weight_set`` (the every-k-th-step subset of the released code).
        cached_temporal_features: replace the TIB at inference by a table of FP temporal features
            per calibrated timestep (the TPAMI extension's cache-based maintenance).
        seed: seed for every random choice of the run.
        recon, tiar_recon, act_recon: iteration counts, batch sizes and learning rates of BRECQ, TIAR
            and Q-Diffusion's step-size learning (paper: 20 000 / 20 000 / 5 000 iterations).
        calib: calibration rows per step. ``calib.n_per_step`` (rows per selected step of the weight
            set) defaults to ``None`` = every row the calibration set recorded; the paper used 256.
            A value above the recorded rows per step is an error naming ``QuantConfig(calib={"n_per_step": ...})``.

    Environment:
        ``TFMQ_MAX_ITERS``: a non-negative integer capping ``recon.iters``, ``tiar_recon.iters`` and
        ``act_recon.iters`` at run time (for smoke tests of documentation examples; results are then
        not the configured method's). A stage that is capped logs one warning line on the ``tfmq``
        logger and records ``iters_capped`` in its stats; the config stored on the model keeps the
        configured counts. Unset (or empty): no effect.
    """

    method: str = "tfmq"
    weight_bits: int = 4
    act_bits: int | None = 8
    policy: str | None = None
    attention_matmul: bool | None = None
    split_shortcut: bool | None = None
    softmax_bits: int | None = None
    tiar: bool = True
    fsc: bool = True
    fsc_scope: str = "all"
    tiar_timesteps: str = "all"
    cached_temporal_features: bool = False
    seed: int = 0
    recon: ReconConfig = field(default_factory=ReconConfig)
    tiar_recon: TiarConfig = field(default_factory=TiarConfig)
    act_recon: ActReconConfig = field(default_factory=ActReconConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for name, cls in _NESTED.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _build(cls, value, name))
        self.validate()

    def validate(self) -> None:
        if self.method not in RECIPES:
            raise ConfigError(f"method={self.method!r} is not a registered recipe; expected one of {', '.join(RECIPES)}")
        if not isinstance(self.weight_bits, int) or not 2 <= self.weight_bits <= 8:
            raise ConfigError(f"weight_bits={self.weight_bits!r}: expected an integer in 2..8")
        if self.act_bits is not None and (not isinstance(self.act_bits, int) or not 2 <= self.act_bits <= 16):
            raise ConfigError(f"act_bits={self.act_bits!r}: expected an integer in 2..16, or null for weight-only")
        if self.softmax_bits is not None and (not isinstance(self.softmax_bits, int) or isinstance(self.softmax_bits, bool)
                                              or not 2 <= self.softmax_bits <= 16):
            raise ConfigError(f"softmax_bits={self.softmax_bits!r}: expected an integer in 2..16, or null for the activation bits")
        if self.policy is not None and self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy!r}: expected one of {', '.join(POLICIES)} (or null for the method default)")
        if self.fsc_scope not in FSC_SCOPES:
            raise ConfigError(f"fsc_scope={self.fsc_scope!r}: expected one of {', '.join(FSC_SCOPES)}")
        if self.tiar_timesteps not in ("all", "weight_set"):
            raise ConfigError(f"tiar_timesteps={self.tiar_timesteps!r}: expected 'all' or 'weight_set'")
        for name in ("tiar", "fsc", "cached_temporal_features"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected true or false")
        for name in _NESTED:
            getattr(self, name).validate(name)

    @property
    def bits_name(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits if self.act_bits is not None else 32}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """Build from a plain dict (e.g. a params.yaml section); unknown keys are an error."""
        return _build(cls, dict(d), "quant")


STAGE_ITERS = {"temporal": "tiar_recon", "blocks": "recon", "activations": "act_recon"}


def max_iters_from_env() -> int | None:
    """``TFMQ_MAX_ITERS`` as an int (``None`` when unset or empty); anything else is a ConfigError."""
    raw = os.environ.get(MAX_ITERS_ENV, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{MAX_ITERS_ENV}={raw!r}: expected a non-negative integer (a cap on every iteration count), or unset it")
    return value


def cap_stage_iters(config: QuantConfig, stage: str) -> tuple[QuantConfig, dict[str, Any]]:
    """Apply ``TFMQ_MAX_ITERS`` to the iteration count of ``stage``; returns (config to run, what was capped).

    Unset, or a cap at or above the configured count, returns ``config`` itself and ``{}``.
    """
    cap = max_iters_from_env()
    name = STAGE_ITERS[stage]
    sub = getattr(config, name)
    if cap is None or sub.iters <= cap:
        return config, {}
    capped = {f"{name}.iters": {"configured": sub.iters, "ran": cap, "by": MAX_ITERS_ENV}}
    logger.warning("%s=%d caps %s.iters %d -> %d in stage %r (smoke-test mode: not the configured method's result)",
                   MAX_ITERS_ENV, cap, name, sub.iters, cap, stage)
    return dataclasses.replace(config, **{name: dataclasses.replace(sub, iters=cap)}), capped


def merge_quant(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A ``QuantConfig`` dict ``base`` with ``overrides`` applied; nested sections (``recon``, ``calib``, ...)
    merge key by key, so ``{"recon": {"iters": 400}}`` keeps the other ``recon`` keys."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_bits(name: str) -> tuple[int, int | None]:
    """``"W4A8" -> (4, 8)``; ``"W4A32"`` (A32 and up) means weight-only -> ``(4, None)``."""
    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", str(name).strip())
    if not m:
        raise ConfigError(f"bits={name!r}: expected the form W<weight bits>A<activation bits>, e.g. W4A8 or W4A32")
    w, a = int(m.group(1)), int(m.group(2))
    return w, (None if a >= 32 else a)


def _build(cls, d: dict[str, Any], where: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in d.items():
        if k in _NESTED and cls is QuantConfig and isinstance(v, dict):
            v = _build(_NESTED[k], v, f"{where}.{k}")
        kwargs[k] = v
    return cls(**kwargs)


def _positive_int(v: Any, where: str, allow_zero: bool = False) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
        raise ConfigError(f"{where}={v!r}: expected an integer >= {0 if allow_zero else 1}")


def _positive(v: Any, where: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"{where}={v!r}: expected a positive number")
