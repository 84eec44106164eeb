"""Pre-flight checks: every input file a command will read exists and is what it claims, before any flow starts.

A missing FP model, dataset, Inception weights file or a truncated/foreign quantized checkpoint is
ONE line naming the params key and the file (CLI exit code 2), instead of a traceback after
minutes of quantization. Outputs of earlier stages are checked only by the commands that read them.
"""
from __future__ import annotations

import json
from pathlib import Path

from flows.params import Params, ParamsError
from tasks.setting import Setting, model_name
from tfmq.diffusion.pipelines import output_shape
from tfmq.evaluation.classifier import domain_classifier_for
from tfmq.evaluation.extractors import get_extractor_spec
from tfmq.evaluation.reference_data import ReferenceDataError, check_reference, load_fid_stats

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


def fp_model(params: Params, model: str | None = None) -> None:
    """``<model.root>/<model>``: a diffusers folder with unet/ and scheduler/ (and every component its
    model_index.json lists, e.g. an LDMPipeline's vqvae/)."""
    from tasks.setting import model_name

    model = model_name(params, model)
    path = str(Path(params.model.root) / model)
    key = "model.root/model.name" if model == params.model.name else f"model.root/{model}"
    hint = ("expected a diffusers folder with unet/ and scheduler/ (pixel) or an LDMPipeline folder (+ vqvae/); "
            "fix model.root / model.name / grid.models in params.yaml or run `tfmq train`")
    _need_dir(key, path, hint, inside=("unet/config.json", "scheduler"))
    index = Path(path) / "model_index.json"
    if index.is_file():
        try:
            comps = [k for k, v in json.loads(index.read_text()).items() if not k.startswith("_") and
                     isinstance(v, list) and v[0] is not None]
        except (OSError, ValueError) as e:
            raise InputError(f"{key}={path!r}: model_index.json is unreadable ({e}); {hint}") from None
        _need_dir(key, path, hint, inside=tuple(f"{c}/" for c in comps if c not in ("tokenizer",)))


def calib_set(params: Params, setting: Setting | None = None) -> None:
    """The setting's calibration set exists, was recorded with the run's sampler (name, steps, eta, guidance)
    for a UNet of this model's input shape and conditioning, and holds only finite rows."""
    from tfmq.diffusion.calibration import CalibrationSet, CalibrationSetError, verify_calibration_set

    model = setting.model if setting is not None and setting.model else params.model.name
    path = setting.calib_dir if setting is not None else str(Path(params.calib_data.dir) / model)
    _need_dir("calib_data.dir", path, f"run `tfmq calib-data --model {model}` (dvc repro calib_data) first")
    try:
        calib = CalibrationSet(path)
        unet_config = json.loads((Path(params.model.root) / model / "unet" / "config.json").read_text())
        s = params.sampler
        verify_calibration_set(calib, s.name, s.num_inference_steps, s.eta, s.guidance_scale, unet_config)
    except (OSError, ValueError, KeyError) as e:  # CalibrationSetError is a ValueError
        kind = "" if isinstance(e, CalibrationSetError) else "unreadable: "
        raise InputError(f"calib_data.dir={path!r}: {kind}{' '.join(str(e).split())}; re-record it: "
                         f"delete {path}, then `tfmq calib-data --model {model}` (dvc repro calib_data)") from None


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


def clip_model(params: Params) -> None:
    """``eval.clip_model``: null, or a local CLIP folder (``CLIPModel.save_pretrained`` + its processor: the hub's
    ``preprocessor_config.json``, or the ``processor_config.json`` that transformers 5 writes)."""
    path = params.eval.clip_model
    if path is not None:
        hint = ("expected a local CLIP folder (e.g. openai/clip-vit-base-patch32 saved with save_pretrained, with its "
                "processor) or null (prompt accuracy of the domain classifier instead)")
        _need_dir("eval.clip_model", path, hint, inside=("config.json",))
        if not any((Path(path) / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
            raise InputError(f"eval.clip_model={path!r}: lacks preprocessor_config.json (or processor_config.json); {hint}")


def lpips_backbone(params: Params) -> None:
    """``eval.lpips_backbone``: null, or a local AlexNet file LPIPS can use (and the lpips package's linear layers)."""
    path = params.eval.lpips_backbone
    if path is None:
        return
    from tfmq.evaluation.lpips import LpipsError, load_lpips

    hint = ("expected a local torchvision AlexNet state dict (alexnet-owt-7be5be79.pth, or its safetensors) or null "
            "(no LPIPS column)")
    _need_file("eval.lpips_backbone", path, hint)
    try:
        load_lpips(path)
    except LpipsError as e:
        raise InputError(f"eval.lpips_backbone={path!r}: {' '.join(str(e).split())}") from None


def prompt_files(params: Params, model: str | None, keys: tuple[str, ...]) -> None:
    """A text-guided model's prompt files (``calib_data.prompts`` / ``eval.prompts``): readable, one prompt a line."""
    from tasks.setting import model_name
    from tfmq.diffusion.pipelines import read_family

    if read_family(Path(params.model.root) / model_name(params, model)).conditioning != "text":
        return
    from tfmq.diffusion.text import read_prompts

    for key in keys:
        section, field = key.split(".")
        path = getattr(getattr(params, section), field)
        hint = ("expected a UTF-8 text file with one prompt per line or an MS-COCO captions JSON "
                "(annotations/captions_val2014.json layout): text-guided models sample these prompts")
        _need_file(key, path, hint)
        try:
            read_prompts(path)
        except ValueError as e:
            raise InputError(f"{key}={path!r}: {' '.join(str(e).split())}") from None


def image_shape(params: Params, model: str | None, idx_as_is: bool = True) -> tuple[int, int, int] | None:
    """``(C, H, W)`` of the images ``<model.root>/<model>`` makes (``output_shape``: from its folder, never assumed).
    ``None`` for the embedded IDX reference with ``idx_as_is`` (its images are used as they are: one reference for
    every model, the default run's numbers unchanged)."""
    if params.reference.source == "idx" and idx_as_is:
        return None
    return output_shape(Path(params.model.root) / model_name(params, model))


def real_row_model(params: Params) -> str:
    """The model whose output shape the one real-data row is drawn at: the first of ``grid.models``."""
    return params.grid.models[0]


def reference_file(params: Params, model: str | None = None) -> str:
    """The reference statistics a model's rows are scored against, under ``reference.dir``:
    ``<split>_<extractor>`` (the embedded IDX data: one for every model), ``<stats stem>-stats_<extractor>``
    (precomputed statistics) or ``<images stem>-<C>x<H>x<W>_<extractor>`` (a folder / npz, per output shape)."""
    name = get_extractor_spec(params.eval.extractor).name
    r = params.reference
    if r.source == "idx":
        stem = r.split
    elif r.source == "stats":
        stem = f"{Path(r.stats).stem}-stats"
    else:
        c, h, w = image_shape(params, model or real_row_model(params))
        stem = f"{Path(r.images).stem or Path(r.images).name}-{c}x{h}x{w}"
    return str(Path(r.dir) / f"{stem}_{name}.safetensors")


def reference_targets(params: Params) -> dict[str, tuple[int, int, int] | None]:
    """Every reference file the run's models need (``reference_file``) and the image shape it is computed at."""
    models = [m for m in dict.fromkeys([*params.grid.models, params.model.name, params.studies.model])
              if (Path(params.model.root) / m / "unet" / "config.json").is_file()]
    if params.reference.source == "idx" or not models:
        return {reference_file(params): None}
    return {reference_file(params, m): image_shape(params, m) for m in models}


def reference_source(params: Params) -> None:
    """``reference.images`` (a folder of images or a guided-diffusion ``.npz``) or ``reference.stats`` (FID statistics
    of this extractor's width): readable and what they claim, before any stage embeds a single image."""
    r = params.reference
    try:
        if r.images is not None:
            check_reference(r.images)
        elif r.stats is not None:
            mu, _ = load_fid_stats(r.stats)
            spec = get_extractor_spec(params.eval.extractor)
            if spec.fid_feature.isdigit() and mu.shape[0] != int(spec.fid_feature):
                raise ReferenceDataError(
                    f"statistics of {mu.shape[0]}-d features, but eval.extractor={spec.name} scores FID on "
                    f"{spec.fid_feature}-d features; expected statistics of the same network (pytorch-fid's 2048-d: "
                    "eval.extractor inception-v3-compat with eval.inception_weights)")
    except (ReferenceDataError, OSError, ValueError) as e:
        key = "reference.images" if r.images is not None else "reference.stats"
        raise InputError(f"{key}={r.images or r.stats!r}: {' '.join(str(e).split())}") from None


def domain_classifier(params: Params, models: list[str]) -> None:
    """``eval.domain_classifier``: a named classifier folder exists and was trained on the images of every model it
    would score (``auto`` and ``null`` never fail: auto leaves a model of other images without domain metrics)."""
    choice = params.eval.domain_classifier
    if choice in (None, "auto"):
        return
    _need_dir("eval.domain_classifier", choice, "expected a classifier folder written by train_classifier, auto or null",
              inside=("classifier.json", "classifier.safetensors"))
    for m in models:
        try:
            domain_classifier_for(choice, params.classifier.path, output_shape(Path(params.model.root) / m))
        except ValueError as e:
            raise InputError(f"{' '.join(str(e).split())} (model {m})") from None


def eval_inputs(params: Params, model: str | None = None) -> None:
    extractor_weights(params)
    clip_model(params)
    lpips_backbone(params)
    reference_source(params)
    if model is not None:
        prompt_files(params, model, ("eval.prompts",))
        domain_classifier(params, [model])
    _need_file("reference.dir", reference_file(params, model),
               "run `tfmq reference-stats` (dvc repro reference_stats) first")
    if params.eval.domain_classifier == "auto" and params.reference.source == "idx":  # the pipeline trains it
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
        msg = " ".join(str(e).split()).removesuffix("; re-run the quantization")  # the hint below says how
        raise InputError(f"{msg}; {hint}") from None
    if (header.get("method"), header.get("bits")) != (setting.method, setting.bits):
        raise InputError(f"{path}: checkpoint is {header.get('method')}-{header.get('bits')}, expected "
                         f"{setting.method}-{setting.bits}; {hint}")


def run_inputs(command: str, params: Params, setting: Setting | None = None, model: str | None = None) -> None:
    """Raise InputError for the first missing input of ``command`` (the CLI's sub-command name); ``model``:
    the ``--model`` of a command without a setting (calib-data)."""
    model = setting.model if setting is not None and setting.model else model
    if command in ("check", "compare"):  # the whole run: its sources (produced outputs are rebuilt)
        if command == "check":
            for name in params.grid.models:
                fp_model(params, name)
                prompt_files(params, name, ("calib_data.prompts", "eval.prompts"))
        if not Path(params.data.path).is_file():
            dataset_source(params)
        extractor_weights(params)
        clip_model(params)
        lpips_backbone(params)
        reference_source(params)
        if command == "check":
            domain_classifier(params, list(params.grid.models))
    elif command == "prepare-data":
        dataset_source(params)
    elif command in ("train", "train-classifier"):
        dataset(params)
    elif command == "reference-stats":
        if params.reference.source == "idx":
            dataset(params)
        extractor_weights(params)
        reference_source(params)
    elif command == "calib-data":
        fp_model(params, model)
        prompt_files(params, model, ("calib_data.prompts",))
    elif command in ("quantize", "run"):
        fp_model(params, model)
        calib_set(params, setting)
        if command == "run":
            eval_inputs(params, model)
    elif command == "evaluate":
        assert setting is not None
        if setting.kind != "real":
            fp_model(params, model)
        if setting.kind in ("real", "autoencoder", "fp") and params.reference.source == "idx":
            dataset(params)  # the real row, and a latent FP row's autoencoder floor, read the IDX images
        eval_inputs(params, model if setting.kind != "real" else None)
        if setting.quantized:
            checkpoint(setting)


def summary(params: Params, settings: list[Setting]) -> str:
    """What ``tfmq check`` prints on success: the run's inputs and settings, one line each."""
    from tfmq.evaluation.extractors import get_extractor_spec

    spec = get_extractor_spec(params.eval.extractor)
    from tfmq.diffusion.pipelines import read_family

    lines = [f"model {m}: {Path(params.model.root) / m} ({read_family(Path(params.model.root) / m).name}, "
             f"{json.loads((Path(params.model.root) / m / 'unet' / 'config.json').read_text())['_class_name']})"
             for m in params.grid.models]
    lines += [
             f"dataset: {params.data.path if Path(params.data.path).is_file() else params.data.root}",
             f"extractor: {spec.name}" + (f" (weights {params.eval.inception_weights})" if spec.needs_weights_path else ""),
             _reference_line(params),
             f"settings: {len(settings)} ({', '.join(f'{s.model}/{s.name}' for s in settings)})"]
    return "\n".join(lines)


def _reference_line(params: Params) -> str:
    """``tfmq check``'s reference line; it says when the embedded 28 px grey data scores a model of other images."""
    r = params.reference
    if r.source == "images":
        return f"reference: {check_reference(r.images)}, centre-cropped + resized to each model's output shape"
    if r.source == "stats":
        return f"reference: FID statistics {r.stats} (FID only: sFID, KID and the real-data row absent)"
    other = sorted({m for m in params.grid.models if output_shape(Path(params.model.root) / m) != (1, 28, 28)})
    note = (f"; WARNING: {', '.join(other)} make(s) other images than this 1x28x28 data: set reference.images to "
            "your data" if other else "")
    return f"reference: the embedded data's {r.split} split ({r.num_images} images){note}"
