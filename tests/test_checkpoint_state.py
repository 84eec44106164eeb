"""Quantizer state for checkpoints (tfmq.quant.quantizer / layers / tib ``export_state`` / ``restore_state``):
every mode round-trips exactly onto a fresh quantizer, a bad entry is refused with a message naming it, and the
on-disk tensor names and header meta keep the layout of checkpoint format version 1."""
import math
import re

import pytest
import torch
from safetensors import safe_open
from torch import nn

import tfmq
from engine_fixtures import quantized
from tfmq.quant.layers import QuantLayer
from tfmq.quant.prepare import quant_layers
from tfmq.quant.quantizer import ActQuantizer, TimestepContext, WeightQuantizer, pack_nibbles, unpack_nibbles
from tfmq.quant.tib import TemporalFeatureCache

pytestmark = pytest.mark.usefixtures("one_thread")


def _weight(seed=0, shape=(6, 4, 3, 3)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _copy(tensors):
    """What a save/load does to the tensors: fresh storage, same bits."""
    return {k: v.detach().clone() for k, v in tensors.items()}


def _fresh_weight_quantizer(w, bits=4):
    fresh = WeightQuantizer(w, bits, init=False)
    assert torch.equal(fresh.scale, torch.ones_like(fresh.scale))  # nothing to find unless restored
    return fresh


@pytest.mark.parametrize("mode", ["nearest", "adaround-soft", "adaround-hard", "int"])
def test_weight_quantizer_state_round_trips_exactly(mode):
    w = _weight()
    q = WeightQuantizer(w, 4)
    if mode != "nearest":
        q.init_adaround(w)
        with torch.no_grad():
            q.alpha.add_(torch.randn(q.alpha.shape, generator=torch.Generator().manual_seed(1)))
    if mode in ("adaround-hard", "int"):
        q.harden()
    if mode == "int":
        q.finalize(w)
    tensors, meta = q.export_state()
    expected_keys = {"scale", "zero_point"} | ({"w_packed"} if mode == "int" else {"alpha"} if mode != "nearest" else set())
    assert set(tensors) == expected_keys
    packed = {"packed": "nibble", "shape": list(w.shape)} if mode == "int" else {}
    assert meta == {"mode": mode.split("-")[0], "soft": mode == "adaround-soft", **packed}
    fresh = _fresh_weight_quantizer(w)
    fresh.restore_state(_copy(tensors), dict(meta))
    assert (fresh.mode, fresh.soft) == (q.mode, q.soft)
    assert torch.equal(fresh.scale, q.scale) and torch.equal(fresh.zero_point, q.zero_point)
    grid = q.integer_weight(w)
    assert torch.equal(fresh.integer_weight(w), grid)  # integer grid: exactly the same
    assert grid.unique().numel() > 4  # a real 4-bit grid, not a constant
    assert torch.equal(fresh(w), q(w)) and not torch.equal(fresh(w), w)
    if mode.startswith("adaround"):
        assert [n for n, _ in fresh.named_parameters()] == ["alpha"] and torch.equal(fresh.alpha, q.alpha)
    if mode == "int":
        assert fresh.w_int.dtype == torch.uint8 and torch.equal(fresh(torch.zeros_like(w)), q(w))  # grid, not weight


@pytest.mark.parametrize("bits,change,match", [
    (8, lambda t, m: t.pop("scale"), "'scale' is missing"),
    (8, lambda t, m: t.update(scale=t["scale"].flatten()), r"'scale' has shape \(6,\), expected \(6, 1, 1, 1\)"),
    (8, lambda t, m: t.update(w_int=t["w_int"].float()), "'w_int' is torch.float32"),
    (8, lambda t, m: t.update(w_int=t["w_int"][:3]), "6 output channels"),
    (6, lambda t, m: t.update(w_int=t["w_int"] + 200), "beyond the 6-bit grid"),
    (8, lambda t, m: m.update(mode="ternary"), "mode='ternary'"),
    (4, lambda t, m: t.pop("w_packed"), "'w_packed' is missing"),
    (4, lambda t, m: t.update(w_packed=t["w_packed"][:, :-1]), r"'w_packed' is torch.uint8 \(6, 17\), expected uint8 \(6, 18\)"),
    (4, lambda t, m: m.update(shape=[6, 4, 3]), r"packed grid shape=\[6, 4, 3\], expected 4 positive ints"),
    (4, lambda t, m: m.update(packed="crumb"), "packed='crumb', expected 'nibble'"),
    (3, lambda t, m: t.update(w_packed=t["w_packed"] | 0x88), "beyond the 3-bit grid"),
])
def test_weight_quantizer_restore_refuses_bad_entries(bits, change, match):
    w = _weight()
    q = WeightQuantizer(w, bits)
    q.finalize(w)
    tensors, meta = q.export_state()
    tensors, meta = _copy(tensors), dict(meta)
    change(tensors, meta)
    with pytest.raises(ValueError, match=match):
        _fresh_weight_quantizer(w, bits).restore_state(tensors, meta)


@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 3, 3), (4, 1), (2, 16)])
def test_nibble_packing_round_trips_every_value_exactly(shape):
    g = torch.Generator().manual_seed(sum(shape))
    grid = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
    grid.view(-1)[:16] = torch.arange(16, dtype=torch.uint8)[: grid.numel()]  # every 4-bit value appears
    packed = pack_nibbles(grid)
    n = math.prod(shape[1:])
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == (shape[0], (n + 1) // 2)
    assert int(packed[0, 0]) == int(grid.view(shape[0], -1)[0, 0]) | (int(grid.view(shape[0], -1)[0, 1]) << 4 if n > 1 else 0)
    assert torch.equal(unpack_nibbles(packed, shape), grid)
    with pytest.raises(ValueError, match="values 0..15"):
        pack_nibbles(grid + 16)


def _calibrated_act_quantizer(mode):
    ctx = TimestepContext()
    q = ActQuantizer(8, ctx)
    q.enabled = True
    if mode == "shared":
        q.start_observing(None)
        q(torch.tensor([-1.5, 3.25]))
        q.commit_shared()
    elif mode == "table":
        for t, amp in ((999, 6.0), (499, 2.0), (1, 0.25)):
            q.start_observing(None)
            q(torch.tensor([-amp, amp * 0.5]))
            q.commit_timestep(t)
        q.commit_table()
    assert q.mode == mode
    return q, ctx


@pytest.mark.parametrize("mode", ["uncalibrated", "shared", "table"])
def test_act_quantizer_state_round_trips_exactly(mode):
    q, ctx = _calibrated_act_quantizer(mode)
    tensors, meta = q.export_state()
    assert meta == mode  # format version 1 stores the bare mode string
    assert set(tensors) == {"uncalibrated": set(), "shared": {"scale", "zero_point"},
                            "table": {"table_timesteps", "table_scale", "table_zero_point"}}[mode]
    fresh = ActQuantizer(8, ctx)
    fresh.enabled = True
    fresh.restore_state(_copy(tensors), meta)
    assert fresh.mode == mode
    assert fresh.calibrated_timesteps() == q.calibrated_timesteps() == ([1, 499, 999] if mode == "table" else None)
    x = torch.linspace(-7.0, 7.0, 57)
    if mode == "uncalibrated":
        with pytest.raises(RuntimeError, match="never calibrated"):
            fresh(x)
        return
    for t in (999, 499, 1):
        ctx.timesteps = torch.tensor([t])
        out = fresh(x)
        assert torch.equal(out, q(x)) and not torch.equal(out, x)
    if mode == "table":
        ctx.timesteps = torch.tensor([1, 999, 499])  # mixed batch: the lookup of the restored table is rebuilt
        assert torch.equal(fresh(x.reshape(3, -1)), q(x.reshape(3, -1)))
        ctx.timesteps = torch.tensor([17])
        with pytest.raises(tfmq.UncalibratedTimestepError, match="timestep 17"):
            fresh(x)


def test_act_quantizer_restore_refuses_bad_entries():
    q, ctx = _calibrated_act_quantizer("table")
    tensors, _ = q.export_state()
    with pytest.raises(ValueError, match="'table_scale' is missing"):
        ActQuantizer(8, ctx).restore_state({k: v for k, v in tensors.items() if k != "table_scale"}, "table")
    with pytest.raises(ValueError, match=r"'table_zero_point' has shape \(2,\), expected \(3,\)"):
        ActQuantizer(8, ctx).restore_state({**tensors, "table_zero_point": tensors["table_zero_point"][:2]}, "table")
    with pytest.raises(ValueError, match="'table_timesteps' is torch.float32"):
        ActQuantizer(8, ctx).restore_state({**tensors, "table_timesteps": tensors["table_timesteps"].float()}, "table")
    with pytest.raises(ValueError, match="mode='per_channel'"):
        ActQuantizer(8, ctx).restore_state({}, "per_channel")


def test_split_layer_state_round_trips_and_refuses_another_wrapping():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 6, 3, padding=1)
    layer = QuantLayer(conv, "up_blocks.0.resnets.0.conv_shortcut", 3, 8, TimestepContext(), split=8)
    layer.finalize()
    tensors, meta = layer.export_state()
    assert sorted(tensors) == sorted(f"wq.{k}.{n}" for k in (0, 1) for n in ("scale", "zero_point", "w_packed"))
    assert meta == {"weight": [{"mode": "int", "soft": False, "packed": "nibble", "shape": [6, n, 3, 3]} for n in (8, 4)],
                    "split": 8, "act": True, "temporal": False}
    fresh = QuantLayer(conv, layer.name, 3, 8, TimestepContext(), split=8, init=False)
    fresh.restore_state(_copy(tensors), meta)
    layer.set_quant_state(True, False)
    fresh.set_quant_state(True, False)
    x = torch.randn(2, 12, 5, 5)
    assert torch.equal(fresh(x), layer(x)) and not torch.equal(fresh(x), conv(x))
    unsplit = QuantLayer(conv, layer.name, 3, 8, TimestepContext(), init=False)
    with pytest.raises(ValueError, match="split=8 in the checkpoint, but this layer has split=None"):
        unsplit.restore_state(tensors, {**meta, "split": 8})
    with pytest.raises(ValueError, match=r"wq\.1: tensor 'w_packed' is missing"):
        fresh.restore_state({k: v for k, v in tensors.items() if k != "wq.1.w_packed"}, meta)


@pytest.mark.parametrize("classes", [None, torch.tensor([0, 2])])
def test_feature_cache_state_round_trips_exactly(classes):
    g = torch.Generator().manual_seed(0)
    ts = torch.tensor([1, 201, 801])
    k = 1 if classes is None else len(classes)
    feats = [torch.randn(3, k, 8, generator=g), torch.randn(3, k, 16, generator=g)]
    cache = TemporalFeatureCache(ts, classes, feats, ["a.time_emb_proj", "b.time_emb_proj"])
    tensors, meta = cache.export_state()
    assert set(tensors) == {"timesteps", "classes", "feature_0", "feature_1"} and meta == ["a.time_emb_proj", "b.time_emb_proj"]
    fresh = TemporalFeatureCache.from_state(_copy(tensors), list(meta))
    c = None if classes is None else torch.tensor([2, 0, 2])
    for i in range(2):
        assert torch.equal(fresh.lookup(i, torch.tensor([801, 1, 201]), c), cache.lookup(i, torch.tensor([801, 1, 201]), c))
    with pytest.raises(ValueError, match=r"'feature_1' has shape \(2, %d, 16\), expected \[3, %d, C\]" % (k, k)):
        TemporalFeatureCache.from_state({**tensors, "feature_1": tensors["feature_1"][:2]}, meta)
    with pytest.raises(ValueError, match=r"\['feature_1'\] missing"):
        TemporalFeatureCache.from_state({k_: v for k_, v in tensors.items() if k_ != "feature_1"}, meta)


_V2_TENSOR = re.compile(
    r"^(?:[\w.]+\.wq\.\d\.(?:scale|zero_point|w_packed|w_int|alpha)"
    r"|[\w.]+\.(?:scale|zero_point|table_timesteps|table_scale|table_zero_point)"
    r"|tfmq_feature_cache\.(?:timesteps|classes|feature_\d+))$"
)


def test_on_disk_layout_is_format_version_2(tmp_path):
    """Tensor names and header meta of format version 2: W4 grids packed two per byte, the rest as version 1."""
    q = quantized("uncond", "tfmq", cached_temporal_features=True)
    tfmq.save(q, tmp_path / "c")
    header = tfmq.read_header(tmp_path / "c")
    with safe_open(str(tmp_path / "c" / "quantized.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "tfmq-quantized-unet", "format_version": "2"}
        keys = list(f.keys())
        packed = {k: f.get_tensor(k) for k in keys if k.endswith(".w_packed")}
    assert keys and [k for k in keys if not _V2_TENSOR.match(k)] == []
    layers = header["layers"]
    assert header["weight_bits"] == 4 and not any(k.endswith(".w_int") for k in keys)
    assert len(layers) > 10 and len(packed) == sum(len(v["weight"]) for v in layers.values())
    for name, info in layers.items():
        assert set(info) == {"weight", "split", "act", "temporal"}
        for k, m in enumerate(info["weight"]):
            assert m["mode"] == "int" and m["soft"] is False and m["packed"] == "nibble"
            n = math.prod(m["shape"][1:])
            assert tuple(packed[f"{name}.wq.{k}.w_packed"].shape) == (m["shape"][0], (n + 1) // 2)
    modes = header["act_quantizers"]
    assert modes and set(modes.values()) <= {"shared", "table", "uncalibrated"} and "table" in modes.values()
    assert sum(k.endswith(".table_scale") for k in keys) == sum(m == "table" for m in modes.values())
    assert header["feature_cache"] and all(n.endswith("time_emb_proj") for n in header["feature_cache"])
    assert sum(k.startswith("tfmq_feature_cache.feature_") for k in keys) == len(header["feature_cache"])


def _as_version_1(ckpt):
    """Rewrite a version-2 checkpoint directory as version 1 wrote it (every grid a uint8 ``w_int``)."""
    import json

    from safetensors.torch import load_file, save_file

    header = json.loads((ckpt / "quant_config.json").read_text())
    tensors = load_file(str(ckpt / "quantized.safetensors"))
    for name, info in header["layers"].items():
        for k, m in enumerate(info["weight"]):
            if m.pop("packed", None):
                tensors[f"{name}.wq.{k}.w_int"] = unpack_nibbles(tensors.pop(f"{name}.wq.{k}.w_packed"), tuple(m.pop("shape")))
    header["format_version"] = 1
    (ckpt / "quant_config.json").write_text(json.dumps(header))
    save_file(tensors, str(ckpt / "quantized.safetensors"), metadata={"format": "tfmq-quantized-unet", "format_version": "1"})


def test_a_version_1_checkpoint_loads_to_the_same_model_and_the_packed_one_is_smaller(tmp_path):
    from engine_fixtures import run, tiny_unet, unet_inputs

    q = quantized("uncond", "tfmq")
    tfmq.save(q, tmp_path / "v2")
    tfmq.save(q, tmp_path / "v1")
    _as_version_1(tmp_path / "v1")
    assert tfmq.read_header(tmp_path / "v1")["format_version"] == 1
    a, b = tfmq.load(tmp_path / "v2", tiny_unet("uncond")), tfmq.load(tmp_path / "v1", tiny_unet("uncond"))
    for (n, la), (_, lb) in zip(quant_layers(a), quant_layers(b)):
        assert all(torch.equal(wa.w_int, wb.w_int) for wa, wb in zip(la.wq, lb.wq)), n
    x = unet_inputs("uncond")
    assert torch.equal(run(a, x), run(b, x)) and torch.equal(run(a, x), run(q, x))

    def grid_bytes(path):
        with safe_open(str(path / "quantized.safetensors"), "pt") as f:
            return sum(f.get_tensor(k).numel() for k in f.keys() if k.endswith((".w_int", ".w_packed")))

    v1, v2 = grid_bytes(tmp_path / "v1"), grid_bytes(tmp_path / "v2")
    rows = sum(m["shape"][0] for info in tfmq.read_header(tmp_path / "v2")["layers"].values() for m in info["weight"])
    assert v2 < v1 and v1 // 2 <= v2 <= v1 // 2 + rows  # half the bytes, plus at most one pad nibble per row
