"""Reference data for FID / sFID / KID (docs/method.md section 9) as users have it: an image folder, a
guided-diffusion reference batch (``.npz`` with ``arr_0`` uint8 [N, H, W, C]) or precomputed pytorch-fid
statistics (``.npz`` with ``mu`` / ``sigma``). Images are brought to the model's size as the ADM evaluator does.
"""
from __future__ import annotations

import collections
import logging
import os
import struct
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # compared case-insensitively
VERIFY_LIMIT = 2000  # check_reference opens at most this many image headers of a folder
_NPZ_IMAGES = "arr_0.npy"
_EXPECTED = ("expected an image folder (png/jpg/jpeg/webp, searched recursively) or a guided-diffusion .npz "
             "whose arr_0 is uint8 [N, H, W, C] with C in (1, 3)")
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

logger = logging.getLogger("tfmq")


class ReferenceDataError(ValueError):
    """Reference images or statistics that cannot be used as given (the message says how to fix them)."""


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Every image file under ``folder``, searched recursively, in a stable order.

    Args:
        folder: a directory; files whose suffix (any case) is in ``IMAGE_SUFFIXES`` count, others are ignored.

    Returns:
        The paths, sorted by their path relative to ``folder`` as a posix string (``a/x.png`` < ``b.png``).
    """
    root = Path(folder)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise ReferenceDataError(f"reference folder {root} {what}; expected a folder of images; fix the path")
    files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise ReferenceDataError(f"reference folder {root} holds no image file; expected files ending in "
                                 f"{', '.join(IMAGE_SUFFIXES)} (any case, subfolders included); add images or fix the path")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _npz_header(path: Path, member: str = _NPZ_IMAGES) -> tuple[tuple[int, ...], np.dtype, bool]:
    """(shape, dtype, fortran_order) of one array of an .npz, read from its .npy header (no data is loaded)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if member not in names:
                arrays = sorted(n[:-4] for n in names if n.endswith(".npy"))
                if "mu" in arrays and "sigma" in arrays:
                    raise ReferenceDataError(f"reference {path} holds statistics (mu, sigma), not images; "
                                             f"use reference.stats for precomputed FID statistics")
                raise ReferenceDataError(f"reference {path} has no {member[:-4]} (its arrays: {arrays}); {_EXPECTED}")
            with zf.open(member) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, ReferenceDataError):
            raise
        raise ReferenceDataError(f"reference {path} is not a readable .npz ({' '.join(str(e).split())}); "
                                 f"{_EXPECTED}") from None
    return tuple(shape), np.dtype(dtype), fortran


def _check_npz_images(path: Path) -> tuple[int, ...]:
    """The shape of ``arr_0`` after checking it holds uint8 images [N, H, W, C] (C in 1, 3) or [N, H, W]."""
    shape, dtype, _ = _npz_header(path)
    if dtype != np.uint8:
        raise ReferenceDataError(f"reference {path}: arr_0 has dtype {dtype}; expected uint8 images (0..255); "
                                 f"convert it with arr.astype(np.uint8) after scaling to 0..255")
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3))):
        raise ReferenceDataError(f"reference {path}: arr_0 has shape {list(shape)}; expected [N, H, W, C] with C in "
                                 f"(1, 3) or [N, H, W] (channels last, as guided-diffusion's reference batches)")
    return shape


def reference_count(path: str | os.PathLike) -> int:
    """How many reference images ``path`` holds, without decoding any of them.

    Args:
        path: an image folder (counted with :func:`list_image_files`) or an .npz (the first dimension of ``arr_0``,
            read from its .npy header: the array itself is not loaded).
    """
    p = Path(path)
    if p.is_dir():
        return len(list_image_files(p))
    if p.is_file() and p.suffix.lower() == ".npz":
        return int(_npz_header(p)[0][0])
    raise _not_reference(p)


def _not_reference(p: Path) -> ReferenceDataError:
    if not p.exists():
        return ReferenceDataError(f"reference {p} does not exist; {_EXPECTED}; fix the path")
    return ReferenceDataError(f"reference {p} is a single {p.suffix or 'suffix-less'} file; {_EXPECTED}")


def _unreadable(file: Path, e: Exception) -> ReferenceDataError:
    return ReferenceDataError(f"reference image {file} cannot be read ({' '.join(str(e).split())}); "
                              f"expected a valid png/jpg/jpeg/webp; re-save or remove it")


def center_crop_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The ADM evaluator's ``center_crop_arr`` generalised to an (H, W) target.

    While the image is at least twice the target in both dimensions it is halved with a box filter (cheap
    anti-aliasing), then resized with bicubic so that it just covers (H, W) (scale ``max(H / h, W / w)``, new
    sizes rounded) and centre-cropped to exactly (H, W). For a square target this is ``center_crop_arr``
    pixel for pixel; an image already of size (H, W) is returned unchanged.

    Args:
        image: a PIL image of any size (mode kept: convert to RGB / L before, as ADM does).
        size: the target (H, W).

    Returns:
        A PIL image with ``image.size == (W, H)``.

    Example:
        >>> center_crop_resize(Image.new("RGB", (48, 40)), (32, 32)).size
        (32, 32)
    """
    th, tw = size
    if image.size == (tw, th):
        return image
    while image.size[0] >= 2 * tw and image.size[1] >= 2 * th:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    w, h = image.size
    scale = max(th / h, tw / w)
    # max() guards a rounding below the target; it never changes a square target (ADM's case)
    image = image.resize((max(round(w * scale), tw), max(round(h * scale), th)), resample=Image.BICUBIC)
    x, y = (image.size[0] - tw) // 2, (image.size[1] - th) // 2
    return image.crop((x, y, x + tw, y + th))


def _check_size_channels(size, channels) -> tuple[int, int]:
    try:
        th, tw = (int(s) for s in size)
    except (TypeError, ValueError):
        th = tw = 0
    if th <= 0 or tw <= 0:
        raise ReferenceDataError(f"reference image size {size!r}; expected (H, W), two positive ints "
                                 f"(the model's sample size)")
    if channels not in (1, 3):
        raise ReferenceDataError(f"reference channels={channels!r}; expected 1 (grey) or 3 (RGB), "
                                 f"the model's image channels")
    return th, tw


def _check_indices(indices, n_total: int, p: Path) -> list[int]:
    if indices is None:
        return list(range(n_total))
    idx = [int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < n_total]
    if not idx or bad:
        what = f"indices {bad[:5]}" if bad else "an empty index list"
        raise ReferenceDataError(f"reference {p}: {what}; expected positions in 0..{n_total - 1} "
                                 f"({n_total} images); ask for at most {n_total} images")
    return idx


def _npz_rows(p: Path, indices: list[int]):
    """Yield (position in ``indices``, image array [H, W] or [H, W, C]) reading only the rows asked for."""
    shape = _check_npz_images(p)
    _, _, fortran = _npz_header(p)
    row_shape = shape[1:]
    row_bytes = int(np.prod(row_shape))
    order = sorted(range(len(indices)), key=lambda k: indices[k])
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo(_NPZ_IMAGES)
        if fortran:  # rows are not contiguous: rare enough to load the whole array
            arr = np.load(p)["arr_0"]
            for k in order:
                yield k, np.ascontiguousarray(arr[indices[k]])
            return
        if info.compress_type == zipfile.ZIP_STORED:  # np.savez: map the member's bytes, read only what is asked
            with open(p, "rb") as raw:
                raw.seek(info.header_offset)
                local = raw.read(30)
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                raw.seek(info.header_offset + 30 + name_len + extra_len)
                version = np.lib.format.read_magic(raw)
                (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(raw)
                offset = raw.tell()
            arr = np.memmap(p, dtype=np.uint8, mode="r", offset=offset, shape=shape)
            for k in order:
                yield k, np.array(arr[indices[k]])
            del arr
            return
        with zf.open(_NPZ_IMAGES) as f:  # np.savez_compressed: stream forward through the rows in order
            version = np.lib.format.read_magic(f)
            (np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0)(f)
            start = f.tell()
            for k in order:
                f.seek(start + indices[k] * row_bytes)
                yield k, np.frombuffer(f.read(row_bytes), dtype=np.uint8).reshape(row_shape)


def _sizes_text(sizes) -> str:
    shown = [list(s) for s in sorted(sizes)[:10]]
    return f"{shown}" + (f" and {len(sizes) - 10} more sizes" if len(sizes) > 10 else "")


def load_reference_images(path: str | os.PathLike, size: tuple[int, int], channels: int,
                          indices: Sequence[int] | None = None, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Reference images as the evaluation embeds them: uint8 [N, channels, H, W].

    Each image is converted with PIL to RGB (grey repeated) or L, then brought to ``size`` with
    :func:`center_crop_resize`; if any needed it, one warning line on the ``tfmq`` logger says how many.

    Args:
        path: an image folder (nested folders searched, other suffixes ignored; :func:`list_image_files` order)
            or an .npz whose ``arr_0`` is uint8 [N, H, W, C] with C in (1, 3), or [N, H, W] (grey), as
            guided-diffusion's reference batches.
        size: the target (H, W).
        channels: 3 (RGB) or 1 (L).
        indices: positions of the images to load, in that order (default: all).
        progress: show a tqdm progress bar.

    Returns:
        ``(images, info)``; info is ``{"source": "folder" | "npz", "path": str, "n_total": int, "n": int,
        "resized": int, "original_sizes": sorted distinct [h, w] seen (at most 10)}``.

    Example:
        >>> images, info = load_reference_images("data/celeba", (64, 64), 3, indices=range(1000))
    """
    th, tw = _check_size_channels(size, channels)
    p = Path(path)
    mode = "RGB" if channels == 3 else "L"
    if p.is_dir():
        files = list_image_files(p)
        source, n_total = "folder", len(files)
        idx = _check_indices(indices, n_total, p)

        def images():
            for k, i in enumerate(idx):
                try:
                    with Image.open(files[i]) as im:
                        image = im.convert(mode)
                except _PIL_ERRORS as e:
                    raise _unreadable(files[i], e) from None
                yield k, image
    elif p.is_file() and p.suffix.lower() == ".npz":
        shape = _check_npz_images(p)
        source, n_total = "npz", shape[0]
        idx = _check_indices(indices, n_total, p)

        def images():
            for k, arr in _npz_rows(p, idx):
                if arr.ndim == 3 and arr.shape[2] == 1:
                    arr = arr[:, :, 0]
                yield k, Image.fromarray(arr).convert(mode)
    else:
        raise _not_reference(p)

    out = torch.empty((len(idx), channels, th, tw), dtype=torch.uint8)
    seen, resized_from, resized = set(), set(), 0
    for k, im in tqdm(images(), total=len(idx), disable=not progress, desc="reference images", unit="img"):
        hw = (im.size[1], im.size[0])
        seen.add(hw)
        if hw != (th, tw):
            resized += 1
            resized_from.add(hw)
            im = center_crop_resize(im, (th, tw))
        arr = np.asarray(im, dtype=np.uint8)
        out[k] = torch.from_numpy(arr.reshape(th, tw, channels).copy()).permute(2, 0, 1)
    if resized:
        logger.warning(f"reference: {resized} of {len(idx)} images resized from {_sizes_text(resized_from)} to "
                       f"{th}x{tw} (centre crop + resize, as the ADM evaluator)")
    info = {"source": source, "path": str(p), "n_total": int(n_total), "n": len(idx), "resized": resized,
            "original_sizes": [list(s) for s in sorted(seen)[:10]]}
    return out, info


def check_reference(path: str | os.PathLike) -> str:
    """Validate reference images without decoding every pixel (``tfmq check`` calls it before heavy work).

    A folder must hold image files whose headers PIL can open and verify; only the first 2000 files
    (``VERIFY_LIMIT``, in :func:`list_image_files` order) are verified, to stay fast on large folders. An .npz
    must be a readable zip whose ``arr_0`` header says uint8 [N, H, W, C] with C in (1, 3) or [N, H, W], N >= 2.

    Args:
        path: the image folder or .npz.

    Returns:
        A one-line summary: ``"folder data/celeba: 30000 images (png, jpg)"`` or
        ``"npz ref.npz: 50000 x 256x256x3 uint8"``.
    """
    p = Path(path)
    if p.is_dir():
        files = list_image_files(p)
        for f in files[:VERIFY_LIMIT]:
            try:
                with Image.open(f) as im:
                    im.verify()
            except _PIL_ERRORS as e:
                raise _unreadable(f, e) from None
        counts = collections.Counter(f.suffix.lower().lstrip(".") for f in files)
        kinds = ", ".join(s for s, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        return f"folder {p}: {len(files)} images ({kinds})"
    if p.is_file() and p.suffix.lower() == ".npz":
        shape = _check_npz_images(p)
        if shape[0] < 2:
            raise ReferenceDataError(f"reference {p}: arr_0 holds {shape[0]} image(s); expected N >= 2 "
                                     f"(FID needs a covariance); use a larger reference batch")
        return f"npz {p}: {shape[0]} x {'x'.join(str(s) for s in shape[1:])} uint8"
    raise _not_reference(p)


def load_fid_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Precomputed FID statistics as pytorch-fid (``--save-stats``) and torch-fidelity write them.

    Args:
        path: an .npz with ``mu`` [D] and ``sigma`` [D, D] (the features' mean and covariance).

    Returns:
        ``(mu, sigma)`` as float64.

    Example:
        >>> mu, sigma = load_fid_stats("fid_stats_cifar10_train.npz")
    """
    p = Path(path)
    expected = "expected an .npz with mu [D] and sigma [D, D] (pytorch-fid --save-stats)"
    if not p.is_file():
        what = "is a folder" if p.exists() else "does not exist"
        raise ReferenceDataError(f"FID statistics {p} {what}; {expected}; fix the path")
    try:
        npz = np.load(p, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ReferenceDataError(f"FID statistics {p} is not a readable .npz ({' '.join(str(e).split())}); "
                                 f"{expected}") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ReferenceDataError(f"FID statistics {p} is a single array, not an npz; {expected}")
    with npz:
        keys = sorted(npz.files)
        if "mu" not in keys or "sigma" not in keys:
            hint = "; an .npz with arr_0 holds images: use reference.images" if "arr_0" in keys else ""
            raise ReferenceDataError(f"FID statistics {p} has arrays {keys}, no mu/sigma; {expected}{hint}")
        try:
            mu, sigma = np.asarray(npz["mu"], dtype=np.float64), np.asarray(npz["sigma"], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise ReferenceDataError(f"FID statistics {p}: mu/sigma are not numeric ({e}); {expected}") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ReferenceDataError(f"FID statistics {p}: mu has shape {list(mu.shape)} and sigma {list(sigma.shape)}; "
                                 f"{expected}; recompute them from the same features")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ReferenceDataError(f"FID statistics {p}: mu or sigma holds NaN/inf values; expected finite statistics; "
                                 f"recompute them")
    asym = float(np.abs(sigma - sigma.T).max()) if sigma.size else 0.0
    tol = 1e-6 * (float(np.abs(sigma).max()) if sigma.size else 0.0)
    if asym > tol:
        raise ReferenceDataError(f"FID statistics {p}: sigma is not symmetric (max |sigma - sigma.T| = {asym:.3g} > "
                                 f"{tol:.3g}); expected a covariance matrix; recompute it (np.cov of the features)")
    return mu, sigma
