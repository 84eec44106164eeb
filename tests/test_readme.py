"""README.md's examples run as written: every ```python and ```bash block is extracted and checked.

Python blocks are executed verbatim in a subprocess whose cwd is a temp dir holding a symlink to the
committed ``models/`` (so ``calib/`` and ``qunet/`` land there, never in the repo), with
``TFMQ_MAX_ITERS=2`` as the README says next to the example (caps every reconstruction/TIAR
iteration count) and one torch thread. A line after the block checks what it produced.

Every bash line is either EXECUTED or only VALIDATED, by the table ``BASH_RULES`` below; a line that
matches no rule fails the test, so a new README command must be classified here:

* executed (read-only, seconds): ``tfmq check``, ``dvc metrics show``, ``dvc metrics diff``;
* validated only, because they run for many minutes, start long-lived servers, re-install, or write
  into the repo: ``./scripts/*.sh`` and ``source scripts/env.sh`` (exist, executable, ``bash -n``),
  the other ``tfmq`` subcommands (the CLI's own argparse parser accepts them; ``--method`` is a
  registered recipe, ``--bits`` parses), ``dvc repro`` / ``dvc exp run`` (DVC's own parser accepts
  them; every ``-S key=value`` key exists in params.yaml; every target is a dvc.yaml stage),
  ``scripts/render_plots.py`` (compiles; dvc plots + rendering is ~a minute and writes ``dvc_plots/``),
  ``prefect server start`` / ``prefect deployment run`` / ``mlflow ui`` (their ``--help`` lists every
  flag used; the named deployment exists), ``python -m flows.serve`` (its parser accepts the flags).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", DO_NOT_TRACK="true", DVC_NO_ANALYTICS="1", TQDM_DISABLE="1",
               MLFLOW_DISABLE_TELEMETRY="true", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


def _run(argv: list[str], cwd: Path = ROOT, timeout: int = 120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- python blocks

#: appended after the block (the block itself runs unchanged): what it must have produced
PY_CHECKS = r'''
import json, torch
assert images.shape == (16, 1, 28, 28) and images.dtype == torch.float32, (images.shape, images.dtype)
assert float(images.min()) >= -1.0 and float(images.max()) <= 1.0
again = sample(qunet, scheduler, num_samples=16, num_inference_steps=20, batch_size=16, seed=0)
cos_int8 = float(torch.nn.functional.cosine_similarity(images_int8.flatten().double(), images.flatten().double(), dim=0))
assert report.integer and cos_int8 >= 0.999, (len(report.integer), cos_int8)  # int8 kernels, the same images
print("README-CHECK " + json.dumps({"roundtrip_max_abs": float((again - images).abs().max()),
                                     "calib_steps": calib.num_steps, "calib_rows": calib.rows_per_step}))
'''


#: appended after the second block (a user step + recipe): run it on a tiny UNet against plain naive
PY_RECIPE_CHECKS = r'''
import json, tempfile, torch
from diffusers import DDPMScheduler, UNet2DModel
from tfmq.diffusion.sampling import make_scheduler
from tfmq.quant.prepare import get_state

def tiny():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, attention_head_dim=4).eval()

sched = make_scheduler("ddim", dict(DDPMScheduler(num_train_timesteps=100).config))
calib = tfmq.capture_calibration_data(tiny(), sched, tempfile.mkdtemp(), num_samples=4, num_inference_steps=3,
                                      batch_size=4, seed=0)
mine = tfmq.quantize(tiny(), calib, config, progress=False)
base = tfmq.quantize(tiny(), calib, tfmq.QuantConfig(method="naive", weight_bits=4, act_bits=8), progress=False)
a = {n: q.scale.detach().clone() for n, q in act_quantizers(mine)}
b = {n: q.scale.detach().clone() for n, q in act_quantizers(base)}
print("README-CHECK " + json.dumps({
    "mode": get_state(mine).stats["activations"]["mode"], "clipped": get_state(mine).stats["activations"]["clipped"],
    "n": len(a), "same_names": sorted(a) == sorted(b),
    "max_rel_err": max(float(((a[k] - 0.5 * b[k]).abs() / b[k].abs()).max()) for k in a)}))
'''


def test_readme_has_the_blocks_this_test_knows():
    assert len(_blocks("python")) == 2, "a new python block: give it checks like PY_CHECKS / PY_RECIPE_CHECKS"
    assert len(_blocks("bash")) >= 6


def test_python_api_block_runs_as_written(tmp_path):
    block = _blocks("python")[0]
    assert "TFMQ_MAX_ITERS=2" in README.read_text(), "README must say how the example is smoke-tested"
    (tmp_path / "models").symlink_to(ROOT / "models", target_is_directory=True)
    script = tmp_path / "readme_example.py"
    script.write_text(block + PY_CHECKS)
    r = _run([sys.executable, str(script)], cwd=tmp_path, timeout=600, TFMQ_MAX_ITERS="2",
             PYTHONPATH=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    check = json.loads(r.stdout.split("README-CHECK ", 1)[1].splitlines()[0])
    assert check["roundtrip_max_abs"] == 0.0  # tfmq.load restores exactly the model that was saved
    assert check["calib_steps"] == 20 and check["calib_rows"] == 64
    meta = json.loads((tmp_path / "calib" / "meta.json").read_text())
    assert len(list((tmp_path / "calib").glob("step_*.safetensors"))) == 20 and meta
    cfg = json.loads((tmp_path / "qunet" / "quant_config.json").read_text())
    assert (tmp_path / "qunet" / "quantized.safetensors").stat().st_size > 10_000
    c = cfg["config"]
    assert (c["method"], c["weight_bits"], c["act_bits"]) == ("tfmq", 4, 8)
    assert c["recon"]["iters"] == 200 and c["tiar_recon"]["iters"] == 200  # the config as written is recorded
    assert not (ROOT / "qunet").exists()  # nothing written into the repo


def test_user_recipe_block_runs_as_written(tmp_path):
    """The README's own-method block: its handler runs inside tfmq.quantize and halves every range min-max sets."""
    script = tmp_path / "readme_recipe.py"
    script.write_text(_blocks("python")[1] + PY_RECIPE_CHECKS)
    r = _run([sys.executable, str(script)], cwd=tmp_path, timeout=300, PYTHONPATH=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    check = json.loads(r.stdout.split("README-CHECK ", 1)[1].splitlines()[0])
    assert check["mode"] == "clipped_minmax" and check["clipped"] == 0.5
    assert check["n"] > 10 and check["same_names"]
    assert check["max_rel_err"] < 1e-6  # exactly half of naive's min-max scales (same weights, same inputs)


# ----------------------------------------------------------------------------- bash blocks


def _bash_commands() -> list[tuple[int, str, list[str]]]:
    """(block index, source line, argv) for every command; comments dropped, ``a ; b`` split."""
    out = []
    for b, block in enumerate(_blocks("bash")):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            cmd: list[str] = []
            for w in words + [";"]:
                if w == ";" or w.endswith(";"):
                    if w.rstrip(";"):
                        cmd.append(w.rstrip(";"))
                    if cmd:
                        out.append((b, line.strip(), cmd))
                    cmd = []
                else:
                    cmd.append(w)
    return out


def _strip_env(argv: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        k, v = argv[0].split("=", 1)
        env[k] = v
        argv = argv[1:]
    return env, argv


def _params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _has_key(d: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return False
        d = d[part]
    return True


def _stages() -> set[str]:
    return set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


def _validate_script(argv):
    path = ROOT / argv[-1] if argv[0] == "source" else ROOT / argv[0]
    assert path.is_file(), path
    if argv[0] != "source":
        assert os.access(path, os.X_OK), f"{path} is not executable"
    assert _run(["bash", "-n", str(path)]).returncode == 0


def _validate_tfmq(argv):
    from flows.cli import build_parser

    args = build_parser().parse_args(argv[1:])  # SystemExit on an unknown subcommand or flag
    if getattr(args, "method", None):
        from tfmq import RECIPES

        assert args.method in RECIPES, args.method
    if isinstance(getattr(args, "bits", None), str):
        from tfmq.quant.config import parse_bits

        parse_bits(args.bits)


def _validate_dvc(argv):
    from dvc.cli import parse_args

    from flows.params import load_params

    args = parse_args(argv[1:])
    sets = getattr(args, "set_param", None) or []
    params = _params()
    for kv in sets:
        key, value = kv.split("=", 1)
        assert _has_key(params, key), f"-S {key}: no such key in params.yaml"
        *parents, leaf = key.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)  # as dvc writes it
    if sets:  # the experiment's params.yaml passes the same strict validation as the committed one
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "params.yaml"
            path.write_text(yaml.safe_dump(params, sort_keys=False))
            load_params(path)
    for target in getattr(args, "targets", None) or []:
        assert target in _stages(), f"dvc target {target!r} is not a stage of dvc.yaml"


def _validate_help(argv, n_words):
    """``<tool> <sub...> --help`` must succeed and list every flag the README line uses."""
    head = [str(w) for w in argv[:n_words]]
    with tempfile.TemporaryDirectory() as home:  # prefect writes its settings/db under PREFECT_HOME
        r = _run(head + ["--help"], timeout=180, PREFECT_HOME=home)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in [w.split("=", 1)[0] for w in argv[n_words:] if w.startswith("--")]:
        assert flag in r.stdout, f"{' '.join(head)} has no {flag}"


def _validate_deployment_run(argv):
    _validate_help(argv, 3)
    from flows.serve import build_deployments

    names = {f"{d.flow_name}/{d.name}" for d in build_deployments()}
    assert argv[3] in names, f"deployment {argv[3]!r} not among {sorted(names)}"


def _validate_serve(argv):
    import flows.serve as serve

    src = Path(serve.__file__).read_text()
    for flag in [w for w in argv[3:] if w.startswith("--")]:
        assert f'"{flag}"' in src, f"flows.serve has no {flag}"


def _execute(argv):
    r = _run(argv, timeout=180)
    assert r.returncode == 0, f"{argv}: {r.stderr[-2000:]}"
    return r


def _execute_check(argv):
    assert "params.yaml: OK" in _execute(argv).stdout


def _execute_metrics_show(argv):
    out = _execute(argv).stdout
    assert "fid" in out.lower(), out[-1000:]


#: (regex on the command, "run" | "validate", handler)
BASH_RULES = [
    (r"^\./scripts/\S+\.sh$", "validate", _validate_script),
    (r"^source scripts/env\.sh$", "validate", _validate_script),
    (r"^tfmq check$", "run", _execute_check),
    (r"^tfmq \S+", "validate", _validate_tfmq),
    (r"^dvc metrics show$", "run", _execute_metrics_show),
    (r"^dvc metrics diff$", "run", _execute),
    (r"^dvc (repro|exp run)\b", "validate", _validate_dvc),
    (r"^python scripts/studies\.py (iterations|seeds|eqseeds|stress|plot|table)\b", "validate",
     lambda a: _run([sys.executable, "-m", "py_compile", str(ROOT / a[1])]).returncode == 0 or pytest.fail(a)),
    (r"^python scripts/render_plots\.py \S+$", "validate",
     lambda a: _run([sys.executable, "-m", "py_compile", str(ROOT / a[1])]).returncode == 0 or pytest.fail(a)),
    (r"^prefect server start\b", "validate", lambda a: _validate_help(a, 3)),
    (r"^prefect deployment run \S+$", "validate", _validate_deployment_run),
    (r"^python -m flows\.serve\b", "validate", _validate_serve),
    (r"^(\.venv/bin/)?mlflow ui\b", "validate", lambda a: _validate_help([BIN / "mlflow", "ui", *a[2:]], 2)),
]


def _rule(argv):
    text = " ".join(argv)
    for pattern, mode, fn in BASH_RULES:
        if re.search(pattern, text):
            return mode, fn
    pytest.fail(f"README command {text!r} matches no rule of tests/test_readme.py: classify it (run or validate)")


def test_every_bash_line_is_classified():
    cmds = _bash_commands()
    assert len(cmds) >= 18
    modes = [_rule(_strip_env(argv)[1])[0] for _, _, argv in cmds]
    assert modes.count("run") == 3


@pytest.mark.parametrize("mode", ["run", "validate"])
def test_bash_blocks(mode):
    done = 0
    for _, line, argv in _bash_commands():
        _, argv = _strip_env(argv)
        m, fn = _rule(argv)
        if m == mode:
            fn(argv)
            done += 1
    assert done >= (3 if mode == "run" else 15)


def test_params_yaml_blocks_validate(tmp_path):
    """Every (indented) ```yaml block of the README is a params.yaml fragment: merged into the committed
    params.yaml, the result passes the strict schema (a renamed or mistyped key fails here)."""
    from flows.params import load_params

    blocks = re.findall(r"^( *)```yaml\n(.*?)^\1```", README.read_text(), flags=re.S | re.M)
    assert blocks, "the README's Stable Diffusion protocol block is gone"

    def merge(base: dict, over: dict) -> dict:
        for k, v in over.items():
            base[k] = merge(dict(base[k]), v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return base

    for indent, body in blocks:
        fragment = yaml.safe_load("\n".join(line[len(indent):] for line in body.splitlines()))
        params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), fragment)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        loaded = load_params(tmp_path / "params.yaml").model_dump()

        def leaves(d: dict, prefix: str = ""):
            for k, v in d.items():
                yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

        for key, want in leaves(fragment):  # every value of the fragment is the validated params' value
            node = loaded
            for part in key.split("."):
                node = node[part]
            assert node == want, key
    assert len(blocks) >= 2, "the README's own-model protocol blocks (LDM-4, Stable Diffusion) are gone"
