"""LPIPS (Zhang et al., CVPR 2018; v0.1, AlexNet) of decoded samples against the FP samples of the same noise.

Offline: the AlexNet backbone is the ImageNet file the user names (``eval.lpips_backbone``: torchvision's
``alexnet-owt-7be5be79.pth``, or the same state dict as safetensors; only ``features.*`` is read), and the
five linear calibration layers are the ones the ``lpips`` package ships inside its wheel
(``lpips/weights/v0.1/alex.pth``), or a file given as ``lin_path``. No download, no unpickling of
arbitrary objects: ``.pth`` files are read with ``torch.load(weights_only=True)``.

The distance is the package's ``LPIPS(net="alex", version="0.1")`` forward: images in [-1, 1] go through
its scaling layer, AlexNet's five ReLU outputs are normalised to unit length over channels, squared
differences are weighted per channel by the linear layers, averaged over positions and summed over the
five layers. ``tests/test_lpips.py`` checks it against the ``lpips`` package itself on the same weights.
Images smaller than ``MIN_SIZE`` pixels on a side (28 px Fashion-MNIST) are upsampled bilinearly to
``MIN_SIZE`` first (AlexNet's stride-4 stem and three max-pools need at least ~64 px); grey images are
repeated to three channels.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: AlexNet ``features`` conv layers LPIPS taps (after their ReLU), with the weight shapes a file must have
TAPS = {0: (64, 3, 11, 11), 3: (192, 64, 5, 5), 6: (384, 192, 3, 3), 8: (256, 384, 3, 3), 10: (256, 256, 3, 3)}
#: LPIPS v0.1 scaling layer (inputs in [-1, 1])
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
MIN_SIZE = 64
EPS = 1e-10


class LpipsError(ValueError):
    """An LPIPS weights file that is missing or does not hold what LPIPS needs."""


def _read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise LpipsError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with objects beyond tensors, or not a torch file at all
        raise LpipsError(f"{p}: not a tensor state dict readable with weights_only=True ({type(e).__name__})") from None
    if not isinstance(state, dict):
        raise LpipsError(f"{p}: expected a state dict, got {type(state).__name__}")
    return state


def default_lin_path() -> Path:
    """The v0.1 AlexNet linear layers inside the installed ``lpips`` package."""
    import importlib.util

    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise LpipsError("the lpips package is not installed (pip install lpips==0.1.4): its wheel carries the "
                         "linear layers of LPIPS v0.1")
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "alex.pth"


class Lpips(nn.Module):
    """LPIPS v0.1 with an AlexNet backbone; ``forward(a, b)`` takes float images in [-1, 1], returns [N]."""

    def __init__(self, backbone: dict[str, torch.Tensor], lin: dict[str, torch.Tensor]):
        super().__init__()
        self.convs = nn.ModuleList()
        for idx, shape in TAPS.items():
            w, b = backbone[f"features.{idx}.weight"], backbone[f"features.{idx}.bias"]
            conv = nn.Conv2d(shape[1], shape[0], shape[2], stride=4 if idx == 0 else 1, padding={0: 2, 3: 2}.get(idx, 1))
            conv.weight.data.copy_(w)
            conv.bias.data.copy_(b)
            self.convs.append(conv)
        self.lins = nn.ParameterList([nn.Parameter(lin[f"lin{i}.model.1.weight"].float().clone()) for i in range(5)])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        out = []
        for i, conv in enumerate(self.convs):
            if i in (1, 2):  # max-pool before conv2 and conv3 (AlexNet features.2 / features.5)
                x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = F.relu(conv(x))
            out.append(x)
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
        for fa, fb, w in zip(self.taps(a), self.taps(b), self.lins):
            na = fa / (fa.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
            nb = fb / (fb.pow(2).sum(dim=1, keepdim=True).sqrt() + EPS)
            total = total + F.conv2d((na - nb) ** 2, w.to(a.dtype)).mean(dim=(1, 2, 3))
        return total


def load_lpips(backbone_path: str | os.PathLike, lin_path: str | os.PathLike | None = None, device="cpu") -> Lpips:
    """``Lpips`` from a local AlexNet file and the v0.1 linear layers; ``LpipsError`` names what is wrong."""
    backbone = _read_state(backbone_path)
    for idx, shape in TAPS.items():
        for part, want in (("weight", shape), ("bias", shape[:1])):
            k = f"features.{idx}.{part}"
            if k not in backbone:
                raise LpipsError(f"{backbone_path}: no {k!r}; expected a torchvision AlexNet state dict "
                                 "(features.0/3/6/8/10 weights and biases, e.g. alexnet-owt-7be5be79.pth)")
            if tuple(backbone[k].shape) != want:
                raise LpipsError(f"{backbone_path}: {k} has shape {tuple(backbone[k].shape)}, AlexNet's is {want}")
    lin_file = Path(lin_path) if lin_path is not None else default_lin_path()
    lin = _read_state(lin_file)
    for i, shape in enumerate(TAPS.values()):
        k = f"lin{i}.model.1.weight"
        if k not in lin or tuple(lin[k].shape) != (1, shape[0], 1, 1):
            raise LpipsError(f"{lin_file}: expected {k} of shape {(1, shape[0], 1, 1)} (LPIPS v0.1 AlexNet linear layers)")
    return Lpips(backbone, lin).to(device)


def _prepare(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float [-1, 1], three channels, at least ``MIN_SIZE`` px on a side."""
    x = images.to(device=device, dtype=torch.float32) / 127.5 - 1.0
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if min(x.shape[-2:]) < MIN_SIZE:
        h, w = x.shape[-2:]
        f = MIN_SIZE / min(h, w)
        x = F.interpolate(x, size=(round(h * f), round(w * f)), mode="bilinear", align_corners=False)
    return x


def lpips_distance(ref_images: torch.Tensor, images: torch.Tensor, model: Lpips, batch_size: int = 64) -> np.ndarray:
    """Per-sample LPIPS of uint8 ``images`` [N, C, H, W] against ``ref_images`` (row by row), float64 [N]."""
    if ref_images.shape != images.shape or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"lpips: expected two uint8 [N, C, H, W] tensors of one shape; got {tuple(ref_images.shape)} "
                         f"{ref_images.dtype} and {tuple(images.shape)} {images.dtype}")
    dev = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, images.shape[0], batch_size):
            out.append(model(_prepare(ref_images[i:i + batch_size], dev), _prepare(images[i:i + batch_size], dev)).cpu())
    return torch.cat(out).double().numpy() if out else np.zeros(0)
