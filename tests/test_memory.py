"""Bounded memory (tfmq.quant.cache, docs/method.md section 6 "Memory"): unit caches on the CPU or spilled to files
over a budget give the same rows and the same checkpoint; the per-row cache formula (a forward pass on the meta
device) matches what BRECQ caches; FSC reads one calibration step at a time."""
import json
from pathlib import Path

import pytest
import torch

import tfmq
from engine_fixtures import calib, small_config, tiny_unet
from tfmq.diffusion.calibration import every_kth_step
from tfmq.quant import fsc
from tfmq.quant.cache import MemoryPolicy, RowCache, unit_cache_bytes
from test_resume import _tensor_bytes

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n: int, sizes: list[int]):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 4, 4, generator=g)
    e = torch.randn(n, 5, generator=g).double()
    start = 0
    for b in sizes:
        yield ((x[start:start + b], None, 2.5), {"temb": e[start:start + b], "scale": torch.tensor(1.0), "flag": True})
        start += b


@pytest.mark.parametrize("budget", [None, 10**9, 0])
def test_row_cache_returns_the_rows_in_the_order_asked_wherever_it_lives(tmp_path, budget):
    n, sizes = 10, [4, 4, 2]
    cache = RowCache(n, budget, tmp_path)
    for b in _batches(n, sizes):
        cache.append(b)
    assert cache.on_disk == (budget == 0)
    assert cache.nbytes == n * (3 * 4 * 4 * 4 + 5 * 8)
    assert len(list(tmp_path.iterdir())) == (2 if budget == 0 else 0)  # one file per row tensor
    (x, none, c), kw = cache.all()
    full = list(_batches(n, [n]))[0]
    assert torch.equal(x, full[0][0]) and none is None and c == 2.5
    assert torch.equal(kw["temb"], full[1]["temb"]) and kw["temb"].dtype == torch.float64
    assert kw["flag"] is True and torch.equal(kw["scale"], torch.tensor(1.0))
    idx = torch.tensor([7, 0, 7, 3])
    (xi, _, _), kwi = cache.take(idx)
    assert torch.equal(xi, full[0][0][idx]) and torch.equal(kwi["temb"], full[1]["temb"][idx])
    cache.close()
    assert list(tmp_path.iterdir()) == []


def test_a_half_filled_cache_refuses_to_serve_rows(tmp_path):
    cache = RowCache(10, None)
    cache.append(next(_batches(10, [4])))
    with pytest.raises(RuntimeError, match="4 of 10 rows"):
        cache.take(torch.tensor([0]))


def test_memory_policy_rejects_a_negative_budget():
    with pytest.raises(ValueError, match="expected None or a number >= 0"):
        MemoryPolicy(-1)


@pytest.mark.parametrize("method", ["tfmq", "qdiffusion"])
def test_spilled_caches_give_the_same_checkpoint(tmp_path, method):
    """Budget 0: every unit cache of BRECQ (and Q-Diffusion's step-size learning) is written to files and read
    back per mini-batch; the model is byte-identical to the all-in-memory run."""
    cfg = small_config(method)
    results = {}
    for budget in (None, 0):
        spill = tmp_path / f"spill-{budget}"
        spill.mkdir()
        unet = tfmq.quantize(tiny_unet("uncond"), calib("uncond"), cfg, progress=False, memory_budget_mb=budget, spill_dir=spill)
        stats = tfmq.read_header(tfmq.save(unet, tmp_path / f"m-{budget}"))["stats"]
        results[budget] = (_tensor_bytes(tmp_path / f"m-{budget}"), stats)
        assert list(spill.iterdir()) == []  # spill files go with their unit
    units = results[0][1]["blocks"]["units"]
    assert units and all(u["cache_spilled"] == 2 for u in units.values())
    assert all(u["cache_spilled"] == 0 for u in results[None][1]["blocks"]["units"].values())
    if method == "qdiffusion":
        assert all(u["cache_spilled"] == 2 for u in results[0][1]["activations"]["learned"]["units"].values())
    assert results[0][0] == results[None][0]


def test_the_cache_formula_matches_what_brecq_caches():
    """unit_cache_bytes on a meta-device copy of the UNet (nothing computed) x rows = BRECQ's cache of every block."""
    cfg = small_config("tfmq")
    unet = tfmq.quantize(tiny_unet("text"), calib("text"), cfg, progress=False)
    blocks = tfmq.read_header(tfmq.save(unet, Path(calib("text").path).parent / "formula"))["stats"]["blocks"]
    rows = every_kth_step(calib("text"), cfg.calib.every_k, cfg.calib.n_per_step, seed=cfg.seed)["sample"].shape[0]
    with torch.device("meta"):
        meta = tiny_unet("text")
    inputs = {k: v[:1].to("meta") for k, v in calib("text").load_step(0).items()}  # one row's shapes
    formula = {u["unit"]: u for u in unit_cache_bytes(meta, inputs)}
    kinds = {u["kind"] for u in formula.values()}
    assert {"ResnetBlock2D", "BasicTransformerBlock"} <= kinds
    checked = 0
    for name, u in formula.items():
        if name in blocks["units"]:
            predicted = rows * (u["input_bytes"] + u["output_bytes"]) / 2**20
            assert blocks["units"][name]["cache_mb"] == pytest.approx(predicted, abs=1e-4), name
            checked += 1
    assert checked >= 6


def test_fsc_reads_one_step_at_a_time(monkeypatch):
    """Each step's rows are loaded just before its forward passes, not all up front."""
    log: list[str] = []
    real_batches = fsc.batches

    def logged_batches(*a, **k):
        log.append("forward")
        return real_batches(*a, **k)

    monkeypatch.setattr(fsc, "batches", logged_batches)
    c = calib("uncond")
    real_load = c.load_step

    def logged_load(i):
        log.append(f"load {i}")
        return real_load(i)

    monkeypatch.setattr(c, "load_step", logged_load)
    unet = tfmq.prepare_model(tiny_unet("uncond"), small_config("tfmq", calib=dict(fsc_n_per_step=None)))
    tfmq.reconstruct_temporal(unet, c, progress=False)
    tfmq.reconstruct_blocks(unet, c, progress=False)
    log.clear()
    tfmq.calibrate_activations(unet, c, progress=False)
    fsc_part = log[: 2 * len(c.timesteps)]
    assert fsc_part == [x for i in range(len(c.timesteps)) for x in (f"load {i}", "forward")], log


def test_pipeline_budget_reaches_the_stage_and_leaves_no_spill(tmp_path, monkeypatch):
    from diffusers import DDPMScheduler

    from tasks.quantize import progress_dir, recon_blocks, recon_tib
    from tasks.setting import Setting

    monkeypatch.setenv("TFMQ_DEVICE", "cpu")
    tiny_unet("uncond").save_pretrained(tmp_path / "fp" / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path / "fp" / "scheduler")
    calib_dir = str(calib("uncond").path)
    setting = Setting(name="freeze-W4A8", kind="quantized", method="freeze", bits="W4A8", model="fp",
                      fp_dir=str(tmp_path / "fp"), calib_dir=calib_dir, quant_dir=str(tmp_path / "quant" / "s"),
                      results_dir=str(tmp_path / "r"), metrics_path=str(tmp_path / "m.json"),
                      config=small_config("freeze"), memory_budget_mb=0.0)
    recon_blocks.fn(setting, calib_dir, recon_tib.fn(setting, calib_dir))
    units = json.loads((tmp_path / "quant" / "s" / "stage_times.json").read_text())["recon_blocks"]["stats"]["units"]
    assert units and all(u["cache_spilled"] == 2 for u in units.values())
    assert not (progress_dir(setting) / "spill").exists()


@pytest.mark.parametrize("method", ["tfmq", "qdiffusion"])
def test_one_fp_pass_captures_every_units_fp_tensors_with_the_same_result(tmp_path, monkeypatch, method):
    """Without a budget, BRECQ's FP targets (and Q-Diffusion's FP inputs and targets) come from one pass over the
    calibration rows instead of one partial pass per unit: fewer UNet calls, a byte-identical model."""
    from tfmq.quant import reconstruction

    cfg = small_config(method)
    results = {}
    for one_pass in (True, False):
        if not one_pass:
            monkeypatch.setattr(reconstruction, "capture_fp_io_once", lambda *a, **k: None)
        unet = tiny_unet("uncond")
        calls = []
        unet.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
        q = tfmq.quantize(unet, calib("uncond"), cfg, progress=False)
        results[one_pass] = (_tensor_bytes(tfmq.save(q, tmp_path / f"m-{one_pass}")), len(calls))
    assert results[True][0] == results[False][0]
    assert results[True][1] < results[False][1] * 0.8, results  # the per-unit FP captures are gone


def test_the_one_pass_capture_steps_aside_when_the_caches_would_not_fit(monkeypatch):
    from tfmq.quant import reconstruction

    unet = tfmq.prepare_model(tiny_unet("uncond"), small_config("qdiffusion"))
    tfmq.set_quant_state(unet, weight=False, act=False)
    data = every_kth_step(calib("uncond"), 2)
    units = {i: u.module for i, u in enumerate(reconstruction.discover_units(unet))}
    assert len(units) > 3
    monkeypatch.setattr(reconstruction, "_available_bytes", lambda: 1000)  # far less than the caches
    assert reconstruction.capture_fp_io_once(unet, units, data, 8, "cpu", True, MemoryPolicy()) is None
    assert reconstruction.capture_fp_io_once(unet, units, data, 8, "cpu", True, MemoryPolicy(budget_mb=64)) is None
    monkeypatch.setattr(reconstruction, "_available_bytes", lambda: 2**40)
    caches = reconstruction.capture_fp_io_once(unet, units, data, 8, "cpu", True, MemoryPolicy())
    n = int(data["sample"].shape[0])
    assert sorted(caches) == sorted(units) and all(i.filled == n and o.filled == n for i, o in caches.values())
    k = sorted(units)[-1]  # the last unit: its per-unit capture runs the whole UNet up to it
    _, per_unit = reconstruction.capture_unit_io(unet, units[k], data, 8, "cpu", False, True)
    assert torch.equal(caches[k][1].all(), per_unit.all())
