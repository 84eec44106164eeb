"""flows.warm: a `tfmq` command handed to the warm server runs in a child forked from it, in the caller's working
directory and environment, with the caller's output streams and exit code; without a server it runs itself."""
import os
import subprocess
import sys
import time

import pytest

from pipeline_fixtures import REPO, subprocess_env


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """One server for the module, started OUTSIDE the repository (the child must move to the caller's cwd)."""
    home = tmp_path_factory.mktemp("warm")
    sock, log = home / "w.sock", home / "server.log"
    env = {**subprocess_env(), "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.warm", "serve", "--socket", str(sock)], cwd=home,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    t0 = time.time()
    while not sock.exists() and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.2)
    assert sock.exists(), log.read_text()
    yield sock, log
    proc.terminate()
    proc.wait(timeout=60)
    assert not sock.exists()  # the server removes its socket when it stops


def _tfmq(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], cwd=REPO, env=subprocess_env(**env),
                          capture_output=True, text=True, timeout=300)


def test_a_command_runs_in_the_warm_server_with_the_callers_streams_and_exit_code(warm):
    sock, log = warm
    direct = _tfmq("check")
    via = _tfmq("check", TFMQ_WARM_SOCKET=str(sock))
    assert direct.returncode == 0, direct.stderr
    assert via.returncode == 0, via.stderr
    assert via.stdout == direct.stdout and "params.yaml: OK" in via.stdout  # read from the caller's cwd (the repo)
    assert "tfmq check" in log.read_text()  # ...by a child of the server
    bad = _tfmq("quantize", "--bits", "4bit", TFMQ_WARM_SOCKET=str(sock))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["tfmq: error: bits='4bit': expected the form W<weight bits>A<activation "
                                               "bits>, e.g. W4A8 or W4A32"]
    assert "tfmq quantize --bits 4bit" in log.read_text()


def test_the_child_reads_the_callers_arguments(warm, tmp_path):
    sock, log = warm
    r = _tfmq("check", "--config", str(tmp_path / "missing.yaml"), TFMQ_WARM_SOCKET=str(sock))
    assert r.returncode == 2 and str(tmp_path / "missing.yaml") in r.stderr and r.stderr.count("\n") == 1
    assert f"tfmq check --config {tmp_path / 'missing.yaml'}" in log.read_text()


def test_without_a_server_the_command_runs_itself(tmp_path):
    r = _tfmq("quantize", "--bits", "4bit", TFMQ_WARM_SOCKET=str(tmp_path / "nobody.sock"))
    assert r.returncode == 2 and r.stderr.startswith("tfmq: error: bits='4bit'")
    assert not os.path.exists(tmp_path / "nobody.sock")
