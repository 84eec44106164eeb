"""Sharded evaluation on Dask through Prefect (flows/sharded.py): a real ``DaskTaskRunner`` on a loopback
``LocalCluster`` (2 worker processes x 1 thread) samples the committed latent model in 3 shards, and the
merged FID / sFID / KID / IS equal the in-process ``compute_metrics`` of the same samples (FID and sFID
to float64 round-off of the merge, KID and IS exactly: the shards' images and features are bit-identical
to the unsharded run's, their boundaries sitting on batch boundaries)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tfmq.evaluation.job import shard_bounds

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "fashion_ldm"


def test_shard_bounds_tile_the_samples_on_batch_boundaries():
    assert shard_bounds(24, 3, 8) == [(0, 8), (8, 16), (16, 24)]
    assert shard_bounds(50, 3, 8) == [(0, 24), (24, 48), (48, 50)]
    assert shard_bounds(5, 8, 4) == [(0, 4), (4, 5)]
    with pytest.raises(ValueError, match="expected positive integers"):
        shard_bounds(10, 0, 4)


def test_dask_sharded_scores_equal_the_in_process_metrics(tmp_path):
    from prefect.testing.utilities import prefect_test_harness

    from flows.sharded import sharded_scores
    from tfmq.diffusion.jobs import SamplerRun
    from tfmq.evaluation.job import EvalJob
    from tfmq.diffusion.conditioning import class_labels_for
    from tfmq.diffusion.data import to_uint8
    from tfmq.diffusion.pipelines import load_diffusion_model
    from tfmq.diffusion.sampling import make_scheduler, sample
    from tfmq.evaluation.metrics import compute_metrics
    from tfmq.evaluation.reference_stats import compute_reference_stats

    torch.set_num_threads(1)
    n, e = 24, {"seed": 2, "batch_size": 8, "feature_batch_size": 8, "extractor": "efficientnet-lite0",
                "kid_subsets": 10, "kid_subset_size": 12}
    sampler = {"name": "ddim", "num_inference_steps": 5, "eta": 0.0, "guidance_scale": 1.0}
    real = (torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    ref = compute_reference_stats(real, tmp_path / "ref.safetensors", "efficientnet-lite0", progress=False)

    model = load_diffusion_model(MODEL)
    x = sample(model.unet, make_scheduler("ddim", model.scheduler.config), n, 5, e["batch_size"], e["seed"],
               class_labels=class_labels_for(model.unet, n, model.family), progress=False)
    images = to_uint8(model.to_images(x, batch_size=e["batch_size"]))  # decoded in the batches it was sampled in, as the stage does
    want = compute_metrics(images, ref, num_bootstrap=0, kid_subsets=10, kid_subset_size=12, batch_size=8,
                           progress=False)["values"]

    with prefect_test_harness():
        job = EvalJob(fp_dir=str(MODEL), checkpoint=None, num_samples=n, seed=e["seed"], batch_size=e["batch_size"],
                      sampler=SamplerRun(**sampler), extractor=e["extractor"], feature_batch_size=e["feature_batch_size"])
        got = sharded_scores(job, 3, str(ref.path), str(tmp_path / "shards"), workers=2, kid_subsets=10,
                             kid_subset_size=12)
    assert (got["n"], got["shards"]) == (n, 3)
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        "shard_0000000_0000008", "shard_0000008_0000016", "shard_0000016_0000024"]
    ext = ref.meta["extractor"]  # the sized name, e.g. efficientnet-lite0-112
    assert want[f"fid/{ext}"] > 1.0
    assert got["fid"] == pytest.approx(want[f"fid/{ext}"], rel=1e-9)
    assert got["sfid"] == pytest.approx(want[f"sfid_proxy/{ext}"], rel=1e-9)
    assert (got["kid_mean"], got["kid_std"]) == (want[f"kid_mean/{ext}"], want[f"kid_std/{ext}"])
    assert (got["is"], got["is_std"]) == (want[f"is_proxy/{ext}"], want[f"is_proxy_std/{ext}"])
