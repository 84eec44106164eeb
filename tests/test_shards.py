"""Sharded evaluation statistics (tfmq.evaluation.shards): merged metrics equal the unsharded ones.

FID / sFID from merged moments against the unsharded computation of compute_metrics (the Gram
formulation on the concatenated features) to float64 round-off for 1, 2 and 3 shards in any order;
KID and IS from the merged rows exactly; the merged covariance equals numpy's on the concatenated
features even with a mean 10^4 times the spread; shards that do not tile [0, N) are refused.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tfmq.evaluation.feature_metrics import inception_score_from_logits, kid
from tfmq.evaluation.reference_stats import ReferenceStats
from tfmq.evaluation.shards import (
    Moments, ShardError, load_shard, merge_shards, metrics_from_shards, save_shard, shard_statistics,
)

N = 150


def _features(seed: int, n: int = N, offset: float = 0.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(24, 24, generator=g)
    return {"fid": (torch.randn(n, 24, generator=g) @ mix + offset).float(),
            "spatial": torch.rand(n, 40, generator=g).float() * 3,
            "logits": torch.randn(n, 10, generator=g).float() * 2}


def _reference() -> ReferenceStats:
    f = _features(99, n=400)
    x = {k: f[k].double().numpy() for k in ("fid", "spatial")}
    return ReferenceStats(Path("ref.safetensors"), {"extractor": "efficientnet-lite0", "n": 400}, {"fid": f["fid"]},
                          {k: v.mean(0) for k, v in x.items()}, {k: np.cov(v, rowvar=False) for k, v in x.items()})


def _sharded(feats, bounds, tmp_path):
    shards = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        s = shard_statistics({k: v[a:b] for k, v in feats.items()}, a, "efficientnet-lite0", ["fid", "spatial"],
                             ["fid", "logits"])
        shards.append(load_shard(save_shard(s, tmp_path / f"shard_{i}")))  # through the files
    return shards[::-1]  # any order


@pytest.mark.parametrize("bounds", [[0, N], [0, 71, N], [0, 1, 100, N]])
def test_merged_metrics_equal_the_unsharded_ones(bounds, tmp_path):
    feats, ref = _features(0), _reference()
    merged = merge_shards(_sharded(feats, bounds, tmp_path))
    assert (merged.start, merged.stop) == (0, N)
    got = metrics_from_shards(merged, ref, "fid", "spatial", "logits", kid_subsets=20, kid_subset_size=50)
    want_fid, want_sfid = ref.fid(feats["fid"], "fid"), ref.fid(feats["spatial"], "spatial")
    assert want_fid > 1.0 and want_sfid > 0.1  # real distances, not ~0
    assert got["fid"] == pytest.approx(want_fid, rel=1e-9) and got["sfid"] == pytest.approx(want_sfid, rel=1e-9)
    k = kid(feats["fid"], ref.features["fid"], 20, 50)
    s = inception_score_from_logits(feats["logits"])
    assert (got["kid_mean"], got["kid_std"], got["is"], got["is_std"]) == (k["mean"], k["std"], s["mean"], s["std"])
    assert torch.equal(merged.rows["fid"], feats["fid"]) and torch.equal(merged.rows["logits"], feats["logits"])


def test_merged_covariance_is_exact_when_the_mean_dwarfs_the_spread():
    x = _features(3, offset=1.0e4)["fid"].double().numpy()
    parts = [Moments.of(x[a:b]) for a, b in ((0, 10), (10, 11), (11, 90), (90, N))]
    m = parts[0]
    for p in parts[1:]:
        m = m.merged(p)
    cov = np.cov(x, rowvar=False)
    assert m.n == N and np.abs(m.mean - x.mean(0)).max() <= 1e-12 * 1e4
    assert np.abs(m.covariance() - cov).max() <= 1e-9 * np.abs(cov).max()


def test_shards_that_do_not_tile_the_samples_are_refused(tmp_path):
    feats = _features(0)
    a, b, c = sorted(_sharded(feats, [0, 50, 100, N], tmp_path), key=lambda s: s.start)
    with pytest.raises(ShardError, match=r"shard \[100, 150\) leaves a gap after samples \[0, 50\)"):
        merge_shards([a, c])
    with pytest.raises(ShardError, match=r"start at sample 50; expected 0"):
        merge_shards([b, c])
    with pytest.raises(ShardError, match=r"shard \[0, 50\) overlaps samples \[0, 50\)"):
        merge_shards([a, a, b])
    other = shard_statistics({k: v[100:] for k, v in feats.items()}, 100, "inception-v3-compat", ["fid", "spatial"],
                             ["fid", "logits"])
    with pytest.raises(ShardError, match="extractor 'inception-v3-compat'"):
        merge_shards([a, b, other])
    with pytest.raises(ShardError, match="no shards"):
        merge_shards([])
    (tmp_path / "shard_0" / "stats.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ShardError, match="not a readable evaluation shard"):
        load_shard(tmp_path / "shard_0")


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_a_shard_samples_exactly_its_rows_of_the_whole_run(eta):
    from conftest import make_tiny_unet
    from engine_fixtures import SCHED_CFG
    from tfmq.diffusion.sampling import initial_noise, make_scheduler, sample

    unet, sched = make_tiny_unet("class"), make_scheduler("ddim", SCHED_CFG)
    n, labels = 10, torch.arange(10) % 3
    kw = dict(num_inference_steps=4, seed=5, eta=eta, progress=False)
    whole = sample(unet, sched, n, batch_size=n, class_labels=labels, **kw)
    shape = (n, 1, 8, 8)
    parts = [sample(unet, sched, b - a, batch_size=3, class_labels=labels[a:b], first_index=a,
                    noise=initial_noise(5, shape, a, b), **kw) for a, b in ((0, 4), (4, 7), (7, 10))]
    torch.testing.assert_close(torch.cat(parts), whole, atol=1e-5, rtol=0)  # batch size changes only float round-off
    if eta > 0:  # the stochastic steps really depend on the index: a shard without first_index differs
        wrong = sample(unet, sched, 3, batch_size=3, class_labels=labels[4:7], noise=initial_noise(5, shape, 4, 7), **kw)
        assert (wrong - whole[4:7]).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["uncond", "class-cfg"])
def test_calibration_shards_merge_into_the_unsharded_set(kind, tmp_path):
    import json

    from conftest import make_tiny_unet
    from engine_fixtures import SCHED_CFG
    from tfmq.diffusion.calibration import capture_calibration_data, merge_calibration_shards
    from tfmq.diffusion.sampling import make_scheduler

    unet = make_tiny_unet("class" if kind == "class-cfg" else "uncond")
    kw = dict(num_samples=6, num_inference_steps=3, batch_size=2, seed=4, eta=0.3, progress=False)
    if kind == "class-cfg":
        kw.update(class_labels=torch.tensor([0, 1, 0, 1, 0, 1]), null_class_label=2, guidance_scale=2.0)
    whole = capture_calibration_data(unet, make_scheduler("ddim", SCHED_CFG), tmp_path / "whole", **kw)
    shards = [capture_calibration_data(unet, make_scheduler("ddim", SCHED_CFG), tmp_path / f"s{a}", shard=(a, b), **kw)
              for a, b in ((4, 6), (0, 2), (2, 4))]
    merged = merge_calibration_shards([s.path for s in shards], tmp_path / "merged")
    meta = lambda p: json.loads((Path(p) / "meta.json").read_text())  # noqa: E731
    assert meta(merged.path) == meta(whole.path)
    for i in range(whole.num_steps):
        a, b = whole.load_step(i), merged.load_step(i)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), i  # same batches: bit-identical
    with pytest.raises(ValueError, match=r"shard \[4, 6\) leaves a gap after trajectories \[0, 2\)"):
        merge_calibration_shards([shards[1].path, shards[0].path], tmp_path / "bad")
    with pytest.raises(ValueError, match=r"cover trajectories \[0, 4\) of 6"):
        merge_calibration_shards([shards[1].path, shards[2].path], tmp_path / "bad")
    with pytest.raises(ValueError, match="not a calibration shard"):
        merge_calibration_shards([whole.path], tmp_path / "bad")
