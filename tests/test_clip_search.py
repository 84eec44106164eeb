"""tfmq.quant.quantizer.mse_clip_search (docs/method.md section 2): the blocked, in-place search makes exactly
the choices of the original one-shot implementation, kept here verbatim as ``_reference_clip_search``.

Both run under the same thread count in each test: the original's own float32 scores depend on it (CPU ``pow``
computes the tail of each thread's share with a scalar kernel a few ulps off the vectorised one), so the 2-thread
cases use shapes of >= 32768 elements whose per-thread tails fall in the middle and at the end of the tensor.
"""
import pytest
import torch

import tfmq.quant.quantizer as quantizer
from tfmq.quant.quantizer import MIN_SCALE, mse_clip_search

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference_clip_search(
    w: torch.Tensor, n_bits: int, n_candidates: int = 80, p: float = 2.4, step: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel scale and zero point by the clipping search of docs/method.md section 2.

    Candidates ``i = 0..n_candidates-1`` clip the channel's ``[min, max]`` to ``(1 - step * i)``
    of itself; the one with the lowest mean ``|x_hat - x|^p`` wins (first one on ties).

    Args:
        w: weight, output channels on dim 0, any trailing shape.
    Returns:
        ``(scale, zero_point)``, each shaped ``[C, 1, ..., 1]`` to broadcast against ``w``.
    """
    flat = w.detach().reshape(w.shape[0], -1).float()
    w_min, w_max = flat.min(dim=1).values, flat.max(dim=1).values
    levels = 2**n_bits - 1
    best_score = torch.full_like(w_min, float("inf"))
    best_scale = torch.ones_like(w_min)
    best_zp = torch.zeros_like(w_min)
    for i in range(n_candidates):
        c_min, c_max = w_min * (1.0 - step * i), w_max * (1.0 - step * i)
        scale = torch.clamp((c_max - c_min) / levels, min=MIN_SCALE)
        zp = torch.round(-c_min / scale)
        x_hat = (torch.clamp(torch.round(flat / scale[:, None]) + zp[:, None], 0, levels) - zp[:, None]) * scale[:, None]
        score = (x_hat - flat).abs().pow(p).mean(dim=1)
        better = score < best_score
        best_score = torch.where(better, score, best_score)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    shape = (w.shape[0],) + (1,) * (w.dim() - 1)
    return best_scale.reshape(shape), best_zp.reshape(shape)


def _weight(shape, kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    if kind == "heavy":  # heavy-tailed: a few weights far outside the bulk, where clipping pays
        w = w * torch.exp(torch.randn(shape, generator=g))
    elif kind == "const":  # one constant channel (zero range: every candidate's scale is MIN_SCALE)
        w[1 % shape[0]] = 0.37
    elif kind == "zeros":  # one channel of zeros
        w[-1] = 0.0
    return w


def _assert_same(w: torch.Tensor, bits: int, p: float, **search) -> None:
    s_ref, z_ref = _reference_clip_search(w, bits, p=p, **search)
    s, z = mse_clip_search(w, bits, p=p, **search)
    assert s.shape == s_ref.shape and z.shape == z_ref.shape
    assert torch.equal(s, s_ref), (tuple(w.shape), bits, p, (s != s_ref).sum().item())
    assert torch.equal(z, z_ref), (tuple(w.shape), bits, p, (z != z_ref).sum().item())


@pytest.mark.parametrize(
    "shape,kind,bits,p",
    [
        ((320, 320, 3, 3), "randn", 4, 2.4),  # SD conv, 921600 weights: several blocks
        ((1280, 320), "randn", 8, 2.0),  # SD linear
        ((1280, 320), "heavy", 4, 2.4),
        ((7, 5), "randn", 4, 2.4),
        ((7, 5), "heavy", 8, 2.0),
        ((1, 1), "randn", 4, 2.4),
        ((1, 1), "randn", 8, 2.0),
        ((16, 3, 3, 3), "const", 4, 2.4),
        ((16, 3, 3, 3), "const", 8, 2.0),
        ((16, 3, 3, 3), "zeros", 4, 2.4),
        ((16, 3, 3, 3), "zeros", 8, 2.0),
        ((64, 4, 3, 3), "heavy", 4, 2.4),
        ((64, 4, 3, 3), "heavy", 8, 2.0),
    ],
)
def test_same_choices_as_the_original(shape, kind, bits, p):
    _assert_same(_weight(shape, kind, seed=len(shape) * 100 + bits), bits, p)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(333, 111), (3, 40001), (1, 40003), (2, 20000)])
def test_same_choices_on_one_and_two_threads(threads, shape):
    # 36963 / 120003 / 40003 weights: each of 2 threads' shares ends in a pow tail (not a multiple of 16), while
    # (2, 20000)'s do not; (1, K) has a one-row mean that 2 threads split, (3, K) rows of over 32768 weights.
    # 6 candidates 5% apart: 2 threads next to another busy process run each op ~100x slower (tests/conftest.py)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _assert_same(_weight(shape, "heavy", seed=threads), 4, 2.4, n_candidates=6, step=0.05)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("block", [1, 100, 4096])
def test_any_blocking_gives_the_same_choices(monkeypatch, block):
    # blocks of one row, a few rows (not dividing C) and whole rows of a K > block
    monkeypatch.setattr(quantizer, "_CLIP_BLOCK_ELEMS", block)
    for shape, kind in [((37, 45), "heavy"), ((9, 5000), "randn"), ((5, 1), "const")]:
        _assert_same(_weight(shape, kind, seed=block), 4, 2.4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,block_rows", [((333, 111), 2), ((3, 40001), 1)])
def test_each_candidate_scores_bit_identical(monkeypatch, threads, shape, block_rows):
    # stronger than the choices: every candidate's score is the one-shot expression's bit for bit, with blocks
    # where a per-block pow (tails) or, on 2 threads, a one-row mean (split sum) would change the last bits
    monkeypatch.setattr(quantizer, "_CLIP_BLOCK_ELEMS", block_rows * shape[1])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flat = _weight(shape, "heavy", seed=3)
        w_min, w_max = flat.min(dim=1).values, flat.max(dim=1).values
        err = torch.empty_like(flat)
        for i in (0, 7, 40, 79):
            c_min, c_max = w_min * (1.0 - 0.01 * i), w_max * (1.0 - 0.01 * i)
            scale = torch.clamp((c_max - c_min) / 15, min=MIN_SCALE)
            zp = torch.round(-c_min / scale)
            one_shot = quantizer._clip_scores(flat, scale, zp, 15, 2.4, None)
            assert torch.equal(quantizer._clip_scores(flat, scale, zp, 15, 2.4, err), one_shot), i
    finally:
        torch.set_num_threads(before)


def test_inputs_the_quantizer_sees():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(24, 8, 3, 3, generator=g) * 0.1
    _assert_same(w.half(), 4, 2.4)  # half weight: searched in float32
    _assert_same(w.requires_grad_(), 4, 2.4)  # a parameter: detached
    _assert_same(w.detach().to(memory_format=torch.channels_last), 4, 2.4)  # reshape copies
    _assert_same(w.detach()[:, 2:6], 8, 2.4)  # a channel slice (tests/test_quantizer.py's split layer)
    t = torch.randn(40, 7, generator=g).t()  # a transposed view: reshape keeps it, not row-major
    assert not t.reshape(7, -1).is_contiguous()
    _assert_same(t, 4, 2.4)
