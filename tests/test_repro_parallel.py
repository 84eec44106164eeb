"""flows.repro: independent DVC stages side by side, the DAG respected, dvc.lock as a serial run leaves it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from flows.repro import _partner, pick

ROOT = Path(__file__).resolve().parents[1]


def test_ptqd_waits_for_its_qdiffusion_stage_unless_nothing_else_is_ready():
    assert _partner("run@fashion_ldm-ptqd-W8A8") == "run@fashion_ldm-qdiffusion-W8A8"
    assert _partner("run_study@ptqd-eq-W4A8") == "run_study@qdiffusion-eq-W4A8"
    assert _partner("run@fashion_ldm-tfmq-W4A8") is None and _partner("report") is None
    ready = ["run@m-ptqd-W8A8", "run@m-tfmq-W8A8"]
    assert pick(ready, ["run@m-qdiffusion-W8A8"], set()) == "run@m-tfmq-W8A8"
    assert pick(ready, [], {"run@m-qdiffusion-W8A8"}) == "run@m-tfmq-W8A8"
    assert pick(ready, [], {"run@m-qdiffusion-W4A8"}) == "run@m-ptqd-W8A8"  # another bits' stage: no wait
    assert pick(["run@m-ptqd-W8A8"], [], {"run@m-qdiffusion-W8A8"}) == "run@m-ptqd-W8A8"  # nothing else ready
    assert pick([], ["x"], set()) is None


STAGE = textwrap.dedent("""
    import json, sys, time
    name, out = sys.argv[1], sys.argv[2]
    t0 = time.time()
    for dep in sys.argv[3:]:
        assert open(dep).read(), dep
    time.sleep(1.5)
    open(out, "w").write(json.dumps({"name": name, "start": t0, "end": time.time()}))
""")


@pytest.fixture()
def project(tmp_path):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "stage.py").write_text(STAGE)
    py = sys.executable

    def st(name, deps=()):
        return {"cmd": f"{py} stage.py {name} {name}.json " + " ".join(f"{d}.json" for d in deps),
                "deps": ["stage.py", *[f"{d}.json" for d in deps]], "outs": [f"{name}.json"]}

    stages = {"a": st("a"), "b": st("b", ["a"]), "c": st("c", ["a"]), "d": st("d", ["b", "c"])}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    return tmp_path, env


def _times(root: Path) -> dict[str, dict]:
    return {n: json.loads((root / f"{n}.json").read_text()) for n in "abcd"}


def test_independent_stages_overlap_and_the_lock_is_complete(project):
    root, env = project
    out = subprocess.run([sys.executable, "-m", "flows.repro", "--jobs", "2"], cwd=root, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    t = _times(root)
    assert t["a"]["end"] <= min(t["b"]["start"], t["c"]["start"])  # the DAG: b and c read a's output
    assert max(t["b"]["end"], t["c"]["end"]) <= t["d"]["start"]
    assert t["b"]["start"] < t["c"]["end"] and t["c"]["start"] < t["b"]["end"]  # b and c ran side by side
    assert "4 stages, up to 2 at a time" in out.stdout
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert sorted(lock["stages"]) == ["a", "b", "c", "d"]
    status = subprocess.run(["dvc", "status", "--json"], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}
    again = subprocess.run([sys.executable, "-m", "flows.repro", "--jobs", "2"], cwd=root,
                           env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to run" in again.stdout and _times(root) == t


def test_a_failing_stage_stops_new_starts_and_sets_the_exit_code(project):
    root, env = project
    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    spec["stages"]["b"]["cmd"] = f"{sys.executable} -c 'raise SystemExit(3)'"
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "flows.repro", "--jobs", "2"], cwd=root, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "b failed" in out.stdout
    assert not (root / "d.json").exists()  # d needs b: never started


def test_bad_jobs_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flows.repro", "--jobs", "0"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == "--jobs 0: expected 1 or more"
    out = subprocess.run([sys.executable, "-m", "flows.repro"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True)
    assert out.returncode == 2 and "no dvc.yaml here" in out.stderr


def test_mlflow_sqlite_store_has_one_writer_at_a_time(tmp_path):
    import fcntl

    from tasks.tracking import _store_lock

    db = tmp_path / "m" / "mlflow.db"
    with _store_lock(f"sqlite:///{db}"):
        with open(str(db) + ".lock", "w") as f:  # a second stage process trying the same lock
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(str(db) + ".lock", "w") as f:  # released
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with _store_lock("http://127.0.0.1:5000"):  # a server store: no file lock
        assert not (tmp_path / "http:").exists()
