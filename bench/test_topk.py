"""Microbenchmarks of top-K selection (pytest-benchmark): our backends against the codebases' own code.

Query selection (test_topk_select): logits [N, T, C] -> class max -> top-300 tokens -> gathers of the
post-LN memory [N, T, 256], the logits and the box logits [N, T, 4]; N in {1, 8, 32}, T = 8400 (640 px)
and 13125 (800 px), C = 80 (COCO) and 365 (Objects365), fp32/fp16/bf16; forward, and forward+backward
(the gradients of the three gathered tensors, as training uses them). Anchors: RT-DETR's code path
(rtdetr/decoder.py ``_select_topk``: ``topk(logits.max(-1).values)`` and three gathers) eager and under
torch.compile.

Post-processor (test_topk_postprocess): logits [N, 300, C] -> sigmoid -> top-300 of the 300 x C pairs
-> labels, queries, gathered boxes; forward. Anchors: RT-DETR's RTDETRPostProcessor path (sigmoid,
``topk(flatten(1))``, ``% C``, ``// C``, a gather), and rfdetr's full sort (``flatten(1).sort(descending=True)``
then the first 300).

On CPU a small subset runs (N = 1, T = 8400, C = 80, float32; the cpu backend against the eager
anchors, torch.compile skipped), and test_topk_select_paired calls ours and the eager path alternately
(the median of the per-round ratios, which a shared host's drifting speed does not bias). The GPU
runs the whole grid on the cuda and triton backends (CUDA-event medians). Every provider's outputs
are checked before it is timed: ours exactly against the reference backend, the anchors' selected
scores (sorted values, equal whatever the tie order) against ours.
"""

from __future__ import annotations

import functools

import pytest
import torch

import rtdetr_kernels
from rtdetr_kernels import backends
from rtdetr_kernels.topk import topk_select_flat, topk_select_reference

from conftest import budget_left, device_name, paired_ratios, quick, record_timing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K = 300
HIDDEN = 256


def _select_cases():
    if DEVICE == "cpu" or quick():
        return [(1, 8400, 80)]
    return [(n, t, c) for n in (1, 8, 32) for t in (8400, 13125) for c in (80, 365)]


def _post_cases():
    if DEVICE == "cpu" or quick():
        return [(1, 300, 80)]
    return [(n, 300, c) for n in (1, 8, 32) for c in (80, 365)]


SELECT_CASES = _select_cases()
POST_CASES = _post_cases()
DTYPES = [torch.float32] if DEVICE == "cpu" or quick() else [torch.float32, torch.float16, torch.bfloat16]
MODES = ["forward", "forward+backward"]


def _ours():
    call = backends.Call("topk_select", DEVICE, (torch.float32,))
    return [b for b in backends.implemented_backends("topk_select")
            if b != "reference" and backends.why_not(b, call) is None]


OURS = _ours()
SELECT_PROVIDERS = OURS + ["rtdetr-eager", "rtdetr-eager-compiled"]
POST_PROVIDERS = OURS + ["rtdetr-postprocessor", "rfdetr-full-sort"]


# --------------------------------------------------------------------------------------------
# The anchors: the codebases' code
# --------------------------------------------------------------------------------------------


def rtdetr_select(memory, logits, coords, k):
    """rtdetr/decoder.py RTDETRTransformer._select_topk, query_select_method 'default'."""
    _, ind = torch.topk(logits.max(-1).values, k, dim=-1)
    ind = ind.unsqueeze(-1)
    coords_k = coords.gather(1, ind.expand(-1, -1, coords.shape[-1]))
    logits_k = logits.gather(1, ind.expand(-1, -1, logits.shape[-1]))
    memory_k = memory.gather(1, ind.expand(-1, -1, memory.shape[-1]))
    return memory_k, logits_k, coords_k


def rtdetr_postprocess(logits, boxes, k):
    """RTDETRPostProcessor's focal-loss branch (rtdetr/model.py): sigmoid, topk over flatten(1)."""
    C = logits.shape[-1]
    scores, index = torch.topk(torch.sigmoid(logits).flatten(1), k, dim=-1)
    labels = index % C
    index = index // C
    return scores, labels, boxes.gather(1, index.unsqueeze(-1).expand(-1, -1, boxes.shape[-1]))


def rfdetr_postprocess(logits, boxes, k):
    """rfdetr's PostProcess: sigmoid, a full descending sort of the pairs, the first k."""
    C = logits.shape[-1]
    scores, index = torch.sigmoid(logits).flatten(1).sort(dim=1, descending=True)
    scores, index = scores[:, :k], index[:, :k]
    labels = index % C
    return scores, labels, boxes.gather(1, (index // C).unsqueeze(-1).expand(-1, -1, boxes.shape[-1]))


@functools.lru_cache(maxsize=None)
def _compiled_select():
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    return torch.compile(rtdetr_select)


def _select_function(provider):
    if provider == "rtdetr-eager":
        return rtdetr_select
    if provider == "rtdetr-eager-compiled":
        return _compiled_select()

    def ours(memory, logits, coords, k):
        return rtdetr_kernels.topk_select(logits, k, (memory, logits, coords), backend=provider)[2]

    return ours


def _post_function(provider):
    if provider == "rtdetr-postprocessor":
        return rtdetr_postprocess
    if provider == "rfdetr-full-sort":
        return rfdetr_postprocess

    def ours(logits, boxes, k):
        scores, labels, _, (g_boxes,) = topk_select_flat(logits, k, (boxes,), sigmoid=True, backend=provider)
        return scores, labels, g_boxes

    return ours


# --------------------------------------------------------------------------------------------
# Inputs, checks, timing
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _select_inputs(n, t, c, dtype):
    gen = torch.Generator().manual_seed(n * 100000 + t + c)
    memory = torch.randn(n, t, HIDDEN, generator=gen)
    logits = torch.randn(n, t, c, generator=gen) * 2 - 4
    coords = torch.randn(n, t, 4, generator=gen)
    coords[:, torch.randperm(t, generator=gen)[:316]] = float("inf")  # RT-DETR's invalid anchors at 640 px
    grads = [torch.randn(n, K, d, generator=gen) for d in (HIDDEN, c, 4)]
    return [x.to(DEVICE, dtype) for x in (memory, logits, coords, *grads)]


@functools.lru_cache(maxsize=None)
def _post_inputs(n, q, c, dtype):
    gen = torch.Generator().manual_seed(n * 1000 + q + c)
    logits = torch.randn(n, q, c, generator=gen) * 3 - 2
    boxes = torch.rand(n, q, 4, generator=gen)
    return logits.to(DEVICE, dtype), boxes.to(DEVICE, dtype)


def _check_select(provider, fn, memory, logits, coords):
    got = fn(memory, logits, coords, K)
    _, indices, _, want = topk_select_reference(logits, K, (memory, logits, coords))
    if provider in OURS:
        for g, w in zip(got, want):
            assert torch.equal(g, w), f"{provider}: gathered tensors differ from the reference"
    else:  # torch.topk's tie order is unspecified: compare the selected class maxima (sorted)
        assert torch.equal(got[1].max(-1).values.sort(dim=1, descending=True).values,
                           want[1].max(-1).values), f"{provider}: selected scores differ from the reference"


def _check_post(provider, fn, logits, boxes):
    scores, labels, g_boxes = fn(logits, boxes, K)
    want_scores, _, _, _ = topk_select_reference(torch.sigmoid(logits), K, (), pairs=True)
    assert torch.equal(scores, want_scores), f"{provider}: scores differ from the reference"
    assert labels.shape == (logits.shape[0], K) and g_boxes.shape == (logits.shape[0], K, 4)


def _select_runner(fn, inputs, mode):
    memory, logits, coords, *grads = inputs
    if mode == "forward":
        def run():
            with torch.no_grad():
                return fn(memory, logits, coords, K)
        return run
    leaves = [t.detach().clone().requires_grad_() for t in (memory, logits, coords)]

    def run():
        outs = fn(*leaves, K)
        return torch.autograd.grad(outs, leaves, grads, allow_unused=True)
    return run


def _record(benchmark, op, provider, mode, dtype, shape, run):
    record_timing(benchmark, run, DEVICE, op=op, provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""),
                  shape=shape)


def _skip(provider):
    if provider.endswith("-compiled") and DEVICE == "cpu":
        pytest.skip("torch.compile of the anchor runs on GPU only (its CPU compile takes minutes here)")
    if budget_left() <= 0:
        pytest.skip("benchmark time budget spent")


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: f"N{c[0]}-T{c[1]}-C{c[2]}")
@pytest.mark.parametrize("provider", SELECT_PROVIDERS)
def test_topk_select(benchmark, provider, case, dtype, mode):
    _skip(provider)
    n, t, c = case
    fn = _select_function(provider)
    inputs = _select_inputs(n, t, c, dtype)
    _check_select(provider, fn, *inputs[:3])
    _record(benchmark, "topk_select", provider, mode, dtype, {"N": n, "T": t, "C": c, "k": K, "hidden": HIDDEN},
            _select_runner(fn, inputs, mode))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", POST_CASES, ids=lambda c: f"N{c[0]}-Q{c[1]}-C{c[2]}")
@pytest.mark.parametrize("provider", POST_PROVIDERS)
def test_topk_postprocess(benchmark, provider, case, dtype):
    _skip(provider)
    n, q, c = case
    fn = _post_function(provider)
    logits, boxes = _post_inputs(n, q, c, dtype)
    _check_post(provider, fn, logits, boxes)

    def run():
        with torch.no_grad():
            return fn(logits, boxes, K)

    _record(benchmark, "topk_select_flat", provider, "forward", dtype, {"N": n, "Q": q, "C": c, "k": K}, run)


@pytest.mark.parametrize("mode", MODES)
def test_topk_select_paired(benchmark, mode):
    """CPU: ours (the cpu backend) and RT-DETR's eager path called alternately, N = 1, T = 8400, C = 80,
    float32: the median over rounds of eager_i / ours_i (> 1: ours is faster)."""
    if DEVICE != "cpu" or "cpu" not in OURS:
        pytest.skip("paired timing is for shared CPU hosts (CUDA events are steady)")
    n, t, c = 1, 8400, 80
    inputs = _select_inputs(n, t, c, torch.float32)
    runs = {}
    for provider in ("cpu", "rtdetr-eager"):
        fn = _select_function(provider)
        _check_select(provider, fn, *inputs[:3])
        runs[provider] = _select_runner(fn, inputs, mode)
    stats = paired_ratios(runs["cpu"], runs["rtdetr-eager"], DEVICE)
    benchmark.extra_info.update(
        op="topk_select", kind="paired", provider="cpu", anchor="rtdetr-eager", mode=mode, dtype="float32",
        shape={"N": n, "T": t, "C": c, "k": K, "hidden": HIDDEN}, device=device_name(DEVICE), **stats)
    benchmark.pedantic(runs["cpu"], rounds=3, iterations=1, warmup_rounds=0)
