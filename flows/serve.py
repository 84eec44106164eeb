"""Serve the pipeline as Prefect deployments on a cron schedule, against a local Prefect server.

    export PREFECT_HOME=$PWD/.prefect PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=true
    prefect server start --host 127.0.0.1 --port 4200 --analytics-off      # terminal 1 (UI: http://127.0.0.1:4200)
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve        # terminal 2

Two deployments: ``tfmq-repro/nightly`` runs ``dvc repro`` on the cron schedule (DVC re-runs only
stale stages, and every stage's flow run shows up in the same UI), and ``compare/grid`` runs the
whole grid in one process when triggered from the UI or ``prefect deployment run compare/grid``.
Stopping this process (Ctrl-C / SIGTERM) pauses the schedule.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_CRON = "0 3 * * *"  # every night at 03:00, server time


def build_deployments(cron: str = DEFAULT_CRON, config: str = "params.yaml", repo: str | None = None) -> list:
    """The two deployments (not yet registered): scheduled ``dvc repro`` and on-demand ``compare``."""
    from flows.pipeline import compare, repro

    repo = str(Path(repo or os.getcwd()).resolve())
    config = str(Path(config).resolve())
    return [
        repro.to_deployment(name="nightly", cron=cron, parameters={"repo": repo}, tags=["tfmq"],
                            description="dvc repro of every stage (stale stages only), on a cron schedule"),
        compare.to_deployment(name="grid", parameters={"config": config}, tags=["tfmq"],
                              description="methods x bits grid in one process, then the results table"),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule of the dvc repro deployment ({DEFAULT_CRON!r})")
    ap.add_argument("--config", default="params.yaml")
    args = ap.parse_args(argv)
    if not os.environ.get("PREFECT_API_URL"):
        print("flows.serve: error: PREFECT_API_URL is not set; a schedule needs a long-lived server: "
              "`prefect server start --host 127.0.0.1 --analytics-off`, then "
              "`export PREFECT_API_URL=http://127.0.0.1:4200/api`", file=sys.stderr)
        return 2
    from prefect import serve

    serve(*build_deployments(args.cron, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
