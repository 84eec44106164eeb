"""tfmq.diffusion.data: IDX verification, error messages, deterministic one-file snapshots."""
import gzip
import hashlib
import struct
from pathlib import Path

import pytest
import torch

from tfmq.diffusion.data import (
    DEFAULT_FASHION_MNIST_DIR,
    DatasetError,
    load_dataset,
    load_fashion_mnist,
    save_dataset,
    to_model_range,
    to_uint8,
)

COUNTS = {"train": 12, "test": 5}


def _write_idx(path: Path, arr: torch.Tensor, magic: int, gz: bool) -> None:
    raw = struct.pack(">I", magic) + struct.pack(f">{arr.dim()}I", *arr.shape) + arr.to(torch.uint8).numpy().tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw, mtime=0)
    path.write_bytes(raw)


def _fixture(root: Path, gz: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    data = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        n = COUNTS[split]
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(n) % 10
        _write_idx(root / f"{stem}-images-idx3-ubyte", images, 0x803, gz)
        _write_idx(root / f"{stem}-labels-idx1-ubyte", labels, 0x801, gz and split == "train")  # mixed gz/raw
        data[f"{split}_images"], data[f"{split}_labels"] = images, labels
    return data


def test_load_fixture_shapes_counts_labels(tmp_path):
    ref = _fixture(tmp_path)
    d = load_fashion_mnist(tmp_path, expected_counts=COUNTS)
    assert d["train_images"].shape == (12, 28, 28) and d["train_images"].dtype == torch.uint8
    assert d["test_images"].shape == (5, 28, 28)
    assert d["train_labels"].dtype == torch.int64 and d["test_labels"].tolist() == [0, 1, 2, 3, 4]
    for k in ref:
        assert torch.equal(d[k], ref[k].to(d[k].dtype)), k


def test_raw_idx_without_gz(tmp_path):
    ref = _fixture(tmp_path, gz=False)
    d = load_fashion_mnist(tmp_path, expected_counts=COUNTS)
    assert torch.equal(d["test_images"], ref["test_images"])


def test_wrong_count_is_an_error(tmp_path):
    _fixture(tmp_path)
    with pytest.raises(DatasetError, match="expected 60000"):
        load_fashion_mnist(tmp_path)  # the real counts are the default check


def test_corrupt_magic(tmp_path):
    _fixture(tmp_path)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = bytearray(gzip.decompress(bad.read_bytes()))
    raw[3] = 0x01
    bad.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DatasetError, match=r"magic 0x00000801, expected 0x00000803") as e:
        load_fashion_mnist(tmp_path, expected_counts=COUNTS)
    assert str(bad) in str(e.value)


def test_truncated_data_and_bad_labels(tmp_path):
    _fixture(tmp_path)
    img = tmp_path / "train-images-idx3-ubyte.gz"
    img.write_bytes(gzip.compress(gzip.decompress(img.read_bytes())[:-7]))
    with pytest.raises(DatasetError, match="data bytes"):
        load_fashion_mnist(tmp_path, expected_counts=COUNTS)
    _fixture(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", torch.tensor([0, 1, 2, 3, 12]), 0x801, gz=False)
    with pytest.raises(DatasetError, match=r"labels in 0\.\.12, expected 0\.\.9"):
        load_fashion_mnist(tmp_path, expected_counts=COUNTS)


def test_missing_dir_and_file_messages(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_fashion_mnist(tmp_path / "nope")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nope") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root" in msg
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    _fixture(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.*apt-get"):
        load_fashion_mnist(tmp_path, expected_counts=COUNTS)


def test_snapshot_roundtrip_and_deterministic_bytes(tmp_path):
    d = load_fashion_mnist(_fixture_dir(tmp_path), expected_counts=COUNTS)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_dataset(d, a)
    save_dataset({k: d[k].clone() for k in reversed(list(d))}, b)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    back = load_dataset(a)
    assert set(back) == set(d) and all(torch.equal(back[k], d[k]) for k in d)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "missing.safetensors")


def _fixture_dir(tmp_path: Path) -> Path:
    root = tmp_path / "idx"
    root.mkdir()
    _fixture(root)
    return root


def test_model_range_roundtrip():
    x = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16)
    y = to_model_range(x)
    assert y.shape == (1, 1, 16, 16) and y.min() == -1.0 and y.max() == 1.0
    assert torch.equal(to_uint8(y), x.unsqueeze(1))
    assert to_uint8(torch.tensor([[-3.0, 3.0]])).tolist() == [[0, 255]]


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_DIR).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_counts():
    d = load_fashion_mnist()
    assert d["train_images"].shape == (60000, 28, 28) and d["test_images"].shape == (10000, 28, 28)
    assert torch.equal(d["train_labels"].bincount(), torch.full((10,), 6000))
