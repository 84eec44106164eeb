"""scripts/studies.py: the fraction of weights AdaRound moved off round-to-nearest, counted exactly."""
import importlib.util
from pathlib import Path

import pytest
import torch

from engine_fixtures import quantized

pytestmark = pytest.mark.usefixtures("one_thread")

_spec = importlib.util.spec_from_file_location("studies", Path(__file__).resolve().parents[1] / "scripts" / "studies.py")
studies = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(studies)


def test_off_nearest_fraction_counts_moved_weights():
    import copy

    from tfmq.quant.prepare import quant_layers

    naive = copy.deepcopy(quantized("uncond", "naive"))  # round to nearest everywhere
    r = studies.off_nearest_fraction(naive)
    assert r["moved"] == 0 and r["fraction"] == 0.0 and r["weights"] > 1000
    name, layer = next(iter(quant_layers(naive)))
    q = layer.wq[0]
    assert q.mode == "int"
    w_int = q.w_int.clone()
    i = int((w_int.flatten() < 2 ** q.n_bits - 1).nonzero()[0])
    q.w_int.view(-1)[i] += 1  # one grid value off nearest by one step
    r = studies.off_nearest_fraction(naive)
    assert r["moved"] == 1 and r["layers"][name] == 1 / w_int.numel()
    learned = studies.off_nearest_fraction(quantized("uncond", "tfmq"))
    assert 0.0 < learned["fraction"] < 0.5  # AdaRound moved some, not most, weights
    assert torch.equal(q.w_int.view(-1)[i] - 1, w_int.view(-1)[i])


def test_eqseeds_table_pairs_each_seed_and_summarises_over_seeds(tmp_path, monkeypatch):
    """Per seed: each method's paired difference against tfmq at that seed; then mean ± sample std over the seeds
    and how many seeds' FID intervals exclude 0 (values checked by hand)."""
    import json

    rows, comps = [], []
    for s, (d, lo, hi) in enumerate([(-4.0, -7.0, -1.0), (-2.0, -5.0, 1.0), (0.0, -3.0, 3.0)]):
        for name in (f"tfmq-W4A8-s{s}", f"qdiffusion-eq-W4A8-s{s}"):
            rows.append({"setting": name, "fid": 350.0 + s, "fid_ci_low": 340.0, "fid_ci_high": 360.0})
        comps.append({"a": f"qdiffusion-eq-W4A8-s{s}", "b": f"tfmq-W4A8-s{s}",
                      "fid": {"diff": d, "ci": [lo, hi], "verdict": "x"},
                      "psnr": {"diff": 0.1 * s, "ci": [0.0, 0.2 * s + 0.1], "verdict": "y"}})
    (tmp_path / "results" / "studies").mkdir(parents=True)
    (tmp_path / "results" / "studies" / "eqseeds.json").write_text(json.dumps({"rows": rows, "comparisons": comps}))
    monkeypatch.setattr(studies, "ROOT", tmp_path)
    text = studies.eqseeds_table()
    assert "| qdiffusion-eq-W4A8-s1 | 1 | 351.0 [340.0, 360.0] | -2.0 [-5.0, +1.0] | +0.10 [+0.00, +0.30] | x |" in text
    assert "| qdiffusion | 3 | -2.00 ± 2.00 | +0.10 ± 0.10 | 1 of 3 |" in text  # only seed 0's interval excludes 0
    assert "| tfmq-W4A8-s2 | 2 | 352.0 [340.0, 360.0] | - | - | - |" in text
