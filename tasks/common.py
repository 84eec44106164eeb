"""Shared conventions of the Prefect tasks: no Prefect caching, retries only on I/O, one logger.

DVC owns caching (a stage re-runs only when its deps or params change), so every task is
declared with ``cache_policy=NO_CACHE`` and ``persist_result=False``: Prefect never hashes or
pickles the models, it only sees file paths. Retries are reserved for failures of storage
(``OSError``: a locked sqlite store, a full disk that was cleared); a numeric error never
silently re-runs a 10-minute reconstruction.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Callable, Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext, FlowRunContext

_FALLBACK = logging.getLogger("tfmq.pipeline")

#: seconds spent inside tfmq calls in this process, by task: the compute that orchestration
#: overhead is measured against (flows/cli.py writes it to TFMQ_TIMINGS_LOG).
COMPUTE_TIMES: dict[str, float] = {}
#: seconds spent in orchestration calls timed from inside a task (MLflow logging), by tool
ORCH_TIMES: dict[str, float] = {}


def _io_error(task_, task_run, state) -> bool:
    """Retry condition: only an I/O failure (OSError, sqlite 'database is locked') is worth a retry."""
    try:
        state.result()
    except OSError:
        return True
    except Exception as e:  # noqa: BLE001 - inspect, never swallow: the task still fails
        return "database is locked" in str(e)
    return False


def pipeline_task(fn: Callable | None = None, *, io: bool = False, **kwargs: Any):
    """``@task`` with the pipeline's defaults; ``io=True`` adds 2 retries on I/O errors only."""
    opts: dict[str, Any] = dict(cache_policy=NO_CACHE, persist_result=False, log_prints=False)
    if io:
        opts.update(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_io_error)
    opts.update(kwargs)
    if fn is None:
        return lambda f: task(f, **opts)
    return task(fn, **opts)


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow/task run (shows in the UI), the std logger outside (``task.fn``)."""
    if TaskRunContext.get() is not None or FlowRunContext.get() is not None:
        from prefect.logging import get_run_logger

        return get_run_logger()
    if not _FALLBACK.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _FALLBACK.setLevel(logging.INFO)
    return _FALLBACK


@contextlib.contextmanager
def timed(times: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to ``times[name]`` (seconds): the compute part of a task."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[name] = times.get(name, 0.0) + time.perf_counter() - t0


def device() -> str:
    """Torch device for every task: ``TFMQ_DEVICE`` or cuda when available, else cpu."""
    if os.environ.get("TFMQ_DEVICE"):
        return os.environ["TFMQ_DEVICE"]
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def configure_torch() -> None:
    """Honour ``TFMQ_TORCH_THREADS``: with other jobs on the cores, 1 thread beats 2 oversubscribed ones
    (a small conv measured 0.5 ms vs 48 ms here); unset = torch's default (one per core)."""
    n = os.environ.get("TFMQ_TORCH_THREADS")
    if n:
        import torch

        torch.set_num_threads(int(n))


def show_progress() -> bool:
    """tqdm bars on a terminal, off when ``TQDM_DISABLE`` is set (tests, CI logs)."""
    return os.environ.get("TQDM_DISABLE", "") in ("", "0", "false")
