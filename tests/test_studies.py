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
