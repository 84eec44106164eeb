"""Temporal-disturbance analyses on tiny seeded UNets: feature error, mismatch, trajectory deviation,
activation ranges, and their plots (poster section "temporal feature disturbance")."""
import copy

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel

from tfmq.evaluation import temporal as T

TIMESTEPS = [999, 800, 600, 400, 200, 1]


def _unet(num_class_embeds=None, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    ).eval()


def _perturbed(unet, name):
    q = copy.deepcopy(unet)
    proj = dict(q.named_modules())[name].time_emb_proj
    with torch.no_grad():
        proj.weight.add_(0.5 * torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(1)))
    return q


@pytest.mark.parametrize("num_class_embeds,class_label", [(None, None), (10, 3)])
def test_hook_and_direct_temporal_features_agree(num_class_embeds, class_label):
    unet = _unet(num_class_embeds)
    a = T.measure_temporal_features(unet, TIMESTEPS, class_label=class_label, method="hooks")
    b = T.measure_temporal_features(unet, TIMESTEPS, class_label=class_label, method="direct")
    assert a.names == b.names and len(a.names) == 8  # 2 down + 2 mid + 2x2 up resnets
    assert a.names[0].startswith("down_blocks") and a.names[-1].startswith("up_blocks")
    for x, y in zip(a.features, b.features):
        assert x.shape == (len(TIMESTEPS), y.shape[1])
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_conditional_unet_hook_and_direct_agree():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    ehs = torch.randn(1, 3, 8)
    a = T.measure_temporal_features(unet, TIMESTEPS, method="hooks", unet_kwargs={"encoder_hidden_states": ehs})
    b = T.measure_temporal_features(unet, TIMESTEPS, method="direct")
    for x, y in zip(a.features, b.features):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_identical_models_have_cos_one_and_no_mismatch(tmp_path):
    fp = _unet()
    q = copy.deepcopy(fp)
    err = T.temporal_feature_error(fp, q, TIMESTEPS, plot_path=tmp_path / "cos.png")
    assert err["cos"].shape == (len(TIMESTEPS), 8)
    torch.testing.assert_close(err["cos"], torch.ones_like(err["cos"]), atol=1e-12, rtol=0)
    mm = T.temporal_mismatch(fp, q, TIMESTEPS, plot_path=tmp_path / "delta.png")
    assert mm["delta_step"].abs().max() == 0 and mm["delta_timestep"].abs().max() == 0
    assert mm["mismatched_fraction"] == 0.0
    assert (tmp_path / "cos.png").stat().st_size > 1000 and (tmp_path / "delta.png").stat().st_size > 1000


def test_perturbed_time_emb_proj_lowers_cos_only_for_that_resnet():
    fp = _unet()
    feats = T.measure_temporal_features(fp, TIMESTEPS)
    target = feats.names[2]
    q = _perturbed(fp, target)
    err = T.temporal_feature_error(feats, q, TIMESTEPS)
    cos = err["cos"]
    col = feats.names.index(target)
    assert (cos[:, col] < 1 - 1e-4).all()
    others = torch.cat([cos[:, :col], cos[:, col + 1 :]], dim=1)
    torch.testing.assert_close(others, torch.ones_like(others), atol=1e-12, rtol=0)
    mm = T.temporal_mismatch(feats, q)
    assert (mm["delta_step"][:, [i for i in range(8) if i != col]] == 0).all()
    # delta in timestep space is the step delta mapped through the schedule
    ts = torch.tensor(TIMESTEPS)
    torch.testing.assert_close(mm["delta_timestep"], ts[mm["argmax_step"]] - ts[:, None])


def test_trajectory_deviation_zero_for_identical_and_positive_for_perturbed(tmp_path):
    fp = _unet()
    sched = DDIMScheduler(num_train_timesteps=1000)
    same = T.trajectory_deviation(fp, copy.deepcopy(fp), sched, num_inference_steps=4, num_samples=2,
                                  plot_path=tmp_path / "traj.png")
    assert len(same["rmse"]) == 5 and max(same["rmse"]) == 0.0 and max(same["local_rmse"]) == 0.0
    assert min(same["cos"]) == pytest.approx(1.0, abs=1e-12)
    assert (tmp_path / "traj.png").stat().st_size > 1000
    q = _perturbed(fp, T.temporal_resnets(fp)[0][0])
    diff = T.trajectory_deviation(fp, q, sched, num_inference_steps=4, num_samples=2, eta=1.0)
    assert diff["rmse"][0] == 0.0 and diff["final_rmse"] > 0 and min(diff["local_rmse"]) > 0
    assert sched.num_inference_steps is None  # caller's scheduler untouched


def test_activation_ranges_per_timestep(tmp_path):
    unet = _unet(num_class_embeds=10)
    names = T.default_activation_layers(unet)
    assert "conv_in" in names and "conv_out" in names
    out = T.activation_ranges(unet, names, DDIMScheduler(num_train_timesteps=1000), num_inference_steps=3,
                              num_samples=2, class_labels=torch.tensor([1, 2]), plot_path=tmp_path / "act.png")
    assert out["min"].shape == (3, len(names)) == out["max"].shape
    assert (out["min"] <= out["max"]).all() and torch.isfinite(out["min"]).all()
    assert (tmp_path / "act.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="not found"):
        T.activation_ranges(unet, ["nope"], num_inference_steps=2)


def test_temporal_report_writes_all_outputs(tmp_path):
    fp = _unet(num_class_embeds=10)
    q = _perturbed(fp, T.temporal_resnets(fp)[-1][0])
    rep = T.temporal_report(fp, q, DDIMScheduler(num_train_timesteps=1000), 3, tmp_path, num_samples=2, class_label=4)
    for name in ("temporal_feature_error.png", "temporal_mismatch.png", "trajectory_deviation.png",
                 "activation_ranges_fp.png", "activation_ranges_q.png", "temporal_table.csv", "temporal.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert len((tmp_path / "temporal_table.csv").read_text().splitlines()) == 1 + 3 * 8
    assert rep["summary"]["temporal_cos_min"] < 1.0 and rep["summary"]["trajectory_rmse_final"] > 0
