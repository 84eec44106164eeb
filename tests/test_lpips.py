"""LPIPS against the FP samples (``eval.lpips_backbone``): the distance equals the ``lpips`` package's own
``LPIPS(net="alex")`` on the same weights, the shard path files it per sample, the paired comparison reads it,
and a bad backbone file is one clear refusal before any work."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from tfmq.evaluation.lpips import LpipsError, _prepare, load_lpips, lpips_distance


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory):
    """A seeded, untrained torchvision AlexNet saved the way torchvision's ImageNet file is (a state dict)."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.alexnet(weights=None)
    path = tmp_path_factory.mktemp("alex") / "alexnet.pth"
    torch.save(net.state_dict(), path)
    return path, net


def _images(seed: int, n: int = 6, size: int = 28, channels: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


def _noisy(x: torch.Tensor, amount: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x.int() + torch.randint(-amount, amount + 1, x.shape, generator=g)).clamp(0, 255).to(torch.uint8)


def _package_lpips(net):
    """The lpips package's model (its shipped v0.1 linear layers) with ``net``'s features as its backbone."""
    import lpips

    ref = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    for s in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5):
        for k, mod in s._modules.items():
            if isinstance(mod, torch.nn.Conv2d):
                mod.load_state_dict(net.features[int(k)].state_dict())
    return ref.eval()


@pytest.mark.parametrize("shape", [(1, 28), (3, 64)])
def test_lpips_equals_the_lpips_package_on_the_same_weights(alexnet_file, shape):
    path, net = alexnet_file
    channels, size = shape
    a = _images(1, channels=channels, size=size)
    b = _noisy(a, 60, 2)
    ours = lpips_distance(a, b, load_lpips(path), batch_size=4)  # two batches: 4 + 2
    with torch.no_grad():
        theirs = _package_lpips(net)(_prepare(a, "cpu"), _prepare(b, "cpu")).flatten().double().numpy()
    assert ours.shape == (6,) and ours.dtype == np.float64
    assert np.all(theirs > 0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)


def test_lpips_is_zero_for_identical_images_symmetric_and_grows_with_the_distortion(alexnet_file):
    m = load_lpips(alexnet_file[0])
    a = _images(3)
    assert np.all(lpips_distance(a, a, m) == 0.0)
    b = _noisy(a, 30, 4)
    np.testing.assert_allclose(lpips_distance(a, b, m), lpips_distance(b, a, m), rtol=1e-6)
    small, large = lpips_distance(a, _noisy(a, 8, 5), m), lpips_distance(a, _noisy(a, 120, 5), m)
    assert np.all(large > small)


def test_small_images_are_upsampled_to_64_px_and_grey_is_repeated():
    x = _prepare(torch.full((2, 1, 28, 28), 255, dtype=torch.uint8), "cpu")
    assert x.shape == (2, 3, 64, 64)
    assert torch.allclose(x, torch.ones_like(x))
    assert _prepare(torch.zeros(1, 3, 48, 40, dtype=torch.uint8), "cpu").shape == (1, 3, 77, 64)
    assert _prepare(torch.zeros(1, 3, 96, 80, dtype=torch.uint8), "cpu").shape == (1, 3, 96, 80)  # large enough


def test_bad_backbone_files_are_refused_by_name(tmp_path, alexnet_file):
    with pytest.raises(LpipsError, match="no such file"):
        load_lpips(tmp_path / "missing.pth")
    state = torch.load(alexnet_file[0], weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "features.6.weight"}, tmp_path / "cut.pth")
    with pytest.raises(LpipsError, match=r"no 'features\.6\.weight'.*AlexNet"):
        load_lpips(tmp_path / "cut.pth")
    torch.save({**state, "features.3.weight": torch.zeros(192, 64, 3, 3)}, tmp_path / "shape.pth")
    with pytest.raises(LpipsError, match=r"features\.3\.weight has shape \(192, 64, 3, 3\), AlexNet's is \(192, 64, 5, 5\)"):
        load_lpips(tmp_path / "shape.pth")
    with open(tmp_path / "objects.pth", "wb") as f:  # a pickle of arbitrary objects is never unpickled
        pickle.dump({"features.0.weight": object()}, f)
    with pytest.raises(LpipsError, match="weights_only=True"):
        load_lpips(tmp_path / "objects.pth")
    with pytest.raises(LpipsError, match="lin0.model.1.weight"):
        load_lpips(alexnet_file[0], lin_path=alexnet_file[0])  # an AlexNet file is not the linear layers


def test_safetensors_backbone_gives_the_same_distance(tmp_path, alexnet_file):
    from safetensors.torch import save_file

    path, net = alexnet_file
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "alex.safetensors")
    a = _images(6)
    b = _noisy(a, 50, 7)
    np.testing.assert_array_equal(lpips_distance(a, b, load_lpips(tmp_path / "alex.safetensors")),
                                  lpips_distance(a, b, load_lpips(path)))


def test_shard_rows_carry_lpips_and_the_paired_comparison_reads_it(tmp_path, alexnet_file):
    """``tfmq.evaluation.job.paired_rows`` files LPIPS beside PSNR when a backbone is named; ``PairedData.compare`` then
    reports the paired LPIPS difference (lower is better) with its interval."""
    from safetensors.torch import save_file

    from tasks.claims import PairedData
    from tfmq.evaluation.job import paired_rows as _paired_rows

    path = str(alexnet_file[0])
    fp = _images(8, n=12)
    feats = torch.zeros(12, 4)
    save_file({"images": fp, "features": feats}, tmp_path / "fp.safetensors")
    near, far = _noisy(fp, 10, 9), _noisy(fp, 100, 9)
    rows = {}
    for name, imgs in (("near", near), ("far", far)):
        rows[name] = _paired_rows(str(tmp_path / "fp.safetensors"), 0, 12, 12, imgs, feats, path, 5)
        assert set(rows[name]) == {"mse", "psnr", "ssim", "feat_dist", "lpips"}
        # batches of 5 there vs 64 here: float32 convolutions of other batch shapes agree to rounding, not bit for bit
        np.testing.assert_allclose(rows[name]["lpips"].numpy(), lpips_distance(fp, imgs, load_lpips(path)), rtol=1e-5)
    assert "lpips" not in _paired_rows(str(tmp_path / "fp.safetensors"), 0, 12, 12, near, feats)
    paired = tmp_path / "out" / "paired" / "m"
    metrics = tmp_path / "out" / "metrics" / "m"
    paired.mkdir(parents=True)
    metrics.mkdir(parents=True)
    for name, imgs in (("near", near), ("far", far)):
        save_file({"images": imgs, "features": feats, **{k: v.contiguous() for k, v in rows[name].items()}},
                  paired / f"{name}.safetensors")
        (metrics / f"{name}.json").write_text("{}")
    c = PairedData(str(tmp_path / "out"), None, 50, 0).compare("m", "far", "near")
    want = float((rows["far"]["lpips"] - rows["near"]["lpips"]).double().mean())
    assert c["lpips"]["diff"] == pytest.approx(want, rel=1e-12)
    assert c["lpips"]["ci"][0] > 0 and c["lpips"]["verdict"] == "near better"


def test_check_refuses_a_bad_lpips_backbone(capsys, tmp_path):
    from flows.cli import main
    from pipeline_fixtures import params_file

    cfg = params_file(tmp_path, eval__lpips_backbone=str(tmp_path / "alex.pth"))
    code = main(["check", "--config", cfg])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1
    assert err[0].startswith("tfmq: error: eval.lpips_backbone=") and "alex.pth" in err[0] and "AlexNet" in err[0]
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, tmp_path / "alex.pth")
    code = main(["check", "--config", cfg])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "features.0.bias" in err[0]
