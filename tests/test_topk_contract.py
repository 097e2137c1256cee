"""topk_select's contract: exact order (distinct values against torch.topk, ties by lower index,
+inf/-inf/NaN), gathers (inf copied as is, any dtype and rank), gradients (against autograd of plain
torch), the RT-DETR shape, the post-processor form, opcheck of both custom ops,
torch.compile(fullgraph=True), every bad input and its message, empty batch, backend selection.
"""

from __future__ import annotations

import math

import pytest
import torch

import rtdetr_kernels
from helpers import OpCalls
from rtdetr_kernels import BackendUnavailableError, backends
from rtdetr_kernels.topk import topk_select, topk_select_flat, topk_select_reference

INF, NAN = math.inf, math.nan


def _logits_with_class_max(token_scores: torch.Tensor, C: int) -> torch.Tensor:
    """[N, T] -> [N, T, C] logits whose max over classes is exactly token_scores, at a random class."""
    N, T = token_scores.shape
    logits = token_scores.unsqueeze(-1) - 1 - torch.rand(N, T, C, dtype=token_scores.dtype)
    argmax = torch.randint(0, C, (N, T, 1))
    return logits.scatter(2, argmax, token_scores.unsqueeze(-1))


def _oracle_order(scores_row: list, k: int) -> list:
    """The documented order, spelled out: descending, NaN last, equal scores by lower index."""
    def key(t):
        s = scores_row[t]
        return (1, 0.0, t) if math.isnan(s) else (0, -s, t)

    return sorted(range(len(scores_row)), key=key)[:k]


# --------------------------------------------------------------------------------------------
# Order
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,C,k", [(1, 1, 1), (7, 3, 7), (97, 5, 13), (250, 80, 250)])
def test_permutation_rows_match_torch_topk(T, C, k, dtype):
    """Distinct values (permutations of arange, exact in every dtype at T <= 256): exact indices."""
    N = 3
    token_scores = torch.stack([torch.randperm(T) for _ in range(N)]).to(dtype) - T // 2
    logits = _logits_with_class_max(token_scores.double(), C).to(dtype)
    scores, indices, gathered = topk_select(logits, k)
    expected = torch.topk(logits.max(-1).values, k, dim=1)
    assert indices.dtype == torch.int64 and scores.dtype == dtype and gathered == ()
    assert torch.equal(indices, expected.indices)
    assert torch.equal(scores, expected.values)


def test_ties_go_to_the_lower_index():
    N, T, C, k = 2, 40, 3, 11
    constant = torch.full((N, T, C), 0.5)
    _, indices, _ = topk_select(constant, k)
    assert torch.equal(indices, torch.arange(k).expand(N, k))
    # many ties among few values: the order is the oracle's, the values are torch.topk's
    token_scores = torch.randint(-3, 4, (N, T)).float()
    logits = _logits_with_class_max(token_scores, C)
    scores, indices, _ = topk_select(logits, k)
    for n in range(N):
        assert indices[n].tolist() == _oracle_order(token_scores[n].tolist(), k)
    torch.testing.assert_close(scores, torch.topk(token_scores, k, dim=1).values, atol=0, rtol=0)
    # -0.0 and +0.0 are one value
    signed_zeros = torch.tensor([[0.0, -0.0, 0.0, -0.0]]).unsqueeze(-1)
    assert topk_select(signed_zeros, 4)[1].tolist() == [[0, 1, 2, 3]]


def test_infinities_and_nan():
    row = [1.0, NAN, INF, -INF, 1.0, -2.0, NAN, INF, -INF, 0.5]
    logits = torch.tensor([row, row[::-1]]).unsqueeze(-1)
    scores, indices, _ = topk_select(logits, len(row))
    for n, r in enumerate((row, row[::-1])):
        assert indices[n].tolist() == _oracle_order(r, len(row))
    assert scores[0, :2].tolist() == [INF, INF] and torch.isnan(scores[0, -2:]).all()
    # a NaN anywhere in a token's classes makes its score NaN: it never displaces a real candidate
    logits = torch.randn(1, 6, 4)
    logits[0, 2, 1] = NAN
    logits[0, 4] = -INF
    _, indices, _ = topk_select(logits, 6)
    assert indices[0, -2:].tolist() == [4, 2]
    # +inf logits (as in the official inf anchors' neighbourhood) rank first, in index order
    logits = torch.randn(2, 50, 3)
    logits[:, [31, 7, 44], 1] = INF
    _, indices, _ = topk_select(logits, 5)
    assert indices[:, :3].tolist() == [[7, 31, 44]] * 2


def test_scores_are_the_class_max_of_the_first_max_class():
    logits = torch.randn(2, 30, 6, dtype=torch.float64)
    logits[0, :, 4] = logits[0].max(-1).values  # ties between class 4 and an earlier class
    scores, indices, _ = topk_select(logits, 9)
    torch.testing.assert_close(scores, logits.max(-1).values.gather(1, indices), atol=0, rtol=0)
    _, _, classes, _ = topk_select_reference(logits, 9)
    torch.testing.assert_close(classes, logits.argmax(-1).gather(1, indices), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Gather and gradients
# --------------------------------------------------------------------------------------------


def _rtdetr_like(N, T, C, hidden, dtype=torch.float32, invalid=()):
    output_memory = torch.randn(N, T, hidden, dtype=dtype)
    logits = torch.randn(N, T, C, dtype=dtype)
    coord_unact = torch.randn(N, T, 4, dtype=dtype)
    coord_unact[:, list(invalid)] = INF  # invalid anchors
    return output_memory, logits, coord_unact


def test_gather_copies_every_tensor_as_is():
    N, T, C, k = 2, 60, 5, 20
    invalid = list(range(0, 60, 3))
    memory, logits, coords = _rtdetr_like(N, T, C, 16, invalid=invalid)
    logits[:, invalid] += 2  # the invalid anchors are among the chosen
    extra = (torch.randint(0, 100, (N, T)), torch.rand(N, T) > 0.5, torch.randn(N, T, 2, 3, dtype=torch.float64))
    scores, indices, gathered = topk_select(logits, k, (memory, logits, coords) + extra)
    batch = torch.arange(N).unsqueeze(1)
    for source, got in zip((memory, logits, coords) + extra, gathered):
        assert got.dtype == source.dtype and got.shape == (N, k, *source.shape[2:])
        assert torch.equal(got, source[batch, indices])
    assert torch.isinf(gathered[2]).any() and (gathered[2][torch.isinf(gathered[2])] > 0).all()
    # a non-contiguous source gives the same
    memory_t = memory.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(topk_select(logits, k, (memory_t,))[2][0], gathered[0])


def _plain_torch(logits, indices, sources):
    """What RT-DETR writes, at given indices: autograd of this is the spec of the backward."""
    token_scores = logits.max(-1).values
    scores = token_scores.gather(1, indices)
    gathered = [s.gather(1, indices.reshape(*indices.shape, *([1] * (s.dim() - 2))).expand(*indices.shape, *s.shape[2:]))
                for s in sources]
    return [scores] + gathered


def test_backward_matches_autograd_of_plain_torch():
    N, T, C, k = 2, 70, 6, 25
    memory, logits, coords = _rtdetr_like(N, T, C, 8, dtype=torch.float64, invalid=[1, 5])
    ours = [t.clone().requires_grad_() for t in (logits, memory, coords)]
    plain = [t.clone().requires_grad_() for t in (logits, memory, coords)]
    scores, indices, gathered = topk_select(ours[0], k, (ours[1], ours[0], ours[2]))
    outputs = [scores, *gathered]
    grads = [torch.randn_like(o) for o in outputs]
    torch.autograd.backward(outputs, grads)
    torch.autograd.backward(_plain_torch(plain[0], indices, (plain[1], plain[0], plain[2])), grads)
    for got, want in zip(ours, plain):
        torch.testing.assert_close(got.grad, want.grad, atol=0, rtol=0)


def test_backward_computes_only_the_needed_grads():
    memory, logits, coords = _rtdetr_like(2, 30, 4, 8)
    memory.requires_grad_()
    scores, _, (g_memory, g_coords) = topk_select(logits, 10, (memory, coords))
    with OpCalls("topk_select_backward") as spy:
        (g_memory * torch.randn_like(g_memory)).sum().backward()
    assert [(call[6], list(call[7])) for call in spy.calls] == [(False, [True, False])]  # need_logits, need_gather
    assert memory.grad is not None and logits.grad is None and coords.grad is None


def test_gradcheck_float64():
    token_scores = torch.randperm(12).double().reshape(1, 12).repeat(2, 1)  # gaps of 1 >> eps: order is stable
    logits = _logits_with_class_max(token_scores, 3).requires_grad_()
    memory = torch.randn(2, 12, 3, dtype=torch.float64, requires_grad=True)

    def fn(logits, memory):
        scores, _, (g_memory, g_logits) = topk_select(logits, 5, (memory, logits))
        return scores, g_memory, g_logits

    assert torch.autograd.gradcheck(fn, (logits, memory), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_rtdetr_shapes_match_torch_topk():
    """[N, 8400, 80] logits, k = 300, gather of output_memory, logits and inf-holding box logits."""
    N, T, C, k = 2, 8400, 80, 300
    invalid = torch.randperm(T)[:316].tolist()  # the 80x80 level's border ring at 640 px
    memory, _, coords = _rtdetr_like(N, T, C, 256, invalid=invalid)
    token_scores = torch.stack([torch.randperm(T) for _ in range(N)]).float() / 1000  # distinct, exact in fp32
    logits = _logits_with_class_max(token_scores, C)
    scores, indices, (g_memory, g_logits, g_coords) = topk_select(logits, k, (memory, logits, coords))
    expected = torch.topk(logits.max(-1).values, k, dim=1)
    assert torch.equal(indices, expected.indices) and torch.equal(scores, expected.values)
    batch = torch.arange(N).unsqueeze(1)
    assert torch.equal(g_memory, memory[batch, expected.indices])
    assert torch.equal(g_logits, logits[batch, expected.indices])
    assert torch.equal(g_coords, coords[batch, expected.indices])  # inf rows included, as is


def test_post_processor_form():
    N, Q, C, k = 2, 30, 7, 40
    probabilities = torch.stack([torch.randperm(Q * C) for _ in range(N)]).float().reshape(N, Q, C) / (Q * C)
    boxes = torch.randn(N, Q, 4)
    scores, labels, queries, (g_boxes,) = topk_select_flat(probabilities, k, (boxes,))
    expected = torch.topk(probabilities.flatten(1), k, dim=1)
    assert torch.equal(scores, expected.values)
    assert torch.equal(labels, expected.indices % C) and torch.equal(queries, expected.indices // C)
    assert torch.equal(g_boxes, boxes[torch.arange(N).unsqueeze(1), queries])
    with pytest.raises(ValueError, match="k"):
        topk_select_flat(probabilities, Q * C + 1)
    with pytest.raises(ValueError, match=r"gather\[0\]"):
        topk_select_flat(probabilities, k, (boxes[:, :5],))
    with pytest.raises(TypeError, match="scores"):
        topk_select_flat(probabilities.long(), k)


def test_empty_batch():
    logits = torch.randn(0, 9, 4, requires_grad=True)
    memory = torch.randn(0, 9, 5, requires_grad=True)
    scores, indices, (g_memory,) = topk_select(logits, 3, (memory,))
    assert scores.shape == (0, 3) and indices.shape == (0, 3) and g_memory.shape == (0, 3, 5)
    (scores.sum() + g_memory.sum()).backward()
    assert logits.grad.shape == logits.shape and memory.grad.shape == memory.shape


# --------------------------------------------------------------------------------------------
# torch.library
# --------------------------------------------------------------------------------------------


def test_opcheck():
    memory, logits, coords = _rtdetr_like(2, 20, 4, 6, invalid=[3])
    labels = torch.randint(0, 4, (2, 20))
    args = (logits.requires_grad_(), 7, [memory.requires_grad_(), coords, labels], "reference")
    torch.library.opcheck(torch.ops.rtdetr_kernels.topk_select.default, args)
    strided = (logits.detach().transpose(0, 1).contiguous().transpose(0, 1), 7, [memory.detach()[..., ::2]], "reference")
    torch.library.opcheck(torch.ops.rtdetr_kernels.topk_select.default, strided)
    _, indices, classes, gathered = topk_select_reference(logits.detach(), 7, [memory.detach(), coords])
    backward = torch.ops.rtdetr_kernels.topk_select_backward.default
    grad_scores = torch.randn(2, 7)
    grads = [torch.randn_like(g) for g in gathered]
    for need_logits, need_gather in ((True, [True, True]), (False, [True, False]), (True, [False, False])):
        torch.library.opcheck(backward, (grad_scores, indices, classes, grads, 20, 4, need_logits, need_gather, "reference"))


def test_torch_compile_fullgraph():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def select_queries(logits, memory, coords):
        scores, indices, (target, boxes) = topk_select(logits, 5, (memory, coords), backend="reference")
        return scores.sigmoid(), indices, target * 2, boxes.detach()

    for T in (20, 33):
        memory, logits, coords = _rtdetr_like(2, T, 4, 6, invalid=[0])
        logits.requires_grad_()
        memory.requires_grad_()
        for t in (logits, memory, coords):
            torch._dynamo.mark_dynamic(t, 1)
        scores, indices, target, boxes = select_queries(logits, memory, coords)
        (scores.sum() + target.sum()).backward()
        eager_logits, eager_memory = logits.detach().requires_grad_(), memory.detach().requires_grad_()
        e_scores, e_indices, (e_target, e_boxes) = topk_select(eager_logits, 5, (eager_memory, coords))
        (e_scores.sigmoid().sum() + (e_target * 2).sum()).backward()
        assert torch.equal(indices, e_indices) and torch.equal(boxes, e_boxes)
        torch.testing.assert_close(scores, e_scores.sigmoid())
        torch.testing.assert_close(logits.grad, eager_logits.grad)
        torch.testing.assert_close(memory.grad, eager_memory.grad)
    assert counter.frame_count == 1, f"recompiled for a new token count ({counter.frame_count} compiles)"


def test_torch_compile_fullgraph_auto_backend():
    torch._dynamo.reset()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def select_queries(logits):
        return topk_select(logits, 3)[0]

    logits = torch.randn(2, 10, 4)
    torch.testing.assert_close(select_queries(logits), topk_select(logits, 3)[0])


def test_deterministic_mode():
    memory, logits, coords = _rtdetr_like(2, 40, 4, 6)
    results = []
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (logits, memory)]
            scores, _, (g_memory,) = topk_select(leaves[0], 9, (leaves[1],))
            (scores.sum() + (g_memory * 3).sum()).backward()
            results.append([leaves[0].grad, leaves[1].grad])
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# Bad inputs: (id, how to break the valid call, exception, what the message must name)
# --------------------------------------------------------------------------------------------


def _valid_args():
    memory, logits, coords = _rtdetr_like(2, 20, 4, 6)
    return dict(logits=logits, k=5, gather=(memory, coords))


BAD_INPUTS = [
    ("logits_int", lambda a: a.update(logits=a["logits"].long()), TypeError, "logits"),
    ("logits_not_tensor", lambda a: a.update(logits=a["logits"].tolist()), TypeError, "logits"),
    ("logits_rank2", lambda a: a.update(logits=a["logits"][..., 0]), ValueError, "logits"),
    ("logits_rank4", lambda a: a.update(logits=a["logits"][None]), ValueError, "logits"),
    ("logits_no_classes", lambda a: a.update(logits=a["logits"][..., :0]), ValueError, "logits"),
    ("k_zero", lambda a: a.update(k=0), ValueError, "k"),
    ("k_negative", lambda a: a.update(k=-1), ValueError, "k"),
    ("k_above_tokens", lambda a: a.update(k=21), ValueError, r"k = 21 with T = 20"),
    ("k_float", lambda a: a.update(k=5.0), TypeError, "k"),
    ("k_bool", lambda a: a.update(k=True), TypeError, "k"),
    ("k_tensor", lambda a: a.update(k=torch.tensor(5)), TypeError, "k"),
    ("gather_single_tensor", lambda a: a.update(gather=a["gather"][0]), TypeError, "gather"),
    ("gather_not_sequence", lambda a: a.update(gather=5), TypeError, "gather"),
    ("gather_entry_not_tensor", lambda a: a.update(gather=(a["gather"][0], [1, 2])), TypeError, r"gather\[1\]"),
    ("gather_batch", lambda a: a.update(gather=(a["gather"][0][:1],)), ValueError, r"gather\[0\]"),
    ("gather_tokens", lambda a: a.update(gather=(a["gather"][0], a["gather"][1][:, :19])), ValueError, r"gather\[1\]"),
    ("gather_rank1", lambda a: a.update(gather=(torch.randn(2),)), ValueError, r"gather\[0\]"),
    ("gather_device", lambda a: a.update(gather=(a["gather"][0].to("meta"),)), ValueError, r"gather\[0\]"),
    ("backend_unknown", lambda a: a.update(backend="tpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(case):
    name, breaks, error, argument = case
    args = _valid_args()
    breaks(args)
    with pytest.raises(error, match=argument):
        topk_select(**args)


def test_backends_and_explain(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    args = _valid_args()
    for backend in ("triton", "cuda", "cpu"):
        with pytest.raises(BackendUnavailableError, match=f"has no {backend} implementation"):
            topk_select(**args, backend=backend)
    expected = topk_select(**args, backend="reference")
    got = topk_select(**args)
    assert torch.equal(got[1], expected[1])
    text = rtdetr_kernels.explain("topk_select", **args)
    assert "* reference ok" in text and "has no triton implementation" in text
    assert "topk_select" in backends.registered_ops()
