"""The quantization engine on tiny diffusers UNets (docs/method.md sections 2-8): TIB discovery, layer policies,
shortcut splitting, finite set calibration, every recipe end to end, TIAR, the feature cache."""
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

import tfmq
from engine_fixtures import (
    KINDS,
    N_SAMPLES,
    STEPS,
    calib,
    calib_cfg,
    quantized,
    run,
    sample_kwargs,
    scheduler,
    small_config,
    tiny_unet,
    unet_inputs,
)
from tfmq.quant.methods import weight_calibration_rows
from tfmq.quant.fsc import temporal_act_quantizers
from tfmq.quant.layers import QuantAttnProcessor, QuantLayer
from tfmq.quant.prepare import act_quantizers, get_state, quant_layers
from tfmq.quant.quantizer import ActQuantizer, WeightQuantizer, minmax_qparams
from tfmq.quant.methods import tiar_inputs
from tfmq.quant.reconstruction import lp_loss, mean_temporal_cos
from tfmq.quant.tiar import tiar_loss
from tfmq.diffusion.sampling import sample
from tfmq.quant.tib import TemporalInformationBlock


pytestmark = pytest.mark.usefixtures("one_thread")


def _cond(kind: str, n: int) -> dict:
    return sample_kwargs(kind, n)


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB (inf if equal)."""
    ref, out = ref.double(), out.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


# SQNR windows of the tiny seeded UNets at W4 with 10 iterations (measured: one call 9-23 dB, W4A32 12-13 dB,
# 5-step samples 3.5-14 dB): below the upper bound the model is quantized (FP would be inf), above the lower
# one it still computes the FP model's function; the margins leave room for a few boundary flips
W4A32_SQNR_DB = (8.0, 35.0)
W4A8_SQNR_DB = (6.0, 35.0)
SAMPLE_SQNR_DB = (1.0, 40.0)


# --------------------------------------------------------------------------------------------
# 4. TIB discovery
@pytest.mark.parametrize("kind", KINDS)
def test_tib_features_equal_time_emb_proj_outputs_of_a_real_forward(kind):
    unet = tiny_unet(kind)
    with_proj = [n for n, m in unet.named_modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None]
    tib = TemporalInformationBlock(unet)
    assert len(with_proj) == 8  # 2 down + 2 mid + 4 up resnets
    captured = {}  # filled in execution order: down -> mid -> up
    hooks = [unet.get_submodule(f"{n}.time_emb_proj").register_forward_hook(
        lambda m, a, out, n=n: captured.__setitem__(n, out.detach().clone())) for n in with_proj]
    t = torch.tensor([999, 431, 17, 0])
    cond = _cond(kind, 4)
    with torch.no_grad():
        unet(torch.randn(4, 1, 8, 8), t, **cond)
    for h in hooks:
        h.remove()
    feats = tfmq.temporal_features(unet, t, cond.get("class_labels"))
    assert len(feats) == len(with_proj) and tib.names == list(captured)
    for n, f in zip(tib.names, feats):
        assert f.shape == captured[n].shape == (4, unet.get_submodule(f"{n}.time_emb_proj").out_features)
        torch.testing.assert_close(f, captured[n], rtol=0, atol=1e-6)
    # the features depend on t (and on the class for the class-conditional model)
    assert float((feats[0][0] - feats[0][1]).abs().max()) > 1e-3
    if kind == "class":
        other = tfmq.temporal_features(unet, t, (cond["class_labels"] + 1) % 3)
        assert float((other[0] - feats[0]).abs().max()) > 1e-3


# --------------------------------------------------------------------------------------------
# 6. layer policies
@pytest.mark.parametrize("kind", ["uncond", "text"])
def test_policy_tfmq_keeps_the_released_float_layers(kind):
    fp = tiny_unet(kind)
    names = {n for n, m in fp.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    kept = {"conv_in", "conv_out", "time_embedding.linear_1"} | {
        n for n in names if n.endswith("conv_shortcut") or ".downsamplers." in n}
    assert {"down_blocks.0.downsamplers.0.conv", "up_blocks.0.resnets.0.conv_shortcut"} <= kept
    unet = tfmq.prepare_model(tiny_unet(kind), small_config("tfmq"))
    for n in names:
        m = unet.get_submodule(n)
        if n in kept:
            assert type(m) in (nn.Conv2d, nn.Linear), n
        else:
            assert isinstance(m, QuantLayer), n
    for n in ("time_embedding.linear_2", "down_blocks.0.resnets.0.conv1"):
        layer = unet.get_submodule(n)
        assert isinstance(layer, QuantLayer) and len(layer.wq) == 1 and layer.aq is None, n
    assert unet.get_submodule("down_blocks.0.resnets.0.conv2").aq is not None
    assert unet.get_submodule("up_blocks.0.upsamplers.0.conv").aq is not None  # upsamplers are not exempt
    assert len(list(quant_layers(unet))) == len(names) - len(kept)


@pytest.mark.parametrize("kind", ["uncond", "text"])
def test_policy_all_wraps_every_conv_and_linear(kind):
    fp = tiny_unet(kind)
    names = [n for n, m in fp.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    unet = tfmq.prepare_model(tiny_unet(kind), small_config("tfmq", policy="all"))
    assert all(isinstance(unet.get_submodule(n), QuantLayer) for n in names)
    assert all(unet.get_submodule(n).aq is not None for n in names)
    assert not [n for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


@pytest.mark.parametrize("kind,method", [("uncond", "qdiffusion"), ("text", "qdiffusion"), ("class", "tfmq")])
def test_prepared_model_in_fp_mode_is_the_fp_model(kind, method):
    """Wrapping (incl. the matmul-quantizing attention processor) changes nothing until enabled."""
    fp = tiny_unet(kind)
    unet = tfmq.prepare_model(tiny_unet(kind), small_config(method))
    if method == "qdiffusion":
        assert sum(isinstance(m, QuantAttnProcessor) for m in unet.modules()) > 0
    x = unet_inputs(kind, step=1)
    torch.testing.assert_close(run(unet, x), run(fp, x), rtol=0, atol=1e-5)
    sd = unet.state_dict()  # wrapping keeps every FP tensor under its name
    assert all(torch.equal(sd[k], v) for k, v in fp.state_dict().items())


# --------------------------------------------------------------------------------------------
# 7. Q-Diffusion shortcut split
@pytest.mark.parametrize("kind", ["uncond", "text"])
def test_qdiffusion_splits_up_block_shortcuts_at_the_deep_feature_channels(kind):
    fp = tiny_unet(kind)
    deep, hooks = {}, []  # channels of the deep feature each up-block resnet concatenates with its skip
    for bi, block in enumerate(fp.up_blocks):
        def pre(m, args, kwargs, bi=bi):
            h = kwargs.get("hidden_states", args[0] if args else None)
            deep[(bi, 0)] = h.shape[1]
        hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        for j, r in enumerate(block.resnets[1:], start=1):
            deep[(bi, j)] = block.resnets[j - 1].out_channels
    run(fp, unet_inputs(kind))
    for h in hooks:
        h.remove()
    unet = tfmq.prepare_model(tiny_unet(kind), small_config("qdiffusion"))
    split_layers = {n: l for n, l in quant_layers(unet) if l.split is not None}
    expected = {f"up_blocks.{bi}.resnets.{j}.conv_shortcut": c for (bi, j), c in deep.items()}
    assert {n: l.split for n, l in split_layers.items()} == expected
    assert expected["up_blocks.0.resnets.0.conv_shortcut"] == 16 and len(expected) == 4
    for n, l in split_layers.items():
        assert len(l.wq) == 2 and len(l.aq) == 2
        c_in = l.weight.shape[1]
        assert l.wq[0].scale.shape[0] == l.wq[1].scale.shape[0] == l.weight.shape[0] and 0 < l.split < c_in
    assert unet.get_submodule("down_blocks.1.resnets.0.conv_shortcut").split is None  # no concat there
    # with every quantizer off, the split forward is the FP forward
    x = unet_inputs(kind)
    torch.testing.assert_close(run(unet, x), run(fp, x), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 5. finite set calibration
def test_fsc_all_gives_one_table_entry_per_calibrated_timestep():
    q = quantized("uncond", "tfmq")
    c = calib("uncond")
    acts = list(act_quantizers(q))
    assert len(acts) == 40
    for name, a in acts:
        assert a.mode == "table" and a.enabled, name
        assert a.table_timesteps.tolist() == sorted(c.timesteps), name
        assert a.table_scale.shape == a.table_zero_point.shape == (STEPS,)
        assert bool((a.table_scale > 0).all())
    varying = [n for n, a in acts if float(a.table_scale.max() / a.table_scale.min()) > 1.05]
    assert len(varying) >= len(acts) // 4, varying
    assert get_state(q).stats["activations"]["fsc"]["timesteps"] == c.timesteps


def test_fsc_temporal_table_equals_min_max_of_the_quantized_temporal_input():
    """The input of a time_emb_proj is SiLU(h^q(t)): every row of a step is the same, so EMA = min/max."""
    q = quantized("uncond", "tfmq")
    ts = torch.tensor(sorted(calib("uncond").timesteps))
    with torch.no_grad():
        x = F.silu(TemporalInformationBlock(q).embedding(ts))
    checked = 0
    for name, l in quant_layers(q):
        if not name.endswith("time_emb_proj"):
            continue
        s, _ = minmax_qparams(x.min(1).values, x.max(1).values, 8)
        # the EMA of equal values equals them up to float rounding: the scale agrees to float precision
        torch.testing.assert_close(l.aq[0].table_scale, s, rtol=1e-5, atol=0)
        # the zero point is an integer: exactly round(-min / scale), except where that ratio sits on .5
        # (where an ulp of the EMA decides): there, either neighbour
        z_exact = -x.min(1).values.double().clamp(max=0) / s.double()
        z = l.aq[0].table_zero_point.double()
        assert torch.equal(z, z.round()), name
        on_boundary = (z_exact - z_exact.floor() - 0.5).abs() < 1e-3  # z <= 255: 1e-3 covers a 4e-6 relative slip
        assert torch.equal(z[~on_boundary], z_exact[~on_boundary].round()), name
        assert bool(((z == z_exact.floor()) | (z == z_exact.ceil()))[on_boundary].all()), name
        checked += 1
    assert checked == 8


def test_fsc_selects_the_entry_of_the_call_timestep():
    q = quantized("uncond", "tfmq")
    name, aq = next((n, a) for n, a in act_quantizers(q) if float(a.table_scale.max() / a.table_scale.min()) > 1.05)
    used = []
    h = aq.register_forward_hook(lambda m, args, out: used.append(m.current_qparams(args[0])[0].item()))
    x = unet_inputs("uncond", n=2)
    outs = {}
    try:
        for t in (800, 200, 0):
            outs[t] = run(q, {**x, "timestep": torch.full((2,), t)})
    finally:
        h.remove()
    table = dict(zip(aq.table_timesteps.tolist(), aq.table_scale.tolist()))
    assert used == [table[800], table[200], table[0]]
    assert len(set(used)) > 1
    # a batch mixing timesteps uses each row's own entry (a table lookup: exact)
    per_row = []
    h = aq.register_forward_hook(lambda m, args, out: per_row.append(m.current_qparams(args[0])))
    try:
        mixed = run(q, {**x, "timestep": torch.tensor([800, 0])})
    finally:
        h.remove()
    (scale, zp), = per_row
    i800, i0 = aq.table_timesteps.tolist().index(800), aq.table_timesteps.tolist().index(0)
    assert scale.flatten().tolist() == [aq.table_scale[i800].item(), aq.table_scale[i0].item()]
    assert zp.flatten().tolist() == [aq.table_zero_point[i800].item(), aq.table_zero_point[i0].item()]
    # the outputs: each row as in its own uniform batch, up to an activation that a 1-ulp difference of
    # the batched arithmetic moves across a rounding boundary -- far below what the other entry changes
    for row, t, other in ((0, 800, 0), (1, 0, 800)):
        err = float((mixed[row] - outs[t][row]).abs().max())
        wrong = float((outs[other][row] - outs[t][row]).abs().max())
        assert err <= 0.1 * wrong, (row, err, wrong)


def test_uncalibrated_timestep_raises():
    q = quantized("uncond", "tfmq")
    x = unet_inputs("uncond", n=2)
    with pytest.raises(tfmq.UncalibratedTimestepError, match=r"timestep 17\b"):
        run(q, {**x, "timestep": torch.full((2,), 17)})
    with pytest.raises(tfmq.UncalibratedTimestepError, match=r"timestep 999\b"):
        run(q, {**x, "timestep": torch.tensor([800, 999])})
    # shared ranges (fsc=False) have no notion of timesteps
    assert torch.isfinite(run(quantized("uncond", "tfmq", fsc=False), {**x, "timestep": torch.full((2,), 17)})).all()


def test_fsc_scope_tib_tables_only_on_the_temporal_quantizers():
    q = quantized("uncond", "tfmq", fsc_scope="tib")
    tib_q = {id(a) for a in temporal_act_quantizers(q)}
    assert len(tib_q) == 8  # one input quantizer per time_emb_proj (linear_2 has none under policy tfmq)
    modes = {n: (a.mode, id(a) in tib_q) for n, a in act_quantizers(q)}
    assert all(m == ("table" if is_tib else "shared") for m, is_tib in modes.values()), modes
    assert sum(is_tib for _, is_tib in modes.values()) == 8
    assert all(a.table_timesteps.tolist() == [0, 200, 400, 600, 800] for a in temporal_act_quantizers(q))


def test_fsc_false_gives_shared_ranges():
    q = quantized("uncond", "tfmq", fsc=False)
    assert {a.mode for _, a in act_quantizers(q)} == {"shared"}
    assert all(a.table_timesteps.numel() == 0 for _, a in act_quantizers(q))
    assert get_state(q).stats["activations"]["mode"] == "ema"


def test_fsc_rows_of_a_cfg_set_keep_null_and_conditional_rows():
    """fsc_n_per_step on a classifier-free-guidance set must pick (null, cond) pairs, not the first n rows
    (which are all null-condition rows in the CalibrationSet layout)."""
    c = calib_cfg()
    assert c.cfg and c.load_step(0)["class_labels"].tolist() == [2, 2, 2, 2, 0, 1, 0, 1]
    cfg = small_config("tfmq", recon={"iters": 0}, tiar_recon={"iters": 0}, calib={"fsc_n_per_step": 4})
    unet = tfmq.prepare_model(tiny_unet("class"), cfg)
    tfmq.reconstruct_temporal(unet, c, progress=False)
    tfmq.reconstruct_blocks(unet, c, progress=False)
    seen = []
    h = unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].tolist()), with_kwargs=True)
    try:
        tfmq.calibrate_activations(unet, c, progress=False)
    finally:
        h.remove()
    labels = sorted(v for batch in seen for v in batch)
    assert len(labels) == STEPS * 4
    assert labels.count(2) == STEPS * 2, f"FSC rows per step should be 2 null + 2 conditional, saw labels {seen}"


# --------------------------------------------------------------------------------------------
# 8 (spec). PTQ4DM calibration timesteps
def test_ptq4dm_weight_set_is_skewed_toward_small_t():
    """Spec section 8: NDTC draws calibration timesteps from a normal distribution skewed toward small t: with the
    released N(0.4 T, 0.4 T) truncated to [0, T] the mean is 0.458 T, below the T / 2 of uniform timesteps."""
    c = calib("uncond")  # timesteps 800, 600, 400, 200, 0
    rows = weight_calibration_rows(c, small_config("ptq4dm"), "ptq4dm")
    t = rows["timestep"].double()
    assert len(t) == 3 * 8  # same size as the every-k set
    assert float(t.mean()) < 999 / 2, f"PTQ4DM rows lean to large t: {rows['timestep'].tolist()}"
    assert int((t <= 400).sum()) > int((t >= 600).sum()), rows["timestep"].tolist()


# --------------------------------------------------------------------------------------------
# 9. every recipe end to end
RECIPE_VARIANTS = [
    ("naive", {}), ("brecq", {}), ("freeze", {}), ("ptq4dm", {}), ("qdiffusion", {}), ("tfmq", {}),
    ("tfmq", {"tiar": False}), ("tfmq", {"fsc": False}),
]


def _ids(v):
    return v[0] + "".join(f"-{k}={w}" for k, w in v[1].items())


@pytest.mark.parametrize("variant", RECIPE_VARIANTS, ids=_ids)
def test_recipe_w4a8_quantizes_and_samples(variant):
    method, kw = variant
    q = quantized("uncond", method, **kw)
    state = get_state(q)
    assert state.stages_done == ["temporal", "blocks", "activations"]
    recipe = tfmq.get_recipe(method)
    assert state.config.policy == recipe.policy
    layers = list(quant_layers(q))
    assert layers and all(l.finalized and l.use_wq for _, l in layers)
    for n, l in layers:
        for wq in l.wq:
            assert wq.w_int.dtype == torch.uint8 and int(wq.w_int.max()) <= 15, n
    acts = list(act_quantizers(q))
    assert acts and all(a.enabled and a.mode in ("shared", "table") for _, a in acts)
    if method == "qdiffusion":
        assert any(isinstance(m, QuantAttnProcessor) for m in q.modules())
        assert any(l.split for _, l in layers)
    if kw.get("tiar") is False:
        assert state.stats["temporal"]["mode"] == "nearest"
    elif method == "tfmq":
        assert state.stats["temporal"]["mode"] == "tiar" and state.stats["temporal"]["iters"] == 10
    fp = tiny_unet("uncond")
    x = unet_inputs("uncond")
    out, ref = run(q, x), run(fp, x)
    cos = float(F.cosine_similarity(out.flatten(), ref.flatten(), dim=0))
    assert not torch.equal(out, ref) and cos > 0.8, cos
    imgs = sample(q, scheduler(), num_samples=3, num_inference_steps=STEPS, batch_size=3, seed=1, progress=False)
    assert imgs.shape == (3, 1, 8, 8) and bool(torch.isfinite(imgs).all())


@pytest.mark.parametrize("kind,method", [("class", "tfmq"), ("text", "tfmq"), ("text", "qdiffusion")])
def test_conditional_unets_quantize_and_sample(kind, method):
    q = quantized(kind, method)
    fp = tiny_unet(kind)
    x = unet_inputs(kind)
    db = sqnr_db(run(fp, x), run(q, x))
    assert W4A8_SQNR_DB[0] < db < W4A8_SQNR_DB[1], db  # one UNet call: quantized, and close to FP
    kw = dict(num_samples=3, num_inference_steps=STEPS, batch_size=3, seed=1, progress=False, **_cond(kind, 3))
    imgs, ref = sample(q, scheduler(), **kw), sample(fp, scheduler(), **kw)
    assert imgs.shape == ref.shape == (3, 1, 8, 8)
    db = sqnr_db(ref, imgs)
    assert SAMPLE_SQNR_DB[0] < db < SAMPLE_SQNR_DB[1], db  # the trajectory follows FP's, not exactly
    if method == "tfmq":
        assert {a.mode for _, a in act_quantizers(q)} == {"table"}
    if kind == "class" and method == "tfmq":  # TIAR is fitted on every (t, class) pair of the calibration set
        assert get_state(q).stats["temporal"]["rows"] == STEPS * 3


@pytest.mark.parametrize("method", ["tfmq", "qdiffusion"])
def test_weight_only_has_no_enabled_act_quantizers(method):
    q = quantized("uncond", method, act_bits=None)
    assert get_state(q).config.bits_name == "W4A32"
    assert not [n for n, a in act_quantizers(q) if a.enabled]
    assert not any(isinstance(m, QuantAttnProcessor) for m in q.modules())
    assert all(l.use_wq and l.finalized for _, l in quant_layers(q))
    for n, l in quant_layers(q):  # W4 integer grids, and the float weight the layer uses is their dequantisation
        wq = l.wq[0]
        assert wq.w_int.dtype == torch.uint8 and int(wq.w_int.max()) <= 15, n
        if l.split is None:
            torch.testing.assert_close(l.quantized_weight(), (wq.w_int.float() - wq.zero_point) * wq.scale, rtol=0, atol=0)
    x = unet_inputs("uncond", n=2)
    x17 = {**x, "timestep": torch.full((2,), 17)}  # no activation table: any timestep works
    out, ref = run(q, x17), run(tiny_unet("uncond"), x17)
    db = sqnr_db(ref, out)
    assert W4A32_SQNR_DB[0] < db < W4A32_SQNR_DB[1], db  # quantized (not FP), and not broken


def test_temporal_layers_are_frozen_after_the_temporal_stage():
    """freeze: TIB rounded to nearest; tfmq: TIB rounded by TIAR (differs from nearest); BRECQ leaves both alone."""
    for method, expect_rtn in (("freeze", True), ("tfmq", False)):
        q = quantized("uncond", method)
        names = set(TemporalInformationBlock(q).layer_names())
        tib_layers = [(n, l) for n, l in quant_layers(q) if n in names]
        assert len(tib_layers) == 9  # linear_2 + 8 time_emb_proj (linear_1 stays float under policy tfmq)
        changed = 0
        for n, l in tib_layers:
            wq = l.wq[0]
            rtn = torch.clamp(torch.round(l.weight / wq.scale) + wq.zero_point, 0, 15)
            changed += int((wq.w_int.float() != rtn).sum())
        assert (changed == 0) if expect_rtn else (changed > 0), (method, changed)
        assert "time_embedding.linear_2" not in get_state(q).stats["blocks"]["units"]


def test_quantize_leaves_no_gradients_on_the_fp_model():
    """Only AdaRound alphas (and Q-Diffusion's step sizes) learn: the FP weights, biases and norms must not
    get (and keep) gradients -- wasted backward compute and one gradient buffer per FP tensor."""
    fp_names = set(dict(tiny_unet("uncond").named_parameters()))
    for method in ("tfmq", "qdiffusion"):
        q = quantized("uncond", method)
        with_grad = [n for n, p in q.named_parameters() if n in fp_names and p.grad is not None]
        assert not with_grad, f"{method}: {len(with_grad)} parameters hold gradients, e.g. {with_grad[:4]}"


# --------------------------------------------------------------------------------------------
# 10. TIAR lowers the temporal feature error
def test_tiar_lowers_temporal_feature_error():
    ts = calib("uncond").timesteps
    fp = tfmq.temporal_features(tiny_unet("uncond"), ts)
    err = {
        "tfmq": mean_temporal_cos(fp, tfmq.temporal_features(quantized("uncond", "tfmq", tiar_recon={"iters": 200}), ts)),
        "tfmq_tiar_off": mean_temporal_cos(fp, tfmq.temporal_features(quantized("uncond", "tfmq", tiar=False), ts)),
        "naive": mean_temporal_cos(fp, tfmq.temporal_features(quantized("uncond", "naive"), ts)),
        "qdiffusion": mean_temporal_cos(fp, tfmq.temporal_features(quantized("uncond", "qdiffusion"), ts)),
    }
    print("\nW4A8 mean(1 - cos(emb, emb_q)):", {k: f"{v:.3e}" for k, v in err.items()})
    assert err["tfmq"] < err["naive"] and err["tfmq"] < err["qdiffusion"]
    assert err["tfmq"] < err["tfmq_tiar_off"]  # same policy and FSC: the gain is TIAR's
    assert all(v > 0 for v in err.values())


# the reconstruction losses against references
def test_lp_loss_is_brecqs_reduction_against_hand_computed_and_float64_values():
    """BRECQ's (and Q-Diffusion's, p=2.4) loss: ``|pred - target|^p`` summed over channels, mean over the rest."""
    pred, target = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.zeros(2, 2)
    assert float(lp_loss(pred, target)) == 15.0  # ((1 + 4) + (9 + 16)) / 2
    assert float(lp_loss(pred, target, p=1.0)) == 5.0  # ((1 + 2) + (3 + 4)) / 2
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    d = (a.double() - b.double()).abs()
    for p in (2.0, 2.4):
        ref = sum(float((d[n, :, i, j] ** p).sum()) for n in range(2) for i in range(4) for j in range(5)) / 40
        assert float(lp_loss(a, b, p)) == pytest.approx(ref, rel=1e-5), p


def test_tiar_loss_against_a_hand_computed_value():
    q = [torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[3.0], [1.0]])]
    fp = [torch.zeros(2, 2), torch.tensor([[1.0], [1.0]])]
    assert float(tiar_loss(q, fp)) == 4.5  # resnet 0: rows 1 and 4 -> 2.5; resnet 1: rows 4 and 0 -> 2


def test_tiar_reports_the_loss_of_its_rounded_tib_against_a_float64_reference():
    """loss_final = sum_i mean_rows ||g^q_i - g_i||^2 over every (t, class) of the finite set, recomputed in
    float64 from the features of the FP model and of the model TIAR left (weight-only)."""
    c = calib("class")
    unet = tfmq.prepare_model(tiny_unet("class"), small_config("tfmq", tiar_recon={"iters": 20}))
    stats = tfmq.reconstruct_temporal(unet, c, progress=False)
    t, labels = tiar_inputs(c)
    assert stats["rows"] == len(t) == STEPS * 3 and stats["layers"] == 9 and stats["iters"] == 20
    fp = tfmq.temporal_features(tiny_unet("class"), t, labels)
    qf = tfmq.temporal_features(unet, t, labels)
    ref = sum(float(((a.double() - b.double()) ** 2).sum(1).mean()) for a, b in zip(qf, fp))
    assert ref > 1e-8  # the rounded TIB is not the FP one
    assert stats["loss_final"] == pytest.approx(ref, rel=1e-4)


# --------------------------------------------------------------------------------------------
# 12. cached temporal features
@pytest.mark.parametrize("kind", ["uncond", "class"])
def test_cached_temporal_features_equal_fp_features(kind):
    q = quantized(kind, "tfmq", cached_temporal_features=True)
    c = calib(kind)
    fp = tiny_unet(kind)
    if kind == "class":
        ts = torch.tensor(c.timesteps).repeat_interleave(3)
        labels = torch.arange(3).repeat(STEPS)
    else:
        ts, labels = torch.tensor(c.timesteps), None
    got = tfmq.temporal_features(q, ts, labels)
    want = tfmq.temporal_features(fp, ts, labels)
    assert len(got) == len(want) == 8
    cache = q.tfmq_feature_cache
    ti = torch.searchsorted(cache.timesteps, ts)  # the cache holds timesteps ascending; ts runs descending
    for i, (a, b) in enumerate(zip(got, want)):
        table = getattr(cache, f"feature_{i}")
        assert torch.equal(a, table[ti, 0] if labels is None else table[ti, labels])  # served from the table
        # the table is FP's features, computed in the other row order: equal to float precision
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    plain = tfmq.temporal_features(quantized(kind, "tfmq"), ts, labels)
    assert mean_temporal_cos(want, plain) > 1e-6  # without the cache the quantized TIB does differ
    # while sampling, every resnet receives FP's features of the call's timestep (and class)
    state, seen = get_state(q), []
    hooks = [q.get_submodule(n).register_forward_hook(
        lambda m, a, out, i=i: seen.append((i, state.ctx.timesteps.clone(), out.detach().clone())))
        for i, n in enumerate(cache.names)]
    try:
        imgs = sample(q, scheduler(), num_samples=2, num_inference_steps=STEPS, batch_size=2, seed=3, progress=False,
                      **_cond(kind, 2))
    finally:
        for h in hooks:
            h.remove()
    assert imgs.shape == (2, 1, 8, 8) and len(seen) == 8 * STEPS
    assert sorted({int(t[0]) for _, t, _ in seen}) == sorted(c.timesteps)
    cond_labels = _cond(kind, 2).get("class_labels")
    for i, t, out in seen:
        torch.testing.assert_close(out, tfmq.temporal_features(fp, t, cond_labels)[i], rtol=1e-5, atol=1e-6)
    with pytest.raises(tfmq.UncalibratedTimestepError):
        tfmq.temporal_features(q, torch.tensor([17]), None if labels is None else labels[:1])


# --------------------------------------------------------------------------------------------
# stage API guards
def test_stages_run_in_order_once():
    unet = tfmq.prepare_model(tiny_unet("uncond"), small_config("naive"))
    c = calib("uncond")
    with pytest.raises(ValueError, match="needs temporal"):
        tfmq.reconstruct_blocks(unet, c, progress=False)
    with pytest.raises(ValueError, match="weight_bits: passed 8, prepared with 4"):
        tfmq.reconstruct_temporal(unet, c, small_config("naive", weight_bits=8), progress=False)
    tfmq.reconstruct_temporal(unet, c, progress=False)
    with pytest.raises(ValueError, match="already run"):
        tfmq.reconstruct_temporal(unet, c, progress=False)
    with pytest.raises(ValueError, match="already prepared"):
        tfmq.prepare_model(unet, small_config("naive"))


# --------------------------------------------------------------------------------------------
# device / dtype moves
def test_integer_grid_is_a_buffer_that_moves_with_the_model():
    """``unet.to(device)`` only moves parameters and buffers: a plain-attribute w_int stays behind."""
    q = quantized("uncond", "naive")
    wqs = [m for m in q.modules() if isinstance(m, WeightQuantizer)]
    assert wqs and all(m.mode == "int" for m in wqs)
    plain = [m for m in wqs if "w_int" not in dict(m.named_buffers())]
    assert not plain, f"{len(plain)}/{len(wqs)} WeightQuantizer.w_int are plain attributes, not buffers"


def test_quantized_model_follows_dtype_conversion():
    """``unet.to(dtype)`` after a forward must not leave the cached float weights in the old dtype: they
    follow it, the integer grids stay, and weight-only numerics agree to float precision. (With 8-bit
    activations an activation on a rounding boundary may flip between float32 and float64: not compared.)"""
    q = tfmq.quantize(tiny_unet("uncond"), calib("uncond"), small_config("naive"), progress=False)
    x = unet_inputs("uncond", n=2)
    run(q, x)  # a forward fills the per-layer float weight cache
    layers = [l for _, l in quant_layers(q)]
    w32 = {l.name: l.quantized_weight().clone() for l in layers}
    grids = {l.name: [wq.w_int.clone() for wq in l.wq] for l in layers}
    tfmq.set_quant_state(q, weight=True, act=False)
    ref = run(q, x)
    q.to(torch.float64)
    x64 = {**x, "sample": x["sample"].double()}
    out = run(q, x64)
    assert out.dtype == torch.float64
    for l in layers:
        assert all(torch.equal(wq.w_int, g) and wq.w_int.dtype == torch.uint8 for wq, g in zip(l.wq, grids[l.name]))
        w = l.quantized_weight()
        assert w.dtype == torch.float64, l.name
        # (w_int - z) * s from float32 s: float64 holds the float32 product to within its rounding
        torch.testing.assert_close(w, w32[l.name].double(), rtol=2**-23, atol=0)
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-4)
    tfmq.enable_inference(q)
    assert run(q, x64).dtype == torch.float64
