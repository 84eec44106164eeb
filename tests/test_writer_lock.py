"""Two processes writing the same setting at once: the second is refused (one line, exit 2, before any work).

A real second process holds the writer lock of ``fashion_ldm/tfmq-W4A8`` (``flows.locks.writer_locks``,
as ``tfmq quantize`` would); ``tfmq compare`` / ``tfmq run`` of that setting are refused naming its pid,
another setting is not blocked, and after the holder is killed with SIGKILL the lock is free again
(the kernel drops an flock with its process: no stale lock).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main
from flows.locks import BusyError, lock_path, writer_locks
from flows.params import load_params
from pipeline_fixtures import REPO, params_file, subprocess_env
from tasks.setting import quantized_setting

HOLD = """
import sys
from flows.locks import writer_locks
from flows.params import load_params
from tasks.setting import quantized_setting
p = load_params(sys.argv[1])
with writer_locks([quantized_setting(p, "tfmq", "W4A8", None, "fashion_ldm")], "quantize"):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills us
"""


@pytest.fixture
def cfg(tmp_path) -> str:
    return params_file(tmp_path, quant_out__dir=str(tmp_path / "quant"), eval__out_dir=str(tmp_path / "results"))


@pytest.fixture
def holder(cfg):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, cfg], cwd=REPO, env=subprocess_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_second_writer_is_refused(capsys, cfg, holder, tmp_path):
    for argv in (["compare", "--methods", "tfmq", "--bits", "W4A8", "--models", "fashion_ldm"],
                 ["compare", "--methods", "tfmq", "naive", "--bits", "W4A8", "--models", "fashion_ldm"]):
        code = main([*argv, "--config", cfg])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"tfmq: error: {tmp_path / 'quant' / 'fashion_ldm' / 'tfmq-W4A8'}: setting "
                                 "fashion_ldm/tfmq-W4A8 is being written by another tfmq process "
                                 f"(pid {holder.pid}, `tfmq quantize "), err
    assert not (tmp_path / "quant" / "fashion_ldm" / "tfmq-W4A8").exists()  # nothing was started
    params = load_params(cfg)
    doc = json.loads(lock_path(quantized_setting(params, "tfmq", "W4A8", None, "fashion_ldm")).read_text())
    assert doc["pid"] == holder.pid


def test_other_settings_are_not_blocked(cfg, holder):
    params = load_params(cfg)
    other = quantized_setting(params, "naive", "W4A8", None, "fashion_ldm")
    with writer_locks([other], "quantize") as held:
        assert held == [lock_path(other)]
        assert json.loads(held[0].read_text())["pid"] == os.getpid()


def test_lock_dies_with_its_holder(cfg, holder):
    params = load_params(cfg)
    mine = quantized_setting(params, "tfmq", "W4A8", None, "fashion_ldm")
    with pytest.raises(BusyError, match=f"pid {holder.pid}"):
        with writer_locks([mine], "quantize"):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert lock_path(mine).is_file()  # the file stays; the lock does not
    with writer_locks([mine, mine], "quantize") as held:  # a setting listed twice is locked once
        assert held == [lock_path(mine)]


def test_lock_paths_of_every_kind(cfg):
    from tasks.setting import unquantized_setting

    params = load_params(cfg)
    q = quantized_setting(params, "tfmq", "W4A8", None, "fashion_ldm")
    fp = unquantized_setting(params, "fp", None, "fashion_ldm")
    assert lock_path(q) == Path(params.quant_out.dir) / "fashion_ldm" / ".tfmq-W4A8.writer.lock"
    assert lock_path(fp) == Path(params.eval.out_dir) / "metrics" / "fashion_ldm" / ".fp.writer.lock"
