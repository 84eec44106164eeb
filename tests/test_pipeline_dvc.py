"""dvc.yaml against the code: each stage's code deps cover what its task modules import, every dep exists.

The import closure is computed from the source (ast), transitively within tfmq/, tasks/ and flows/;
``flows/`` and ``tasks/common.py`` are wiring and deliberately not deps (see the header of dvc.yaml).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from pipeline_fixtures import REPO

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())

#: the task modules each stage runs (its code deps must cover their import closure)
STAGE_ENTRIES = {
    "prepare_data": ["tasks/data.py"],
    "train_fp": ["tasks/train.py"],
    "train_fp_class": ["tasks/train.py"],
    "train_autoencoder": ["tasks/autoencoder.py"],
    "train_ldm": ["tasks/train.py"],
    "train_ldm_class": ["tasks/train.py"],
    "train_vae": ["tasks/vae.py"],
    "train_sd": ["tasks/train.py"],
    "train_classifier": ["tasks/classifier.py"],
    "reference_stats": ["tasks/reference.py"],
    "calib_data": ["tasks/calibration.py"],
    "run": ["tasks/quantize.py", "tasks/evaluate.py", "tasks/tracking.py"],
    "run_exp": ["tasks/quantize.py", "tasks/evaluate.py", "tasks/tracking.py"],
    "run_study": ["tasks/quantize.py", "tasks/evaluate.py", "tasks/tracking.py"],
    "evaluate_fp": ["tasks/evaluate.py", "tasks/real.py", "tasks/tracking.py"],
    "evaluate_real": ["tasks/real.py", "tasks/tracking.py"],
    "report": ["tasks/report.py", "tasks/claims.py"],
}
#: wiring, deliberately not a dep (see the header of dvc.yaml)
WIRING = ("tasks/common.py", "flows/")


def _resolve(mod: str, names: tuple[str, ...]) -> list[Path]:
    base = REPO.joinpath(*mod.split("."))
    if base.with_suffix(".py").is_file():
        return [base.with_suffix(".py")]
    out = []
    if (base / "__init__.py").is_file():
        sub = [base / f"{n}.py" for n in names if (base / f"{n}.py").is_file()]
        out.extend(sub)
        if len(sub) < len(names):  # a name defined in the package itself
            out.append(base / "__init__.py")
    return out


def import_closure(entries: list[str]) -> set[str]:
    """Repo files a stage's task modules import, transitively (package __init__ only when imported from)."""
    seen: set[str] = set()
    todo = [REPO / e for e in entries]
    while todo:
        path = todo.pop()
        rel = path.relative_to(REPO).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        pkg = path.relative_to(REPO).parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found = [(a.name, ()) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mod = ".".join([*pkg[: len(pkg) - node.level + 1], *([node.module] if node.module else [])]) \
                    if node.level else node.module
                found = [(mod, tuple(a.name for a in node.names))]
            else:
                continue
            for mod, names in found:
                if mod.split(".")[0] not in ("tfmq", "tasks", "flows"):
                    continue
                for f in _resolve(mod, names):
                    r = f.relative_to(REPO).as_posix()
                    if not r.startswith(WIRING):
                        todo.append(f)
    return seen


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_has_entries():
    assert set(_dvc_stages()) == set(STAGE_ENTRIES)


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRIES))
def test_stage_code_deps_cover_imports(stage):
    body = _dvc_stages()[stage]
    deps = [d for d in body.get("do", body)["deps"] if "${" not in d]  # a foreach stage keeps them under do:
    for d in deps:
        assert (REPO / d).exists(), f"{stage}: dep {d} does not exist"

    def covered(f: str) -> bool:
        return any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)

    missing = sorted(f for f in import_closure(STAGE_ENTRIES[stage]) if not covered(f))
    assert not missing, f"dvc.yaml stage {stage} runs {missing} but does not list them as deps"


def test_stage_params_exist_in_params_yaml():
    flat = set()

    def walk(d, prefix=""):
        for k, v in d.items():
            flat.add(prefix + k)
            if isinstance(v, dict):
                walk(v, prefix + k + ".")

    walk(PARAMS)
    studies = list(PARAMS["studies"]["settings"])
    for name, stage in _dvc_stages().items():
        for key in stage.get("do", stage).get("params", []):
            keys = [key.replace("${key}", s) for s in studies] if "${key}" in key else [key]
            for k in keys:
                assert k in flat, f"{name}: params key {k} not in params.yaml"
    assert _dvc_stages()["run_study"]["foreach"] == "${studies.settings}"


def test_grid_matrix_reads_params():
    stages = _dvc_stages()
    for name in ("run",):
        assert stages[name]["matrix"] == {"model": "${grid.models}", "method": "${grid.methods}", "bits": "${grid.bits}"}
    for name in ("calib_data", "evaluate_fp"):
        assert stages[name]["matrix"] == {"model": "${grid.models}"}




def test_closure_follows_the_refactored_layout():
    """The closure is not vacuous: the quantize stage reaches the engine through tasks/setting.py and tfmq/__init__."""
    closure = import_closure(["tasks/quantize.py"])
    assert {"tasks/setting.py", "tfmq/__init__.py", "tfmq/quant/prepare.py", "tfmq/diffusion/models.py",
            "tfmq/diffusion/calibration.py"} <= closure
    assert not any(f.startswith("flows/") for f in closure)
    assert "tfmq/evaluation/metrics.py" in import_closure(STAGE_ENTRIES["run"])


@pytest.mark.parametrize("stage", sorted(STAGE_ENTRIES))
def test_every_listed_dep_path_exists(stage):
    """Templated deps too (``${model.fp_dir}`` etc. are resolved against params.yaml; outputs of other stages
    are skipped): a mechanically rewritten path that points nowhere fails here."""
    def resolve(d: str) -> str:
        for key in [k[2:-1] for k in re.findall(r"\$\{[^}]+\}", d)]:
            node = PARAMS
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            d = d.replace("${" + key + "}", str(node)) if node is not None else d
        return d

    body = _dvc_stages()[stage]
    code = [resolve(d) for d in body.get("do", body)["deps"] if resolve(d).startswith(("tfmq/", "tasks/", "flows/"))]
    assert code, stage
    missing = [d for d in code if not (REPO / d).exists()]
    assert not missing, f"{stage}: deps {missing} do not exist"
