"""Reference data as users have it (tfmq.evaluation.reference_data): image folders, guided-diffusion .npz
batches and pytorch-fid statistics; tiny seeded images written inline."""
import logging
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from tfmq.evaluation.reference_data import (
    IMAGE_SUFFIXES, ReferenceDataError, center_crop_resize, check_reference, list_image_files, load_fid_stats,
    load_reference_images, reference_count,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def adm_center_crop_arr(pil_image, image_size):
    """guided-diffusion's evaluator ``center_crop_arr``, written from its published description."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture
def png_folder(tmp_path):
    """Five 8x8 RGB pngs in nested folders (+ a text file), and the same images as an npz in sorted order."""
    root = tmp_path / "imgs"
    names = ["b.png", "a/x.png", "a/c/z.PNG", "a/y.png", "c.png"]  # sorted posix: a/c/z.PNG, a/x, a/y, b, c
    arrays = {}
    for k, n in enumerate(names):
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        arrays[n] = rgb(8, 8, k)
        Image.fromarray(arrays[n]).save(root / n)
    (root / "a" / "notes.txt").write_text("not an image")
    order = sorted(names, key=str)
    np.savez(tmp_path / "ref.npz", np.stack([arrays[n] for n in order]))
    return root, order, arrays


def test_list_image_files_recursive_sorted_and_filtered(tmp_path, png_folder):
    root, order, _ = png_folder
    Image.fromarray(rgb(4, 4, 9)).save(root / "a" / "w.jpg")
    Image.fromarray(rgb(4, 4, 9)).save(root / "d.webp")
    files = list_image_files(root)
    assert [f.relative_to(root).as_posix() for f in files] == [
        "a/c/z.PNG", "a/w.jpg", "a/x.png", "a/y.png", "b.png", "c.png", "d.webp"]
    assert set(IMAGE_SUFFIXES) == {".png", ".jpg", ".jpeg", ".webp"}
    assert reference_count(root) == 7
    with pytest.raises(ReferenceDataError, match="does not exist; expected a folder of images"):
        list_image_files(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("")
    with pytest.raises(ReferenceDataError, match="holds no image file; expected files ending in"):
        list_image_files(tmp_path / "empty")


def test_folder_and_npz_of_same_images_give_identical_tensors(tmp_path, png_folder):
    root, order, arrays = png_folder
    a, info_a = load_reference_images(root, (8, 8), 3)
    b, info_b = load_reference_images(tmp_path / "ref.npz", (8, 8), 3)
    assert a.dtype == torch.uint8 and a.shape == (5, 3, 8, 8)
    assert torch.equal(a, b)
    assert torch.equal(a[0], torch.from_numpy(arrays[order[0]]).permute(2, 0, 1))
    assert info_a == {"source": "folder", "path": str(root), "n_total": 5, "n": 5, "resized": 0, "original_sizes": [[8, 8]]}
    assert info_b["source"] == "npz" and info_b["n_total"] == 5 and info_b["resized"] == 0
    # the compressed npz is read by streaming, the plain one by mapping: same images
    np.savez_compressed(tmp_path / "refc.npz", np.stack([arrays[n] for n in order]))
    c, _ = load_reference_images(tmp_path / "refc.npz", (8, 8), 3, indices=[4, 1, 3])
    assert torch.equal(c, a[[4, 1, 3]])
    np.savez(tmp_path / "reff.npz", np.asfortranarray(np.stack([arrays[n] for n in order])))  # column-major rows
    f, _ = load_reference_images(tmp_path / "reff.npz", (8, 8), 3, indices=[2, 0])
    assert torch.equal(f, a[[2, 0]])


def test_indices_subset_in_the_order_asked(tmp_path, png_folder):
    root, order, arrays = png_folder
    full, _ = load_reference_images(root, (8, 8), 3)
    for path in (root, tmp_path / "ref.npz"):
        sub, info = load_reference_images(path, (8, 8), 3, indices=[3, 0])
        assert sub.shape == (2, 3, 8, 8) and info["n"] == 2 and info["n_total"] == 5
        assert torch.equal(sub, full[[3, 0]])
        with pytest.raises(ReferenceDataError, match=r"indices \[5\]; expected positions in 0..4"):
            load_reference_images(path, (8, 8), 3, indices=[0, 5])


def test_center_crop_resize_equals_adm_for_square_targets():
    rng = np.random.default_rng(0)
    for h, w, s in [(70, 45, 16), (33, 100, 16), (128, 128, 32), (257, 64, 16), (20, 31, 32), (64, 40, 8)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        out = center_crop_resize(im, (s, s))
        assert out.size == (s, s)
        np.testing.assert_array_equal(np.asarray(out), adm_center_crop_arr(im, s))
    same = Image.fromarray(rgb(12, 20, 1))
    assert center_crop_resize(same, (12, 20)) is same


def test_center_crop_resize_non_square_target():
    im = Image.fromarray(rgb(64, 96, 2))  # exactly twice (32, 48): one box halving, nothing else
    out = center_crop_resize(im, (32, 48))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(im.resize((48, 32), resample=Image.BOX)))
    wide = center_crop_resize(Image.fromarray(rgb(30, 90, 3)), (16, 24))
    assert wide.size == (24, 16)  # PIL size is (W, H)


def test_grey_and_rgb_channel_conversions(tmp_path):
    grey = np.random.default_rng(4).integers(0, 256, (6, 6), dtype=np.uint8)
    colour = rgb(6, 6, 5)
    (tmp_path / "g").mkdir()
    Image.fromarray(grey).save(tmp_path / "g" / "grey.png")
    Image.fromarray(colour).save(tmp_path / "g" / "rgb.png")
    x3, _ = load_reference_images(tmp_path / "g", (6, 6), 3)
    for c in range(3):
        assert torch.equal(x3[0, c], torch.from_numpy(grey))
    x1, _ = load_reference_images(tmp_path / "g", (6, 6), 1)
    assert x1.shape == (2, 1, 6, 6)
    assert torch.equal(x1[1, 0], torch.from_numpy(np.array(Image.fromarray(colour).convert("L"))))
    # an npz of grey images, [N, H, W] and [N, H, W, 1], gives the same tensor
    np.savez(tmp_path / "g3.npz", np.stack([grey, grey]))
    np.savez(tmp_path / "g4.npz", np.stack([grey, grey])[..., None])
    a, _ = load_reference_images(tmp_path / "g3.npz", (6, 6), 3)
    b, _ = load_reference_images(tmp_path / "g4.npz", (6, 6), 3)
    assert torch.equal(a, b) and torch.equal(a[0], x3[0])


def test_resized_count_and_one_warning_line(tmp_path, caplog):
    root = tmp_path / "mixed"
    root.mkdir()
    for k in range(3):
        Image.fromarray(rgb(40, 48, k)).save(root / f"big{k}.png")
    Image.fromarray(rgb(32, 32, 7)).save(root / "ok.png")
    Image.fromarray(rgb(50, 32, 8)).save(root / "tall.jpg")
    with caplog.at_level(logging.WARNING, logger="tfmq"):
        x, info = load_reference_images(root, (32, 32), 3)
    assert x.shape == (5, 3, 32, 32)
    assert info["resized"] == 4 and info["original_sizes"] == [[32, 32], [40, 48], [50, 32]]
    lines = [r.getMessage() for r in caplog.records if r.name == "tfmq"]
    assert lines == ["reference: 4 of 5 images resized from [[40, 48], [50, 32]] to 32x32 "
                     "(centre crop + resize, as the ADM evaluator)"]
    big0 = Image.open(root / "big0.png").convert("RGB")
    assert torch.equal(x[0], torch.from_numpy(adm_center_crop_arr(big0, 32)).permute(2, 0, 1))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tfmq"):
        load_reference_images(root, (32, 32), 3, indices=[3])
    assert not [r for r in caplog.records if r.name == "tfmq"]


def test_reference_count_reads_the_header_only(tmp_path, monkeypatch):
    np.savez(tmp_path / "r.npz", np.zeros((7, 4, 5, 3), np.uint8))
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("reference_count must not load the array"))
    assert reference_count(tmp_path / "r.npz") == 7


def test_check_reference_summaries(tmp_path, png_folder):
    root, _, _ = png_folder
    Image.fromarray(rgb(4, 4, 9)).save(root / "a" / "w.jpg")
    assert check_reference(root) == f"folder {root}: 6 images (png, jpg)"
    assert check_reference(tmp_path / "ref.npz") == f"npz {tmp_path / 'ref.npz'}: 5 x 8x8x3 uint8"
    np.savez(tmp_path / "grey.npz", np.zeros((3, 4, 6), np.uint8))
    assert check_reference(tmp_path / "grey.npz") == f"npz {tmp_path / 'grey.npz'}: 3 x 4x6 uint8"


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "nope.npz", "does not exist; expected an image folder"),
    (lambda d: _write(d / "one.png", lambda p: Image.fromarray(rgb(4, 4, 0)).save(p)), r"is a single \.png file; expected an image folder"),
    (lambda d: _write(d / "bad.npz", lambda p: p.write_bytes(b"not a zip")), "is not a readable .npz"),
    (lambda d: _write(d / "f.npz", lambda p: np.savez(p, np.zeros((3, 4, 4, 3), np.float32))), "arr_0 has dtype float32; expected uint8"),
    (lambda d: _write(d / "c.npz", lambda p: np.savez(p, np.zeros((3, 4, 4, 4), np.uint8))), r"arr_0 has shape \[3, 4, 4, 4\]; expected \[N, H, W, C\]"),
    (lambda d: _write(d / "n.npz", lambda p: np.savez(p, np.zeros((1, 4, 4, 3), np.uint8))), r"holds 1 image\(s\); expected N >= 2"),
    (lambda d: _write(d / "s.npz", lambda p: np.savez(p, mu=np.zeros(2), sigma=np.eye(2))), "holds statistics .*use reference.stats"),
    (lambda d: _write(d / "k.npz", lambda p: np.savez(p, images=np.zeros((3, 4, 4, 3), np.uint8))), r"has no arr_0 \(its arrays: \['images'\]\)"),
    (lambda d: _write(d / "broken" / "x.png", lambda p: p.write_bytes(b"\x89PNG garbage")), r"reference image .*x\.png cannot be read"),
])
def test_check_reference_refusals(tmp_path, make, match):
    path = make(tmp_path)
    with pytest.raises(ReferenceDataError, match=match) as e:
        check_reference(path.parent if path.name == "x.png" else path)
    assert "\n" not in str(e.value)


def _write(path, writer):
    path.parent.mkdir(parents=True, exist_ok=True)
    writer(path)
    return path


def test_load_reference_images_refusals(tmp_path, png_folder):
    root, _, _ = png_folder
    (root / "a" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ReferenceDataError, match=r"reference image .*broken\.jpg cannot be read"):
        load_reference_images(root, (8, 8), 3)
    with pytest.raises(ReferenceDataError, match="channels=4; expected 1 .grey. or 3 .RGB."):
        load_reference_images(tmp_path / "ref.npz", (8, 8), 4)
    with pytest.raises(ReferenceDataError, match=r"size \(0, 8\); expected \(H, W\), two positive ints"):
        load_reference_images(tmp_path / "ref.npz", (0, 8), 3)
    with pytest.raises(ReferenceDataError, match="does not exist; expected an image folder"):
        load_reference_images(tmp_path / "missing", (8, 8), 3)
    np.savez(tmp_path / "s.npz", mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(ReferenceDataError, match="holds statistics .*use reference.stats"):
        load_reference_images(tmp_path / "s.npz", (8, 8), 3)
    with pytest.raises(ReferenceDataError, match="an empty index list"):
        load_reference_images(tmp_path / "ref.npz", (8, 8), 3, indices=[])


def test_load_fid_stats_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(20, 4)).astype(np.float32)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False).astype(np.float32)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    m, s = load_fid_stats(tmp_path / "stats.npz")
    assert m.dtype == np.float64 and s.dtype == np.float64 and m.shape == (4,) and s.shape == (4, 4)
    np.testing.assert_array_equal(m, mu.astype(np.float64))
    np.testing.assert_array_equal(s, sigma.astype(np.float64))


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "does not exist; expected an .npz with mu"),
    (lambda p: p.write_text("mu sigma"), "is not a readable .npz"),
    (lambda p: np.save(open(p, "wb"), np.zeros(3)), "is a single array, not an npz"),
    (lambda p: np.savez(p, np.zeros((3, 4, 4, 3), np.uint8)), "no mu/sigma; .*an .npz with arr_0 holds images: use reference.images"),
    (lambda p: np.savez(p, mu=np.zeros(3)), r"has arrays \['mu'\], no mu/sigma"),
    (lambda p: np.savez(p, mu=np.zeros(3), sigma=np.eye(4)), r"mu has shape \[3\] and sigma \[4, 4\]"),
    (lambda p: np.savez(p, mu=np.array([0.0, np.nan]), sigma=np.eye(2)), "NaN/inf values; expected finite"),
    (lambda p: np.savez(p, mu=np.zeros(2), sigma=np.array([[1.0, 0.5], [0.4, 1.0]])), "sigma is not symmetric"),
])
def test_load_fid_stats_refusals(tmp_path, make, match):
    path = tmp_path / "stats.npz"
    make(path)
    with pytest.raises(ReferenceDataError, match=match) as e:
        load_fid_stats(path)
    assert "\n" not in str(e.value)


def test_npz_saved_stored_is_read_without_inflating(tmp_path):
    """np.savez stores members uncompressed (the mapped path); savez_compressed deflates (the streamed path)."""
    np.savez(tmp_path / "a.npz", np.zeros((2, 2, 2, 3), np.uint8))
    np.savez_compressed(tmp_path / "b.npz", np.zeros((2, 2, 2, 3), np.uint8))
    with zipfile.ZipFile(tmp_path / "a.npz") as za, zipfile.ZipFile(tmp_path / "b.npz") as zb:
        assert za.getinfo("arr_0.npy").compress_type == zipfile.ZIP_STORED
        assert zb.getinfo("arr_0.npy").compress_type == zipfile.ZIP_DEFLATED
