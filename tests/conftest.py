"""Test-session environment: offline, telemetry off, one torch process worth of threads."""
import os

# Must be set before huggingface_hub / mlflow / prefect are imported anywhere.
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
