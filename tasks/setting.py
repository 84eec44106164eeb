"""One row of the results table as ONE immutable object, built where a run starts (CLI or ``compare``).

A :class:`Setting` holds everything that names and places a (model, method, bits) run: its
``tfmq.QuantConfig`` (the ``quant`` section with method and bits replaced, built once), its model
folder ``<model.root>/<model>``, calibration set ``<calib_data.dir>/<model>``, checkpoint and results
directories ``quant/<model>/<name>``, ``results/<model>/<name>`` and metrics path
``results/metrics/<model>/<name>.json``. The flows pass it to the tasks and the
tasks pass ``setting.config`` to ``tfmq``; nothing downstream re-parses bits or re-builds the config.
Bits are parsed by ``tfmq.parse_bits`` and named by ``QuantConfig.bits_name`` only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

from tfmq import QuantConfig, parse_bits
from tfmq.quant.config import merge_quant

if TYPE_CHECKING:  # tasks never import flows; the flows pass the validated params in
    from flows.params import Params

#: checkpoint directory (``tfmq.save``) written by each quantization stage under quant/<setting>/
STAGE_FILES = {"recon_tib": "tib", "recon_blocks": "blocks", "calibrate_activations": "model"}


@dataclass(frozen=True)
class Setting:
    """A quantized setting (``config`` set), the FP model (``kind="fp"``) or the real-data row (``kind="real"``).

    Paths are strings (Prefect serializes task parameters as JSON). ``method``/``bits`` are what the
    metrics JSON, the MLflow tags and the table show: ``fp``/``W32A32`` and ``real``/``data`` for the two
    unquantized rows.
    """

    name: str  # tfmq-W4A8, exp, fp, real: the file name under quant/<model>/, results/<model>/, results/metrics/<model>/
    kind: str  # "quantized" | "fp" | "real"
    method: str
    bits: str
    model: str  # the model folder's name under model.root ("" for the real-data row)
    fp_dir: str  # <model.root>/<model>: the FP diffusers folder every row of this model starts from
    calib_dir: str | None  # <calib_data.dir>/<model>: its FP calibration trajectories
    quant_dir: str | None  # quant/<model>/<name> (quantized only)
    results_dir: str  # results/<model>/<name>: plots/, temporal.csv
    metrics_path: str  # results/metrics/<model>/<name>.json: the DVC metrics file
    config: QuantConfig | None = None
    paired_path: str | None = None  # results/paired/<model>/<name>.safetensors: samples + features for paired comparisons
    memory_budget_mb: float | None = None  # quant_out.memory_budget_mb: the most MiB one unit's cache holds in memory

    @property
    def fp_paired_path(self) -> str | None:
        """The FP row's paired file of this model (the noise every setting shares)."""
        return None if self.paired_path is None else str(Path(self.paired_path).with_name("fp.safetensors"))

    @property
    def quantized(self) -> bool:
        return self.config is not None

    @property
    def checkpoint(self) -> str | None:
        """The final quantized checkpoint (``tfmq.load``-able directory)."""
        return None if self.quant_dir is None else str(Path(self.quant_dir) / STAGE_FILES["calibrate_activations"])


class SettingError(ValueError):
    """A setting name is not usable as a file name."""


def _checked_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise SettingError(f"--name={name!r}: expected a file name (letters, digits, '.', '_', '-'), e.g. exp")
    return name


def model_name(params: "Params", model: str | None) -> str:
    """``--model`` (default ``model.name``), refused unless it is a plain folder name under ``model.root``."""
    model = params.model.name if model is None else model
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model):
        raise SettingError(f"--model={model!r}: expected a folder name under model.root={params.model.root!r}, "
                           f"e.g. {params.model.name}")
    return model


def _places(params: "Params", model: str, name: str) -> dict[str, str]:
    return {"model": model, "fp_dir": str(Path(params.model.root) / model),
            "calib_dir": str(Path(params.calib_data.dir) / model),
            "results_dir": str(Path(params.eval.out_dir) / model / name),
            "metrics_path": str(Path(params.eval.out_dir) / "metrics" / model / f"{name}.json"),
            "paired_path": str(Path(params.eval.out_dir) / "paired" / model / f"{name}.safetensors")}


def quantized_setting(params: "Params", method: str | None = None, bits: str | None = None,
                      name: str | None = None, model: str | None = None,
                      overrides: dict | None = None) -> Setting:
    """The setting of ``method``/``bits`` (default: the ``quant`` section's own) on ``model`` (default:
    ``model.name``), named ``<method>-<bits>``; ``overrides``: quant keys to replace (a study's)."""
    q = merge_quant(dict(params.quant), overrides or {})
    if method is not None:
        q["method"] = method
    if bits is not None:
        q["weight_bits"], q["act_bits"] = parse_bits(bits)
    try:
        config = QuantConfig.from_dict(q)
    except ValueError as e:  # the quant section itself is valid, so method or bits is to blame
        raise SettingError(f"{e} (setting method={q['method']!r} bits={bits!r})") from None
    name = _checked_name(name or f"{config.method}-{config.bits_name}")
    model = model_name(params, model)
    return Setting(name=name, kind="quantized", method=config.method, bits=config.bits_name,
                   quant_dir=str(Path(params.quant_out.dir) / model / name), config=config,
                   memory_budget_mb=params.quant_out.memory_budget_mb, **_places(params, model, name))


def unquantized_setting(params: "Params", kind: str, name: str | None = None, model: str | None = None) -> Setting:
    """``kind="fp"``: the FP model's row; ``kind="real"``: real images scored like samples (the floor, one for
    all models: results/metrics/real.json)."""
    method, bits = {"fp": ("fp", "W32A32"), "real": ("real", "data")}[kind]
    name = _checked_name(name or kind)
    if kind == "real":
        return Setting(name=name, kind=kind, method=method, bits=bits, model="", fp_dir="", calib_dir=None,
                       quant_dir=None, results_dir=str(Path(params.eval.out_dir) / name),
                       metrics_path=str(Path(params.eval.out_dir) / "metrics" / f"{name}.json"))
    return Setting(name=name, kind=kind, method=method, bits=bits, quant_dir=None,
                   **_places(params, model_name(params, model), name))


def study_setting(params: "Params", name: str) -> Setting:
    """The named study ``studies.settings.<name>`` on ``studies.model``."""
    st = params.studies.settings.get(name)
    if st is None:
        raise SettingError(f"--study={name!r}: expected one of studies.settings "
                           f"({', '.join(params.studies.settings) or 'none defined'})")
    return quantized_setting(params, st.method, st.bits, name=name, model=params.studies.model, overrides=st.quant)


def study_settings(params: "Params", models: list[str] | None = None) -> list[Setting]:
    """Every study (none when ``models`` is given and leaves out ``studies.model``)."""
    if models is not None and params.studies.model not in models:
        return []
    return [study_setting(params, n) for n in params.studies.settings]


def grid_settings(params: "Params", methods: list[str] | None = None, bits: list[str] | None = None,
                  models: list[str] | None = None) -> list[Setting]:
    """The model x method x bits grid (default: ``grid.*``), models outer, then bits, as in the results tables."""
    return [quantized_setting(params, m, b, model=mod) for mod in (models or params.grid.models)
            for b in (bits or params.grid.bits) for m in (methods or params.grid.methods)]
