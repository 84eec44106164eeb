#!/usr/bin/env bash
# The main job on the embedded default: `dvc repro` of the whole pipeline (the FP models are
# committed; everything downstream is rebuilt), then the per-stage wall times, the orchestration
# overhead and the results table.
#
# The stage flows report to ONE local Prefect server on 127.0.0.1 (started here unless one already
# answers on $TFMQ_PREFECT_PORT, default 4200, and stopped again at the end), which costs ~1.7 s per
# stage instead of ~6 s for a temporary server per process, and leaves every flow and task run in
# $PWD/.prefect for the UI: `prefect server start --host 127.0.0.1 --analytics-off`.
# Extra arguments go to `dvc repro` (e.g. a stage name, or -f).
#   --quick   the quick profile instead (~10 min): `tfmq compare --config params-quick.yaml`, the
#             whole smaller grid in one process, outputs under *-quick/ (no DVC outputs touched)
QUICK=0
if [ "${1:-}" = "--quick" ]; then QUICK=1; shift; fi
source "$(dirname "$0")/env.sh"

PORT="${TFMQ_PREFECT_PORT:-4200}"
health() { python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/api/health', timeout=2)" 2>/dev/null; }
T0=$(date +%s)
SERVER_PID=""
WARM_PID=""
cleanup() {
  for p in $WARM_PID $SERVER_PID; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  true
}
trap cleanup EXIT
if [ -z "${PREFECT_API_URL:-}" ]; then
  if ! health; then
    echo "[tfmq] starting a Prefect server on 127.0.0.1:$PORT (log: .prefect/server.log)"
    mkdir -p .prefect
    # the UI's own API address defaults to port 4200 whatever --port says: point it at this server
    PREFECT_UI_API_URL="http://127.0.0.1:$PORT/api" \
      prefect server start --host 127.0.0.1 --port "$PORT" --analytics-off > .prefect/server.log 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 1 120); do health && break; sleep 1; done
    health || { echo "[tfmq] Prefect server did not come up; see .prefect/server.log" >&2; exit 1; }
  fi
  export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
fi
echo "[tfmq] Prefect API $PREFECT_API_URL; MLflow store ${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}"

if [ "$QUICK" = 1 ]; then
  python -m flows.cli compare --config params-quick.yaml
  echo "[tfmq] quick profile: $(( $(date +%s) - T0 )) s"
  exit 0
fi
mkdir -p .dvc/tmp
export TFMQ_TIMINGS_LOG="$PWD/.dvc/tmp/stage_times-$(date +%Y%m%d-%H%M%S).jsonl"
# One warm process pays the imports (torch, diffusers, Prefect, MLflow: ~10 s) once; every stage's `tfmq`
# command is forked from it (flows/warm.py). TFMQ_WARM=0: every stage starts its own interpreter.
if [ "${TFMQ_WARM:-1}" = 1 ] && [ -z "${TFMQ_WARM_SOCKET:-}" ]; then
  export TFMQ_WARM_SOCKET="${TMPDIR:-/tmp}/tfmq-warm-$$.sock"
  python -m flows.warm serve --socket "$TFMQ_WARM_SOCKET" > .dvc/tmp/warm.log 2>&1 &
  WARM_PID=$!
  for _ in $(seq 1 240); do [ -S "$TFMQ_WARM_SOCKET" ] && break; kill -0 "$WARM_PID" 2>/dev/null || break; sleep 0.5; done
  if [ -S "$TFMQ_WARM_SOCKET" ]; then head -1 .dvc/tmp/warm.log
  else echo "[tfmq] the warm server did not start (.dvc/tmp/warm.log); every stage starts its own process"; unset TFMQ_WARM_SOCKET; fi
fi
T1=$(date +%s)
# independent stages side by side, one torch thread each (flows/repro.py; TFMQ_JOBS=1: plain serial dvc repro)
python -m flows.repro --jobs "${TFMQ_JOBS:-$(nproc)}" "$@"
T2=$(date +%s)
echo
python scripts/stage_times.py "$TFMQ_TIMINGS_LOG" --total $((T2 - T0)) --repro $((T2 - T1))
echo
cat results/results.md
