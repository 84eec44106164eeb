"""Domain classifier metrics for Fashion-MNIST samples (docs/method.md section 9, offline stand-in for IS).

ImageNet Inception knows nothing about 28x28 clothes, so the Inception Score of Fashion-MNIST
samples says little. A small CNN trained on the same training split gives a "domain IS"
(the IS formula on its softmax) and, for class-conditional models, the accuracy with which
samples show the class they were asked for.

Example::

    info = train_classifier(d["train_images"], d["train_labels"], d["test_images"], d["test_labels"], "out/clf")
    model = load_classifier("out/clf")
    domain_inception_score(model, samples_uint8)["mean"]; class_accuracy(model, samples_uint8, labels)["accuracy"]
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from tfmq.diffusion.data import FASHION_MNIST_CLASSES
from tfmq.diffusion.text import class_of_prompt
from tfmq.evaluation.feature_metrics import inception_score_from_logits
from tfmq.io import atomic_save_safetensors, atomic_write_json

WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "classifier.json"
DOMAIN_IS_LABEL = "domain IS (fashion-mnist classifier)"
CLASS_ACC_LABEL = "class accuracy (fashion-mnist classifier)"
DOMAIN_FD_LABEL = "domain FD (fashion-mnist classifier, 128-d penultimate features)"


class FashionMNISTClassifier(nn.Module):
    """Three 3x3 conv stages (16-32-64 channels, BN, ReLU, two 2x2 max-pools) and a 128-unit head: ~0.44 M params."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, image_size: int = 28):
        super().__init__()
        self.config = {"num_classes": num_classes, "in_channels": in_channels, "width": width, "image_size": image_size}
        w = width

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *stage(in_channels, w), nn.MaxPool2d(2), *stage(w, 2 * w), nn.MaxPool2d(2), *stage(2 * w, 4 * w)
        )
        side = image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(4 * w * side * side, 128), nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(_to_input(x_uint8)))

    def embed(self, x_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(penultimate features [N, 128] after the head's ReLU, logits [N, classes]) in one pass: the features of
        the domain Fréchet distance (``domain_frechet``) and the labels of the same images."""
        h = self.head[:-1](self.features(_to_input(x_uint8)))
        return h, self.head[-1](h)


def _to_input(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.uint8:
        raise ValueError(f"classifier input must be uint8 images [N,1,H,W]; got dtype {x.dtype}; fix: tfmq.diffusion.data.to_uint8")
    if x.dim() == 3:
        x = x[:, None]
    return x.float().div(127.5).sub(1.0)


def _check_pair(images: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise ValueError(f"{name} images must be uint8 [N,28,28] or [N,1,28,28]; got {images.dtype} {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{name} labels must be [N={images.shape[0]}]; got {tuple(labels.shape)}")


@torch.no_grad()
def predict_logits(
    model: nn.Module, images_uint8: torch.Tensor, batch_size: int = 500, device: str | torch.device = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Logits [N, classes] (float32, CPU) in eval mode, batched."""
    from tqdm.auto import tqdm

    model.eval().to(device)
    out = []
    for i in tqdm(range(0, images_uint8.shape[0], batch_size), disable=not progress, leave=False, desc="classify"):
        out.append(model(images_uint8[i : i + batch_size].to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def predict_embeddings(model: nn.Module, images_uint8: torch.Tensor, batch_size: int = 500,
                       device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate features [N, D], logits [N, classes]), float32 on the CPU, in eval mode, batched."""
    model.eval().to(device)
    feats, logits = [], []
    for i in range(0, images_uint8.shape[0], batch_size):
        f, lg = model.embed(images_uint8[i : i + batch_size].to(device))
        feats.append(f.float().cpu())
        logits.append(lg.float().cpu())
    return torch.cat(feats), torch.cat(logits)


def train_classifier(
    train_uint8: torch.Tensor,
    labels: torch.Tensor,
    test_uint8: torch.Tensor,
    test_labels: torch.Tensor,
    out_dir: str | Path,
    epochs: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 128,
    lr: float = 2e-3,
    width: int = 16,
    progress: bool = True,
) -> dict:
    """Train the domain classifier (AdamW, one-cycle LR, random horizontal flips) and save it.

    Writes ``out_dir/classifier.safetensors`` and ``out_dir/classifier.json`` (architecture config,
    training settings, per-epoch loss, test accuracy, wall seconds). Returns that JSON as a dict.
    """
    from tqdm.auto import tqdm

    _check_pair(train_uint8, labels, "train")
    _check_pair(test_uint8, test_labels, "test")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = train_uint8 if train_uint8.dim() == 4 else train_uint8[:, None]
    y = labels.long()
    num_classes = int(max(int(y.max()), int(test_labels.max())) + 1)
    model = FashionMNISTClassifier(num_classes, x.shape[1], width, x.shape[-1]).to(device)
    steps_per_epoch = (x.shape[0] + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    history, t0 = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        total, n = 0.0, 0
        for i in tqdm(range(steps_per_epoch), disable=not progress, leave=False, desc=f"classifier epoch {epoch}"):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = x[idx], y[idx].to(device)
            flip = torch.rand(xb.shape[0], generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb).to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(idx), n + len(idx)
        history.append({"epoch": epoch, "train_loss": total / n})
    train_seconds = time.perf_counter() - t0
    pred = predict_logits(model, test_uint8, device=device).argmax(1)
    acc = float((pred == test_labels.cpu()).float().mean())
    info = {
        "architecture": "FashionMNISTClassifier",
        "config": model.config,
        "params": sum(p.numel() for p in model.parameters()),
        "train": {"epochs": epochs, "seed": seed, "batch_size": batch_size, "lr": lr, "optimizer": "AdamW+OneCycle",
                  "augmentation": "random horizontal flip", "n_train": int(x.shape[0])},
        "history": history,
        "test_accuracy": acc,
        "n_test": int(test_uint8.shape[0]),
        "train_seconds": round(train_seconds, 2),
        "device": str(device),
    }
    out_dir = Path(out_dir)
    atomic_save_safetensors(model.state_dict(), out_dir / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_json(info, out_dir / CONFIG_NAME)
    return info


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> FashionMNISTClassifier:
    """Load a classifier saved by ``train_classifier`` (directory with classifier.safetensors + .json)."""
    path = Path(path)
    if not (path / WEIGHTS_NAME).is_file() or not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"no classifier in {path}; expected {WEIGHTS_NAME} and {CONFIG_NAME}; fix: run train_classifier first"
        )
    info = json.loads((path / CONFIG_NAME).read_text())
    model = FashionMNISTClassifier(**info["config"])
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
    model.test_accuracy = info.get("test_accuracy")  # provenance for reports
    return model.to(device).eval()


def _as_model(model_or_path, device) -> nn.Module:
    return load_classifier(model_or_path, device) if isinstance(model_or_path, (str, Path)) else model_or_path


def domain_inception_score(
    model_or_path: nn.Module | str | Path,
    images_uint8: torch.Tensor,
    splits: int = 10,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """IS formula on the domain classifier's softmax, mean/std over ``splits`` (higher = sharper + more diverse)."""
    model = _as_model(model_or_path, device)
    logits = predict_logits(model, images_uint8, device=device, progress=progress)
    return domain_inception_score_from_logits(logits, splits) | {
        "classifier_test_accuracy": getattr(model, "test_accuracy", None)
    }


def domain_inception_score_from_logits(logits: torch.Tensor, splits: int = 10, shuffle: bool = True) -> dict:
    s = inception_score_from_logits(logits, splits=splits, shuffle=shuffle)
    return {**s, "n": int(logits.shape[0]), "num_classes": int(logits.shape[1]), "label": DOMAIN_IS_LABEL,
            "max_possible": int(logits.shape[1])}


def class_accuracy(
    model_or_path: nn.Module | str | Path,
    images_uint8: torch.Tensor,
    intended_labels: torch.Tensor,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict:
    """Share of class-conditional samples that the classifier assigns to the class they were sampled for."""
    _check_pair(images_uint8, intended_labels, "sample")
    model = _as_model(model_or_path, device)
    pred = predict_logits(model, images_uint8, device=device, progress=progress).argmax(1)
    y = intended_labels.cpu().long()
    hit = pred == y
    per_class = {int(c): float(hit[y == c].float().mean()) for c in torch.unique(y)}
    return {"accuracy": float(hit.float().mean()), "per_class": per_class, "n": int(y.numel()),
            "label": CLASS_ACC_LABEL, "classifier_test_accuracy": getattr(model, "test_accuracy", None)}


def classifier_input_shape(path: str | Path) -> tuple[int, int, int]:
    """``(channels, height, width)`` of the images a classifier saved by ``train_classifier`` was trained on."""
    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG_NAME).read_text())["config"]
    except (OSError, ValueError, KeyError) as e:
        raise FileNotFoundError(f"no classifier in {path} ({e}); expected {WEIGHTS_NAME} and {CONFIG_NAME} written by "
                                "train_classifier") from None
    size = int(cfg.get("image_size", 28))
    return int(cfg.get("in_channels", 1)), size, size


def domain_classifier_for(choice: str | None, default: str | Path, image_shape: tuple[int, int, int]
                          ) -> tuple[str | None, str | None]:
    """The domain classifier an evaluation of images of ``image_shape`` (C, H, W) uses, and why none if none.

    ``choice``: ``"auto"`` (``default``, our Fashion-MNIST classifier, when it was trained on images of this shape),
    ``None`` (no domain metrics), or a classifier folder, which must match. Returns ``(path, None)`` or
    ``(None, reason)``: domain IS, class accuracy and prompt accuracy are never computed on images a classifier
    was not trained on (an RGB 256 px LSUN sample through a 28 px garment classifier is no number at all).
    """
    if choice is None:
        return None, "eval.domain_classifier is null: no classifier of this data's domain"
    path = str(default) if choice == "auto" else str(choice)
    if choice == "auto" and not (Path(path) / CONFIG_NAME).is_file():
        return None, f"no domain classifier at {path} (eval.domain_classifier: auto)"
    have = classifier_input_shape(path)
    if tuple(have) == tuple(image_shape):
        return path, None
    why = (f"the domain classifier {path} was trained on {have[0]}x{have[1]}x{have[2]} images; this model makes "
           f"{image_shape[0]}x{image_shape[1]}x{image_shape[2]}")
    if choice == "auto":
        return None, why + " (eval.domain_classifier: auto uses it only on the data it was trained on)"
    raise ValueError(f"eval.domain_classifier={choice!r}: {why}; expected a classifier of this model's images, "
                     "auto or null")


def prompt_labels(prompts: list[str]) -> torch.Tensor:
    """The Fashion-MNIST class each prompt names (``tfmq.diffusion.text.class_of_prompt``), -1 where none."""
    found = (class_of_prompt(p, FASHION_MNIST_CLASSES) for p in prompts)
    return torch.tensor([-1 if c is None else c for c in found], dtype=torch.int64)
