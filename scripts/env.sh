# Sourced by the scripts: the project venv (created on first use), offline + telemetry off.
# pip (not uv): it takes torch 2.14.1 / torchvision 0.29.1 from this machine's local disk.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false \
       DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 PREFECT_HOME="$ROOT/.prefect" PYTHONUNBUFFERED=1
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null 2>&1; then
  echo "[tfmq] installing the Fashion-MNIST dataset (Debian package dataset-fashion-mnist)"
  if [ "$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } || true
  else sudo -n apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || true; fi
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import tfmq, prefect, dvc, mlflow, torch_fidelity, torchao" >/dev/null 2>&1; then
  echo "[tfmq] creating .venv and installing the project (pip, a few minutes)"
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e '.[dev]'
fi
export PATH="$ROOT/.venv/bin:$PATH"
