"""The CUDA (csrc/topk) and Triton top-k kernels on a GPU against the reference: exact indices on
distinct values, ties (RT-DETR's 316 identical invalid anchors), +-inf/NaN, k = 1 and k = T, the
paths of the kernels (keys in shared memory or not, k sorted in shared memory or by torch.sort, the
warp- and thread-per-token class max), N = 1..33, non-contiguous inputs, every dtype, the post-processor
form with the sigmoid, gradients, determinism, CUDA-graph capture. GPU only: skipped without CUDA
(the CPU machines run the Triton kernels under the interpreter in test_topk_triton.py, and every
backend through the contract suites).
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import cuda_graph_replays
from rtdetr_kernels import backends
from rtdetr_kernels.topk import reference, topk_select, topk_select_flat

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA top-k kernels need a GPU")

GPU_BACKENDS = ["cuda", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=GPU_BACKENDS)
def backend(request):
    reason = backends.why_not(request.param, backends.Call("topk_select", "cuda", (torch.float32,)))
    if reason is not None:
        pytest.skip(reason)
    return request.param


def _equal_scores(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _check(backend, logits, k, gather=(), pairs=False):
    """The op on `backend` against topk_select_reference (same device): every output exactly equal."""
    if pairs:
        scores, labels, indices, gathered = topk_select_flat(logits, k, gather, backend=backend)
        classes = labels
    else:
        scores, indices, gathered = topk_select(logits, k, gather, backend=backend)
        classes = None
    want = reference.topk_select_reference(logits, k, gather, pairs)
    assert indices.dtype == torch.int64 and scores.dtype == logits.dtype
    assert torch.equal(indices, want[1]), "indices"
    assert _equal_scores(scores, want[0]), "scores"
    if classes is not None:
        assert torch.equal(classes, want[2]), "classes"
    for i, (g, w) in enumerate(zip(gathered, want[3])):
        assert g.dtype == w.dtype and torch.equal(g, w), f"gathered[{i}]"
    return scores, indices, gathered


def _distinct(N, T, C, dtype, seed):
    """Logits whose class maxima are a permutation of T values exact in dtype (|v| <= 256 steps of 1/8
    for fp16/bf16: integers up to 256 are exact in bf16), at a random class."""
    gen = torch.Generator().manual_seed(seed)
    steps = torch.stack([torch.randperm(T, generator=gen) for _ in range(N)]).double()
    if dtype != torch.float32:
        steps = steps % 256  # few distinct values: ties, checked against the reference's rule
    token = steps / 8 - 4
    logits = token.unsqueeze(-1) - 1 - torch.rand(N, T, C, generator=gen, dtype=torch.float64)
    logits = logits.scatter(2, torch.randint(0, C, (N, T, 1), generator=gen), token.unsqueeze(-1))
    return logits.to(dtype).cuda()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,T,C,k", [(2, 8400, 80, 300), (1, 13125, 80, 300), (3, 8400, 365, 300), (2, 20000, 7, 300),
                                     (5, 300, 80, 300), (4, 999, 3, 1), (2, 5000, 1, 4500), (1, 17, 16, 17)])
def test_matches_reference(backend, N, T, C, k, dtype):
    """RT-DETR's sizes (640 and 800 px, COCO and Objects365 classes), keys past the shared-memory
    capacity (T = 20000), k = T, k = 1, k above the in-kernel sort (4500), C at the warp threshold."""
    logits = _distinct(N, T, C, dtype, seed=T + C)
    memory = torch.randn(N, T, 256, device="cuda").to(dtype)
    boxes = torch.randn(N, T, 4, device="cuda")
    _check(backend, logits, k, (memory, logits, boxes))


@pytest.mark.parametrize("N", [1, 2, 3, 7, 8, 16, 31, 32, 33])
def test_batch_sizes(backend, N):
    logits = _distinct(N, 8400, 80, torch.float32, seed=N)
    _check(backend, logits, 300, (torch.randn(N, 8400, 256, device="cuda"),))


def test_ties_316_identical_invalid_anchors(backend):
    """RT-DETR at 640 px zeroes the memory of the 80x80 level's border ring (316 tokens): their logits
    are identical, and with random weights they can fill the top 300: lowest token indices first."""
    N, T, C, k = 2, 8400, 80, 300
    logits = torch.randn(N, T, C, device="cuda") - 3
    border = torch.randperm(6400)[:316].sort().values.cuda()
    logits[:, border] = torch.randn(C, device="cuda") + 5  # the same row for every invalid token
    coords = torch.randn(N, T, 4, device="cuda")
    coords[:, border] = math.inf
    _, indices, (g_coords,) = _check(backend, logits, k, (coords,))
    assert torch.equal(indices, border[:k].expand(N, k))
    assert torch.isinf(g_coords).all()
    # 316 tied tokens around the 300th place: the k - (number above) lowest-indexed ones get in
    logits[:, :50] += 20
    _, indices, _ = _check(backend, logits, k)
    above = [t for t in range(50) if t not in set(border.tolist())]
    assert indices[0, :len(above)].tolist() == above


def test_infinities_and_nan(backend):
    N, T, C, k = 3, 3000, 20, 3000
    logits = torch.randn(N, T, C, device="cuda")
    logits.view(-1)[::13] = math.nan
    logits.view(-1)[1::17] = math.inf
    logits.view(-1)[2::19] = -math.inf
    logits[1] = -math.inf
    logits[2, :, :5] = math.nan  # every token NaN: ordered by index
    _check(backend, logits, k)
    _check(backend, logits, 37)
    signed_zeros = torch.tensor([[0.0, -0.0, 0.0, -0.0, -1.0]], device="cuda").unsqueeze(-1)
    scores, indices, _ = _check(backend, signed_zeros, 5)
    assert indices.tolist() == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(backend, dtype):
    N, T, C = 3, 2100, 80
    logits = _distinct(N, T, C, dtype, seed=9)
    wide = torch.randn(N, T, 512, device="cuda").to(dtype)
    strided_tokens = torch.randn(N, 2 * T, 4, device="cuda")[:, ::2]
    transposed = torch.randn(N, 6, T, device="cuda").transpose(1, 2)  # trailing dim strided: copied rows
    odd_half = torch.randn(N, T, 3, device="cuda").half()  # 6-byte rows: byte copies
    flags = torch.rand(N, T, device="cuda") > 0.5
    gather = (wide[..., ::2], strided_tokens, transposed, odd_half, flags, torch.randint(0, 9, (N, T), device="cuda"))
    _check(backend, logits.transpose(0, 1).contiguous().transpose(0, 1), 300, gather)
    _check(backend, logits[:, :, ::2], 300, gather)
    _check(backend, torch.cat([logits, logits], 2)[:, :, :C], 300, gather + gather[:3])  # 9 sources: two launches


@pytest.mark.parametrize("dtype", DTYPES)
def test_post_processor_with_sigmoid(backend, dtype):
    """300 queries x 80 classes -> 300, the sigmoid inside: torch.topk of the sigmoid scores on distinct
    values (exact), saturated logits tied by lower (query, class)."""
    N, Q, C, k = 4, 300, 80, 300
    gen = torch.Generator().manual_seed(3)
    flat = torch.stack([torch.randperm(Q * C, generator=gen) for _ in range(N)]).float() / (Q * C) * 8 - 4
    logits = flat.reshape(N, Q, C).cuda()
    boxes = torch.rand(N, Q, 4, device="cuda")
    scores, labels, queries, (g_boxes,) = topk_select_flat(logits, k, (boxes,), sigmoid=True, backend=backend)
    want = torch.topk(torch.sigmoid(logits).flatten(1), k)
    assert torch.equal(scores, want.values) and torch.equal(queries * C + labels, want.indices)
    assert torch.equal(g_boxes, boxes.gather(1, (want.indices // C).unsqueeze(-1).expand(N, k, 4)))
    hot = logits.to(dtype)
    hot.view(N, -1)[:, ::97] = 30.0  # sigmoid == 1 in every dtype
    scores, labels, queries, _ = topk_select_flat(hot, k, (), sigmoid=True, backend=backend)
    order = torch.sigmoid(hot).flatten(1).float().argsort(dim=1, descending=True, stable=True)[:, :k]
    assert torch.equal(queries * C + labels, order)
    assert (scores[:, :Q * C // 97] == 1).all()
    _check(backend, torch.sigmoid(hot), k, (boxes,), pairs=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pairs", [False, True])
def test_gradients(backend, dtype, pairs):
    """Against autograd of plain torch at the chosen indices; exact (copies and scatters)."""
    N, T, C, k = 2, 3000, 80, 300
    logits = _distinct(N, T, C, dtype, seed=4)
    memory = torch.randn(N, T, 256, device="cuda").to(dtype)
    coords = torch.randn(N, T, 4, device="cuda")
    ours = [t.clone().requires_grad_() for t in (logits, memory, coords)]
    plain = [t.clone().requires_grad_() for t in (logits, memory, coords)]
    if pairs:
        scores, labels, indices, gathered = topk_select_flat(ours[0], k, (ours[1], ours[2]), backend=backend)
        flat = indices * C + labels
    else:
        scores, indices, gathered = topk_select(ours[0], k, (ours[1], ours[0], ours[2]), backend=backend)
    outs = [scores, *gathered]
    grads = [torch.randn_like(o) for o in outs]
    torch.autograd.backward(outs, grads)
    if pairs:
        want = [plain[0].flatten(1).gather(1, flat)] + [
            s.gather(1, indices.unsqueeze(-1).expand(N, k, s.shape[-1])) for s in plain[1:]]
    else:
        want = [plain[0].max(-1).values.gather(1, indices)] + [
            s.gather(1, indices.unsqueeze(-1).expand(N, k, s.shape[-1])) for s in (plain[1], plain[0], plain[2])]
    torch.autograd.backward(want, grads)
    for got, exp in zip(ours, plain):
        torch.testing.assert_close(got.grad, exp.grad, atol=0, rtol=0)


def test_deterministic(backend):
    """Same inputs, same outputs and gradients, bit for bit (integer histograms; no float atomics)."""
    logits = torch.randn(3, 8400, 80, device="cuda").round(decimals=1)  # many ties
    memory = torch.randn(3, 8400, 256, device="cuda")
    runs = []
    for _ in range(3):
        leaves = [t.clone().requires_grad_() for t in (logits, memory)]
        scores, indices, (g,) = topk_select(leaves[0], 300, (leaves[1],), backend=backend)
        (scores.sum() + (g * 0.5).sum()).backward()
        runs.append((scores, indices, g, leaves[0].grad, leaves[1].grad))
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))


@pytest.mark.parametrize("pairs", [False, True])
def test_cuda_graph_capture_and_replay(backend, pairs):
    """No host sync, fixed-size workspaces: a captured forward + backward replays on new inputs."""
    N, T, C, k = 2, 8400, 80, 300

    def inputs(seed):
        gen = torch.Generator().manual_seed(seed)
        return [t.cuda() for t in (torch.randn(N, T, C, generator=gen), torch.randn(N, T, 256, generator=gen),
                                   torch.randn(N, k, generator=gen), torch.randn(N, k, 256, generator=gen))]

    static = inputs(0)
    leaves = [t.requires_grad_() for t in static[:2]]

    def step():
        if pairs:
            scores, _, indices, (g,) = topk_select_flat(leaves[0], k, (leaves[1],), backend=backend)
        else:
            scores, indices, (g,) = topk_select(leaves[0], k, (leaves[1],), backend=backend)
        return (scores, indices, g) + torch.autograd.grad((scores, g), leaves, (static[2], static[3]))

    for captured, expected in cuda_graph_replays(step, static, inputs):
        for got, exp in zip(captured, expected):
            assert torch.equal(got, exp)


def test_empty_batch(backend):
    logits = torch.randn(0, 100, 80, device="cuda")
    scores, indices, (g,) = topk_select(logits, 10, (torch.randn(0, 100, 5, device="cuda"),), backend=backend)
    assert scores.shape == (0, 10) and indices.shape == (0, 10) and g.shape == (0, 10, 5)


def test_direct_op_checks_its_arguments():
    """The compiled op guards itself against direct torch.ops calls (the Python wrapper validates first)."""
    if backends.why_not("cuda", backends.Call("topk_select", "cuda", (torch.float32,))) is not None:
        pytest.skip("the cuda backend is not built")
    ops = torch.ops.rtdetr_kernels_C
    logits = torch.randn(2, 10, 3, device="cuda")
    with pytest.raises(RuntimeError, match="k must be"):
        ops.topk_select_forward(logits, 11, [], False)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        ops.topk_select_forward(logits.double(), 3, [], False)
    with pytest.raises(RuntimeError, match=r"gather\[0\]"):
        ops.topk_select_forward(logits, 3, [torch.randn(2, 9, device="cuda")], False)
