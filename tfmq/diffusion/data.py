"""Fashion-MNIST for the embedded default model: verified IDX loading and one-file snapshots.

No pretrained diffusion weights exist offline, so the default FP model is trained here on
Fashion-MNIST (Debian package ``dataset-fashion-mnist``). The loader checks every IDX header
(magic number, dimensions, file length, counts, label range) so a truncated or wrong file fails
loudly instead of training on garbage; the snapshot is one safetensors file with deterministic bytes
so DVC sees the same hash for the same data.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

from tfmq.io import atomic_save_safetensors

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
FASHION_MNIST_COUNTS = {"train": 60000, "test": 10000}
_FILE_STEMS = {"train": "train", "test": "t10k"}
_DATASET_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
_HOW_TO_FIX = (
    "fix: `apt-get install dataset-fashion-mnist` (installs "
    f"{DEFAULT_FASHION_MNIST_DIR}) or set data.root in params.yaml to a directory holding the four "
    "IDX files ({train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz])"
)


class DatasetError(FileNotFoundError, ValueError):
    """A dataset file is missing or corrupt; the message names the path and both ways to fix it."""


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise DatasetError(f"Fashion-MNIST file {root / stem}[.gz] not found; {_HOW_TO_FIX}")


def _read_idx(path: Path, magic: int, ndim: int) -> torch.Tensor:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"cannot read IDX file {path} ({e}); {_HOW_TO_FIX}") from e
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"IDX file {path} is {len(raw)} bytes, shorter than its {header}-byte header; {_HOW_TO_FIX}")
    found = struct.unpack(">I", raw[:4])[0]
    if found != magic:
        raise DatasetError(f"IDX file {path} has magic 0x{found:08x}, expected 0x{magic:08x}; {_HOW_TO_FIX}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    n_bytes = 1
    for d in dims:
        n_bytes *= d
    if len(raw) - header != n_bytes:
        raise DatasetError(
            f"IDX file {path} holds {len(raw) - header} data bytes, header dims {dims} need {n_bytes}; {_HOW_TO_FIX}"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(dims)


def load_fashion_mnist(
    root: str | os.PathLike = DEFAULT_FASHION_MNIST_DIR, expected_counts: dict[str, int] | None = FASHION_MNIST_COUNTS
) -> dict[str, torch.Tensor]:
    """Load and verify the four Fashion-MNIST IDX files (gzip or raw).

    Args:
        root: directory with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
        expected_counts: ``{"train": 60000, "test": 10000}``; ``None`` skips the count check (test fixtures).

    Returns:
        ``train_images`` uint8 [60000, 28, 28], ``train_labels`` int64 [60000],
        ``test_images`` uint8 [10000, 28, 28], ``test_labels`` int64 [10000].

    Raises:
        DatasetError: missing directory/file, bad magic, truncated data, wrong counts or labels outside 0..9.

    Example:
        >>> d = load_fashion_mnist()
        >>> d["train_images"].shape
        torch.Size([60000, 28, 28])
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"Fashion-MNIST directory {root} does not exist; {_HOW_TO_FIX}")
    out: dict[str, torch.Tensor] = {}
    for split, stem in _FILE_STEMS.items():
        img_path = _find_idx(root, f"{stem}-images-idx3-ubyte")
        lab_path = _find_idx(root, f"{stem}-labels-idx1-ubyte")
        images = _read_idx(img_path, IDX_IMAGES_MAGIC, 3)
        labels = _read_idx(lab_path, IDX_LABELS_MAGIC, 1).to(torch.int64)
        if tuple(images.shape[1:]) != (28, 28):
            raise DatasetError(f"{img_path} holds images of shape {tuple(images.shape[1:])}, expected (28, 28); {_HOW_TO_FIX}")
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"{img_path} has {images.shape[0]} images but {lab_path} has {labels.shape[0]} labels; {_HOW_TO_FIX}"
            )
        if expected_counts is not None and images.shape[0] != expected_counts[split]:
            raise DatasetError(
                f"{img_path} has {images.shape[0]} images, expected {expected_counts[split]} for the {split} split; {_HOW_TO_FIX}"
            )
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
            raise DatasetError(
                f"{lab_path} has labels in {int(labels.min())}..{int(labels.max())}, expected 0..9; {_HOW_TO_FIX}"
            )
        out[f"{split}_images"] = images
        out[f"{split}_labels"] = labels
    return out


def save_dataset(d: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write the dataset dict as ONE safetensors file; same tensors give byte-identical files.

    Args:
        d: the dict from :func:`load_fashion_mnist` (keys ``{train,test}_{images,labels}``).
        path: output ``.safetensors`` path (written atomically).
    """
    missing = [k for k in _DATASET_KEYS if k not in d]
    if missing:
        raise ValueError(f"save_dataset got keys {sorted(d)}, missing {missing}; pass the dict from load_fashion_mnist")
    tensors = {k: d[k].contiguous() for k in _DATASET_KEYS}
    # ONE metadata key: safetensors writes a multi-key metadata map in hash order (random per
    # process), which would make identical data hash differently.
    meta = {"format": "tfmq-dataset-v1 fashion-mnist"}
    return atomic_save_safetensors(tensors, path, metadata=meta)


def load_dataset(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_dataset` (uint8 images, int64 labels)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset snapshot {path} not found; run the data stage first (it reads data.root in params.yaml)")
    d = load_file(str(path))
    missing = [k for k in _DATASET_KEYS if k not in d]
    if missing:
        raise DatasetError(f"dataset snapshot {path} lacks {missing}; re-create it with tfmq.diffusion.data.save_dataset")
    return d


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,H,W] or [N,C,H,W] in 0..255 -> float32 [N,C,H,W] in [-1, 1] (C=1 added for [N,H,W])."""
    if images_uint8.dtype != torch.uint8:
        raise ValueError(f"to_model_range expects uint8 images, got {images_uint8.dtype}; pass the raw dataset tensor")
    x = images_uint8 if images_uint8.dim() == 4 else images_uint8.unsqueeze(1)
    return x.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [N,C,H,W] in [-1, 1] -> uint8 in 0..255 (values outside [-1, 1] are clipped)."""
    return ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
