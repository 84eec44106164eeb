"""Pre-flight checks: every input file a command will read exists and is what it claims, before any flow starts.

A missing FP model, dataset, Inception weights file or a truncated/foreign quantized checkpoint is
ONE line naming the params key and the file (CLI exit code 2), instead of a traceback after
minutes of quantization. Outputs of earlier stages are checked only by the commands that read them.
"""
from __future__ import annotations

import json
from pathlib import Path

from flows.params import Params, ParamsError
from tasks.setting import Setting

IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class InputError(ParamsError):
    """An input path named in params.yaml (or derived from it) is missing or unreadable."""


def _need_dir(key: str, path: str, hint: str, inside: tuple[str, ...] = ()) -> None:
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{key}={path!r}: directory not found; {hint}")
    missing = [s for s in inside if not (p / s).exists()]
    if missing:
        raise InputError(f"{key}={path!r}: lacks {', '.join(missing)}; {hint}")


def _need_file(key: str, path: str | None, hint: str) -> None:
    if not path or not Path(path).is_file():
        raise InputError(f"{key}={path!r}: file not found; {hint}")


def dataset_source(params: Params) -> None:
    """``data.root``: the four IDX files (raw or .gz) that ``prepare-data`` reads."""
    root = params.data.root
    missing = [f for f in IDX_FILES if not (Path(root) / f).is_file() and not (Path(root) / f"{f}.gz").is_file()]
    if missing:
        raise InputError(f"data.root={root!r}: lacks {', '.join(missing)}[.gz]; fix data.root in params.yaml "
                         "(Fashion-MNIST: apt-get install dataset-fashion-mnist)")


def dataset(params: Params) -> None:
    _need_file("data.path", params.data.path, "run `tfmq prepare-data` (dvc repro prepare_data) first")


def fp_model(params: Params) -> None:
    _need_dir("model.fp_dir", params.model.fp_dir, "expected a diffusers folder with unet/ and scheduler/; "
              "fix model.fp_dir in params.yaml or run `tfmq train`", inside=("unet/config.json", "scheduler"))


def calib_set(params: Params) -> None:
    _need_dir("calib_data.out_dir", params.calib_data.out_dir, "run `tfmq calib-data` (dvc repro calib_data) first")


def extractor_weights(params: Params) -> None:
    """``eval.extractor`` is known; ``eval.inception_weights`` is a file when that extractor needs one."""
    from tfmq.evaluation.extractors import get_extractor_spec

    e = params.eval
    try:
        spec = get_extractor_spec(e.extractor)
    except (KeyError, ValueError) as err:
        raise InputError(f"eval.extractor={e.extractor!r}: {' '.join(str(err).split())}") from None
    if spec.needs_weights_path:
        _need_file("eval.inception_weights", e.inception_weights,
                   f"eval.extractor={e.extractor} needs the local pt_inception-2015-12-05-6726825d.pth; "
                   "set eval.inception_weights in params.yaml (or use eval.extractor: efficientnet-lite0)")


def reference_file(params: Params) -> str:
    """``<reference.dir>/<split>_<extractor>.safetensors``: the reference statistics every row is scored against."""
    from tfmq.evaluation.extractors import get_extractor_spec

    name = get_extractor_spec(params.eval.extractor).name
    return str(Path(params.reference.dir) / f"{params.reference.split}_{name}.safetensors")


def eval_inputs(params: Params) -> None:
    extractor_weights(params)
    _need_file("reference.dir", reference_file(params), "run `tfmq reference-stats` (dvc repro reference_stats) first")
    _need_dir("classifier.path", params.classifier.path, "run `tfmq train-classifier` first")


def checkpoint(setting: Setting) -> None:
    """The setting's final checkpoint: a complete tfmq checkpoint of this very method and bits."""
    from tfmq import CheckpointError, verify_checkpoint

    path = setting.checkpoint
    hint = f"re-run `tfmq quantize --method {setting.method} --bits {setting.bits}`"
    if setting.name != f"{setting.method}-{setting.bits}":
        hint = f"re-run `tfmq quantize --name {setting.name}`"
    try:
        header = verify_checkpoint(path)  # header and a complete weights file, without loading tensors
    except CheckpointError as e:
        raise InputError(f"{' '.join(str(e).split())}; {hint}") from None
    if (header.get("method"), header.get("bits")) != (setting.method, setting.bits):
        raise InputError(f"{path}: checkpoint is {header.get('method')}-{header.get('bits')}, expected "
                         f"{setting.method}-{setting.bits}; {hint}")


def run_inputs(command: str, params: Params, setting: Setting | None = None) -> None:
    """Raise InputError for the first missing input of ``command`` (the CLI's sub-command name)."""
    if command in ("check", "compare"):  # the whole run: its sources (produced outputs are rebuilt)
        if command == "check":
            fp_model(params)
        if not Path(params.data.path).is_file():
            dataset_source(params)
        extractor_weights(params)
    elif command == "prepare-data":
        dataset_source(params)
    elif command in ("train", "train-classifier"):
        dataset(params)
    elif command == "reference-stats":
        dataset(params)
        extractor_weights(params)
    elif command == "calib-data":
        fp_model(params)
    elif command in ("quantize", "run"):
        fp_model(params)
        calib_set(params)
        if command == "run":
            eval_inputs(params)
    elif command == "evaluate":
        assert setting is not None
        if setting.kind == "real":
            dataset(params)
        else:
            fp_model(params)
        eval_inputs(params)
        if setting.quantized:
            checkpoint(setting)


def summary(params: Params, settings: list[Setting]) -> str:
    """What ``tfmq check`` prints on success: the run's inputs and settings, one line each."""
    from tfmq.evaluation.extractors import get_extractor_spec

    spec = get_extractor_spec(params.eval.extractor)
    lines = [f"model.fp_dir: {params.model.fp_dir} ({json.loads((Path(params.model.fp_dir) / 'unet' / 'config.json').read_text())['_class_name']})",
             f"dataset: {params.data.path if Path(params.data.path).is_file() else params.data.root}",
             f"extractor: {spec.name}" + (f" (weights {params.eval.inception_weights})" if spec.needs_weights_path else ""),
             f"settings: {len(settings)} ({', '.join(s.name for s in settings)})"]
    return "\n".join(lines)
