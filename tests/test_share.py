"""Weight stages shared across activation settings (tfmq.quant.share, tfmq.load(config=...)).

The claim under test: TIAR and BRECQ never read an activation-only field, so a W4A6 (or W4A32) run
may start from the W4A8 run's weight-stage checkpoint and end bit-identical to computing its own.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import tfmq
from tfmq.quant.prepare import get_state, quant_layers
from tfmq.quant.share import WeightStore, same_activations, same_weights, weight_identity, weight_key

from engine_fixtures import calib, run, small_config, tiny_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(unet) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in quant_layers(unet):
        tensors, _ = layer.export_state()
        out.update({f"{name}.{k}": v for k, v in tensors.items()})
    return out


def _weight_stages(cfg, kind="uncond"):
    unet = tfmq.prepare_model(tiny_unet(kind), cfg)
    tfmq.reconstruct_temporal(unet, calib(kind), cfg, progress=False)
    tfmq.reconstruct_blocks(unet, calib(kind), cfg, progress=False)
    return unet


@pytest.mark.parametrize("method", ["tfmq", "freeze", "brecq", "ptq4dm", "qdiffusion", "naive"])
def test_weight_stages_do_not_read_the_activation_bits(method):
    a8 = _weight_stages(small_config(method, act_bits=8))
    a6 = _weight_stages(small_config(method, act_bits=6, fsc=False, softmax_bits=16, act_recon=dict(iters=3)))
    assert same_weights(get_state(a8).config, get_state(a6).config)
    wa, wb = _weights(a8), _weights(a6)
    assert set(wa) == set(wb) and len(wa) > 20
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert different == []
    x = unet_inputs("uncond")
    assert torch.equal(run(a8, x), run(a6, x))


def test_identity_keeps_what_the_weights_depend_on():
    base = small_config("tfmq")
    assert same_weights(base, small_config("tfmq", act_bits=4, fsc_scope="tib"))
    assert same_weights(small_config("qdiffusion"), small_config("ptqd"))  # PTQD only adds a correction at the end
    assert same_weights(small_config("tfmq", tiar=False), small_config("freeze"))  # TIAR off = the Freeze recipe's weights
    for other in (small_config("tfmq", weight_bits=8), small_config("tfmq", seed=1), small_config("tfmq", tiar=False),
                  small_config("tfmq", recon=dict(iters=11)), small_config("tfmq", calib=dict(every_k=3)),
                  small_config("tfmq", policy="all"), small_config("freeze"), small_config("brecq")):
        assert not same_weights(base, other)
    # Q-Diffusion's attention matmul quantizers replace the attention kernel only when activations are quantized
    assert not same_weights(small_config("qdiffusion"), small_config("qdiffusion", act_bits=None))
    assert same_weights(small_config("freeze"), small_config("freeze", act_bits=None))
    ident = weight_identity(base)
    assert "act_bits" not in ident and "fsc_momentum" not in ident["calib"] and ident["steps"]["temporal"] == "tiar"


@pytest.mark.parametrize("method,other", [("tfmq", dict(act_bits=6)), ("qdiffusion", dict(act_bits=6)),
                                          ("freeze", dict(act_bits=None))])
def test_loading_shared_weights_ends_bit_identical(tmp_path, method, other):
    c = calib("uncond")
    owner_cfg, cfg = small_config(method), small_config(method, **other)
    tfmq.save(_weight_stages(owner_cfg), tmp_path / "blocks")
    borrowed = tfmq.load(tmp_path / "blocks", tiny_unet("uncond"), config=cfg)
    assert get_state(borrowed).config.bits_name == cfg.bits_name
    assert get_state(borrowed).stats["weights_from"]["config"]["act_bits"] == 8
    tfmq.calibrate_activations(borrowed, c, cfg, progress=False)
    own = tfmq.quantize(tiny_unet("uncond"), c, cfg, progress=False)
    x = unet_inputs("uncond")
    assert torch.equal(run(borrowed, x), run(own, x))
    tfmq.save(borrowed, tmp_path / "model")
    assert tfmq.read_header(tmp_path / "model")["bits"] == cfg.bits_name


def test_loading_refuses_foreign_weights_and_finished_checkpoints(tmp_path):
    tfmq.save(_weight_stages(small_config("tfmq")), tmp_path / "blocks")
    with pytest.raises(tfmq.CheckpointMismatchError, match=r"weight_bits: 4 vs 8"):
        tfmq.load(tmp_path / "blocks", tiny_unet("uncond"), config=small_config("tfmq", weight_bits=8))
    with pytest.raises(tfmq.CheckpointMismatchError, match=r"steps.temporal: 'tiar' vs 'nearest'"):
        tfmq.load(tmp_path / "blocks", tiny_unet("uncond"), config=small_config("freeze"))
    done = tfmq.quantize(tiny_unet("uncond"), calib("uncond"), small_config("naive"), progress=False)
    tfmq.save(done, tmp_path / "model")
    with pytest.raises(tfmq.CheckpointMismatchError, match="calibrated activations"):
        tfmq.load(tmp_path / "model", tiny_unet("uncond"), config=small_config("naive", act_bits=6))
    same = tfmq.load(tmp_path / "model", tiny_unet("uncond"), config=small_config("naive"))  # its own config: a plain load
    assert get_state(same).stages_done == ["temporal", "blocks", "activations"]


def test_store_key_follows_every_input(tmp_path, monkeypatch):
    fp = tmp_path / "fp" / "unet"
    fp.mkdir(parents=True)
    (fp / "w.bin").write_bytes(b"weights")
    cal = tmp_path / "calib"
    cal.mkdir()
    (cal / "step_000.safetensors").write_bytes(b"rows")
    cfg = small_config("tfmq")
    k0, desc = weight_key(cfg, tmp_path / "fp", cal, "cpu")
    assert weight_key(small_config("tfmq", act_bits=6, fsc=False), tmp_path / "fp", cal, "cpu")[0] == k0
    assert desc["identity"] == weight_identity(cfg) and len(k0) == 24
    keys = {k0, weight_key(small_config("tfmq", weight_bits=8), tmp_path / "fp", cal, "cpu")[0]}
    (cal / "step_000.safetensors").write_bytes(b"rowz")
    keys.add(weight_key(cfg, tmp_path / "fp", cal, "cpu")[0])
    (fp / "w.bin").write_bytes(b"weightz")
    keys.add(weight_key(cfg, tmp_path / "fp", cal, "cpu")[0])
    monkeypatch.setenv("TFMQ_MAX_ITERS", "2")
    keys.add(weight_key(cfg, tmp_path / "fp", cal, "cpu")[0])
    keys.add(weight_key(cfg, tmp_path / "fp", cal, "meta")[0])
    assert len(keys) == 6


def test_store_entries_appear_whole(tmp_path):
    store = WeightStore(tmp_path / "store")
    assert store.get("k") is None
    src = tmp_path / "src"
    for s in ("tib", "blocks"):
        (src / s).mkdir(parents=True)
        (src / s / "quant_config.json").write_text("{}")
    with store.lock("k"):
        store.put("k", {"tib": src / "tib", "blocks": src / "blocks"}, {"computed_by": "tfmq-W4A8", "seconds": 1.5})
    got = store.get("k")
    assert got["computed_by"] == "tfmq-W4A8" and got["path"] == str(tmp_path / "store" / "k")
    assert json.loads((tmp_path / "store" / "k" / "entry.json").read_text())["seconds"] == 1.5
    (tmp_path / "store" / "k" / "tib" / "quant_config.json").unlink()  # damaged: treated as absent
    assert store.get("k") is None
    assert [p.name for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")] == ["k"]


def test_identity_is_a_plain_json_document():
    ident = weight_identity(dataclasses.replace(small_config("qdiffusion")))
    assert json.loads(json.dumps(ident)) == ident


def _saved_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from tfmq.quant.checkpoint import WEIGHTS_NAME

    return load_file(str(path / WEIGHTS_NAME))


def test_activation_identity_allows_only_a_different_correction():
    assert same_activations(small_config("qdiffusion"), small_config("ptqd"))  # PTQD = Q-Diffusion + a correction
    assert same_activations(small_config("tfmq", fsc=False), small_config("tfmq", fsc=False, seed=0))
    for a, b in ((small_config("qdiffusion"), small_config("ptqd", act_bits=6)),
                 (small_config("qdiffusion"), small_config("ptqd", act_recon=dict(iters=6))),
                 (small_config("qdiffusion"), small_config("ptqd", weight_bits=8)),
                 (small_config("tfmq"), small_config("tfmq", fsc=False)),
                 (small_config("tfmq"), small_config("freeze")),
                 (small_config("tfmq"), small_config("tfmq", calib=dict(fsc_momentum=0.9)))):
        assert not same_activations(a, b)
    key = weight_key(small_config("qdiffusion"), ".", ".", "cpu", upto="activations")[1]["identity"]
    assert key["upto"] == "activations" and key["steps"]["activations"] == "learned" and "method" not in key


def test_adopting_qdiffusion_for_ptqd_equals_quantizing_ptqd(tmp_path):
    """PTQD from Q-Diffusion's finished model + PTQD's correction alone: every saved tensor equal to PTQD's own."""
    c = calib("uncond")
    tfmq.save(tfmq.quantize(tiny_unet("uncond"), c, small_config("qdiffusion"), progress=False), tmp_path / "qd")
    tfmq.save(tfmq.quantize(tiny_unet("uncond"), c, small_config("ptqd"), progress=False), tmp_path / "own")
    unet = tiny_unet("uncond")
    stats = tfmq.adopt_activations(tmp_path / "qd", unet, c, small_config("ptqd"), progress=False)
    assert stats["adopted_from"]["method"] == "qdiffusion" and stats["correction"]["mode"] == "ptqd"
    assert get_state(unet).stages_done == ["temporal", "blocks", "activations"]
    tfmq.save(unet, tmp_path / "adopted")
    own, adopted = _saved_tensors(tmp_path / "own"), _saved_tensors(tmp_path / "adopted")
    assert set(own) == set(adopted) and any("noise_correction" in k for k in own)
    assert [k for k in own if not torch.equal(own[k], adopted[k])] == []
    assert tfmq.read_header(tmp_path / "adopted")["config"]["method"] == "ptqd"
    with pytest.raises(tfmq.CheckpointMismatchError, match="carries a noise correction"):  # PTQD's own is corrected
        tfmq.adopt_activations(tmp_path / "own", tiny_unet("uncond"), c, small_config("ptqd"), progress=False)
    with pytest.raises(tfmq.CheckpointMismatchError, match=r"act_bits: 8 vs 6"):
        tfmq.adopt_activations(tmp_path / "qd", tiny_unet("uncond"), c, small_config("ptqd", act_bits=6), progress=False)
    tfmq.save(_weight_stages(small_config("qdiffusion")), tmp_path / "blocks")
    with pytest.raises(tfmq.CheckpointMismatchError, match="not calibrated"):
        tfmq.adopt_activations(tmp_path / "blocks", tiny_unet("uncond"), c, small_config("ptqd"), progress=False)
