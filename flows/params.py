"""params.yaml: load it and validate it strictly, so a typo fails before any compute starts.

Every hyper-parameter of the pipeline lives in params.yaml (DVC's single source of parameters).
This module checks every key: an unknown key, a missing key or a value of the wrong type is ONE
error line that names the key and what is allowed (llm-compressor's ``extra="forbid"``). Sections
that mirror a library dataclass (``train_fp`` -> ``tfmq.diffusion.training.TrainConfig``, ``quant`` ->
``tfmq.QuantConfig``) take their allowed keys from the dataclass, so the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml

#: the paper's comparison grid (dvc.yaml's matrix); any registered recipe and W<w>A<a> also validate
METHODS = ("naive", "freeze", "ptq4dm", "qdiffusion", "tfmq")
BITS = ("W8A8", "W4A8", "W4A32")
SAMPLERS = ("ddim", "ddpm", "pndm", "plms")


class ParamsError(ValueError):
    """params.yaml is invalid; the one-line message names the key, the bad value and what is allowed."""


# --- a tiny schema language --------------------------------------------------------------------

class Kind:
    """A leaf type: ``check(value, key)`` raises ParamsError or returns the (normalised) value."""

    def __init__(self, name: str, ok: Callable[[Any], bool], optional: bool = False, convert: Callable | None = None):
        self.name, self.ok, self.optional, self.convert = name, ok, optional, convert

    def __or__(self, other: "Kind") -> "Kind":  # Kind | NULL
        return Kind(f"{self.name} or {other.name}", lambda v: self.ok(v) or other.ok(v), self.optional or other.optional,
                    self.convert)

    def check(self, value: Any, key: str) -> Any:
        if value is None and self.optional:
            return None
        if not self.ok(value):
            raise ParamsError(f"params: {key}={value!r} is a {_type_name(value)}, expected {self.name}")
        return self.convert(value) if self.convert and value is not None else value


def _type_name(v: Any) -> str:
    return "null" if v is None else {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
                                     "list": "list", "dict": "mapping"}.get(type(v).__name__, type(v).__name__)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


STR = Kind("a string", lambda v: isinstance(v, str))
INT = Kind("an integer", _is_int)
FLOAT = Kind("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), convert=float)
BOOL = Kind("true or false", lambda v: isinstance(v, bool))
NULL = Kind("null", lambda v: v is None, optional=True)
MAPPING = Kind("a mapping", lambda v: isinstance(v, dict))


def choice(*options: str) -> Kind:
    return Kind(f"one of {', '.join(options)}", lambda v: v in options)


def _registered_methods() -> tuple[str, ...]:
    from tfmq.quant.recipes import RECIPES

    return tuple(RECIPES)


def _is_bits(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"W\d+A\d+", v) is not None


METHOD_LIST = Kind("a non-empty list of registered methods (tfmq.quant.recipes.RECIPES: naive, freeze, ptq4dm, "
                   "qdiffusion, tfmq, ...), no repeats",
                   lambda v: isinstance(v, list) and len(v) > 0 and len(set(v)) == len(v)
                   and all(x in _registered_methods() for x in v))
BITS_LIST = Kind("a non-empty list of bit settings like W8A8, W4A8, W4A32, no repeats",
                 lambda v: isinstance(v, list) and len(v) > 0 and len(set(v)) == len(v) and all(_is_bits(x) for x in v))

FLOAT_PAIR = Kind("a list of two numbers", lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                  and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v))


@dataclasses.dataclass
class DataclassSection:
    """A section whose keys are the fields of a library dataclass (plus pipeline-only ``extra`` keys)."""

    factory: Callable[[], type]  # lazy: importing tfmq pulls in torch
    extra: dict[str, Any]
    exclude: tuple[str, ...] = ("version",)


def _train_config():
    from tfmq.diffusion.training import TrainConfig

    return TrainConfig


def _quant_config():
    from tfmq.quant.config import QuantConfig

    return QuantConfig


# Every key of params.yaml. Comments on the values live in params.yaml itself.
SCHEMA: dict[str, Any] = {
    "data": {"root": STR, "path": STR, "check_counts": BOOL},
    "train_fp": DataclassSection(_train_config, {"out_dir": STR}),
    "train_fp_class": DataclassSection(_train_config, {"out_dir": STR}),
    "classifier": {"path": STR, "epochs": INT, "batch_size": INT, "lr": FLOAT, "width": INT, "seed": INT},
    "sampler": {"name": choice(*SAMPLERS), "num_inference_steps": INT, "eta": FLOAT},
    "model": {"fp_dir": STR},
    "calib_data": {"out_dir": STR, "num_samples": INT, "batch_size": INT, "seed": INT},
    "quant": "QuantConfig",  # validated by tfmq.QuantConfig.from_dict (strict)
    "quant_out": {"dir": STR},
    "reference": {"dir": STR, "split": choice("train", "test"), "num_images": INT, "seed": INT},
    "eval": {
        "out_dir": STR,
        "num_samples": INT,
        "batch_size": INT,
        "seed": INT,
        "extractor": STR,
        "inception_weights": STR | NULL,
        "num_bootstrap": INT,
        "grid_images": INT,
        "temporal_samples": INT,
        "activation_layers": INT,
    },
    "grid": {"methods": METHOD_LIST, "bits": BITS_LIST},
    "report": {"path": STR},
    "mlflow": {"experiment": STR, "tracking_uri": STR | NULL},
}


def _allowed(section: Any) -> list[str]:
    if isinstance(section, dict):
        return sorted(section)
    if isinstance(section, DataclassSection):
        cls = section.factory()
        return sorted({f.name for f in dataclasses.fields(cls)} - set(section.exclude) | set(section.extra))
    return []


def _check_mapping(d: Any, schema: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ParamsError(f"params: {where or 'the file'} is a {_type_name(d)}, expected a mapping with keys "
                          f"{', '.join(sorted(schema))}")
    unknown = sorted(set(d) - set(schema))
    if unknown:
        inside = f" in '{where}'" if where else ""
        raise ParamsError(f"params: unknown key '{_join(where, unknown[0])}'; allowed keys{inside}: {', '.join(sorted(schema))}")
    missing = sorted(set(schema) - set(d))
    if missing:
        raise ParamsError(f"params: missing key '{_join(where, missing[0])}' (every key is required; see the "
                          f"committed params.yaml for its default)")
    out = {}
    for k, spec in schema.items():
        key = _join(where, k)
        if isinstance(spec, dict):
            out[k] = _check_mapping(d[k], spec, key)
        elif isinstance(spec, DataclassSection):
            out[k] = _check_dataclass(d[k], spec, key)
        elif spec == "QuantConfig":
            out[k] = _check_quant(d[k], key)
        else:
            out[k] = spec.check(d[k], key)
    return out


def _join(where: str, k: str) -> str:
    return f"{where}.{k}" if where else k


def _check_dataclass(d: Any, spec: DataclassSection, where: str) -> dict[str, Any]:
    cls = spec.factory()
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in spec.exclude}
    allowed = sorted(set(fields) | set(spec.extra))
    if not isinstance(d, dict):
        raise ParamsError(f"params: {where} is a {_type_name(d)}, expected a mapping with keys {', '.join(allowed)}")
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise ParamsError(f"params: unknown key '{where}.{unknown[0]}'; allowed keys in '{where}': {', '.join(allowed)}")
    for k, kind in spec.extra.items():
        if k not in d:
            raise ParamsError(f"params: missing key '{where}.{k}'")
        kind.check(d[k], f"{where}.{k}")
    for name, f in fields.items():
        if name in d:
            _check_like_default(d[name], f, f"{where}.{name}")
    kwargs = {k: v for k, v in d.items() if k in fields}
    try:
        cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ParamsError(f"params: {where}: {e}") from None
    return dict(d)


def _check_like_default(v: Any, f: dataclasses.Field, key: str) -> None:
    """Type-check a dataclass field against the type of its default value."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    else:
        return
    if default is None:
        return
    kinds = {bool: BOOL, int: INT, float: FLOAT, str: STR, dict: MAPPING, tuple: FLOAT_PAIR}
    kind = kinds.get(type(default))
    if kind is not None:
        kind.check(v, key)


def _check_quant(d: Any, where: str) -> dict[str, Any]:
    from tfmq.quant.config import ConfigError, QuantConfig

    try:
        QuantConfig.from_dict(d)
    except (ConfigError, TypeError, ValueError) as e:
        msg = str(e)
        if re.match(r"[a-z_]+(\.[a-z_]+)*=", msg):  # "recon.iters=...": name the full params key
            msg = f"{where}.{msg}"
        elif not msg.startswith(where):
            msg = f"{where}: {msg}"
        raise ParamsError(f"params: {msg}") from None
    return dict(d)


# --- public API ---------------------------------------------------------------------------------

def load_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    """Read and validate params.yaml; raise ParamsError (one line, naming the key) when it is invalid."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"params: {path} not found; pass --config <params.yaml> or run from the repo root") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"params: {path} is not valid YAML: {' '.join(str(e).split())}") from None
    return _check_mapping(raw, SCHEMA, "")


def setting_name(method: str, bits: str) -> str:
    """``tfmq-W4A8``: the name of a grid setting in paths, DVC stage names and MLflow run names."""
    if not re.fullmatch(r"[a-z0-9]+", method) or not re.fullmatch(r"W\d+A\d+", bits):
        raise ParamsError(f"bad setting method={method!r} bits={bits!r}; expected e.g. tfmq and W4A8")
    return f"{method}-{bits}"


def default_bits(params: dict[str, Any]) -> str:
    """The bits name of the ``quant`` section itself (``quant.weight_bits``/``act_bits``)."""
    q = params["quant"]
    return f"W{q['weight_bits']}A{q['act_bits'] if q['act_bits'] is not None else 32}"
