"""The cpu backend's forward of topk_select, both implementations: the compiled kernel (csrc/topk/cpu.cpp,
``rtdetr_kernels_C::topk_select_forward`` on CPU tensors, called directly) and the PyTorch fallback
(kernels/topk/cpu.py ``forward_torch``, what runs where the extension is not built), each bit for bit
against ``topk_select_reference`` on inputs made to hit the ranking rules: distinct values, ties
(identical invalid-anchor rows, few distinct values, ties across classes), signed zeros, infinities,
NaN (selected when fewer than k tokens are not NaN; inside a row of classes for the argmax rule), every
dtype, odd sizes, batch sizes 0 to 33, k = 1 and k = all candidates; strided inputs; the compiled op's
input checks.

test_topk_contract.py runs the cpu backend (whichever forward it has) through the op against the
reference and plain torch, with gradients; this file does not repeat that.
"""

from __future__ import annotations

import math
import re
import zlib

import pytest
import torch

import helpers
from rtdetr_kernels.topk import cpu as topk_cpu
from rtdetr_kernels.topk import topk_select, topk_select_flat, topk_select_reference

INF, NAN = math.inf, math.nan
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def compiled_kernel():
    """The compiled CPU forward, or a skip (a failure where the extension is required)."""
    return helpers.compiled_kernel(topk_cpu.compiled_forward, "csrc/topk/cpu.cpp")


@pytest.fixture(params=["compiled", "torch"])
def forward(request):
    """forward(logits, k, gather, pairs) of one implementation."""
    if request.param == "compiled":
        kernel = compiled_kernel()
        return lambda logits, k, gather, pairs: kernel(logits, k, list(gather), pairs)
    return topk_cpu.forward_torch


def _gen(*key) -> torch.Generator:
    """A generator seeded by the test's own parameters: fresh values per test, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def bits(t: torch.Tensor) -> torch.Tensor:
    """Floating tensors as their bit patterns (NaN payloads and the sign of zero compared too)."""
    return t.view(_BITS[t.dtype]) if t.dtype in _BITS else t


def assert_matches_reference(forward, logits, k, gather=(), pairs=False):
    want = topk_select_reference(logits, k, gather, pairs)
    scores, indices, classes, gathered = forward(logits, k, gather, pairs)
    N = logits.shape[0]
    assert scores.dtype == logits.dtype and scores.shape == (N, k)
    assert indices.dtype == torch.int64 and classes.dtype == torch.int64
    assert torch.equal(indices, want[1]), "indices differ from the reference"
    assert torch.equal(classes, want[2]), "classes differ from the reference"
    assert torch.equal(bits(scores), bits(want[0])), "scores differ from the reference (bit for bit)"
    assert len(gathered) == len(gather)
    for got, w, source in zip(gathered, want[3], gather):
        assert got.dtype == source.dtype and got.shape == w.shape
        assert torch.equal(bits(got), bits(w)), "a gathered tensor differs from the reference"


def distinct_values(shape, dtype, gen) -> torch.Tensor:
    """Values all different within each image (so every class max is too), in a random order."""
    N, M = shape[0], math.prod(shape[1:])
    if dtype in (torch.float16, torch.bfloat16):  # distinct finite bit patterns, -0.0 left out
        pool = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
        pool = pool[torch.isfinite(pool) & (pool.view(torch.int16) != -(1 << 15))]
        rows = [pool[torch.randperm(len(pool), generator=gen)[:M]] for _ in range(N)]
        return torch.stack(rows).reshape(shape) if N else torch.empty(shape, dtype=dtype)
    while True:
        values = (torch.randn(N, M, generator=gen, dtype=torch.float64) * 3).to(dtype)
        if all(len(torch.unique(row)) == M for row in values):
            return values.reshape(shape)


def _gathers(N, T, gen, logits):
    return (logits, torch.randint(-100, 100, (N, T, 3), generator=gen), torch.rand(N, T, generator=gen) > 0.5,
            torch.randn(N, T, 2, 5, generator=gen).half())


# --------------------------------------------------------------------------------------------
# Order
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,C", [(97, 1), (97, 7), (97, 80), (16, 3)])
@pytest.mark.parametrize("pairs", [False, True], ids=["tokens", "pairs"])
@pytest.mark.parametrize("k_of", ["1", "13", "all"])
def test_distinct_values(forward, dtype, T, C, pairs, k_of):
    candidates = T * C if pairs else T
    k = {"1": 1, "13": min(13, candidates), "all": candidates}[k_of]
    gen = _gen("distinct", dtype, T, C, pairs, k)
    N = 3
    logits = distinct_values((N, T, C), dtype, gen)
    assert_matches_reference(forward, logits, k, _gathers(N, T, gen, logits), pairs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 200, 300, 316, 400])
def test_identical_invalid_anchor_rows(forward, dtype, k):
    """316 tokens with one identical row (RT-DETR's invalid anchors: masked memory, so equal logits),
    ranking above, among and below the others: equal scores by lower index, whatever k cuts them."""
    N, T, C = 2, 400, 80
    gen = _gen("anchors", dtype, k)
    logits = torch.randn(N, T, C, generator=gen).to(dtype)
    invalid = torch.randperm(T, generator=gen)[:316]
    for n, level in enumerate((5.0, 0.0)):  # above every other token; among them
        logits[n, invalid] = (torch.randn(C, generator=gen) + level).to(dtype)
    assert_matches_reference(forward, logits, k, (logits,))
    assert_matches_reference(forward, logits, min(k, 300), (), pairs=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pairs", [False, True], ids=["tokens", "pairs"])
@pytest.mark.parametrize("C", [1, 7, 80])
def test_few_distinct_values(forward, dtype, pairs, C):
    """Many ties within and across classes: a few small integers, and a constant."""
    N, T = 3, 97
    gen = _gen("few", dtype, pairs, C)
    logits = torch.randint(-3, 4, (N, T, C), generator=gen).to(dtype)
    candidates = T * C if pairs else T
    for k in sorted({1, 10, min(150, candidates), candidates}):
        assert_matches_reference(forward, logits, k, (logits,), pairs)
    constant = torch.full((N, T, C), 0.25, dtype=dtype)
    for k in sorted({1, 50, candidates}):
        assert_matches_reference(forward, constant, k, (), pairs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pairs", [False, True], ids=["tokens", "pairs"])
def test_signed_zeros(forward, dtype, pairs):
    """-0.0 == +0.0: ordered by index, and the score is the stored value (its sign) at the first
    max class."""
    N, T, C = 2, 61, 5
    gen = _gen("zeros", dtype, pairs)
    choice = torch.randint(0, 3, (N, T, C), generator=gen)
    logits = torch.where(choice == 0, -0.0, torch.where(choice == 1, 0.0, -1.0)).to(dtype)
    logits[0, 3] = torch.tensor([-0.0, 0.0, -0.0, 0.0, -1.0])
    logits[0, 4] = torch.tensor([0.0, -0.0, -1.0, -0.0, 0.0])
    for k in (1, 20, T):
        assert_matches_reference(forward, logits, k, (logits,), pairs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pairs", [False, True], ids=["tokens", "pairs"])
@pytest.mark.parametrize("C", [1, 7, 80])
def test_infinities_and_nan(forward, dtype, pairs, C):
    """+inf highest, -inf below every finite value, NaN below everything: picked only when fewer
    than k candidates are not NaN (in index order), and a NaN anywhere in a row makes the token's
    score that row's first NaN."""
    N, T = 3, 97
    gen = _gen("specials", dtype, pairs, C)
    logits = torch.randn(N, T, C, generator=gen)
    special = torch.rand(N, T, C, generator=gen)
    logits[special < 0.03] = INF
    logits[(special >= 0.03) & (special < 0.06)] = -INF
    logits[0, torch.randperm(T, generator=gen)[:60]] = NAN  # 60 NaN tokens: more than T - k for k > 37
    row = torch.randperm(T, generator=gen)[:20]
    logits[1, row, torch.randint(0, C, (20,), generator=gen)] = NAN  # one NaN class among finite ones
    logits[1, row[:5], -1] = NAN  # ... and a second, later NaN: the first one's class is the class
    logits[2, :, :] = -INF
    logits[2, ::3, 0] = NAN
    logits = logits.to(dtype)
    candidates = T * C if pairs else T
    for k in sorted({1, 37, 60, 80, candidates}):
        assert_matches_reference(forward, logits, k, (logits,), pairs)


def test_class_is_torch_argmax(forward):
    """The class rule is torch.argmax's, spelled out: the first NaN, else the first max (of equal
    zeros the first, whatever its sign, and the score keeps that sign)."""
    logits = torch.tensor([[[1.0, NAN, 3.0, NAN], [3.0, 1.0, 3.0, 2.0], [-0.0, 0.0, -1.0, 0.0]]])
    assert torch.argmax(logits, dim=-1).tolist() == [[1, 0, 0]]
    scores, indices, classes, _ = forward(logits, 3, (), False)
    assert indices.tolist() == [[1, 2, 0]] and classes.tolist() == [[0, 0, 1]]
    assert scores[0, 0] == 3.0 and math.copysign(1.0, scores[0, 1]) == -1.0 and math.isnan(scores[0, 2])


@pytest.mark.parametrize("N", [0, 1, 3, 33])
@pytest.mark.parametrize("pairs", [False, True], ids=["tokens", "pairs"])
def test_batch_sizes(forward, N, pairs):
    T, C = 97, 7
    gen = _gen("batch", N, pairs)
    logits = torch.randn(N, T, C, generator=gen)
    logits[:, ::4] = logits[:, :1]  # ties in every image
    gathers = (logits, torch.randint(0, 9, (N, T), generator=gen), torch.randn(N, T, 0, generator=gen))
    for k in (1, 40, T):
        assert_matches_reference(forward, logits, k, gathers, pairs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rtdetr_shapes(forward, dtype):
    """Query selection at 640 px (T = 8400, C = 80, k = 300, invalid anchors' +inf boxes) and the
    post-processor's pairs form ([N, 300, 80], k = 300)."""
    N, T, C = 2, 8400, 80
    gen = _gen("rtdetr", dtype)
    logits = (torch.randn(N, T, C, generator=gen) * 2 - 4).to(dtype)
    boxes = torch.randn(N, T, 4, generator=gen).to(dtype)
    boxes[:, torch.randperm(T, generator=gen)[:316]] = INF
    memory = torch.randn(N, T, 32, generator=gen).to(dtype)
    assert_matches_reference(forward, logits, 300, (memory, logits, boxes))
    probs = torch.sigmoid(torch.randn(N, 300, C, generator=gen) * 6).to(dtype)  # saturated: ties at 1.0
    assert_matches_reference(forward, probs, 300, (boxes[:, :300],), pairs=True)


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pairs", [False, True], ids=["tokens", "pairs"])
def test_strided_inputs_through_the_op(pairs):
    """The op makes strided inputs contiguous: non-contiguous logits and gathers give the reference."""
    N, T, C = 3, 97, 7
    gen = _gen("strided-op", pairs)
    logits = torch.randn(T, N, C, generator=gen).transpose(0, 1)
    memory = torch.randn(N, 16, T, generator=gen).transpose(1, 2)
    flags = torch.rand(T, N, generator=gen).t() > 0.3
    k = 30
    want = topk_select_reference(logits, k, (memory, flags), pairs)
    if pairs:
        scores, classes, indices, gathered = topk_select_flat(logits, k, (memory, flags), backend="cpu")
    else:
        scores, indices, gathered = topk_select(logits, k, (memory, flags), backend="cpu")
        classes = want[2]
    assert torch.equal(scores, want[0]) and torch.equal(indices, want[1]) and torch.equal(classes, want[2])
    assert all(torch.equal(g, w) for g, w in zip(gathered, want[3]))


@pytest.mark.parametrize("pairs", [False, True], ids=["tokens", "pairs"])
def test_compiled_op_takes_any_strides(pairs):
    """The compiled op itself: strided logits, gathers with non-contiguous trailing dims (copied to
    rows), strided token and batch dims (read in place), broadcast (stride 0) rows, zero-size rows."""
    kernel = compiled_kernel()
    N, T, C = 3, 97, 7
    gen = _gen("strided-kernel", pairs)
    logits = torch.randn(N, C, T, generator=gen).transpose(1, 2)
    sources = (
        torch.randn(N, T, 5, 3, generator=gen).transpose(2, 3),  # trailing dims not one contiguous row
        torch.randint(0, 1000, (N, T, 4, 6), generator=gen)[:, :, ::2, 1::2],  # ... nor dense
        torch.randn(T, N, 8, generator=gen).half().transpose(0, 1),  # token and batch dims swapped
        torch.randn(N, 1, 1, generator=gen).expand(N, T, 4),  # every token the same row (stride 0)
        (torch.rand(N, 2 * T, generator=gen) > 0.5)[:, ::2],  # bool, token stride 2, no trailing dims
        torch.randn(N, T, 0, 3, generator=gen),  # zero-size rows
    )
    assert_matches_reference(lambda *a: kernel(a[0], a[1], list(a[2]), a[3]), logits, 25, sources, pairs)


# --------------------------------------------------------------------------------------------
# The compiled op's input checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,pairs,message", [
    (lambda: (torch.randn(2, 10), 3, []), False, "must be [N, T, C]"),
    (lambda: (torch.randn(2, 10, 3, 1), 3, []), False, "must be [N, T, C]"),
    (lambda: (torch.randint(0, 5, (2, 10, 3)), 3, []), False, "float16, bfloat16, float32 or float64"),
    (lambda: (torch.randn(2, 10, 3).to(torch.complex64), 3, []), False, "float16, bfloat16, float32 or float64"),
    (lambda: (torch.randn(2, 10, 0), 3, []), False, "at least one class"),
    (lambda: (torch.randn(2, 10, 3), 0, []), False, "k must be in [1, 10]"),
    (lambda: (torch.randn(2, 10, 3), 11, []), False, "k must be in [1, 10]"),
    (lambda: (torch.randn(2, 10, 3), 31, []), True, "k must be in [1, 30]"),
    (lambda: (torch.randn(0, 10, 3), 11, []), False, "k must be in [1, 10]"),
    (lambda: (torch.randn(2, 10, 3), 3, [torch.randn(2, 9, 4)]), False, "gather[0] must be [N, T, *] with N = 2, T = 10"),
    (lambda: (torch.randn(2, 10, 3), 3, [torch.randn(2, 10), torch.randn(3, 10)]), False, "gather[1] must be [N, T, *]"),
    (lambda: (torch.randn(2, 10, 3), 3, [torch.randn(2)]), False, "gather[0] must be [N, T, *]"),
])
def test_compiled_op_rejects_bad_inputs(make, pairs, message):
    kernel = compiled_kernel()
    logits, k, gather = make()
    with pytest.raises(RuntimeError, match=r"topk_select.*" + re.escape(message)):
        kernel(logits, k, gather, pairs)


def test_forward_uses_the_compiled_kernel_when_built():
    """cpu.forward is the compiled kernel where the extension has it (else the fallback, tested above)."""
    kernel = compiled_kernel()
    logits = torch.randn(2, 50, 3)
    got = topk_cpu.forward(logits, 7, [logits], False)
    want = kernel(logits, 7, [logits], False)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3])) and torch.equal(got[3][0], want[3][0])
