"""Microbenchmarks of aifi_attention and of its attention core (pytest-benchmark): ours against the anchors.

Shapes: RT-DETR's encoder (AIFI: L = 400 tokens at 640 px, pos [1, L, E]) and decoder self-attention
(L = 300 queries, and L = 500 with denoising queries under RT-DETR's boolean mask, pos [N, L, E]),
E = 256, 8 heads of 32, batch N in {1, 8, 32}. Modes: forward, backward (all grads from a retained
graph), forward+backward.

test_aifi_attention times the whole op. Providers: nn.MultiheadAttention as RT-DETR calls it
(``mha(x + pos, x + pos, x, attn_mask, need_weights=False)``) and as ultralytics does (need_weights
left on: the slow path), torch.compile of the op's reference, the reference itself, and every other
backend the registry has for the op that runs here. test_attention_core times the core alone
(softmax(q k^T / sqrt(D) + mask) v and its grads): ours (the triton kernels, on q, k, v laid out as the
op has them: views of the [N, L, 2E] and [N, L, E] projections) against SDPA with each backend pinned
(flash, efficient, cudnn, math; on contiguous [N, H, L, D]); a pinned backend that cannot serve a
case (flash and masks, cudnn at some lengths) is skipped with its error.

Every provider's output and gradients are checked against float64 before it is timed; an anchor that
gets them wrong is skipped with the error, ours fails. On CPU only float32 at N in {1, 8} runs (the
500-query decoder at N = 1), the core not at all (the triton kernels need a GPU; the cpu backend's core
is SDPA itself), torch.compile at the smallest case only. GPU times are CUDA-event medians
(extra_info['cuda_event_median_ms']); CPU times medians of about 1.5 s of rounds, with the minimum in
extra_info['min_ms'].
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

import rtdetr_kernels
from rtdetr_kernels import backends
from rtdetr_kernels.attention.reference import aifi_attention_reference

from conftest import budget_left, device_name, paired_ratios, quick, record_timing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
E, HEADS = 256, 8
MODES = ["forward", "backward", "forward+backward"]


def _cases():
    """(name, N, L); the name says which pos layout and mask the case has."""
    cases = []
    for name, L in (("encoder", 400), ("decoder", 300), ("decoder-denoising", 500)):
        for n in (1, 8, 32):
            if quick() and (n == 32 or name == "decoder-denoising"):
                continue
            if DEVICE == "cpu" and (n == 32 or (name == "decoder-denoising" and n != 1)):
                continue
            cases.append((name, n, L))
    return cases


CASES = _cases()
DTYPES = [torch.float32] if quick() or DEVICE == "cpu" else [torch.float32, torch.float16, torch.bfloat16]
# RT-DETR's 3 denoising groups of 2 x 30 queries (here 200 denoising queries in 2 groups of 100, so
# that L = 500 = 200 + 300 matching queries): each group sees only itself, the matching queries no group
DENOISING_GROUPS, DENOISING_GROUP_SIZE = 2, 100


def _denoising_mask(L: int) -> torch.Tensor:
    dn = DENOISING_GROUPS * DENOISING_GROUP_SIZE
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[dn:, :dn] = True
    for g in range(DENOISING_GROUPS):
        rows = slice(g * DENOISING_GROUP_SIZE, (g + 1) * DENOISING_GROUP_SIZE)
        mask[rows, :g * DENOISING_GROUP_SIZE] = True
        mask[rows, (g + 1) * DENOISING_GROUP_SIZE:dn] = True
    return mask


def _call(dtype):
    return backends.Call("aifi_attention", DEVICE, (dtype,) * 6,
                         (("num_heads", HEADS), ("head_dim", E // HEADS), ("mask", "none")))


def _ours():
    """Every backend with a record for the op that runs here (the reference is timed as an anchor)."""
    return [b for b in backends.implemented_backends("aifi_attention")
            if b != "reference" and backends.why_not(b, _call(torch.float32)) is None]


OP_ANCHORS = ["nn-mha", "nn-mha-need-weights", "reference", "reference-compiled"]
OP_PROVIDERS = _ours() + OP_ANCHORS
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}
CORE_PROVIDERS = (["triton"] if "triton" in OP_PROVIDERS else []) + list(SDPA_BACKENDS)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _op_inputs(name, n, L, dtype):
    """x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, mask, grad_output."""
    gen = torch.Generator().manual_seed(n * 1000 + L)
    scale = E ** -0.5
    x = torch.randn(n, L, E, generator=gen)
    pos = torch.randn(1 if name == "encoder" else n, L, E, generator=gen)
    params = [torch.randn(3 * E, E, generator=gen) * scale, torch.randn(3 * E, generator=gen) * 0.1,
              torch.randn(E, E, generator=gen) * scale, torch.randn(E, generator=gen) * 0.1]
    grad = torch.randn(n, L, E, generator=gen)
    mask = _denoising_mask(L).to(DEVICE) if name == "decoder-denoising" else None
    return (*(t.to(DEVICE, dtype) for t in (x, pos, *params)), mask, grad.to(DEVICE, dtype))


@functools.lru_cache(maxsize=None)
def _core_inputs(name, n, L, dtype):
    """q, k, v, grad_output [N, L, H, D] laid out as the op has them, the mask, and an SDPA copy [N, H, L, D]."""
    gen = torch.Generator().manual_seed(n * 1000 + L + 1)
    D = E // HEADS
    qk = torch.randn(n, L, 2 * E, generator=gen).to(DEVICE, dtype)
    v = torch.randn(n, L, E, generator=gen).to(DEVICE, dtype)
    grad = torch.randn(n, L, HEADS, D, generator=gen).to(DEVICE, dtype)
    q, k = (t.unflatten(-1, (HEADS, D)) for t in qk.split(E, -1))
    mask = _denoising_mask(L).to(DEVICE) if name == "decoder-denoising" else None
    return q, k, v.unflatten(-1, (HEADS, D)), grad, mask


# --------------------------------------------------------------------------------------------
# Providers: each builds (call() -> output, leaves) on fresh leaves
# --------------------------------------------------------------------------------------------


def _compiled_reference():
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    return torch.compile(aifi_attention_reference, dynamic=False)


_COMPILED = {}


def _op_setup(provider, inputs, grad: bool):
    *tensors, mask, _ = inputs
    leaves = [t.detach().clone().requires_grad_(grad) for t in tensors]
    x, pos, in_w, in_b, out_w, out_b = leaves
    if provider.startswith("nn-mha"):
        module = torch.nn.MultiheadAttention(E, HEADS, batch_first=True, device=DEVICE, dtype=x.dtype)
        module.in_proj_weight, module.in_proj_bias = torch.nn.Parameter(in_w), torch.nn.Parameter(in_b)
        module.out_proj.weight, module.out_proj.bias = torch.nn.Parameter(out_w), torch.nn.Parameter(out_b)
        leaves = [x, pos, module.in_proj_weight, module.in_proj_bias, module.out_proj.weight, module.out_proj.bias]
        need_weights = provider.endswith("need-weights")

        def call():
            q = x + pos
            return module(q, q, x, attn_mask=mask, need_weights=need_weights)[0]
    elif provider == "reference-compiled":
        if provider not in _COMPILED:
            _COMPILED[provider] = _compiled_reference()
        compiled = _COMPILED[provider]

        def call():
            return compiled(x, pos, in_w, in_b, out_w, out_b, HEADS, mask)
    else:
        def call():
            return rtdetr_kernels.aifi_attention(x, pos, in_w, in_b, out_w, out_b, HEADS, mask, backend=provider)
    return call, leaves


def _core_setup(provider, inputs, grad: bool):
    q, k, v, _, mask = inputs
    if provider == "triton":
        from rtdetr_kernels.attention import triton as attn_triton

        leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]

        def call():
            return attn_triton.attention(*(t.transpose(1, 2) for t in leaves), mask).transpose(1, 2)
        return call, leaves
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, SDPA_BACKENDS[provider])
    leaves = [t.detach().transpose(1, 2).contiguous().requires_grad_(grad) for t in (q, k, v)]
    allowed = None if mask is None else ~mask  # SDPA's boolean masks mark the allowed pairs

    def call():
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(*leaves, attn_mask=allowed).transpose(1, 2)
    return call, leaves


# --------------------------------------------------------------------------------------------
# Checks and timing
# --------------------------------------------------------------------------------------------

TOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 1e-1}  # relative to the largest magnitude


def _core_reference(q, k, v, mask):
    """[N, L, H, D] in float64."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _check(provider, setup, inputs, reference, ours, dtype):
    """Output and every gradient against float64 (one image), before anything is timed."""
    one = [t[:1] if isinstance(t, torch.Tensor) and t.dim() >= 3 and t.shape[0] > 1 else t for t in inputs]
    call, leaves = setup(provider, one, True)
    grad = one[-2] if setup is _core_setup else one[-1]
    try:
        out = call()
        grads = torch.autograd.grad(out, leaves, grad)
    except RuntimeError as exc:
        if ours:
            raise
        pytest.skip(f"{provider} cannot serve this case: {str(exc).splitlines()[0][:200]}")
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad.double())
    for name, got, want in zip(["out"] + [f"grad{i}" for i in range(len(leaves))], (out,) + grads, (ref,) + ref_grads):
        scale = want.abs().max().item() or 1.0
        err = (got.double() - want).abs().max().item() / scale
        if not err < TOL[dtype]:
            message = f"{provider} {name}: relative error {err:.2e} >= {TOL[dtype]} before timing"
            if ours:
                raise AssertionError(message)
            pytest.skip(message)


def _runner(call, leaves, grad, mode):
    if mode == "forward":
        def run():
            with torch.no_grad():
                return call()
    elif mode == "backward":
        out = call()

        def run():
            return torch.autograd.grad(out, leaves, grad, retain_graph=True)
    else:
        def run():
            return torch.autograd.grad(call(), leaves, grad)
    return run


def _time(benchmark, run, info):
    record_timing(benchmark, run, DEVICE, **info)


def _skip_unless_timed(provider, case):
    if provider == "reference-compiled" and DEVICE == "cpu" and case != CASES[0]:
        pytest.skip("torch.compile of the reference runs on CPU at the smallest case only")
    if budget_left() <= 0:
        pytest.skip("benchmark time budget spent")


def _shape_info(case):
    name, n, L = case
    return {"case": name, "N": n, "L": L, "E": E, "heads": HEADS, "mask": "denoising" if name == "decoder-denoising" else "none"}


PARAMS = [pytest.mark.parametrize("mode", MODES),
          pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", "")),
          pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-N{c[1]}-L{c[2]}")]


def _over_cases(test):
    for mark in PARAMS:
        test = mark(test)
    return test


@_over_cases
@pytest.mark.parametrize("provider", OP_PROVIDERS)
def test_aifi_attention(benchmark, provider, case, dtype, mode):
    _skip_unless_timed(provider, case)
    if provider not in OP_ANCHORS and backends.why_not(provider, _call(dtype)) is not None:
        pytest.skip(f"{provider}: {backends.why_not(provider, _call(dtype))}")
    inputs = _op_inputs(*case, dtype)
    mask = inputs[6]
    _check(provider, _op_setup, inputs,
           lambda *t: aifi_attention_reference(*t, HEADS, mask), provider not in OP_ANCHORS, dtype)
    call, leaves = _op_setup(provider, inputs, mode != "forward")
    _time(benchmark, _runner(call, leaves, inputs[-1], mode),
          dict(op="aifi_attention", provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""),
               shape=_shape_info(case)))


@_over_cases
@pytest.mark.parametrize("provider", CORE_PROVIDERS)
def test_attention_core(benchmark, provider, case, dtype, mode):
    if DEVICE == "cpu":
        pytest.skip("the attention core is timed on GPU only (ours is the triton kernels; the cpu backend's is SDPA)")
    _skip_unless_timed(provider, case)
    inputs = _core_inputs(*case, dtype)
    mask = inputs[-1]
    if provider == "triton":  # its leaves are [N, L, H, D] (and its output), SDPA's [N, H, L, D] (output [N, L, H, D])
        reference = lambda q, k, v: _core_reference(q, k, v, mask)  # noqa: E731
    else:
        reference = lambda q, k, v: _core_reference(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)  # noqa: E731
    _check(provider, _core_setup, inputs, reference, provider == "triton", dtype)
    call, leaves = _core_setup(provider, inputs, mode != "forward")
    _time(benchmark, _runner(call, leaves, inputs[3], mode),
          dict(op="attention_core", provider=provider, mode=mode, dtype=str(dtype).replace("torch.", ""),
               shape=_shape_info(case)))


PAIRED_CASES = [("decoder", 1, 300), ("encoder", 1, 400), ("decoder-denoising", 1, 500), ("decoder", 8, 300),
                ("encoder", 8, 400)]


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("anchor", ["nn-mha", "nn-mha-need-weights"])
@pytest.mark.parametrize("case", PAIRED_CASES, ids=lambda c: f"{c[0]}-N{c[1]}-L{c[2]}")
def test_aifi_attention_paired(benchmark, case, anchor, mode):
    """CPU: the cpu backend and nn.MultiheadAttention (as RT-DETR calls it, need_weights=False, and as
    ultralytics does, need_weights on) called alternately, float32: the median over rounds of anchor_i /
    ours_i (> 1: ours is faster), which a shared host's drifting speed does not bias."""
    if DEVICE != "cpu" or "cpu" not in OP_PROVIDERS:
        pytest.skip("paired timing is for shared CPU hosts (CUDA events are steady)")
    if budget_left() <= 0:
        pytest.skip("benchmark time budget spent")
    inputs = _op_inputs(*case, torch.float32)
    mask = inputs[6]
    runs = {}
    for provider in ("cpu", anchor):
        _check(provider, _op_setup, inputs, lambda *t: aifi_attention_reference(*t, HEADS, mask), provider == "cpu",
               torch.float32)
        call, leaves = _op_setup(provider, inputs, mode != "forward")
        runs[provider] = _runner(call, leaves, inputs[-1], mode)
    stats = paired_ratios(runs["cpu"], runs[anchor], DEVICE)
    benchmark.extra_info.update(op="aifi_attention", kind="paired", provider="cpu", anchor=anchor, mode=mode,
                                dtype="float32", shape=_shape_info(case), device=device_name(DEVICE), **stats)
    benchmark.pedantic(runs["cpu"], rounds=3, iterations=1, warmup_rounds=0)
