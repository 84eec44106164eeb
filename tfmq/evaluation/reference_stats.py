"""Reference statistics for FID / sFID / KID (docs/method.md section 9): embed real images once, cache them.

Features, mean and covariance of one (dataset split, extractor) go into one safetensors file with a
JSON sidecar, so each evaluation only embeds the generated images. A cache is reused only when its
meta (extractor, image size, N, sha256 of the images, format version) matches; images are embedded
through torch-fidelity's feature loop with the extractors registered in ``extractors``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from tfmq.evaluation.extractors import ExtractorSpec, create_extractor, get_extractor_spec
from tfmq.evaluation.feature_metrics import feature_statistics, frechet_distance_eig, inception_score_from_logits, psd_sqrt
from tfmq.io import atomic_save_safetensors, atomic_write_json

DEFAULT_BATCH_SIZE = 100
REFERENCE_FORMAT_VERSION = "1"


class UInt8ImageDataset(Dataset):
    """uint8 [N,1|3,H,W] tensor as the Dataset torch-fidelity expects (3xHxW uint8 per item)."""

    def __init__(self, images: torch.Tensor):
        _check_images(images)
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        x = self.images[i]
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def _check_images(images) -> None:
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] in (1, 3)):
        got = (tuple(images.shape), images.dtype) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(
            f"images must be a uint8 tensor [N,1|3,H,W]; got {got}; fix: tfmq.diffusion.data.to_uint8(x) for x in [-1,1]"
        )
    if images.shape[0] < 2:
        raise ValueError(f"need at least 2 images for a covariance; got {images.shape[0]}; fix: generate more samples")


def images_sha256(images: torch.Tensor) -> str:
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def extract_features(
    images: torch.Tensor,
    extractor: str,
    features: Sequence[str],
    weights_path: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Embed uint8 images with a registered extractor, batched (tqdm). Returns float32 CPU features."""
    from torch_fidelity.utils import get_featuresdict_from_dataset

    _check_images(images)
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} not supported by torch-fidelity's feature loop; expected cpu or cuda")
    fe = create_extractor(extractor, list(features), weights_path=weights_path, device=device)
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        out = get_featuresdict_from_dataset(
            UInt8ImageDataset(images), fe, batch_size, device.type == "cuda", True, progress
        )
    return {k: v.float().cpu() for k, v in out.items()}


# ----------------------------------------------------------------------------- reference statistics


@dataclass
class ReferenceStats:
    """Cached reference features + Gaussian statistics of one (split, extractor)."""

    path: Path
    meta: dict
    features: dict[str, torch.Tensor]  # feature layer -> [N, D] float32
    mu: dict[str, np.ndarray]
    sigma: dict[str, np.ndarray]
    _sqrt: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def sigma_sqrt(self, layer: str) -> np.ndarray:
        """``psd_sqrt(sigma[layer])``, computed once per loaded reference."""
        if layer not in self._sqrt:
            self._sqrt[layer] = psd_sqrt(self.sigma[layer])
        return self._sqrt[layer]

    def fid(self, features: torch.Tensor, layer: str) -> float:
        """FID of raw features against this reference (eigh formulation, see ``frechet_distance``)."""
        x = features.double().numpy() if torch.is_tensor(features) else np.asarray(features, np.float64)
        return frechet_distance_eig(x, self.mu[layer], self.sigma_sqrt(layer), float(np.trace(self.sigma[layer])))

    @property
    def spec(self) -> ExtractorSpec:
        return get_extractor_spec(self.meta["extractor"])

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceStats":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference stats {path} not found; fix: run compute_reference_stats first")
        meta = json.loads(_meta_path(path).read_text())
        t = load_file(str(path))
        feats = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("features.")}
        mu = {k.split(".", 1)[1]: v.numpy() for k, v in t.items() if k.startswith("mu.")}
        sigma = {k.split(".", 1)[1]: v.numpy() for k, v in t.items() if k.startswith("sigma.")}
        return cls(path, meta, feats, mu, sigma)


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def compute_reference_stats(
    real_uint8: torch.Tensor,
    out_path: str | Path,
    extractor: str = "efficientnet-lite0",
    split: str = "test",
    weights_path: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    progress: bool = True,
    recompute: bool = False,
) -> ReferenceStats:
    """Embed the real images once and cache features, mu, sigma (float64) + JSON meta.

    Args:
        real_uint8: uint8 [N,1|3,H,W] reference images (e.g. the Fashion-MNIST test split, N=10 000).
        out_path: ``*.safetensors``; the meta goes to the same name with ``.json``.
        extractor: ``"efficientnet-lite0"`` (offline default), ``"efficientnet-lite0-224"`` or
            ``"inception-v3-compat-sfid"`` (needs ``weights_path``).
        split: name of the data split, recorded in the meta.
        recompute: ignore an existing cache file. Without it, a cache whose meta matches
            (extractor, image size, N, data sha256) is loaded instead of recomputed.
    """
    spec = get_extractor_spec(extractor)
    _check_images(real_uint8)
    out_path = Path(out_path)
    digest = images_sha256(real_uint8)
    want = {"extractor": spec.name, "image_size": spec.image_size, "n": int(real_uint8.shape[0]),
            "data_sha256": digest, "split": split, "format_version": REFERENCE_FORMAT_VERSION}
    if not recompute and out_path.is_file() and _meta_path(out_path).is_file():
        cached = ReferenceStats.load(out_path)
        if all(cached.meta.get(k) == v for k, v in want.items()):
            return cached
    t0 = time.perf_counter()
    layers = [spec.fid_feature, spec.spatial_feature, spec.logits_feature]
    feats = extract_features(real_uint8, spec.name, layers, weights_path, batch_size, device, progress)
    seconds = time.perf_counter() - t0
    mu, sigma, tensors = {}, {}, {}
    for layer in (spec.fid_feature, spec.spatial_feature):
        mu[layer], sigma[layer] = feature_statistics(feats[layer])
        tensors[f"features.{layer}"] = feats[layer]
        tensors[f"mu.{layer}"] = torch.from_numpy(mu[layer])
        tensors[f"sigma.{layer}"] = torch.from_numpy(sigma[layer])
    isc = inception_score_from_logits(feats[spec.logits_feature]) if len(real_uint8) >= 10 else None
    meta = {
        **want,
        "extractor_label": spec.label,
        "fid_feature": spec.fid_feature,
        "spatial_feature": spec.spatial_feature,
        "spatial_label": spec.spatial_label,
        "feature_dims": {k: int(v.shape[1]) for k, v in feats.items()},
        "image_shape": list(real_uint8.shape[1:]),
        "weights_path": weights_path,
        "extract_seconds": round(seconds, 3),
        "images_per_second": round(real_uint8.shape[0] / seconds, 2),
        "reference_is": isc,
    }
    atomic_save_safetensors(tensors, out_path, metadata={k: json.dumps(v) for k, v in meta.items()})
    atomic_write_json(meta, _meta_path(out_path))
    return ReferenceStats(out_path, meta, {k: feats[k] for k in (spec.fid_feature, spec.spatial_feature)}, mu, sigma)


def fid_stats_reference(mu: np.ndarray, sigma: np.ndarray, out_path: str | Path, extractor: str,
                        source: str) -> ReferenceStats:
    """A reference of precomputed FID statistics alone (pytorch-fid / torch-fidelity ``mu``, ``sigma``), cached like
    ``compute_reference_stats``: FID (with its bootstrap interval) is scored against it; sFID and KID need the real
    images' features, so scores against it list them as absent with that reason.

    Args:
        mu, sigma: float64 [D], [D, D] of the extractor's FID layer (``tfmq.evaluation.reference_data.load_fid_stats``).
        extractor: the network the statistics were computed with; D must be its FID layer's width.
        source: the statistics file, recorded in the meta.
    """
    spec = get_extractor_spec(extractor)
    dims = int(spec.fid_feature) if spec.fid_feature.isdigit() else None
    if dims is not None and mu.shape[0] != dims:
        raise ValueError(f"{source}: statistics of {mu.shape[0]}-d features, but eval.extractor={spec.name} scores FID "
                         f"on its {dims}-d layer {spec.fid_feature!r}; expected statistics of the same network "
                         "(pytorch-fid's 2048-d pool3: eval.extractor inception-v3-compat with eval.inception_weights)")
    out_path = Path(out_path)
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    meta = {"extractor": spec.name, "image_size": spec.image_size, "n": 0, "data_sha256": None, "split": source,
            "format_version": REFERENCE_FORMAT_VERSION, "stats_only": True, "source": source,
            "extractor_label": spec.label, "fid_feature": spec.fid_feature, "spatial_feature": None,
            "feature_dims": {spec.fid_feature: int(mu.shape[0])}}
    tensors = {f"mu.{spec.fid_feature}": torch.from_numpy(mu), f"sigma.{spec.fid_feature}": torch.from_numpy(sigma)}
    atomic_save_safetensors(tensors, out_path, metadata={k: json.dumps(v) for k, v in meta.items()})
    atomic_write_json(meta, _meta_path(out_path))
    return ReferenceStats(out_path, meta, {}, {spec.fid_feature: mu}, {spec.fid_feature: sigma})
