"""Shared pieces of the pipeline tests: a synthetic IDX dataset, a micro params.yaml, a copied workspace.

The micro config keeps every stage real (the same flows, tasks and library calls as the default
run) but tiny: a 28x28 UNet with (8, 16, 16) channels trained 2 steps, a VQ autoencoder of 8 channels
and two latent UNets of the same size (LDMPipeline folders), a KL autoencoder of 8 channels and a text-guided
UNet of the same size with a 1-layer text encoder (a StableDiffusionPipeline folder), a 4-step DDIM sampler, 2 reconstruction
iterations, 16 evaluation samples.
"""
from __future__ import annotations

import copy
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
CODE = ("tfmq", "tasks", "flows")
TELEMETRY_OFF = {
    "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "TQDM_DISABLE": "1",
}


def write_idx_dataset(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """Four raw IDX files (Fashion-MNIST names) of 28x28 class-dependent blobs, labels cycling 0..9."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(labels):
            cy, cx = 8 + 12 * (c // 5) / 1.0, 4 + 5 * (c % 5)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (2 + c % 3) ** 2))
            images[i] = np.clip(255 * blob + rng.normal(0, 8, (28, 28)), 0, 255).astype(np.uint8)
        (root / f"{stem}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28) + images.tobytes())
        (root / f"{stem}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n) + labels.tobytes())
    return root


MICRO_STUDY = {"tfmq-nofsc-W4A8": {"method": "tfmq", "bits": "W4A8", "quant": {"fsc": False}}}


def micro_params(data_root: Path, mlflow_uri: str, methods: list[str], bits: list[str],
                 models: list[str] | None = None, studies: dict[str, Any] | None = None) -> dict[str, Any]:
    """The repo's params.yaml with every size shrunk (same keys, so it passes the same validation);
    ``models``: grid.models (default: the repo's, the latent and class-conditional latent families);
    ``studies``: studies.settings on fashion_ldm (default: one ablation row, ``MICRO_STUDY``)."""
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p = copy.deepcopy(p)
    p["data"].update(root=str(data_root), check_counts=False)
    tiny_unet = {"block_out_channels": [8, 16, 16], "norm_num_groups": 8}
    for sec in ("train_fp", "train_fp_class", "train_ldm", "train_ldm_class"):
        p[sec].update(steps=2, batch_size=8, warmup_steps=1, unet={**p[sec]["unet"], **tiny_unet}, log_every=1,
                      sample_every=0, num_sample_images=4, sample_steps=2)
    p["autoencoder"].update(block_out_channels=[8, 8, 8], num_vq_embeddings=16, steps=2, batch_size=8)
    p["vae"].update(block_out_channels=[8, 8, 8], steps=2, batch_size=8)
    p["train_sd"].update(steps=2, batch_size=8, warmup_steps=1, log_every=1, sample_every=0, num_sample_images=4,
                         sample_steps=2, unet={"block_out_channels": [8, 16, 16], "norm_num_groups": 8,
                                               "attention_head_dim": 2},
                         text_encoder={"hidden_size": 16, "num_layers": 1, "num_heads": 2})
    p["classifier"].update(epochs=1, batch_size=32)
    p["sampler"].update(num_inference_steps=4)
    p["calib_data"].update(num_samples=8, batch_size=8)
    q = p["quant"]
    q.update(method="naive", weight_bits=8, act_bits=8)  # the *_exp stages: another recipe than the grid's
    q["recon"].update(iters=2, batch_size=4)
    q["tiar_recon"].update(iters=2, batch_size=4)
    q["act_recon"].update(iters=2, batch_size=4)
    q["calib"].update(every_k=2, n_per_step=4, fsc_batch_size=4)
    p["reference"].update(num_images=32)
    p["eval"].update(num_samples=16, batch_size=16, num_bootstrap=4, grid_images=8, temporal_samples=2,
                     activation_layers=2)
    p["grid"].update(methods=methods, bits=bits, models=models or p["grid"]["models"])
    p["studies"].update(model="fashion_ldm", settings=MICRO_STUDY if studies is None else studies)
    p["report"].update(num_bootstrap=100)
    p["mlflow"].update(experiment="micro", tracking_uri=mlflow_uri)
    return p


def make_workspace(dest: Path, params: dict[str, Any]) -> Path:
    """Copy the pipeline's code + dvc.yaml into ``dest`` and write the micro params.yaml there."""
    dest.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in CODE:
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "prompts", dest / "prompts")
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # the report stage reads the committed studies and GPU checks (dvc.yaml deps): none ran in a micro workspace
    (dest / "results" / "studies").mkdir(parents=True, exist_ok=True)
    (dest / "results" / "studies" / "iterations.json").write_text('{"study": "iterations", "rows": []}')
    (dest / "results" / "studies" / "mechanisms.json").write_text('{"study": "mechanisms", "rows": []}')
    (dest / "results" / "studies" / "replicate.json").write_text('{"study": "replicate", "rows": []}')
    (dest / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    for r in (1, 2, 3):
        (dest / "benchmarks" / "results" / f"gpu-h200-run{r}.json").write_text("{}")
    return dest


def subprocess_env(**extra: str) -> dict[str, str]:
    """Env for DVC/CLI subprocesses: telemetry off, and this interpreter's bin dir first on PATH, because
    dvc.yaml's ``python -m flows.cli`` resolves ``python`` through PATH (the venv may not be activated)."""
    env = {**os.environ, **TELEMETRY_OFF, **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # mlflow.set_tracking_uri() in this process exports it; params decide
    return env


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows (cells stripped) of the Markdown table under the first heading starting with ``heading``."""
    lines = text.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(heading))
    out = []
    for ln in lines[i + 1:]:
        if ln.startswith("#"):
            break
        if ln.startswith("| ") and not ln.startswith("| Method"):
            out.append([c.strip() for c in ln.split("|")[1:-1]])
    return out


def params_file(tmp_path: Path, **changes: Any) -> str:
    """The repo's params.yaml with ``section__key=value`` changes, written to ``<tmp>/params.yaml``."""
    d = copy.deepcopy(yaml.safe_load((REPO / "params.yaml").read_text()))
    for key, value in changes.items():
        section, name = key.split("__")
        d[section][name] = value
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return str(p)
