"""One writer per setting: two ``tfmq`` processes never write the same setting's outputs at once.

A command that writes a setting (``quantize``, ``evaluate``, ``run``, ``compare``) holds an exclusive,
non-blocking ``flock`` on ``<dir>/.<name>.writer.lock`` beside the setting's quantization directory
(or its metrics file for FP / real rows) for the whole process. A second process that wants the same
setting is refused with one line naming the holder (pid, command, start time), exit code 2, before it
has loaded anything; the first one's outputs are untouched. The kernel drops the lock when the holder
exits, also after ``kill -9``, so a stale lock file never blocks anything.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from flows.params import ParamsError
from tasks.setting import Setting

WRITING_COMMANDS = ("quantize", "evaluate", "run", "compare")


class BusyError(ParamsError):
    """Another process holds the writer lock of a setting this command would write."""


def lock_path(setting: Setting) -> Path:
    """``<quant_out.dir>/<model>/.<name>.writer.lock`` (FP / real rows: beside their metrics file)."""
    anchor = Path(setting.quant_dir) if setting.quant_dir else Path(setting.metrics_path)
    return anchor.parent / f".{setting.name}.writer.lock"


@contextlib.contextmanager
def writer_locks(settings: list[Setting], command: str) -> Iterator[list[Path]]:
    """Hold the writer lock of every setting in ``settings`` (sorted, so two processes cannot deadlock);
    raise :class:`BusyError` naming the first one another process holds."""
    with contextlib.ExitStack() as stack:
        held: list[Path] = []
        for path, setting in sorted(((lock_path(s), s) for s in settings), key=lambda ps: str(ps[0])):
            if path in held:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            f = stack.enter_context(open(path, "a+"))
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                try:
                    who = json.loads(f.read() or "{}")
                except ValueError:
                    who = {}
                since = time.strftime("%H:%M:%S", time.localtime(who["start"])) if "start" in who else "?"
                out = setting.quant_dir or setting.metrics_path
                raise BusyError(f"{out}: setting {setting.model}/{setting.name} is being written by another tfmq process "
                                f"(pid {who.get('pid', '?')}, `{who.get('command', '?')}`, since {since}); wait for it "
                                "to finish, or write another --name / out dir") from None
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "command": f"tfmq {command} " + " ".join(sys.argv[1:]),
                                "start": time.time()}))
            f.flush()
            held.append(path)
        yield held
