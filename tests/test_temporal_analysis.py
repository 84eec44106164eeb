"""Temporal-disturbance analyses on tiny seeded UNets (docs/method.md sections 1 and 9): feature error,
mismatch, trajectory deviation, activation ranges, and their plots, each checked against the formula
applied by hand to the model's own modules."""
import copy
import csv
import json

import pytest
import torch
from conftest import TEXT_DIM, TEXT_LEN, make_tiny_unet
from diffusers import DDIMScheduler

from tfmq.evaluation import temporal as T

pytestmark = pytest.mark.usefixtures("one_thread")

TIMESTEPS = [999, 800, 600, 400, 200, 1]
N_RESNETS = 8  # 2 down + 2 mid + 2x2 up resnets of the tiny UNet


def _unet(kind="uncond"):
    return make_tiny_unet(kind)


def _perturbed(unet, name):
    q = copy.deepcopy(unet)
    proj = dict(q.named_modules())[name].time_emb_proj
    with torch.no_grad():
        proj.weight.add_(0.5 * torch.randn(proj.weight.shape, generator=torch.Generator().manual_seed(1)))
    return q


def _emb_by_hand(unet, resnet_name, t, class_label=None):
    """emb_{t,i} = time_emb_proj(nonlinearity(time_embedding(time_proj(t)) (+ class embedding)))."""
    with torch.no_grad():
        emb = unet.time_embedding(unet.time_proj(torch.tensor([t])))
        if class_label is not None:
            emb = emb + unet.class_embedding(torch.tensor([class_label]))
        r = dict(unet.named_modules())[resnet_name]
        return r.time_emb_proj(r.nonlinearity(emb))[0].double()


@pytest.mark.parametrize("kind,class_label", [("uncond", None), ("class", 2)])
def test_hook_and_direct_temporal_features_agree(kind, class_label):
    unet = _unet(kind)
    a = T.measure_temporal_features(unet, TIMESTEPS, class_label=class_label, method="hooks")
    b = T.measure_temporal_features(unet, TIMESTEPS, class_label=class_label, method="direct")
    assert a.names == b.names and len(a.names) == N_RESNETS and len(a.features) == N_RESNETS
    assert a.names[0].startswith("down_blocks") and a.names[-1].startswith("up_blocks")
    assert a.timesteps == TIMESTEPS
    for name, x, y in zip(a.names, a.features, b.features):
        r = dict(unet.named_modules())[name]
        assert x.shape == y.shape == (len(TIMESTEPS), r.time_emb_proj.out_features) and x.dtype == torch.float64
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)
    # row k of resnet i is emb_{t_k, i} computed from the modules by hand (class embedding included)
    for i in (0, N_RESNETS // 2, N_RESNETS - 1):
        for k in (0, len(TIMESTEPS) - 1):
            want = _emb_by_hand(unet, a.names[i], TIMESTEPS[k], class_label)
            torch.testing.assert_close(a.features[i][k], want, atol=1e-6, rtol=1e-5)
    # features really depend on t (else the error/mismatch analyses would be vacuous)
    assert (a.features[0][0] - a.features[0][-1]).abs().max() > 1e-3


def test_conditional_unet_hook_and_direct_agree():
    unet = _unet("text")
    ehs = torch.randn(1, TEXT_LEN, TEXT_DIM, generator=torch.Generator().manual_seed(0))
    a = T.measure_temporal_features(unet, TIMESTEPS, method="hooks", unet_kwargs={"encoder_hidden_states": ehs})
    b = T.measure_temporal_features(unet, TIMESTEPS, method="direct")
    n = len(T.temporal_resnets(unet))
    assert n == N_RESNETS and len(a.features) == len(b.features) == n and a.names == b.names
    for x, y in zip(a.features, b.features):
        assert x.shape == y.shape and x.shape[0] == len(TIMESTEPS)
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_identical_models_have_cos_one_and_no_mismatch(tmp_path):
    fp = _unet()
    q = copy.deepcopy(fp)
    err = T.temporal_feature_error(fp, q, TIMESTEPS, plot_path=tmp_path / "cos.png")
    assert err["cos"].shape == (len(TIMESTEPS), N_RESNETS)
    torch.testing.assert_close(err["cos"], torch.ones_like(err["cos"]), atol=1e-12, rtol=0)
    assert err["min_cos"] == pytest.approx(1.0, abs=1e-12) and err["mean_cos"] == pytest.approx(1.0, abs=1e-12)
    mm = T.temporal_mismatch(fp, q, TIMESTEPS, plot_path=tmp_path / "delta.png")
    assert mm["delta_step"].shape == (len(TIMESTEPS), N_RESNETS)
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
    # the perturbed column is the cosine of the FP and quantized emb computed by hand
    for k, t in enumerate(TIMESTEPS):
        a, b = _emb_by_hand(fp, target, t), _emb_by_hand(q, target, t)
        assert cos[k, col].item() == pytest.approx(torch.nn.functional.cosine_similarity(a, b, dim=0).item(), abs=1e-6)
    assert err["min_cos"] == pytest.approx(cos[:, col].min().item()) and err["mean_cos"] == pytest.approx(cos.mean().item())

    mm = T.temporal_mismatch(feats, q)
    assert (mm["delta_step"][:, [i for i in range(N_RESNETS) if i != col]] == 0).all()
    # delta = argmax_t' cos(emb_{t',i}, emb^q_{t,i}) - t, by hand over the whole FP x quantized similarity matrix
    gq = T.measure_temporal_features(q, TIMESTEPS).features[col]
    sim = torch.nn.functional.cosine_similarity(gq[:, None, :], feats.features[col][None, :, :], dim=-1)
    torch.testing.assert_close(mm["best_cos"][:, col], sim.max(dim=1).values, atol=1e-9, rtol=0)
    assert torch.equal(mm["argmax_step"][:, col], sim.argmax(dim=1))
    assert torch.equal(mm["delta_step"][:, col], sim.argmax(dim=1) - torch.arange(len(TIMESTEPS)))
    assert mm["mismatched_fraction"] == pytest.approx((mm["delta_step"] != 0).double().mean().item())
    # delta in timestep space is the step delta mapped through the schedule
    ts = torch.tensor(TIMESTEPS)
    torch.testing.assert_close(mm["delta_timestep"], ts[mm["argmax_step"]] - ts[:, None])


def test_mismatch_against_every_training_timestep():
    """Candidates = all 1000 training timesteps: a quantized feature that equals the FP one of a timestep the sampler
    never visits is found there (delta in training timesteps), where the sampler's list alone cannot see it."""
    fp = _unet()
    every = T.measure_temporal_features(fp, list(range(1000)), method="direct")
    hooks = T.measure_temporal_features(fp, TIMESTEPS)
    for a, b in zip(hooks.features, [x[TIMESTEPS] for x in every.features]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)  # direct == hooks for an FP model
    shifted = copy.deepcopy(hooks)  # the 'quantized' features: each step's FP feature of t - 37
    shifted.features = [x[[t - 37 if t >= 37 else t + 37 for t in TIMESTEPS]] for x in every.features]
    mm = T.temporal_mismatch(hooks, shifted, candidates=every)
    want = torch.tensor([-37 if t >= 37 else 37 for t in TIMESTEPS])[:, None].expand(-1, N_RESNETS)
    assert torch.equal(mm["delta_timestep"], want) and mm["mismatched_fraction"] == 1.0
    assert torch.equal(mm["best_timestep"], torch.tensor(TIMESTEPS)[:, None] + want)
    own = T.temporal_mismatch(hooks, shifted)  # the sampler's 6 timesteps cannot express a 37-step shift
    assert not torch.equal(own["delta_timestep"], want)


def _ddim_by_hand(unet, x, steps, eta=0.0):
    """Plain DDIM loop (diffusers' scheduler.step) from a given x_T: the reference for trajectory_deviation."""
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    out = [x]
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x, eta=eta).prev_sample
            out.append(x)
    return out


def test_trajectory_deviation_zero_for_identical_and_positive_for_perturbed(tmp_path):
    fp = _unet()
    sched = DDIMScheduler(num_train_timesteps=1000)
    same = T.trajectory_deviation(fp, copy.deepcopy(fp), sched, num_inference_steps=4, num_samples=2,
                                  plot_path=tmp_path / "traj.png")
    assert len(same["rmse"]) == len(same["cos"]) == 5 and len(same["local_rmse"]) == 4
    assert max(same["rmse"]) == 0.0 and max(same["local_rmse"]) == 0.0
    assert min(same["cos"]) == pytest.approx(1.0, abs=1e-12)
    assert same["timesteps"] == [750, 500, 250, 0]
    assert (tmp_path / "traj.png").stat().st_size > 1000
    q = _perturbed(fp, T.temporal_resnets(fp)[0][0])
    diff = T.trajectory_deviation(fp, q, sched, num_inference_steps=4, num_samples=2, seed=0)
    assert diff["rmse"][0] == 0.0 and diff["final_rmse"] == diff["rmse"][-1] > 0 and min(diff["local_rmse"]) > 0
    # the same deterministic DDIM loops by hand from the same x_T (seeded randn of the sample shape)
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = _ddim_by_hand(fp, x_t, 4), _ddim_by_hand(q, x_t, 4)
    for k in range(5):
        want = (a[k].double() - b[k].double()).pow(2).flatten(1).mean(1).sqrt().mean().item()
        assert diff["rmse"][k] == pytest.approx(want, rel=1e-5, abs=1e-9)
    # both runs start from x_T, so the first local (one-step) error equals the first accumulated one
    assert diff["local_rmse"][0] == pytest.approx(diff["rmse"][1], rel=1e-12)
    stochastic = T.trajectory_deviation(fp, q, sched, num_inference_steps=4, num_samples=2, eta=1.0)
    assert stochastic["rmse"][0] == 0.0 and stochastic["final_rmse"] > 0 and stochastic["eta"] == 1.0
    assert sched.num_inference_steps is None  # caller's scheduler untouched


def test_activation_ranges_per_timestep(tmp_path):
    unet = _unet("class")
    names = T.default_activation_layers(unet)
    assert "conv_in" in names and "conv_out" in names
    out = T.activation_ranges(unet, names, DDIMScheduler(num_train_timesteps=1000), num_inference_steps=3,
                              num_samples=2, seed=0, class_labels=torch.tensor([1, 2]), plot_path=tmp_path / "act.png")
    assert out["min"].shape == (3, len(names)) == out["max"].shape
    assert (out["min"] <= out["max"]).all() and torch.isfinite(out["min"]).all() and torch.isfinite(out["max"]).all()
    # step 0: conv_in sees x_T itself (DDIM does not scale the model input), a seeded randn of the sample shape
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    i = names.index("conv_in")
    assert out["min"][0, i].item() == x_t.min().item() and out["max"][0, i].item() == x_t.max().item()
    # later steps: the inputs of conv_in along the same trajectory, recorded by a hook of our own
    seen = []
    h = unet.conv_in.register_forward_pre_hook(lambda m, inp: seen.append((inp[0].min().item(), inp[0].max().item())))
    try:
        sched = DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(3)
        x = x_t.clone()
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(unet(x, t, class_labels=torch.tensor([1, 2])).sample, t, x).prev_sample
    finally:
        h.remove()
    assert len(seen) == 3
    for k, (lo, hi) in enumerate(seen):
        assert out["min"][k, i].item() == pytest.approx(lo, rel=1e-5) and out["max"][k, i].item() == pytest.approx(hi, rel=1e-5)
    assert (tmp_path / "act.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="not found"):
        T.activation_ranges(unet, ["nope"], num_inference_steps=2)


def test_ranges_recorded_on_the_trajectory_equal_separate_passes():
    """temporal_report takes each model's activation ranges from the trajectory's own passes: the same tensors as
    activation_ranges(fp) and activation_ranges(q), bit for bit (not the quantized step taken from the FP x_t)."""
    fp = _unet("class")
    q = _perturbed(fp, T.temporal_resnets(fp)[-1][0])
    names = T.default_activation_layers(fp)
    labels = torch.tensor([1, 2])
    traj = T.trajectory_deviation(fp, q, DDIMScheduler(num_train_timesteps=1000), num_inference_steps=4, num_samples=2,
                                  seed=3, eta=0.5, class_labels=labels, range_layers=names)
    for tag, model in (("fp", fp), ("q", q)):
        alone = T.activation_ranges(model, names, DDIMScheduler(num_train_timesteps=1000), num_inference_steps=4,
                                    num_samples=2, seed=3, eta=0.5, class_labels=labels)
        got = traj["activation_ranges"][tag]
        assert got["names"] == alone["names"] and got["timesteps"] == alone["timesteps"]
        assert torch.equal(got["min"], alone["min"]) and torch.equal(got["max"], alone["max"])
        assert got["min"].shape == (4, len(names))
    assert not torch.equal(traj["activation_ranges"]["fp"]["max"], traj["activation_ranges"]["q"]["max"])
    assert "activation_ranges" not in T.trajectory_deviation(fp, q, num_inference_steps=2, num_samples=2, class_labels=labels)
    assert all(not m._forward_pre_hooks for m in list(fp.modules()) + list(q.modules()))  # hooks removed


def test_temporal_report_writes_all_outputs(tmp_path):
    fp = _unet("class")
    target = T.temporal_resnets(fp)[-1][0]
    q = _perturbed(fp, target)
    rep = T.temporal_report(fp, q, DDIMScheduler(num_train_timesteps=1000), 3, tmp_path, num_samples=2, class_label=1)
    for name in ("temporal_feature_error.png", "temporal_mismatch.png", "trajectory_deviation.png",
                 "activation_ranges_fp.png", "activation_ranges_q.png"):
        assert (tmp_path / name).stat().st_size > 1000, name
    rows = list(csv.DictReader((tmp_path / "temporal_table.csv").open()))
    assert len(rows) == 3 * N_RESNETS
    assert rep["timesteps"] == [666, 333, 0] and rep["resnets"][-1] == target
    cos = torch.tensor(rep["cos"])
    assert cos.shape == (3, N_RESNETS)
    # only the perturbed (last) resnet moves; the summary is the mean/min of the table it writes
    assert (cos[:, -1] < 1 - 1e-4).all() and torch.allclose(cos[:, :-1], torch.ones(3, N_RESNETS - 1), atol=1e-12, rtol=0)
    assert rep["summary"]["temporal_cos_mean"] == pytest.approx(cos.mean().item())
    assert rep["summary"]["temporal_cos_min"] == pytest.approx(cos[:, -1].min().item())
    table_cos = [float(r["cos"]) for r in rows if r["resnet"] == target]
    assert table_cos == pytest.approx(cos[:, -1].tolist())
    assert rep["summary"]["trajectory_rmse_final"] == rep["trajectory"]["rmse"][-1] > 0
    on_disk = json.loads((tmp_path / "temporal.json").read_text())
    assert on_disk["summary"] == pytest.approx(rep["summary"]) and on_disk["resnets"] == rep["resnets"]
