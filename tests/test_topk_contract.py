"""topk_select's own contract: exact order on every backend (distinct values against torch.topk,
ties by lower index, +inf/-inf/NaN), gathers (inf copied as is, any dtype and rank), gradients
(against autograd of plain torch, only the needed ones), the RT-DETR shape, the post-processor form.

What every op shares (bad inputs and their messages, empty batch, strides, opcheck, gradcheck,
torch.compile, determinism, autocast, backend selection) is in test_op_contract.py, driven by
op_testers/topk_select.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from helpers import OpCalls, backend_params
from op_testers import recorded
from op_testers.topk_select import rtdetr_like
from rtdetr_kernels import BackendUnavailableError
from rtdetr_kernels.topk import topk_select, topk_select_flat, topk_select_reference

INF, NAN = math.inf, math.nan
BACKENDS = backend_params("topk_select")


@pytest.fixture
def select(device, backend):
    """topk_select(logits, k) on the test's device and backend, results back on the CPU."""
    def run(logits, k):
        try:
            scores, indices, _ = topk_select(logits.to(device), k, backend=backend)
        except BackendUnavailableError as exc:  # a dtype this backend does not serve
            pytest.skip(str(exc))
        return scores.cpu(), indices.cpu(), ()

    return run


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
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_permutation_rows_match_torch_topk(select, T, C, k, dtype):
    """Distinct values (permutations of arange, exact in every dtype at T <= 256): exact indices."""
    N = 3
    token_scores = torch.stack([torch.randperm(T) for _ in range(N)]).to(dtype) - T // 2
    logits = _logits_with_class_max(token_scores.double(), C).to(dtype)
    scores, indices, gathered = select(logits, k)
    expected = torch.topk(logits.max(-1).values, k, dim=1)
    assert indices.dtype == torch.int64 and scores.dtype == dtype and gathered == ()
    assert torch.equal(indices, expected.indices)
    assert torch.equal(scores, expected.values)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_ties_go_to_the_lower_index(select):
    N, T, C, k = 2, 40, 3, 11
    constant = torch.full((N, T, C), 0.5)
    _, indices, _ = select(constant, k)
    assert torch.equal(indices, torch.arange(k).expand(N, k))
    # many ties among few values: the order is the oracle's, the values are torch.topk's
    token_scores = torch.randint(-3, 4, (N, T)).float()
    logits = _logits_with_class_max(token_scores, C)
    scores, indices, _ = select(logits, k)
    for n in range(N):
        assert indices[n].tolist() == _oracle_order(token_scores[n].tolist(), k)
    torch.testing.assert_close(scores, torch.topk(token_scores, k, dim=1).values, atol=0, rtol=0)
    # -0.0 and +0.0 are one value
    signed_zeros = torch.tensor([[0.0, -0.0, 0.0, -0.0]]).unsqueeze(-1)
    assert select(signed_zeros, 4)[1].tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_infinities_and_nan(select):
    row = [1.0, NAN, INF, -INF, 1.0, -2.0, NAN, INF, -INF, 0.5]
    logits = torch.tensor([row, row[::-1]]).unsqueeze(-1)
    scores, indices, _ = select(logits, len(row))
    for n, r in enumerate((row, row[::-1])):
        assert indices[n].tolist() == _oracle_order(r, len(row))
    assert scores[0, :2].tolist() == [INF, INF] and torch.isnan(scores[0, -2:]).all()
    # a NaN anywhere in a token's classes makes its score NaN: it never displaces a real candidate
    logits = torch.randn(1, 6, 4)
    logits[0, 2, 1] = NAN
    logits[0, 4] = -INF
    _, indices, _ = select(logits, 6)
    assert indices[0, -2:].tolist() == [4, 2]
    # +inf logits (as in the official inf anchors' neighbourhood) rank first, in index order
    logits = torch.randn(2, 50, 3)
    logits[:, [31, 7, 44], 1] = INF
    _, indices, _ = select(logits, 5)
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


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gather_copies_every_tensor_as_is(device, backend):
    N, T, C, k = 2, 60, 5, 20
    invalid = list(range(0, 60, 3))
    memory, logits, coords = rtdetr_like(71, N, T, C, 16, device, invalid=invalid)
    logits[:, invalid] += 2  # the invalid anchors are among the chosen
    extra = tuple(t.to(device) for t in (torch.randint(0, 100, (N, T)), torch.rand(N, T) > 0.5,
                                         torch.randn(N, T, 2, 3, dtype=torch.float64)))
    scores, indices, gathered = topk_select(logits, k, (memory, logits, coords) + extra, backend=backend)
    batch = torch.arange(N, device=device).unsqueeze(1)
    for source, got in zip((memory, logits, coords) + extra, gathered):
        assert got.dtype == source.dtype and got.shape == (N, k, *source.shape[2:])
        assert torch.equal(got, source[batch, indices])
    assert torch.isinf(gathered[2]).any() and (gathered[2][torch.isinf(gathered[2])] > 0).all()
    # a non-contiguous source gives the same
    memory_t = memory.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(topk_select(logits, k, (memory_t,), backend=backend)[2][0], gathered[0])


def _plain_torch(logits, indices, sources):
    """What RT-DETR writes, at given indices: autograd of this is the spec of the backward."""
    token_scores = logits.max(-1).values
    scores = token_scores.gather(1, indices)
    gathered = [s.gather(1, indices.reshape(*indices.shape, *([1] * (s.dim() - 2))).expand(*indices.shape, *s.shape[2:]))
                for s in sources]
    return [scores] + gathered


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_matches_autograd_of_plain_torch(device, backend):
    N, T, C, k = 2, 70, 6, 25
    memory, logits, coords = rtdetr_like(72, N, T, C, 8, device, dtype=torch.float64, invalid=[1, 5])
    ours = [t.clone().requires_grad_() for t in (logits, memory, coords)]
    plain = [t.clone().requires_grad_() for t in (logits, memory, coords)]
    try:
        scores, indices, gathered = topk_select(ours[0], k, (ours[1], ours[0], ours[2]), backend=backend)
    except BackendUnavailableError as exc:  # float64 (exact comparison) is not served everywhere
        pytest.skip(str(exc))
    outputs = [scores, *gathered]
    grads = [torch.randn_like(o) for o in outputs]
    torch.autograd.backward(outputs, grads)
    torch.autograd.backward(_plain_torch(plain[0], indices, (plain[1], plain[0], plain[2])), grads)
    for got, want in zip(ours, plain):
        torch.testing.assert_close(got.grad, want.grad, atol=0, rtol=0)


def test_backward_computes_only_the_needed_grads():
    memory, logits, coords = rtdetr_like(73, 2, 30, 4, 8)
    memory.requires_grad_()
    with OpCalls("topk_select_backward") as spy:  # the spy also routes the forward through the registered op
        scores, _, (g_memory, g_coords) = topk_select(logits, 10, (memory, coords))
        (g_memory * torch.randn_like(g_memory)).sum().backward()
    needs = [(recorded("topk_select_backward", call, "need_logits"),
              list(recorded("topk_select_backward", call, "need_gather"))) for call in spy.calls]
    assert needs == [(False, [True, False])]
    assert memory.grad is not None and logits.grad is None and coords.grad is None


def test_rtdetr_shapes_match_torch_topk():
    """[N, 8400, 80] logits, k = 300, gather of output_memory, logits and inf-holding box logits."""
    N, T, C, k = 2, 8400, 80, 300
    invalid = torch.randperm(T)[:316].tolist()  # the 80x80 level's border ring at 640 px
    memory, _, coords = rtdetr_like(74, N, T, C, 256, invalid=invalid)
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


def test_torch_compile_fullgraph_auto_backend():
    torch._dynamo.reset()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def select_queries(logits):
        return topk_select(logits, 3)[0]

    logits = torch.randn(2, 10, 4)
    torch.testing.assert_close(select_queries(logits), topk_select(logits, 3)[0])




# --------------------------------------------------------------------------------------------
# The post-processor with the sigmoid inside
# --------------------------------------------------------------------------------------------


def _flat(scores, k, gather=(), backend=None, **kw):
    try:
        return topk_select_flat(scores, k, gather, backend=backend, **kw)
    except BackendUnavailableError as exc:  # a dtype this backend does not serve
        pytest.skip(str(exc))


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_post_processor_sigmoid_matches_rtdetr_postprocessor(device, backend):
    """RT-DETR's RTDETRPostProcessor (sigmoid, topk over flatten(1), label = idx % C, query = idx // C,
    gather of the scaled xyxy boxes) against topk_select_flat(logits, sigmoid=True): distinct
    probabilities, so the indices, labels, boxes and scores are exactly equal."""
    from rtdetr.model import RTDETRPostProcessor
    import torchvision

    N, Q, C, k = 2, 30, 7, 40
    gen = torch.Generator().manual_seed(80)
    logits = (torch.stack([torch.randperm(Q * C, generator=gen) for _ in range(N)]).float() / (Q * C) * 12 - 6).reshape(N, Q, C)
    boxes = torch.rand(N, Q, 4, generator=gen)
    sizes = torch.tensor([[640, 480], [320, 800]])
    post = RTDETRPostProcessor(num_classes=C, num_top_queries=k).deploy()
    labels, want_boxes, want_scores = post({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    bbox = torchvision.ops.box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy") * sizes.repeat(1, 2).unsqueeze(1)
    scores, got_labels, queries, (got_boxes,) = _flat(logits.to(device), k, (bbox.to(device),), backend, sigmoid=True)
    assert torch.equal(got_labels.cpu(), labels) and torch.equal(got_boxes.cpu(), want_boxes)
    assert torch.equal(scores.cpu(), want_scores)
    assert torch.equal(queries.cpu(), torch.topk(torch.sigmoid(logits).flatten(1), k).indices // C)


@pytest.mark.parametrize("dtype,saturated", [(torch.float32, 17.5), (torch.float16, 9.0)])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_post_processor_sigmoid_ties_when_saturated(device, backend, dtype, saturated):
    """Logits above ~17 (float32; ~8.3 in float16) all have sigmoid exactly 1.0: ranked as probabilities they
    are equal, ordered by lower (query, class), which is rfdetr's stable full sort; ranking the logits
    instead would order them by logit."""
    N, Q, C, k = 2, 25, 6, 30
    gen = torch.Generator().manual_seed(81)
    logits = torch.randn(N, Q, C, generator=gen) * 2
    hot = torch.randperm(Q * C, generator=gen)[:20]  # 20 saturated pairs, distinct logits
    logits.view(N, -1)[:, hot] = saturated + torch.rand(N, 20, generator=gen) * 3
    logits = logits.to(dtype)
    probabilities = torch.sigmoid(logits)
    assert (probabilities.view(N, -1)[:, hot] == 1).all()
    scores, labels, queries, _ = _flat(logits.to(device), k, (), backend, sigmoid=True)
    flat = (queries * C + labels).cpu()
    full_sort = probabilities.flatten(1).float().argsort(dim=1, descending=True, stable=True)[:, :k]  # rfdetr
    assert torch.equal(flat, full_sort)
    assert torch.equal(flat[:, :20], hot.sort().values.expand(N, 20))  # the saturated ones, in index order
    assert torch.equal(scores.cpu(), probabilities.flatten(1).gather(1, flat))
    assert not torch.equal(flat[:, :20], logits.flatten(1).float().topk(20).indices)  # logits rank otherwise


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_post_processor_sigmoid_gradients(device, backend):
    N, Q, C, k = 2, 12, 5, 15
    logits = torch.randn(N, Q, C, dtype=torch.float64, device=device)
    boxes = torch.randn(N, Q, 4, dtype=torch.float64, device=device)
    ours = [t.clone().requires_grad_() for t in (logits, boxes)]
    plain = [t.clone().requires_grad_() for t in (logits, boxes)]
    scores, labels, queries, (g_boxes,) = _flat(ours[0], k, (ours[1],), backend, sigmoid=True)
    grads = [torch.randn_like(scores), torch.randn_like(g_boxes)]
    torch.autograd.backward([scores, g_boxes], grads)
    want_scores = torch.sigmoid(plain[0]).flatten(1).gather(1, queries * C + labels)
    want_boxes = plain[1].gather(1, queries.unsqueeze(-1).expand(N, k, 4))
    torch.autograd.backward([want_scores, want_boxes], grads)
    for got, want in zip(ours, plain):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-15, rtol=0)


def test_post_processor_sigmoid_validates_first():
    scores = torch.randn(2, 10, 3)
    with pytest.raises(TypeError, match="sigmoid"):
        topk_select_flat(scores, 5, sigmoid="yes")
    with pytest.raises(TypeError, match="scores"):  # before torch.sigmoid sees an integer tensor
        topk_select_flat(scores.long(), 5, sigmoid=True)
    with pytest.raises(ValueError, match="k"):
        topk_select_flat(scores, 31, sigmoid=True)
