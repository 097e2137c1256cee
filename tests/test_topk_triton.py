"""Direct tests of kernels/topk/triton.py against topk_select_reference: the cases only the Triton kernels
have.

Keys past one select chunk (ties split across chunks), classes past one class block (the first max
class across blocks, NaN in a later block), k above the in-kernel sort (the torch.sort finish), every
sort mode, sources the word-gather cannot move (torch.gather), more than four sources (two
launches), the scatter backward, and the configurations the host can launch being the ones
compiled ahead of time. On a GPU-less machine the kernels run on CPU tensors under the Triton
interpreter (tests/conftest.py sets TRITON_INTERPRET=1); sizes stay small there.

What every backend shares (order, ties, non-finite scores, gathers, gradients, the op contract) is
tested across backends in test_topk_contract.py and test_op_contract.py.
"""

from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import interpreter  # noqa: E402
from rtdetr_kernels import backends  # noqa: E402
from rtdetr_kernels.topk import reference  # noqa: E402
from rtdetr_kernels.topk import triton as topk_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreter():
    pytest.skip("no GPU and TRITON_INTERPRET is not set: the Triton kernels cannot run here", allow_module_level=True)


def _check(logits, k, gather=(), pairs=False):
    got = topk_triton.forward(logits, k, list(gather), pairs)
    want = reference.topk_select_reference(logits, k, gather, pairs)
    names = ("scores", "indices", "classes")
    for name, g, w in zip(names, got[:3], want[:3]):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        assert torch.equal(g, w) or (name == "scores" and torch.equal(g.isnan(), w.isnan())
                                     and torch.equal(g.nan_to_num(), w.nan_to_num())), name
    assert len(got[3]) == len(gather)
    for i, (g, w) in enumerate(zip(got[3], want[3])):
        assert g.dtype == w.dtype and torch.equal(g, w), f"gathered[{i}]"
    return got


def test_keys_past_one_chunk_with_ties_across_chunks():
    """5000 tokens (two select chunks of 4096): a block of equal scores straddles the chunk edge and
    holds the k-th value, so the compaction's carry of equal keys decides who gets in."""
    T, k = 5000, 37
    scores = torch.randn(2, T, device=DEVICE) - 5
    scores[:, 4080:4120] = 3.0  # 40 equal tokens across the edge at 4096
    scores[0, [7, 4500]] = 4.0  # above them
    scores[1, 4990:] = 3.0  # more equal ones at the very end: never reached
    got = _check(scores.unsqueeze(-1), k)
    assert got[1][0].tolist() == [7, 4500] + list(range(4080, 4115))


def test_classes_past_one_class_block():
    """C = 300 (three blocks of 128): the max in a later block, equal maxima across blocks (the first
    class wins), a NaN in the last block (the token's score is NaN, ranked last)."""
    N, T, C = 2, 40, 300
    logits = torch.randn(N, T, C, device=DEVICE)
    logits[:, 3, 200] = 9.0
    logits[:, 5, [20, 140, 290]] = 8.0
    logits[0, 6, 299] = math.nan
    got = _check(logits, T)
    assert got[1][0, :2].tolist() == [3, 5] and got[2][0, :2].tolist() == [200, 20]
    assert got[1][0, -1].item() == 6 and got[2][0, -1].item() == 299 and math.isnan(got[0][0, -1].item())


@pytest.mark.parametrize("pairs", [False, True])
def test_k_above_the_in_kernel_sort(pairs):
    """k > MAX_SORT: the kernel only compacts, torch.sort orders the words, a kernel unpacks."""
    k = topk_triton.MAX_SORT + 4
    if pairs:
        logits = torch.randn(1, 800, 3, device=DEVICE).round(decimals=1)  # 2400 pairs, many ties
    else:
        logits = torch.randn(1, 2500, 2, device=DEVICE).round(decimals=1)
    _check(logits, k, pairs=pairs)


@pytest.mark.parametrize("rank_j", [8, 128])
def test_rank_sort_tiles(monkeypatch, rank_j):
    """The rank sort's compare tile: 8 columns (a GPU's) and 128 (the interpreter's) give the exact order,
    with k past one block of RANK_I = 128 ranked words."""
    monkeypatch.setattr(topk_triton, "_rank_j", lambda: rank_j)
    logits = torch.randint(-4, 5, (3, 200, 5), device=DEVICE).float()  # heavy ties
    logits[1, ::7, 2] = math.nan
    logits[2, ::11, 0] = math.inf
    _check(logits, 150)
    _check(logits[:, :30], 97, pairs=True)


def test_sources_the_word_gather_cannot_move_and_more_than_four():
    """fp16 rows of odd width, bool [N, T], trailing dims not contiguous: torch.gather; six sources that
    can: two launches of the row kernel."""
    N, T, C, k = 2, 50, 4, 9
    logits = torch.randn(N, T, C, device=DEVICE)
    odd_half = torch.randn(N, T, 3, device=DEVICE).half()
    flags = torch.rand(N, T, device=DEVICE) > 0.5
    transposed = torch.randn(N, T, 4, 3, device=DEVICE).transpose(2, 3)
    assert all(topk_triton._words(t) is None for t in (odd_half, flags, transposed))
    movable = [torch.randn(N, T, w, device=DEVICE) for w in (1, 5, 40, 200)]
    movable += [torch.randint(0, 9, (N, T), device=DEVICE), torch.randn(N, T, 2, 3, dtype=torch.float64, device=DEVICE)]
    movable.append(torch.randn(N, 2 * T, 6, device=DEVICE)[:, ::2])  # strided tokens
    movable.append(torch.randn(N, T, 2, device=DEVICE).half())
    assert all(topk_triton._words(t) is not None for t in movable)
    _check(logits, k, [odd_half, flags, transposed] + movable)


@pytest.mark.parametrize("pairs", [False, True])
def test_backward_scatters_into_zeros(pairs):
    """The row kernel in scatter mode (and torch where it cannot: odd fp16 widths), against the
    reference backward at the same indices; the pairs form accumulates repeated queries."""
    from rtdetr_kernels.topk.op import _reference_backward

    N, T, C, k = 3, 40, 3, 30 if not pairs else 70
    logits = torch.randn(N, T, C, device=DEVICE)
    sources = [torch.randn(N, T, 16, device=DEVICE), torch.randn(N, T, 3, device=DEVICE).half(),
               torch.randn(N, T, 4, device=DEVICE)]
    scores, indices, classes, gathered = topk_triton.forward(logits, k, sources, pairs)
    gen = torch.Generator().manual_seed(5)
    grad_scores = torch.randn(N, k, generator=gen).to(DEVICE)
    grads = [torch.randn(g.shape, generator=gen).to(g) for g in gathered]
    grads[2] = grads[2].transpose(0, 1).contiguous().transpose(0, 1)  # a non-contiguous gradient
    for need_logits, need in ((True, [True, True, True]), (False, [False, True, False])):
        got = topk_triton.backward(grad_scores, indices, classes, grads, T, C, pairs, need_logits, need, False)
        want = _reference_backward(grad_scores, indices, classes, grads, T, C, pairs, need_logits, need, False)
        assert torch.equal(got[0], want[0])
        for g, w in zip(got[1], want[1]):
            assert g.shape == w.shape and torch.equal(g, w)


def test_dtypes_and_non_contiguous_logits():
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    for dtype in dtypes:
        logits = torch.randn(2, 60, 11, device=DEVICE).to(dtype)
        _check(logits, 23)
        _check(logits.transpose(0, 1).contiguous().transpose(0, 1), 23)
        _check(logits[:, :, ::2], 23, pairs=True)


def test_why_not():
    call = backends.Call("topk_select", DEVICE, (torch.float64,))
    assert "float64" in topk_triton.why_not(call)
    assert topk_triton.why_not(backends.Call("topk_select", DEVICE, (torch.bfloat16, torch.bool))) is None


def test_launched_configurations_are_compiled_ahead_of_time():
    """Every (kernel, constexpr) the host can pick is in aot_specs (which tests/test_triton_aot.py compiles)."""
    specs = {s[0] for s in topk_triton.aot_specs()}
    for dtype in ("fp32", "fp16", "bf16"):
        for C in (1, 3, 8, 9, 80, 128, 129, 365, 1000):
            assert f"topk_keys[{dtype},c{topk_triton._block_c(C)}]" in specs
    for word in ("i16", "i32"):
        assert {f"topk_select[{word},sort]", f"topk_select[{word},nosort]", f"topk_emit[{word}]"} <= specs
    for num in range(1, 5):
        for W in (1, 4, 5, 32, 33, 128, 256, 1000):
            for kind in ("gather", "scatter"):
                assert f"topk_rows[{num},w{topk_triton._block_w(W)},{kind}]" in specs
