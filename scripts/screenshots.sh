#!/usr/bin/env bash
# Screenshots of the Prefect UI (runs, one quantize flow run, the served cron deployment) and the
# MLflow UI (the grid's runs, a comparison) after `./scripts/run_default.sh`, with headless
# Chromium (Debian package `chromium`). Everything listens on 127.0.0.1 only and is stopped at the end.
#
#   ./scripts/screenshots.sh [out_dir]        # default docs/img
source "$(dirname "$0")/env.sh"
OUT="${1:-docs/img}"
mkdir -p "$OUT"
command -v chromium >/dev/null || { echo "screenshots: error: chromium not found; expected the Debian package (apt-get install chromium)" >&2; exit 2; }
PORT="${TFMQ_PREFECT_PORT:-4200}"; MLPORT="${TFMQ_MLFLOW_PORT:-5000}"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
up() { for _ in $(seq 1 90); do curl -sf -o /dev/null "$1" && return 0; sleep 1; done; echo "screenshots: error: $1 did not answer" >&2; return 1; }
shot() {  # url file [WxH]
  chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --window-size="${3:-1600,1000}" \
    --virtual-time-budget=20000 --screenshot="$OUT/$2" "$1" 2>/dev/null | grep -v "^$" || true
  [ -s "$OUT/$2" ] || { echo "screenshots: error: no $OUT/$2" >&2; return 1; }
}

PREFECT_UI_API_URL="http://127.0.0.1:$PORT/api" prefect server start --host 127.0.0.1 --port "$PORT" --analytics-off \
  > .prefect/screenshots-server.log 2>&1 & PIDS+=($!)
mlflow ui --backend-store-uri "${MLFLOW_TRACKING_URI:-sqlite:///$PWD/mlflow.db}" --host 127.0.0.1 --port "$MLPORT" \
  > .prefect/screenshots-mlflow.log 2>&1 & PIDS+=($!)
up "http://127.0.0.1:$PORT/api/health"
export PREFECT_API_URL="http://127.0.0.1:$PORT/api"
python -m flows.serve --cron "0 3 * * *" > .prefect/screenshots-serve.log 2>&1 & PIDS+=($!)
up "http://127.0.0.1:$MLPORT/"
sleep 8  # the served deployments register with the server

shot "http://127.0.0.1:$PORT/runs" prefect_runs.png
ids=$(python - <<'EOF'
import asyncio
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

async def main():
    async with get_client() as c:
        runs = await c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["quantize-tfmq-W4A8"])))
        deps = await c.read_deployments()
        print(runs[-1].id if runs else "", next((d.id for d in deps if d.name == "nightly"), ""))
asyncio.run(main())
EOF
)
read -r RUN DEP <<< "$ids"
[ -n "$RUN" ] && shot "http://127.0.0.1:$PORT/runs/flow-run/$RUN" prefect_flow_run_tfmq_W4A8.png
[ -n "$DEP" ] && shot "http://127.0.0.1:$PORT/deployments/deployment/$DEP" prefect_deployment_nightly.png

EXP=$(python - <<'EOF'
import mlflow
from tasks.tracking import tracking_uri
from flows.params import load_params
params = load_params("params.yaml")
mlflow.set_tracking_uri(tracking_uri(params.mlflow))
print(mlflow.get_experiment_by_name(params.mlflow.experiment).experiment_id)
EOF
)
shot "http://127.0.0.1:$MLPORT/#/experiments/$EXP/runs?compareRunsMode=TABLE" mlflow_runs.png
shot "http://127.0.0.1:$MLPORT/#/experiments/$EXP/runs?compareRunsMode=CHART" mlflow_charts.png 1600,1300
ls -la "$OUT"
