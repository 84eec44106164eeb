"""Real integer export (tfmq.quant.export.export_int8, torchao int8 kernels) against the fake-quant model.

Per layer, on the same input, the exported layer computes the same integers as fake-quant (the
difference is float rescaling only, far below one quantization step); it really calls the int8
GEMM; the whole UNet agrees with the fake-quant UNet to cosine >= 0.999 on tiny models (the
exported model's float rounding can move an activation that sits on a grid boundary by one level,
so the whole-model bound is a cosine, not equality); per-timestep (FSC) scales carry over, also in
a batch that mixes timesteps.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

import tfmq
from engine_fixtures import STEPS, quantized, run, tiny_unet, unet_inputs
from tfmq.quant.export import ExportError, export_int8
from tfmq.quant.prepare import get_state, quant_layers

SETTINGS = [  # (kind, method, config overrides): W4A8 with FSC tables, splits + attention matmuls, 8-bit
    ("uncond", "tfmq", {}),  # weights (the rank-one offset term), the A6 clamp, weight-only
    ("uncond", "qdiffusion", {}),
    ("uncond", "naive", {"weight_bits": 8, "act_bits": 8}),
    ("class", "tfmq", {"act_bits": 6}),
    ("text", "qdiffusion", {}),
    ("uncond", "freeze", {"weight_bits": 8, "act_bits": None}),
]


def _exported(kind, method, conv="im2col", **kw):
    q = quantized(kind, method, **kw)
    d = Path(tempfile.mkdtemp(prefix="tfmq-export-"))
    tfmq.save(q, d / "c")
    e = tfmq.load(d / "c", tiny_unet(kind))
    return q, e, export_int8(e, conv=conv)


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


@pytest.mark.parametrize("kind,method,kw", SETTINGS)
def test_each_exported_layer_computes_the_fake_quant_integers(kind, method, kw, monkeypatch):
    q, e, report = _exported(kind, method, **kw)
    kernels = dict(quant_layers(e))
    assert not report.simulated and len(report.integer) + len(report.weight_only) == len(kernels)
    if kw.get("act_bits", 8) is None:
        assert report.integer == []
    else:
        assert len(report.integer) > len(report.weight_only)
    seen, worst = [], 0.0

    def check(module, args, out, name):
        ctx, mine = get_state(e).ctx, get_state(q).ctx  # the exported layers read the timestep of q's call
        ctx.timesteps, ctx.class_labels = mine.timesteps, mine.class_labels
        with torch.no_grad():
            y = kernels[name].kernel(args[0])
        step = float(out.abs().max()) + 1.0
        seen.append(name)
        nonlocal worst
        worst = max(worst, float((y - out).abs().max()) / step)

    hooks = [layer.register_forward_hook(lambda m, a, o, n=n: check(m, a, o, n)) for n, layer in quant_layers(q)]
    try:
        run(q, unet_inputs(kind, step=1))
    finally:
        for h in hooks:
            h.remove()
    assert sorted(seen) == sorted(kernels)
    assert worst < 2e-5  # float rescaling only: one activation level off would be ~1e-3 here

    calls = []
    real = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(tuple(a.shape)) or real(a, b))
    run(e, unet_inputs(kind, step=1))
    parts = sum(len(kernels[n].kernel.parts) for n in report.integer)
    assert len(calls) == parts  # every int8 x int8 part went through the integer GEMM, once per UNet call
    for name in report.integer + report.weight_only:
        assert kernels[name].weight.numel() == 0 and all(w.w_int is None for w in kernels[name].wq)  # float released


@pytest.mark.parametrize("kind,method,kw", SETTINGS)
def test_exported_unet_matches_fake_quant_to_cosine_0999_at_every_step(kind, method, kw):
    q, e, _ = _exported(kind, method, **kw)
    fp = tiny_unet(kind)
    for step in range(STEPS):
        x = unet_inputs(kind, step=step, n=8)
        a, b = run(q, x), run(e, x)
        assert _cos(a, b) >= 0.999, step
        assert float((a - run(fp, x)).abs().max()) > 10 * float((a - b).abs().median())  # quantized, not FP


def test_per_timestep_scales_carry_over_in_a_batch_that_mixes_timesteps():
    q, e, _ = _exported("uncond", "tfmq")
    assert any(a.mode == "table" for n, layer in quant_layers(e) if layer.aq is not None for a in layer.aq)
    x1, x3 = unet_inputs("uncond", step=1, n=3), unet_inputs("uncond", step=3, n=3)
    mixed = {k: torch.cat([x1[k], x3[k]]) for k in x1}
    assert mixed["timestep"].unique().numel() == 2
    a, b = run(q, mixed), run(e, mixed)
    assert _cos(a, b) >= 0.999
    one = run(e, x3)  # the rows of one timestep give what they give alone (per-row scales, not the first row's)
    assert _cos(b[3:], one) >= 0.9999


def test_simulated_convolutions_and_the_weight_bytes():
    q, e, report = _exported("uncond", "tfmq", conv="simulated")
    kinds = {n: layer.kind for n, layer in quant_layers(e)}
    assert set(report.simulated) == {n for n, k in kinds.items() if k == "conv"} and report.integer
    assert all(kinds[n] == "linear" for n in report.integer + report.weight_only)
    x = unet_inputs("uncond", step=2)
    assert _cos(run(q, x), run(e, x)) >= 0.999
    _, _, full = _exported("uncond", "tfmq")
    assert full.float_weight_bytes > 0 and 3.5 < full.float_weight_bytes / full.int8_weight_bytes <= 4.0
    assert get_state(e).stats["export"]["conv"] == "simulated"


def test_export_refuses_what_it_cannot_run():
    with pytest.raises(ExportError, match="needs a model quantized by tfmq.quantize"):
        export_int8(tiny_unet("uncond"))
    _, e, _ = _exported("uncond", "tfmq")
    with pytest.raises(ExportError, match="already exported"):
        export_int8(e)
    with pytest.raises(ExportError, match="conv='winograd'"):
        export_int8(e, conv="winograd")
    prepared = tfmq.prepare_model(tiny_unet("uncond"), get_state(quantized("uncond", "tfmq")).config)
    with pytest.raises(ExportError, match="activations are not calibrated yet"):
        export_int8(prepared)
