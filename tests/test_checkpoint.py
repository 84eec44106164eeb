"""tfmq.quant.checkpoint (docs/method.md sections 2, 5): exact save/load round trips for every recipe, refusal of a
mismatching FP model, and stage-wise quantization across processes (save after a stage, load, go on)."""
import json

import pytest
import torch

import tfmq
from engine_fixtures import calib, quantized, run, small_config, tiny_unet, unet_inputs
from tfmq.quant.layers import layer_policy
from tfmq.quant.prepare import act_quantizers, get_state, quant_layers
from tfmq.quant.tib import feature_cache


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(kind):
    """Rows of two calibrated timesteps (noisiest and last step)."""
    return [unet_inputs(kind, step=0, n=3), unet_inputs(kind, step=4, n=3)]


def _assert_same_outputs(a, b, kind):
    """Bit-identical outputs: for a model and its loaded copy (the same ops on the same numbers)."""
    for x in _inputs(kind):
        oa, ob = run(a, x), run(b, x)
        assert torch.equal(oa, ob), float((oa - ob).abs().max())


def _rel_error(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _assert_quantized(q, kind, at_least=0.02):
    """The model's outputs differ from its FP model's (a model that quantizes nothing passes every equality)."""
    fp = tiny_unet(kind)
    for x in _inputs(kind):
        assert _rel_error(run(q, x), run(fp, x)) > at_least


def _expected_layer_count(kind, policy):
    fp = tiny_unet(kind)
    return sum(layer_policy(n, policy)[0] for n, m in fp.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


def _grid_pairs(a, b):
    """``(name, grid of a, grid of b)`` for every weight quantizer; non-empty and of equal length on both sides."""
    la, lb = list(quant_layers(a)), list(quant_layers(b))
    assert la and [n for n, _ in la] == [n for n, _ in lb]
    pairs = [(n, qa, qb) for (n, x), (_, y) in zip(la, lb) for qa, qb in zip(x.wq, y.wq)]
    assert len(pairs) == sum(len(x.wq) for _, x in la) == sum(len(y.wq) for _, y in lb)
    return [(n, qa.integer_weight(w), qb.integer_weight(w)) for (n, qa, qb), w in
            zip(pairs, [w for _, x in la for w in x.weight_parts()])]


ROUNDTRIPS = [
    ("uncond", "naive", {}), ("uncond", "brecq", {}), ("uncond", "freeze", {}), ("uncond", "ptq4dm", {}),
    ("uncond", "qdiffusion", {}), ("uncond", "tfmq", {}), ("uncond", "tfmq", {"tiar": False}),
    ("uncond", "tfmq", {"fsc": False}), ("uncond", "tfmq", {"fsc_scope": "tib"}),
    ("uncond", "tfmq", {"act_bits": None}), ("uncond", "tfmq", {"cached_temporal_features": True}),
    ("class", "tfmq", {}), ("class", "tfmq", {"cached_temporal_features": True}),
    ("text", "tfmq", {}), ("text", "qdiffusion", {}),
]


@pytest.mark.parametrize("kind,method,kw", ROUNDTRIPS,
                         ids=[f"{k}-{m}" + "".join(f"-{a}={b}" for a, b in kw.items()) for k, m, kw in ROUNDTRIPS])
def test_save_load_reproduces_outputs_exactly(tmp_path, kind, method, kw):
    q = quantized(kind, method, **kw)
    tfmq.save(q, tmp_path / "ckpt", extra_metadata={"run": "test"})
    header = tfmq.read_header(tmp_path / "ckpt")
    cfg = get_state(q).config
    assert header["method"] == method and header["bits"] == cfg.bits_name and header["policy"] == cfg.policy
    assert header["stages_done"] == ["temporal", "blocks", "activations"] and header["extra"] == {"run": "test"}
    assert header["unet_class"] == type(q).__name__
    fsc = method == "tfmq" and kw.get("fsc", True) and kw.get("act_bits", 8) is not None
    assert header["fsc_timesteps"] == (sorted(calib(kind).timesteps) if fsc else None)
    loaded = tfmq.load(tmp_path / "ckpt", tiny_unet(kind))
    _assert_quantized(loaded, kind)
    _assert_same_outputs(q, loaded, kind)
    assert get_state(loaded).config == cfg
    modes = {n: a.mode for n, a in act_quantizers(loaded)}
    assert modes == {n: a.mode for n, a in act_quantizers(q)}
    assert {n: a.enabled for n, a in act_quantizers(loaded)} == {n: a.enabled for n, a in act_quantizers(q)}
    if cfg.act_bits is None:
        assert modes == {}
    else:  # every activation quantizer calibrated and on; per-timestep tables exactly where FSC applies
        assert modes and set(modes.values()) <= {"shared", "table"}
        assert ("table" in modes.values()) == fsc and all(a.enabled for _, a in act_quantizers(loaded))
    n_layers = _expected_layer_count(kind, header["policy"])
    assert len(list(quant_layers(loaded))) == n_layers > 10
    grids = _grid_pairs(q, loaded)
    assert len(grids) >= n_layers
    for (n, a), (_, b) in zip(quant_layers(q), quant_layers(loaded)):
        assert all(wa.mode == wb.mode == "int" and torch.equal(wa.w_int, wb.w_int) for wa, wb in zip(a.wq, b.wq)), n
    for n, ga, gb in grids:
        assert torch.equal(ga, gb) and ga.unique().numel() > 2, n  # a real W4 grid, equal after the round trip
    if kw.get("cached_temporal_features"):
        assert feature_cache(loaded) is not None and len(header["feature_cache"]) > 0
        ts = torch.tensor(calib(kind).timesteps)
        labels = torch.zeros_like(ts) if kind == "class" else None
        fa, fb = tfmq.temporal_features(q, ts, labels), tfmq.temporal_features(loaded, ts, labels)
        assert len(fa) == len(fb) == len(header["feature_cache"])
        for a, b in zip(fa, fb):
            assert a.shape[0] == len(ts) and torch.equal(a, b)
    else:
        assert feature_cache(loaded) is None and header["feature_cache"] is None
    if fsc:  # the loaded model refuses uncalibrated timesteps too
        x = unet_inputs(kind, n=1)
        with pytest.raises(tfmq.UncalibratedTimestepError, match="timestep 17"):
            run(loaded, {**x, "timestep": torch.tensor([17])})


@pytest.fixture(scope="module")
def tfmq_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tfmq"
    tfmq.save(quantized("uncond", "tfmq"), path)
    return path


def test_load_refuses_a_different_config(tfmq_ckpt):
    with pytest.raises(tfmq.CheckpointMismatchError, match="block_out_channels"):
        tfmq.load(tfmq_ckpt, tiny_unet("uncond", block_out_channels=(8, 24)))
    with pytest.raises(tfmq.CheckpointMismatchError, match="num_class_embeds"):
        tfmq.load(tfmq_ckpt, tiny_unet("class"))
    with pytest.raises(tfmq.CheckpointMismatchError, match="UNet2DModel.*UNet2DConditionModel"):
        tfmq.load(tfmq_ckpt, tiny_unet("text"))


def test_load_refuses_different_weights(tfmq_ckpt):
    with pytest.raises(tfmq.CheckpointMismatchError, match=r"FP weights differ.*first at \S+"):
        tfmq.load(tfmq_ckpt, tiny_unet("uncond", seed=1))
    fp = tiny_unet("uncond")
    with torch.no_grad():
        fp.up_blocks[1].resnets[0].conv2.weight[0, 0, 0, 0] += 1e-3  # one fine-tuned weight
    with pytest.raises(tfmq.CheckpointMismatchError, match=r"up_blocks\.1\.resnets\.0\.conv2\.weight"):
        tfmq.load(tfmq_ckpt, fp)


@pytest.mark.parametrize("change", ["negate", "permute"])
def test_load_refuses_weights_with_the_same_magnitudes(tfmq_ckpt, change):
    """A fingerprint of sum|w| cannot see a sign flip or a permutation of the same values."""
    fp = tiny_unet("uncond")
    with torch.no_grad():
        w = fp.conv_out.weight
        w.copy_(-w if change == "negate" else w.flip(0).flip(1))
    with pytest.raises(tfmq.CheckpointMismatchError, match=r"conv_out\.weight"):
        tfmq.load(tfmq_ckpt, fp)


def test_load_refuses_other_format_versions_and_prepared_models(tfmq_ckpt, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tfmq_ckpt, bad)
    header = json.loads((bad / "quant_config.json").read_text())
    header["format_version"] = 99
    (bad / "quant_config.json").write_text(json.dumps(header))
    with pytest.raises(tfmq.CheckpointMismatchError, match="format_version=99"):
        tfmq.load(bad, tiny_unet("uncond"))
    with pytest.raises(FileNotFoundError, match="quant_config.json"):
        tfmq.load(tmp_path / "nothing", tiny_unet("uncond"))
    with pytest.raises(ValueError, match="already prepared"):
        tfmq.load(tfmq_ckpt, tfmq.load(tfmq_ckpt, tiny_unet("uncond")))


@pytest.mark.parametrize("method", ["tfmq", "qdiffusion"])
def test_stagewise_save_load_equals_one_quantize_call(tmp_path, method):
    """Stages in separate 'processes': temporal -> save -> load -> blocks -> save -> load -> activations."""
    c = calib("uncond")
    cfg = small_config(method)
    first = tfmq.prepare_model(tiny_unet("uncond"), cfg)
    tfmq.reconstruct_temporal(first, c, cfg, progress=False)
    tfmq.save(first, tmp_path / "after_temporal")
    assert tfmq.read_header(tmp_path / "after_temporal")["stages_done"] == ["temporal"]
    second = tfmq.load(tmp_path / "after_temporal", tiny_unet("uncond"))
    _assert_same_outputs(first, second, "uncond")  # weight-quantized, activations still float
    tfmq.reconstruct_blocks(second, c, cfg, progress=False)
    tfmq.save(second, tmp_path / "after_blocks")
    third = tfmq.load(tmp_path / "after_blocks", tiny_unet("uncond"))
    _assert_same_outputs(second, third, "uncond")  # a loaded copy: bit-identical
    tfmq.calibrate_activations(third, c, cfg, progress=False)
    assert get_state(third).stages_done == ["temporal", "blocks", "activations"]
    _assert_quantized(third, "uncond")
    # Against one quantize() call the AdaRound optimisation ran in another process' tensors: float32 Adam may
    # differ in the last bits there, which can flip an alpha sitting at 0. Grids must agree up to such flips,
    # outputs far better than the quantization error itself.
    one_call = quantized("uncond", method)
    grids = _grid_pairs(third, one_call)
    assert len(grids) == sum(len(layer.wq) for _, layer in quant_layers(one_call)) > 10
    flipped = sum(int((ga != gb).sum()) for _, ga, gb in grids)
    assert flipped <= 0.01 * sum(ga.numel() for _, ga, _ in grids)
    assert all(float((ga - gb).abs().max()) <= 1 for _, ga, gb in grids)
    fp = tiny_unet("uncond")
    for x in _inputs("uncond"):
        staged, one, ref = run(third, x), run(one_call, x), run(fp, x)
        assert _rel_error(staged, one) <= 0.1 * _rel_error(one, ref)
