"""params.yaml: load it and validate it strictly, so a typo fails before any compute starts.

Every hyper-parameter of the pipeline lives in params.yaml (DVC's single source of parameters).
The schema is a set of strict pydantic models (``extra="forbid"``, no type coercion, frozen), the
llm-compressor habit; pydantic's first error becomes ONE line that names the params key, the bad
value, what is expected and where to fix it. Sections that mirror a library dataclass
(``train_fp`` -> ``tfmq.diffusion.training.TrainConfig``, ``quant`` -> ``tfmq.QuantConfig``) take
their keys and checks from the dataclass, so the two cannot drift apart.

``load_params`` returns a frozen :class:`Params`; the CLI loads it once and passes it (and the
typed sections) down to the flows and tasks. Why pydantic rather than the former home-made schema:
about the same length, but the result is a typed, frozen object Prefect can record, the type checks
are pydantic's (strict: no "10" -> 10, no "yes" -> true), and only the message formatting is ours.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

SAMPLERS = ("ddim", "ddpm", "pndm", "plms")
_FILE = "<params file>"  # replaced by the path given to load_params


class ParamsError(ValueError):
    """params.yaml is invalid; the one-line message names the key, the bad value and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Data(Section):
    root: str
    path: str
    check_counts: bool


class Classifier(Section):
    path: str
    epochs: int
    batch_size: int
    lr: float
    width: int
    seed: int


class Sampler(Section):
    name: Literal[SAMPLERS]  # type: ignore[valid-type]
    num_inference_steps: int
    eta: float
    guidance_scale: float

    @field_validator("guidance_scale")
    @classmethod
    def _scale(cls, v: float) -> float:
        if not v >= 1.0:
            raise ValueError(f"sampler.guidance_scale={v!r}: expected a number >= 1 (1 = no classifier-free "
                             f"guidance; paper: 3.0 for the class-conditional LDM-4); fix it in {_FILE}")
        return v


_MODEL_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"


def _model_name(key: str, v: str) -> str:
    if not re.fullmatch(_MODEL_NAME, v):
        raise ValueError(f"{key}={v!r}: expected a folder name under model.root (letters, digits, '.', '_', '-'); "
                         f"fix it in {_FILE}")
    return v


class Model(Section):
    root: str
    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _model_name("model.name", v)

    @property
    def fp_dir(self) -> str:
        """``<root>/<name>``: the folder the ``*_exp`` stages and CLI calls without ``--model`` quantize."""
        return str(Path(self.root) / self.name)


class CalibData(Section):
    dir: str
    num_samples: int
    batch_size: int
    seed: int
    prompts: str


class QuantOut(Section):
    dir: str
    shared_weights: str | None = None  # weight-stage store (relative: under the repo root); null: every setting computes its own
    # the most MiB one reconstruction unit's cached inputs + targets hold in memory (more goes to files beside
    # the setting's progress); null: all in memory. Not a stage dependency: it changes no number.
    memory_budget_mb: float | None = None

    @field_validator("memory_budget_mb")
    @classmethod
    def _budget(cls, v: float | None) -> float | None:
        if v is not None and not v >= 0:
            raise ValueError(f"quant_out.memory_budget_mb={v!r}: expected a number of MiB >= 0, or null (all in memory); "
                             f"fix it in {_FILE}")
        return v


class Reference(Section):
    dir: str
    split: Literal["train", "test"]
    num_images: int
    seed: int
    images: str | None = None  # an image folder or a guided-diffusion reference batch (.npz, arr_0): the user's data
    stats: str | None = None  # precomputed FID statistics (.npz with mu, sigma): FID only

    @model_validator(mode="after")
    def _one_source(self) -> "Reference":
        if self.images is not None and self.stats is not None:
            raise ValueError(f"reference.images={self.images!r} and reference.stats={self.stats!r}: expected at most "
                             f"one reference source (images give FID, sFID and KID; stats FID alone); fix it in {_FILE}")
        return self

    @property
    def source(self) -> str:
        """``idx`` (the embedded dataset's split), ``images`` or ``stats``."""
        return "images" if self.images is not None else "stats" if self.stats is not None else "idx"


class Eval(Section):
    out_dir: str
    num_samples: int
    batch_size: int
    seed: int
    extractor: str
    inception_weights: str | None
    clip_model: str | None
    lpips_backbone: str | None = None
    domain_classifier: str | None = "auto"  # auto: classifier.path where it matches the model's images; null; a folder
    prompts: str
    num_bootstrap: int
    grid_images: int
    temporal_samples: int
    activation_layers: int

    @field_validator("num_samples", "batch_size", "num_bootstrap", "grid_images", "temporal_samples", "activation_layers")
    @classmethod
    def _counts(cls, v: int, info) -> int:
        least = {"num_samples": 2, "grid_images": 0, "activation_layers": 0}.get(info.field_name, 1)  # FID needs 2 samples
        if v < least:
            raise ValueError(f"eval.{info.field_name}={v!r}: expected an integer >= {least}; fix it in {_FILE}")
        return v


class Grid(Section):
    models: list[str]
    methods: list[str]
    bits: list[str]

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"grid.models={v!r}: expected a non-empty list of folder names under model.root, "
                             f"no repeats; fix grid.models in {_FILE}")
        for name in v:
            _model_name("grid.models", name)
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        from tfmq import RECIPES

        bad = [m for m in v if m not in RECIPES]
        if not v or bad or len(set(v)) != len(v):
            raise ValueError(f"grid.methods={v!r}: expected a non-empty list of registered recipes "
                             f"({', '.join(RECIPES)}), no repeats; fix grid.methods in {_FILE}")
        return v

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: list[str]) -> list[str]:
        from tfmq import ConfigError

        try:  # the canonical name (tfmq's bits_name) is what dvc.yaml's matrix puts in the out paths
            ok = bool(v) and len(set(v)) == len(v) and all(bits_name(b) == b for b in v)
        except ConfigError:
            ok = False
        if not ok:
            raise ValueError(f"grid.bits={v!r}: expected a non-empty list of bit settings like W8A8, W4A8, W4A32 "
                             f"(W<weight bits>A<activation bits>, A32 = weight-only), no repeats; fix grid.bits in {_FILE}")
        return v


class Study(Section):
    """One named setting beyond the grid: a recipe, bits and ``quant`` overrides (ablation switches, layer policy)."""

    method: str
    bits: str
    quant: dict[str, Any]


class Studies(Section):
    """Named settings on ``model`` (the poster's inducement / ablation / equal-footing / activation-stress tables)."""

    model: str
    settings: dict[str, Study]

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return _model_name("studies.model", v)

    @field_validator("settings")
    @classmethod
    def _settings(cls, v: dict[str, Study]) -> dict[str, Study]:
        from tfmq import RECIPES, ConfigError

        for name, st in v.items():
            where = f"studies.settings.{name}"
            if not re.fullmatch(_MODEL_NAME, name):
                raise ValueError(f"{where}: expected a file name (letters, digits, '.', '_', '-'); fix it in {_FILE}")
            if st.method not in RECIPES:
                raise ValueError(f"{where}.method={st.method!r}: expected a registered recipe ({', '.join(RECIPES)}); "
                                 f"fix it in {_FILE}")
            try:
                ok = bits_name(st.bits) == st.bits
            except ConfigError:
                ok = False
            if not ok:
                raise ValueError(f"{where}.bits={st.bits!r}: expected a bit setting like W8A8, W4A8, W4A32; fix it in {_FILE}")
            bad = sorted({"method", "weight_bits", "act_bits"} & set(st.quant))
            if bad:
                raise ValueError(f"{where}.quant sets {', '.join(bad)}: expected only other quant keys (method and bits "
                                 "are the study's own); "
                                 f"fix it in {_FILE}")
        return v


class Report(Section):
    path: str
    num_bootstrap: int = 2000  # rounds of every paired comparison (shared resampled indices for all settings)
    beside_bootstrap: int = 300  # rounds of the set metrics shown beside the deciding one (FID, KID where they do not decide)
    metric: str = "domain_fd"  # the one metric that decides every claim's verdict (tasks.claims.Rules)
    fallback_metric: str = "kid"  # for a model without a domain classifier
    alpha: float = 0.05  # family-wise error of the claims' tests (Holm)

    @field_validator("metric", "fallback_metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        from tfmq.evaluation.comparisons import METRICS  # here, not at the top: reading params must not import torch

        if v not in METRICS:
            raise ValueError(f"{v!r} is not a comparison metric; expected one of {sorted(METRICS)}")
        return v

    @field_validator("num_bootstrap", "beside_bootstrap")
    @classmethod
    def _rounds(cls, v: int) -> int:
        if v < 100:
            raise ValueError(f"{v} rounds; expected >= 100 (2 000 for the claims: a Holm threshold of 0.05 / 40 "
                             "needs the tails)")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not 0.0 < v < 0.5:
            raise ValueError(f"alpha={v}; expected a family-wise error level in (0, 0.5), e.g. 0.05")
        return v


class ScaleOut(Section):
    """Where the evaluate and calib_data stages sample: in their own process, or as shards on Dask (flows/sharded.py).

    No stage lists it as a dependency: the shard count changes no output (tests/test_sharded_stages.py)."""

    shards: int  # 1: in the stage's process; N > 1: N Prefect tasks on a DaskTaskRunner
    address: str | None  # an existing Dask scheduler (tcp://host:8786); null: $TFMQ_DASK_ADDRESS, else a LocalCluster
    workers: int | None  # LocalCluster worker processes; null: cores // threads
    threads: int  # torch threads per worker
    scratch: str  # shard files: <scratch>/eval/<model>/<setting>, <scratch>/calib/<model>; removed after the merge

    @field_validator("shards", "threads")
    @classmethod
    def _positive(cls, v: int, info) -> int:
        if v < 1:
            raise ValueError(f"scale_out.{info.field_name}={v!r}: expected an integer >= 1; fix it in {_FILE}")
        return v

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"scale_out.workers={v!r}: expected an integer >= 1 or null (cores // threads); "
                             f"fix it in {_FILE}")
        return v

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z][a-z0-9+]*://\S+", v):
            raise ValueError(f"scale_out.address={v!r}: expected a Dask scheduler address like tcp://10.0.0.5:8786 "
                             f"or null; fix it in {_FILE}")
        return v

    @property
    def sharded(self) -> bool:
        """Whether the stages map shards over Dask (more than one shard, or a scheduler to run them on)."""
        import os

        return self.shards > 1 or bool(self.address or os.environ.get("TFMQ_DASK_ADDRESS"))


class Mlflow(Section):
    experiment: str
    tracking_uri: str | None


def _dataclass_section(cls: type, name: str) -> type[Section]:
    """A section with the fields of a library dataclass (all required) plus ``out_dir``."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {"out_dir": (str, ...)}
    for f in dataclasses.fields(cls):
        if f.name == "version":
            continue
        tp = hints[f.name]
        if typing.get_origin(tp) is tuple:  # YAML has lists: accept a list, but strict items
            tp = Annotated[tp, Field(strict=False)]
        fields[f.name] = (tp, ...)

    return create_model(name, __base__=Section, **fields)


def _train_section() -> type[Section]:
    """``train_fp`` / ``train_fp_class`` / ``train_ldm*``: the fields of ``TrainConfig`` plus ``out_dir``."""
    from tfmq.diffusion.training import TrainConfig

    return _dataclass_section(TrainConfig, "TrainSection")


def _autoencoder_section() -> type[Section]:
    """``autoencoder``: the fields of ``tfmq.diffusion.autoencoder.AutoencoderConfig`` plus ``out_dir``."""
    from tfmq.diffusion.autoencoder import AutoencoderConfig

    return _dataclass_section(AutoencoderConfig, "AutoencoderSection")


def _vae_section() -> type[Section]:
    """``vae``: the fields of ``tfmq.diffusion.vae.KLAutoencoderConfig`` plus ``out_dir``."""
    from tfmq.diffusion.vae import KLAutoencoderConfig

    return _dataclass_section(KLAutoencoderConfig, "VaeSection")


TrainSection = _train_section()
AutoencoderSection = _autoencoder_section()
VaeSection = _vae_section()


class TextEncoder(Section):
    hidden_size: int
    num_layers: int
    num_heads: int

    @model_validator(mode="after")
    def _shape(self) -> "TextEncoder":
        if min(self.hidden_size, self.num_layers, self.num_heads) < 1 or self.hidden_size % self.num_heads:
            raise ValueError(f"train_sd.text_encoder: hidden_size={self.hidden_size}, num_layers={self.num_layers}, "
                             f"num_heads={self.num_heads}: expected positive integers with hidden_size divisible by "
                             f"num_heads; fix it in {_FILE}")
        return self


class TextTrainSection(TrainSection):  # type: ignore[valid-type, misc]
    """``train_sd``: a ``TrainSection`` plus the prompt dropout (the "" prompt of CFG) and the text encoder's shape."""

    prompt_dropout: float
    text_encoder: TextEncoder

    @field_validator("prompt_dropout")
    @classmethod
    def _dropout(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"train_sd.prompt_dropout={v!r}: expected a number in (0, 1), e.g. 0.1 (guidance needs "
                             f"the '' prompt); fix it in {_FILE}")
        return v


#: the FP training sections: name -> what they train
TRAIN_SECTIONS = ("train_fp", "train_fp_class", "train_ldm", "train_ldm_class", "train_sd")


class Params(Section):
    """The whole params.yaml, validated (every key required, unknown keys refused)."""

    data: Data
    train_fp: TrainSection  # type: ignore[valid-type]
    train_fp_class: TrainSection  # type: ignore[valid-type]
    autoencoder: AutoencoderSection  # type: ignore[valid-type]
    train_ldm: TrainSection  # type: ignore[valid-type]
    train_ldm_class: TrainSection  # type: ignore[valid-type]
    vae: VaeSection  # type: ignore[valid-type]
    train_sd: TextTrainSection
    classifier: Classifier
    sampler: Sampler
    model: Model
    calib_data: CalibData
    quant: dict[str, Any]  # exactly as written; tfmq.QuantConfig.from_dict validates it (strict)
    quant_out: QuantOut
    reference: Reference
    eval: Eval
    grid: Grid
    studies: Studies
    report: Report
    scale_out: ScaleOut
    mlflow: Mlflow

    @field_validator("quant")
    @classmethod
    def _quant(cls, v: dict[str, Any]) -> dict[str, Any]:
        from tfmq import ConfigError, QuantConfig

        try:
            QuantConfig.from_dict(v)
        except (ConfigError, TypeError, ValueError) as e:
            msg = str(e)
            if re.match(r"[a-z_]+(\.[a-z_]+)*=", msg):  # "recon.iters=...": name the full params key
                msg = f"quant.{msg}"
            elif not msg.startswith("quant"):
                msg = f"quant: {msg}"
            raise ValueError(f"{msg}; fix it in {_FILE}") from None
        return v

    @model_validator(mode="after")
    def _train_configs(self) -> "Params":
        from tfmq.diffusion.training import TrainConfig

        from tfmq.diffusion.autoencoder import AutoencoderConfig

        for name in TRAIN_SECTIONS:  # the dataclass's own checks (__post_init__)
            try:
                TrainConfig(**getattr(self, name).model_dump(exclude={"out_dir", "prompt_dropout", "text_encoder"}))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{name}: {e}; fix it in {_FILE}") from None
        try:
            AutoencoderConfig(**self.autoencoder.model_dump(exclude={"out_dir"}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"autoencoder: {e}; fix it in {_FILE}") from None
        from tfmq.diffusion.vae import KLAutoencoderConfig

        try:
            KLAutoencoderConfig(**self.vae.model_dump(exclude={"out_dir"}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"vae: {e}; fix it in {_FILE}") from None
        return self

    @model_validator(mode="after")
    def _studies(self) -> "Params":
        from tfmq import ConfigError, QuantConfig
        from tfmq.quant.config import merge_quant

        grid_names = {f"{m}-{b}" for m in self.grid.methods for b in self.grid.bits}
        for name, st in self.studies.settings.items():
            if self.studies.model in self.grid.models and name in grid_names:
                raise ValueError(f"studies.settings.{name}: {self.studies.model}/{name} is already a grid setting; "
                                 f"expected another name (e.g. {name.rsplit('-', 1)[0]}-variant-{st.bits}); fix it in {_FILE}")
            w, a = parse_bits_pair(st.bits)
            try:
                QuantConfig.from_dict({**merge_quant(self.quant, st.quant), "method": st.method,
                                       "weight_bits": w, "act_bits": a})
            except (ConfigError, TypeError, ValueError) as e:
                raise ValueError(f"studies.settings.{name}.quant: {e}; fix it in {_FILE}") from None
        return self


# --- one error line from pydantic's report ------------------------------------------------------

_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
             "string_type": "a string", "dict_type": "a mapping", "list_type": "a list", "tuple_type": "a list",
             "model_type": "a mapping", "int_from_float": "an integer"}


def _a_type(v: Any) -> str:
    return "null" if v is None else {"str": "a string", "int": "an integer", "float": "a number", "bool": "a boolean",
                                     "list": "a list", "dict": "a mapping"}.get(type(v).__name__, type(v).__name__)


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = Params
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        model = field.annotation
    return model


def _one_line(err: dict[str, Any], raw: Any) -> str:
    loc = tuple(p for p in err["loc"] if isinstance(p, str))
    key, kind, value = ".".join(loc), err["type"], err.get("input")
    if len(loc) < len(err["loc"]):  # an item of a list (train_fp.betas): name the whole value
        for part in loc:
            raw = raw.get(part) if isinstance(raw, dict) else None
        n = len(typing.get_args(_model_at(loc[:-1]).model_fields[loc[-1]].annotation)) if _model_at(loc[:-1]) else 0
        return f"params: {key}={raw!r}: expected a list of {n} numbers; fix {key} in {_FILE}"
    if kind == "value_error":  # our validators' messages already start with the key
        return f"params: {err['msg'].removeprefix('Value error, ')}"
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        inside = f" in '{'.'.join(loc[:-1])}'" if loc[:-1] else ""
        allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
        return f"params: unknown key '{key}'; allowed keys{inside}: {allowed}"
    if kind == "missing":
        return (f"params: missing key '{key}' in {_FILE} (every key is required; copy it with its default "
                "from the committed params.yaml)")
    if not loc:
        return f"params: {_FILE} is {_a_type(value)}, expected a mapping with keys {', '.join(Params.model_fields)}"
    if kind == "literal_error":
        expected = "one of " + err["ctx"]["expected"].replace("'", "")
    else:
        expected = _EXPECTED.get(kind, err["msg"][0].lower() + err["msg"][1:])
        parent = _model_at(loc[:-1])
        if parent is not None and type(None) in typing.get_args(parent.model_fields[loc[-1]].annotation):
            expected += " or null"
    return f"params: {key}={value!r} is {_a_type(value)}, expected {expected}; fix {key} in {_FILE}"


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError (one line, naming the key) when it is invalid."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"params: {path} not found; pass --config <params.yaml> or run from the repo root") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"params: {path} is not valid YAML: {' '.join(str(e).split())}") from None
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_one_line(e.errors()[0], raw).replace(_FILE, str(path))) from None


def bits_name(bits: str) -> str:
    """``"w4a8" -> "W4A8"``, ``"W4A64" -> "W4A32"``: tfmq's own parse and name (``parse_bits``, ``QuantConfig.bits_name``)."""
    from tfmq import QuantConfig, parse_bits

    w, a = parse_bits(bits)
    return QuantConfig(weight_bits=w, act_bits=a).bits_name


def parse_bits_pair(bits: str) -> tuple[int, int | None]:
    """``"W4A8" -> (4, 8)`` (tfmq's ``parse_bits``)."""
    from tfmq import parse_bits

    return parse_bits(bits)
