"""A warm stage process: the imports every ``tfmq`` command pays, paid once per ``dvc repro``.

``dvc repro`` starts one Python process per stage, and each spends ~10 s importing torch, diffusers,
Prefect and MLflow before its first line of work: on the default grid's ~50 stages that is the largest
single cost after the computation itself (benchmarks/results/performance-cpu.md, section 3b). This
server imports them once, then forks a child per command; a ``tfmq`` process that finds
``TFMQ_WARM_SOCKET`` in its environment hands its arguments, working directory, environment and
standard streams to the server and exits with the child's exit code. The child runs the same
``flows.cli.main`` on the same inputs, so nothing a stage writes changes; DVC still sees one command per
stage, with its own output and exit code. No torch operation runs in the server before it forks (no
thread pool exists to be copied half-way), and a child is one process like any other.

    python -m flows.warm serve --socket .dvc/tmp/tfmq-warm.sock     # scripts/run_default.sh starts it
    TFMQ_WARM_SOCKET=.dvc/tmp/tfmq-warm.sock python -m flows.cli run --method tfmq --bits W4A8

This module imports only the standard library at its top: the client side runs in every ``tfmq``
process before anything heavy is imported.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import time
import traceback

SOCKET_ENV = "TFMQ_WARM_SOCKET"
_HEADER = struct.Struct("!Q")


def _send_json(conn: socket.socket, obj: dict) -> None:
    body = json.dumps(obj).encode()
    conn.sendall(_HEADER.pack(len(body)) + body)


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the warm server closed the connection")
        buf += chunk
    return bytes(buf)


def _recv_json(conn: socket.socket) -> dict:
    (n,) = _HEADER.unpack(_recv_exact(conn, _HEADER.size))
    return json.loads(_recv_exact(conn, n))


# --- client: inside every tfmq process ----------------------------------------------------------------
def call(path: str, argv: list[str]) -> int | None:
    """Run ``tfmq argv`` in the warm server at ``path``: its exit code, or ``None`` when no server answers there
    (the caller then runs the command itself)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    with conn:
        sys.stdout.flush()
        sys.stderr.flush()
        socket.send_fds(conn, [b"T"], [0, 1, 2])  # one byte: the stdio descriptors ride on it
        _send_json(conn, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)})
        pid = _recv_json(conn)["pid"]
        try:
            return int(_recv_json(conn)["exit"])
        except KeyboardInterrupt:  # Ctrl-C / DVC stopping the stage: stop the child too
            os.kill(pid, signal.SIGINT)
            try:
                return int(_recv_json(conn)["exit"])
            except (ConnectionError, KeyboardInterrupt):
                return 130
        except ConnectionError:
            print(f"tfmq: error: the warm server ({path}) lost the command's process {pid}", file=sys.stderr)
            return 1


# --- server ---------------------------------------------------------------------------------------------
def _child(conn: socket.socket, fds: list[int], req: dict) -> None:
    """In the forked child: become the client's command, run it, report the exit code. Never returns."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        os.environ.pop(SOCKET_ENV, None)  # the child runs the command itself
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _send_json(conn, {"pid": os.getpid()})
        sys.argv = ["tfmq", *req["argv"]]
        from flows import cli

        code = cli.main(req["argv"])
        cli.finish_process()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # noqa: BLE001 - a crash is the command's, reported like a normal process's
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            _send_json(conn, {"exit": code})
        except OSError:
            pass
        os._exit(code)


def preload() -> float:
    """Import what every stage command imports; seconds taken."""
    t0 = time.perf_counter()
    # function-local: this is the start-up cost the server exists to pay once (~10 s), not paid by clients
    import flows.cli  # noqa: F401
    import flows.stages  # noqa: F401
    import mlflow  # noqa: F401
    import tasks.common  # noqa: F401
    return time.perf_counter() - t0


def serve(path: str) -> None:
    took = preload()
    if os.path.exists(path):
        os.unlink(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
    print(f"[tfmq] warm server on {path} (imports {took:.1f} s, paid once)", flush=True)
    try:
        while True:
            conn, _ = srv.accept()
            try:
                _, fds, _, _ = socket.recv_fds(conn, 1, 3)
                req = _recv_json(conn)
            except (OSError, ValueError) as e:  # a client that went away or spoke something else
                print(f"[tfmq] warm server: bad request ({e})", flush=True)
                conn.close()
                continue
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                srv.close()
                _child(conn, fds, req)
            print(f"[tfmq] warm server: pid {pid}: tfmq {' '.join(req['argv'])}", flush=True)
            for fd in fds:
                os.close(fd)
            conn.close()
            while True:  # reap finished children
                try:
                    done, _ = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if done == 0:
                    break
    finally:
        srv.close()
        if os.path.exists(path):
            os.unlink(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="import once, then run every tfmq command sent to --socket in a forked child")
    s.add_argument("--socket", required=True, help="the Unix socket path (clients read it from $TFMQ_WARM_SOCKET)")
    args = ap.parse_args()
    serve(os.path.abspath(args.socket))


if __name__ == "__main__":
    main()
