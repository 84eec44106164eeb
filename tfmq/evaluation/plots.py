"""Figures for the temporal-disturbance analyses (poster figures: feature-error heatmap, mismatch,
trajectory deviation, activation range per timestep). Agg backend; every PNG is written atomically."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tfmq.io import atomic_write_bytes  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(buf.getvalue(), path)


def _short(name: str) -> str:
    return (name.replace("down_blocks.", "d").replace("up_blocks.", "u").replace("mid_block", "m")
            .replace(".resnets.", "r").replace(".downsamplers.", "ds").replace(".upsamplers.", "us"))


def _tick_positions(n: int, max_ticks: int = 12) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, max_ticks)).round().astype(int))


def _heatmap(values: np.ndarray, names: Sequence[str], timesteps: Sequence[int], title: str, cbar: str, path,
             cmap: str, vmin=None, vmax=None) -> Path:
    T, n = values.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * n + 2.5), max(3.5, min(0.12 * T + 2.0, 9.0))))
    im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(n), [_short(s) for s in names], rotation=90, fontsize=7)
    rows = _tick_positions(T)
    ax.set_yticks(rows, [f"{i}: t={timesteps[i]}" for i in rows], fontsize=7)
    ax.set_xlabel("residual block (down -> mid -> up)")
    ax.set_ylabel("sampler step : timestep")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=cbar)
    return save_figure(fig, path)


def plot_temporal_feature_error(cos: torch.Tensor, names, timesteps, path) -> Path:
    c = cos.double().numpy()
    return _heatmap(c, names, timesteps, f"temporal feature error: cos(emb, emb^q)  (min {c.min():.4f})",
                    "cosine similarity", path, "viridis", vmin=min(c.min(), 0.99), vmax=1.0)


def plot_temporal_mismatch(delta_step: torch.Tensor, names, timesteps, path) -> Path:
    d = delta_step.numpy()
    m = max(1, int(np.abs(d).max()))
    return _heatmap(d, names, timesteps, "temporal mismatch delta (sampler steps; >0 = looks like a later step)",
                    "delta_{t,i} (steps)", path, "coolwarm", vmin=-m, vmax=m)


def plot_trajectory_deviation(result: dict, path) -> Path:
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    k = np.arange(len(result["rmse"]))
    ax[0].plot(k, result["rmse"], label="RMSE(x_fp, x_q) accumulated")
    ax[0].plot(k[1:], result["local_rmse"], label="RMSE one quantized step on FP x_t", linestyle="--")
    ax[0].set_xlabel("sampler steps taken")
    ax[0].set_ylabel("RMSE")
    ax[0].legend(fontsize=7)
    ax[1].plot(k, result["cos"])
    ax[1].set_xlabel("sampler steps taken")
    ax[1].set_ylabel("cos(x_fp, x_q)")
    fig.suptitle(f"trajectory deviation ({result['scheduler']}, {result['num_inference_steps']} steps, "
                 f"{result['num_samples']} samples, seed {result['seed']})", fontsize=9)
    return save_figure(fig, path)


def plot_activation_ranges(result: dict, path) -> Path:
    names = result["names"]
    n = len(names)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 2.8 * rows), squeeze=False)
    steps = np.arange(len(result["timesteps"]))
    for j, name in enumerate(names):
        a = axes[j // cols][j % cols]
        lo, hi = result["min"][:, j].numpy(), result["max"][:, j].numpy()
        a.fill_between(steps, lo, hi, alpha=0.35)
        a.plot(steps, lo, lw=0.8)
        a.plot(steps, hi, lw=0.8)
        a.set_title(name, fontsize=7)
        a.set_xlabel("sampler step (0 = noisiest)", fontsize=7)
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle("activation range (input min/max) per timestep", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
