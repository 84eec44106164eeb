"""``tfmq``: the one command line entry point (dvc.yaml stages, people, and the scheduler call it).

    tfmq check                                   # validate params.yaml, the grid and every input path
    tfmq quantize --method tfmq --bits W4A8      # TIAR -> BRECQ -> FSC, checkpoint under quant/
    tfmq evaluate --method tfmq --bits W4A8      # samples, FID/sFID/KID/IS, temporal analyses, MLflow
    tfmq evaluate --fp --model fashion_ldm       # the FP row (+ the autoencoder floor of a latent model)
    tfmq run --method tfmq --bits W4A8           # quantize + evaluate (the quantize_and_evaluate flow)
    tfmq compare                                 # the whole grid in ONE process, then the table
    tfmq report                                  # results/results.md from the metrics files

Every command takes ``--config params.yaml`` and ``--no-prefect`` (plain functions, no Prefect server).
params.yaml is loaded and validated ONCE here; the settings (``tasks.setting.Setting``) are built
here and passed down. Bad input (params, method, bits, a missing input file, a truncated or foreign
checkpoint) is one error line and exit code 2, before any flow starts.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

_T0 = time.time()
#: wall-clock marks of this process (epoch seconds): where start-up ends and orchestration begins
_MARKS: dict[str, float] = {}


def _process_start() -> float:
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil is optional; fall back to module import time
        return _T0


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--no-prefect", action="store_true",
                   help="run the task bodies as plain functions: no Prefect server, no flow runs in the UI")
    return p


def _setting(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--method", required=required, help="naive | brecq | freeze | ptq4dm | qdiffusion | ptqd | tfmq (default: quant.method)")
    p.add_argument("--bits", required=required, help="W8A8 | W4A8 | W4A32 | W<w>A<a> (default: quant.weight_bits/act_bits)")
    p.add_argument("--name", default=None, help="output name under quant/ and results/ (default: <method>-<bits>)")
    p.add_argument("--study", default=None,
                   help="a named setting of studies.settings on studies.model (instead of --method/--bits/--name/--model)")
    _model_arg(p)


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="model folder name under model.root, e.g. fashion_ldm (default: model.name)")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = argparse.ArgumentParser(prog="tfmq", description="TFMQ-DM post-training quantization pipeline")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("check", parents=[common], help="validate params.yaml and exit")
    sub.add_parser("prepare-data", parents=[common], help="verify the IDX dataset and snapshot it (data.path)")
    p = sub.add_parser("train", parents=[common],
                       help="train an FP model (train_fp / train_fp_class / train_ldm / train_ldm_class / train_sd)")
    p.add_argument("--class-conditional", action="store_true", help="the class-conditional model (*_class)")
    p.add_argument("--latent", action="store_true", help="the latent UNet on the autoencoder's latents (train_ldm*)")
    p.add_argument("--text", action="store_true", help="the text-guided UNet on the VAE's latents (train_sd)")
    sub.add_parser("train-autoencoder", parents=[common], help="train the latent family's VQ autoencoder")
    sub.add_parser("train-vae", parents=[common], help="train the text-guided family's KL autoencoder")
    sub.add_parser("train-classifier", parents=[common], help="train the domain-IS classifier")
    sub.add_parser("reference-stats", parents=[common], help="feature statistics of the reference split")
    _model_arg(sub.add_parser("calib-data", parents=[common], help="record calibration trajectories of the FP model"))
    _setting(sub.add_parser("quantize", parents=[common], help="quantize one setting (3 stages)"))
    p = sub.add_parser("evaluate", parents=[common], help="evaluate one setting (or --fp) and log it to MLflow")
    _setting(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--fp", action="store_true", help="evaluate the FP model instead of a quantized one")
    which.add_argument("--real", action="store_true",
                       help="score eval.num_samples real images (the table's FID floor at this N)")
    _setting(sub.add_parser("run", parents=[common], help="quantize + evaluate one setting"))
    p = sub.add_parser("compare", parents=[common], help="quantize + evaluate a grid in one process, then report")
    p.add_argument("--methods", nargs="+", default=None, help="default: grid.methods")
    p.add_argument("--bits", nargs="+", default=None, help="default: grid.bits")
    p.add_argument("--models", nargs="+", default=None, help="default: grid.models")
    p.add_argument("--rebuild", action="store_true", help="re-run upstream stages even when their outputs exist")
    sub.add_parser("report", parents=[common], help="write and print the results table")
    p = sub.add_parser("repro", parents=[common], help="run `dvc repro` inside a Prefect flow (what the schedule runs)")
    p.add_argument("targets", nargs="*", help="dvc stage names (default: all)")
    p.add_argument("--force", action="store_true")
    return parser


def _settings(args: argparse.Namespace, params) -> list:
    """The run's settings, built once here (the edge) and passed down: none, one, or the compare grid."""
    from tasks.setting import (SettingError, grid_settings, quantized_setting, study_setting, study_settings,
                               unquantized_setting)

    cmd = args.command
    if cmd == "check":
        return grid_settings(params) + study_settings(params)
    if cmd == "compare":
        studies = study_settings(params, args.models) if args.methods is None and args.bits is None else []
        return grid_settings(params, args.methods, args.bits, args.models) + studies
    if cmd == "evaluate" and (args.fp or args.real):
        return [unquantized_setting(params, "fp" if args.fp else "real", args.name, args.model)]
    if cmd == "train" and args.text and (args.latent or args.class_conditional):
        raise SettingError("train --text is the text-guided model (train_sd); expected neither --latent nor "
                           "--class-conditional with it")
    if cmd in ("quantize", "evaluate", "run") and args.study is not None:
        given = [f"--{k}" for k in ("method", "bits", "name", "model") if getattr(args, k) is not None]
        if given or getattr(args, "fp", False) or getattr(args, "real", False):
            raise SettingError(f"--study={args.study} names its method, bits, model and output name itself; "
                               f"expected no {', '.join(given) or '--fp/--real'} with it")
        return [study_setting(params, args.study)]
    if cmd in ("quantize", "evaluate", "run"):
        return [quantized_setting(params, args.method, args.bits, args.name, args.model)]
    return []


def _dispatch(args: argparse.Namespace, params, settings: list) -> Any:
    from flows import pipeline, stages

    rf: Callable[..., Any] = stages.run_flow
    cmd = args.command
    simple = {"prepare-data": stages.prepare_data_flow, "train-classifier": stages.train_classifier_flow,
              "reference-stats": stages.reference_stats_flow, "report": stages.report_flow,
              "train-autoencoder": stages.train_autoencoder_flow, "train-vae": stages.train_vae_flow}
    if cmd in simple:
        return rf(simple[cmd], params)
    if cmd == "calib-data":
        return rf(stages.calib_data_flow, params, args.model)
    if cmd == "train":
        section = "train_sd" if args.text else \
            ("train_ldm" if args.latent else "train_fp") + ("_class" if args.class_conditional else "")
        return rf(stages.train_fp_flow, params, section)
    if cmd in ("quantize", "evaluate", "run"):
        flow_ = {"quantize": stages.quantize_flow, "evaluate": stages.evaluate_flow,
                 "run": pipeline.quantize_and_evaluate}[cmd]
        return rf(flow_, settings[0], params)
    if cmd == "compare":  # the deployment's entry point: it takes the file and builds the same grid
        return rf(pipeline.compare, args.methods, args.bits, args.config, args.rebuild, args.models)
    if cmd == "repro":
        return rf(pipeline.repro, args.targets, args.force)
    raise AssertionError(cmd)


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input, not a bug: one line, exit 2 (anything else keeps its traceback)."""
    import tfmq
    import tfmq.quant.checkpoint as ckpt
    from flows.params import ParamsError
    from tasks.setting import SettingError

    return tuple({ParamsError, SettingError, tfmq.ConfigError, tfmq.CheckpointMismatchError,
                  getattr(ckpt, "CheckpointError", tfmq.CheckpointMismatchError)})


def _log_timing(args: argparse.Namespace, wall: float) -> None:
    """Append process vs compute seconds to ``TFMQ_TIMINGS_LOG`` (how orchestration overhead is measured)."""
    path = os.environ.get("TFMQ_TIMINGS_LOG")
    if not path:
        return
    from tasks.common import COMPUTE_TIMES, ORCH_TIMES

    start, now = _process_start(), time.time()
    params_at, stages_at = _MARKS.get("params", start), _MARKS.get("stages", _MARKS.get("params", start))
    rec = {"command": args.command, "argv": sys.argv[1:], "dvc_stage": os.environ.get("DVC_STAGE", ""),
           "start": round(start, 3), "end": round(now, 3),
           "process_s": round(now - start, 3), "main_s": round(wall, 3),
           # interpreter + torch/diffusers/tfmq imports + params validation: paid by any process that runs a stage
           "startup_s": round(params_at - start, 3),
           # prefect + the task modules (flows.stages)
           "prefect_import_s": round(stages_at - params_at, 3),
           "mlflow_s": round(ORCH_TIMES.get("mlflow", 0.0), 3),
           "compute_s": round(sum(COMPUTE_TIMES.values()), 3),
           "compute": {k: round(v, 3) for k, v in COMPUTE_TIMES.items()}, "prefect": not args.no_prefect}
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _error(e: BaseException) -> int:
    print(f"tfmq: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flows.params import ParamsError, load_params

    try:
        params = load_params(args.config)
    except ParamsError as e:
        return _error(e)
    from flows import checks

    errors = _input_errors()
    try:
        settings = _settings(args, params)
        checks.run_inputs(args.command, params, settings[0] if len(settings) == 1 else None,
                          model=getattr(args, "model", None))
    except errors as e:
        return _error(e)
    _MARKS["params"] = time.time()
    if args.command == "check":
        print(f"{args.config}: OK\n{checks.summary(params, settings)}")
        return 0
    from flows.stages import PLAIN
    from tasks.common import configure_torch

    _MARKS["stages"] = time.time()

    from flows.locks import WRITING_COMMANDS, BusyError, writer_locks

    PLAIN.set(bool(args.no_prefect))
    configure_torch()
    t0 = time.time()
    try:
        with writer_locks(settings if args.command in WRITING_COMMANDS else [], args.command):
            result = _dispatch(args, params, settings)
    except (*errors, BusyError) as e:  # another writer of a setting; a checkpoint that fails tfmq.load's model check
        return _error(e)
    finally:
        _log_timing(args, time.time() - t0)
    if isinstance(result, str):
        print(result)
    return 0


def run() -> None:
    """Console entry point: ``main()`` (in the warm server when ``TFMQ_WARM_SOCKET`` names one, ``flows.warm``),
    then exit without the interpreter's module teardown.

    With torch and diffusers loaded, tearing the modules down takes about a second per process,
    which `dvc repro` pays for every stage. All outputs are written (atomically) and closed by
    now; what must still happen at exit is done first, in CPython's own order: non-daemon threads
    and Prefect's log/event drains (``threading._shutdown``), then the ``atexit`` handlers
    (logging, MLflow). ``TFMQ_FAST_EXIT=0`` restores the normal exit.
    """
    warm = os.environ.get("TFMQ_WARM_SOCKET")
    if warm:
        from flows.warm import call  # standard library only: nothing heavy is imported before the hand-over

        code = call(warm, sys.argv[1:])
        if code is not None:
            sys.exit(code)
    code = main()
    if os.environ.get("TFMQ_FAST_EXIT", "1") == "0":
        sys.exit(code)
    try:
        finish_process()
    finally:
        os._exit(code)


def finish_process() -> None:
    """What a process must still do at exit once its outputs are written: thread drains, then ``atexit``."""
    import atexit
    import threading

    try:
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    run()
