"""aifi_attention's cuda backend (csrc/attention/ core, kernels/attention/cuda.py host side), GPU only.

Against the float64 reference on the same (rounded) inputs, output and every gradient:
- head dims 16, 32, 64 (tensor-core path for fp16/bf16) and 24 (the generic SIMT path), lengths 1 to
  1000 around the 32-row and 64-row tile edges (7, 97, 300, 400, 401, 500, 1000);
- masks: none, RT-DETR's denoising bool mask, an additive float mask, per-head masks, a fully
  blocked query row (output = out_proj_bias exactly, finite gradients, no gradient through it);
- fp16 / bf16 / fp32, each within 2x PyTorch's own error in that dtype (nn.MultiheadAttention, or
  PyTorch's math attention in that dtype where MHA cannot express the case) plus 1e-5 of the scale.
Also: CUDA-graph capture and replay, bitwise-equal repeated backwards, strided and misaligned core
inputs, and the core op's own argument checks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import cuda_graph_replays, deterministic_algorithms, pair_skip_reason
from rtdetr_kernels import backends
from rtdetr_kernels.attention import aifi_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the cuda backend's kernels need a GPU")

TINY = 1e-5  # relative to the largest reference magnitude
NAMES = ["out", "x", "pos", "in_w", "in_b", "out_w", "out_b"]
LENGTHS = [1, 7, 97, 300, 400, 401, 500, 1000]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _needs_cuda_backend():
    reason = pair_skip_reason("aifi_attention", "cuda", "cuda")
    if reason is not None:
        pytest.skip(reason)


def _params(E, gen):
    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    return [randn(3 * E, E, scale=E ** -0.5), randn(3 * E, scale=0.5), randn(E, E, scale=E ** -0.5), randn(E, scale=0.5)]


def _inputs(N, L, E, seed=0):
    """fp64 x [N, L, E], pos [1, L, E], nn.MultiheadAttention-shaped params with non-zero biases, grad_out."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, L, E, generator=gen, dtype=torch.float64)
    pos = torch.randn(1, L, E, generator=gen, dtype=torch.float64)
    grad = torch.randn(N, L, E, generator=gen, dtype=torch.float64)
    return [x, pos, *_params(E, gen)], grad


def denoising_mask(L, groups=4):
    """RT-DETR's contrastive-denoising mask (True = blocked): the last ~2/3 are matching queries that
    cannot see the denoising ones; each denoising group sees only itself and the matching queries."""
    size = max(1, (L // 3) // groups)
    dn = size * groups if L >= 3 * groups else 0
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[dn:, :dn] = True
    for g in range(groups if dn else 0):
        lo, hi = g * size, (g + 1) * size
        mask[lo:hi, :lo] = True
        mask[lo:hi, hi:dn] = True
    return mask


def _mask(kind, N, H, L, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000)
    if kind == "none":
        return None
    if kind == "denoising":
        return denoising_mask(L)
    blocked = torch.rand(L, L, generator=gen) < 0.3
    blocked[:, 0] = False  # every row sees a key (no fully blocked row in these)
    if kind == "bool":
        return blocked
    if kind == "additive":
        return torch.randn(L, L, generator=gen).masked_fill(blocked, float("-inf"))
    if kind == "additive_per_head":
        blocked = torch.rand(N * H, L, L, generator=gen) < 0.3
        blocked[..., 0] = False
        return torch.randn(N * H, L, L, generator=gen).masked_fill(blocked, float("-inf"))
    if kind == "bool_per_head":
        blocked = torch.rand(N * H, L, L, generator=gen) < 0.3
        blocked[..., 0] = False
        return blocked
    raise ValueError(kind)


def _leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _ours(tensors, H, mask, grad, backend="cuda"):
    leaves = _leaves(tensors)
    out = aifi_attention(leaves[0], leaves[1], *leaves[2:], H, mask, backend=backend)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _torch_mha(tensors, H, mask, grad):
    """nn.MultiheadAttention as RT-DETR calls it, in the inputs' dtype (SDPA inside)."""
    x, pos, *params = _leaves(tensors)
    E = x.shape[-1]
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True, device=x.device, dtype=x.dtype)
    with torch.no_grad():
        for p, v in zip((mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias), params):
            p.copy_(v)
    if mask is not None and mask.is_floating_point():
        mask = mask.to(x.dtype)
    q = x + pos
    out = mha(q, q, x, attn_mask=mask, need_weights=False)[0]
    out.backward(grad.to(out.dtype))
    return [out.detach(), x.grad, pos.grad, mha.in_proj_weight.grad, mha.in_proj_bias.grad, mha.out_proj.weight.grad,
            mha.out_proj.bias.grad]


def _torch_math(tensors, H, mask, grad):
    """PyTorch's math attention in the inputs' dtype, with the reference's rule for a fully blocked row
    (SDPA's fused kernels do not all define it)."""
    leaves = _leaves(tensors)
    x, pos, in_w, in_b, out_w, out_b = leaves
    N, L, E = x.shape
    D = E // H
    qk_in = x + pos
    w_q, w_k, w_v = in_w.chunk(3)
    b_q, b_k, b_v = in_b.chunk(3)

    def heads(t):
        return t.reshape(N, L, H, D).transpose(1, 2)

    q, k, v = heads(F.linear(qk_in, w_q, b_q)), heads(F.linear(qk_in, w_k, b_k)), heads(F.linear(x, w_v, b_v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    if mask is not None:
        m = mask if mask.dim() == 2 else mask.reshape(N, H, L, L)
        scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m.to(scores.dtype)
    blocked = (scores == float("-inf")).all(-1, keepdim=True)
    scores = torch.where(blocked, torch.zeros_like(scores), scores)
    weights = torch.where(blocked, torch.zeros_like(scores), torch.softmax(scores, -1))
    out = F.linear((weights @ v).transpose(1, 2).reshape(N, L, E), out_w, out_b)
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _check_parity(N, L, D, H, dtype, mask_kind, seed=0, torch_impl=_torch_mha):
    E = D * H
    tensors64, grad = _inputs(N, L, E, seed)
    low = [t.to("cuda", dtype) for t in tensors64]
    rounded = [t.double() for t in low]  # the reference sees the same rounded inputs
    grad = grad.cuda()
    mask = _mask(mask_kind, N, H, L, seed)
    mask = None if mask is None else mask.cuda()
    reference = _ours(rounded, H, mask, grad, backend="reference")
    got = _ours(low, H, mask, grad)
    theirs = torch_impl(low, H, mask, grad)
    assert got[0].dtype == dtype and got[0].shape == (N, L, E)
    _compare(got, theirs, reference)
    return got


def _compare(got, theirs, reference):
    """|ours - ref64| <= 2 |torch - ref64| + TINY * scale per tensor. pos's scale is also x's: both are
    gradients of the same tokens, and pos's is exactly 0 at L = 1 (softmax over one key is constant),
    where both implementations leave only rounding noise."""
    scales = {name: r.abs().max().item() for name, r in zip(NAMES, reference)}
    scales["pos"] = max(scales["pos"], scales["x"])
    for name, g, t, r in zip(NAMES, got, theirs, reference):
        assert g.dtype == t.dtype and g.shape == r.shape, name
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        err = (g.double() - r).abs().max().item()
        torch_err = (t.double() - r).abs().max().item()
        assert err <= 2 * torch_err + TINY * scales[name], \
            f"{name}: error {err:.3g} vs torch's {torch_err:.3g} (scale {scales[name]:.3g})"


# --------------------------------------------------------------------------------------------
# Parity with the fp64 reference, within 2x PyTorch's own error
# --------------------------------------------------------------------------------------------


# every length at RT-DETR's head dim (32) and the generic path's (24); the tile edges at 16 and 64
SIZES = [(D, L) for D in (32, 24) for L in LENGTHS] + [(D, L) for D in (16, 64) for L in (1, 97, 401, 1000)]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("D,L", SIZES, ids=[f"D{d}-L{length}" for d, length in SIZES])
def test_no_mask_matches_reference(D, L, dtype):
    _check_parity(2, L, D, 8 if D <= 32 else 4, dtype, "none", seed=L + D)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("L", [97, 401, 500])
@pytest.mark.parametrize("mask_kind", ["denoising", "bool", "additive", "bool_per_head", "additive_per_head"])
@pytest.mark.parametrize("D", [32, 24], ids=lambda d: f"D{d}")
def test_masks_match_reference(D, mask_kind, L, dtype):
    _check_parity(2, L, D, 8, dtype, mask_kind, seed=L)


def test_batch_one_encoder_shape_and_odd_batch():
    """RT-DETR's AIFI at 640 px (B = 1, L = 400, 8 x 32) and an odd batch of the decoder's 300 queries."""
    _check_parity(1, 400, 32, 8, torch.float16, "none")
    _check_parity(3, 300, 32, 8, torch.bfloat16, "denoising")


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("D", [32, 24], ids=lambda d: f"D{d}")
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_fully_blocked_rows_attend_to_nothing(kind, D, dtype):
    """A query that sees no key: output = out_proj_bias exactly, no NaN anywhere, grads as the reference
    (which passes no gradient through that row's attention)."""
    N, L, H = 2, 77, 8
    E = D * H
    tensors64, grad = _inputs(N, L, E, seed=5)
    gen = torch.Generator().manual_seed(6)
    blocked = torch.rand(L, L, generator=gen) < 0.3
    blocked[:, 0] = False
    rows = [3, 40, L - 1]  # in the first tile, in the middle, and the last row (past a tile edge)
    blocked[rows] = True
    mask = blocked if kind == "bool" else torch.randn(L, L, generator=gen).masked_fill(blocked, float("-inf"))
    mask = mask.cuda()
    low = [t.to("cuda", dtype) for t in tensors64]
    rounded = [t.double() for t in low]
    grad = grad.cuda()
    reference = _ours(rounded, H, mask, grad, backend="reference")
    got = _ours(low, H, mask, grad)
    theirs = _torch_math(low, H, mask, grad)
    out_b = low[5]
    for r in rows:
        assert torch.equal(got[0][:, r], out_b.expand(N, E)), f"row {r}: expected out_proj_bias exactly"
    _compare(got, theirs, reference)


def test_every_row_blocked():
    N, L, H, D = 2, 33, 4, 16
    tensors64, grad = _inputs(N, L, D * H, seed=7)
    low = [t.to("cuda", torch.float16) for t in tensors64]
    mask = torch.ones(L, L, dtype=torch.bool, device="cuda")
    got = _ours(low, H, mask, grad.cuda())
    assert torch.equal(got[0], low[5].expand(N, L, D * H))
    # the attention passes no gradient at all: x, pos and the input projection get exactly 0
    for name, g in zip(NAMES[1:5], got[1:5]):
        assert torch.equal(g, torch.zeros_like(g)), name
    assert torch.isfinite(got[5]).all() and torch.isfinite(got[6]).all()


# --------------------------------------------------------------------------------------------
# The core op: strided and misaligned inputs, checks
# --------------------------------------------------------------------------------------------


def _core():
    return backends.extension_namespace()


def _core_reference(q, k, v, mask, scale):
    """[N, L, H, D] float64 attention with the reference's fully-blocked-row rule."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        N, H, L = q.shape[:3]
        m = mask if mask.dim() == 2 else mask.reshape(N, H, L, L)
        s = s.masked_fill(m, float("-inf")) if m.dtype == torch.bool else s + m.double()
    blocked = (s == float("-inf")).all(-1, keepdim=True)
    p = torch.where(blocked, torch.zeros_like(s), torch.softmax(torch.where(blocked, torch.zeros_like(s), s), -1))
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("D", [16, 32, 64, 24, 8, 100], ids=lambda d: f"D{d}")
def test_core_strided_and_misaligned_views(D, dtype):
    N, L, H = 2, 45, 3
    base = torch.randn(N, L, H, 3 * D + 1, device="cuda", dtype=dtype)
    q, k, v = base[..., 1:D + 1], base[..., D + 1:2 * D + 1], base[..., 2 * D + 1:]  # offset by one element
    scale = D ** -0.5
    out, lse = _core().aifi_attention_core_forward(q, k, v, None, scale)
    expected = _core_reference(q, k, v, None, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    assert lse.shape == (N, H, L) and lse.dtype == torch.float32
    s = (q.double().transpose(1, 2) @ k.double().transpose(1, 2).transpose(-1, -2)) * scale
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1) / math.log(2), atol=tol * 10, rtol=tol)
    grad = torch.randn_like(out)
    d_qk, d_v = _core().aifi_attention_core_backward(grad, q, k, v, out, lse, None, scale)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _core_reference(*leaves, None, scale).backward(grad.double())
    for got, leaf in zip((d_qk[:, :, 0], d_qk[:, :, 1], d_v), leaves):
        torch.testing.assert_close(got.double(), leaf.grad, atol=tol * 5, rtol=tol * 5)


def test_core_checks_its_arguments():
    q = torch.randn(1, 5, 2, 16, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="k must have q's shape"):
        _core().aifi_attention_core_forward(q, q[:, :4], q, None, 0.25)
    with pytest.raises(RuntimeError, match="dtype"):
        _core().aifi_attention_core_forward(q, q.float(), q, None, 0.25)
    with pytest.raises(RuntimeError, match="attn_mask must be"):
        _core().aifi_attention_core_forward(q, q, q, torch.zeros(5, 4, dtype=torch.bool, device="cuda"), 0.25)
    with pytest.raises(RuntimeError, match="bool or floating"):
        _core().aifi_attention_core_forward(q, q, q, torch.zeros(5, 5, dtype=torch.int32, device="cuda"), 0.25)
    with pytest.raises(RuntimeError, match="head dims"):
        big = torch.randn(1, 3, 1, 264, device="cuda")
        _core().aifi_attention_core_forward(big, big, big, None, 0.1)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        d = q.double()
        _core().aifi_attention_core_forward(d, d, d, None, 0.25)


# --------------------------------------------------------------------------------------------
# CUDA graphs and determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cuda_graph_capture_and_replay(dtype):
    N, L, D, H = 2, 97, 32, 8
    mask = denoising_mask(L).cuda()

    def fresh(seed):
        tensors, grad = _inputs(N, L, D * H, seed)
        return [t.to("cuda", dtype) for t in tensors + [grad]]

    static = fresh(0)
    leaves = [t.requires_grad_() for t in static[:6]]

    def step():
        out = aifi_attention(leaves[0], leaves[1], *leaves[2:6], H, mask, backend="cuda")
        return (out,) + torch.autograd.grad(out, leaves, static[6])

    for captured, expected in cuda_graph_replays(step, static, fresh):
        for got, exp in zip(captured, expected):
            torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_backward_is_bitwise_repeatable(dtype, deterministic, monkeypatch):
    """No atomics in the core: two backwards give the same bits (cuBLAS needs its workspace config
    under torch.use_deterministic_algorithms)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    N, L, D, H = 2, 401, 32, 8
    tensors, grad = _inputs(N, L, D * H, seed=3)
    tensors = [t.to("cuda", dtype) for t in tensors]
    mask = _mask("bool", N, H, L).cuda()
    with deterministic_algorithms(deterministic):
        first = _ours(tensors, H, mask, grad.cuda())
        second = _ours(tensors, H, mask, grad.cuda())
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name
