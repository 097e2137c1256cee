"""Direct tests of kernels/attention/triton.py: the attention core and the op's triton backend against
float64 (the op's reference and nn.MultiheadAttention as RT-DETR calls it, q = k = x + pos, v = x),
outputs and every gradient, with the cases only these kernels have: head dims padded to the kernels'
BLOCK_D (16 and 24 run as 32), lengths that are not tile multiples, every tile the dispatcher can pick,
masks (none, boolean, RT-DETR's denoising mask, additive [L, L] and per (batch, head)), a fully
blocked query row, the dispatcher's tile rule, the needed-grads-only paths and the backend's reasons.

On a GPU-less machine the kernels run on CPU tensors under the Triton interpreter (tests/conftest.py
sets TRITON_INTERPRET=1, and its bounds checker watches every access); the interpreter computes
bfloat16 wrongly, so bfloat16 runs on GPU only, as do the long lengths (400 to 1000: minutes there).

What every backend shares is tested across backends elsewhere: bad inputs, empty batches, strides,
opcheck, torch.compile, determinism, autocast (test_op_contract.py), parity with
nn.MultiheadAttention in float64 and the low-precision rule at RT-DETR's size
(test_attention_contract.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from helpers import cuda_graph_replays, interpreter  # noqa: E402
from rtdetr_kernels import backends  # noqa: E402
from rtdetr_kernels.attention import aifi_attention  # noqa: E402
from rtdetr_kernels.attention import triton as attn_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreter():
    pytest.skip("no GPU and TRITON_INTERPRET is not set: the Triton kernels cannot run here", allow_module_level=True)

GPU_ONLY = pytest.mark.skipif(DEVICE == "cpu", reason="GPU only: the Triton interpreter takes minutes at these lengths")
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
              DEVICE == "cpu", reason="bfloat16 is computed wrongly by the Triton interpreter; tested on GPU"))]
TINY_ATOL = 1e-5  # relative to the largest reference magnitude
FP32_TOL = (2e-5, 1e-4)  # (atol relative to the largest reference magnitude, rtol)
# the core alone against float64, from the same rounded inputs
CORE_TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


# --------------------------------------------------------------------------------------------
# Inputs and oracles
# --------------------------------------------------------------------------------------------


def denoising_mask(L: int, groups: int = 3, group_size: int = 10) -> torch.Tensor:
    """RT-DETR's decoder self-attention mask (True = blocked): ``groups`` denoising groups that see only
    themselves, then L - groups * group_size matching queries that see no denoising query."""
    dn = groups * group_size
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[dn:, :dn] = True
    for g in range(groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        mask[rows, :g * group_size] = True
        mask[rows, (g + 1) * group_size:dn] = True
    return mask


def make_mask(kind: str, N: int, H: int, L: int, blocked_row: bool = True, seed: int = 0):
    """None, a bool mask (True = blocked), RT-DETR's denoising mask, an additive [L, L] mask or an additive
    per-(batch, head) one; the random ones block query row L // 2 everywhere when ``blocked_row``."""
    if kind == "none":
        return None
    if kind == "denoising":
        return denoising_mask(L)
    gen = torch.Generator().manual_seed(seed)
    shape = (N * H, L, L) if kind == "float_per_head" else (L, L)
    blocked = torch.rand(shape, generator=gen) < 0.3
    blocked[..., 0] = False  # every other row sees a key
    if blocked_row:
        blocked[..., L // 2, :] = True
    if kind == "bool":
        return blocked
    # values exact in float16, so that every dtype's copy of the mask is the same mask
    return (torch.randn(shape, generator=gen) * 2).half().float().masked_fill(blocked, float("-inf"))


def core_reference(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v in float64 for [N, L, H, D] inputs; a fully blocked row gives 0."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    N, H, L, D = q.shape
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    if mask is not None:
        m = mask if mask.dim() == 2 else mask.view(N, H, L, L)
        scores = scores.masked_fill(m, float("-inf")) if m.dtype == torch.bool else scores + m.double()
    blocked = (scores == float("-inf")).all(-1, keepdim=True)
    weights = torch.where(blocked, 0.0, torch.softmax(torch.where(blocked, 0.0, scores), -1))
    return (weights @ v).transpose(1, 2)


def core_inputs(N, L, H, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N, L, H, D, generator=gen).to(device=DEVICE, dtype=dtype) for _ in range(3)]


def core_grads(q, k, v, mask, grad_out, tile=None):
    """(out, dq, dk, dv) of the Triton core."""
    out, lse = attn_triton.core_forward(q, k, v, mask, tile=tile)
    return (out, *attn_triton.core_backward(grad_out, q, k, v, out, lse, mask, tile=tile))


def reference_grads(q, k, v, mask, grad_out):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = core_reference(*leaves, None if mask is None else mask.to(DEVICE))
    out.backward(grad_out.double())
    return (out.detach(), *(t.grad for t in leaves))


def assert_close(got, want, atol, rtol, what):
    """``atol`` relative to the largest magnitude of ``want``, floored at 1 (the inputs are unit normals: a
    gradient that is exactly 0 in float64, dq at L = 1, is rounding noise in float32)."""
    assert torch.isfinite(got).all(), f"{what}: not finite"
    scale = max(want.abs().max().item(), 1.0)
    torch.testing.assert_close(got.double(), want.double(), atol=atol * scale, rtol=rtol, msg=what)


def mha(E, H, dtype=torch.float64, seed=0):
    """nn.MultiheadAttention with random (non-zero) biases, as after training."""
    torch.manual_seed(seed)
    module = torch.nn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():
        module.in_proj_bias.normal_(0, 0.5)
        module.out_proj.bias.normal_(0, 0.5)
    return module.to(device=DEVICE, dtype=dtype)


def mha_params(module):
    return [module.in_proj_weight, module.in_proj_bias, module.out_proj.weight, module.out_proj.bias]


def mha_grads(module, x, pos, mask, grad_out):
    """(out, grads of x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias) of RT-DETR's call."""
    x, pos = x.detach().requires_grad_(), pos.detach().requires_grad_()
    if mask is not None and mask.is_floating_point():
        mask = mask.to(x.dtype)  # nn.MultiheadAttention misreads a float mask of another dtype than the query's
    module.zero_grad()
    q = x + pos
    out = module(q, q, x, attn_mask=mask, need_weights=False)[0]
    out.backward(grad_out)
    return [out.detach(), x.grad, pos.grad] + [p.grad for p in mha_params(module)]


def op_grads(x, pos, params, H, mask, grad_out, backend="triton"):
    tensors = [t.detach().requires_grad_() for t in (x, pos, *params)]
    out = aifi_attention(tensors[0], tensors[1], *tensors[2:], H, mask, backend=backend)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [t.grad for t in tensors]


def low_precision_module(module64, dtype):
    low = torch.nn.MultiheadAttention(module64.embed_dim, module64.num_heads, batch_first=True).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        for p, v in zip(mha_params(low), mha_params(module64)):
            p.copy_(v)
    return low


GRAD_NAMES = ["out", "x", "pos", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias"]


# --------------------------------------------------------------------------------------------
# The core
# --------------------------------------------------------------------------------------------

CORE_CASES = [  # N, L, H, D, mask
    (2, 1, 2, 32, "none"),
    (2, 7, 2, 16, "bool"),
    (1, 97, 2, 32, "float"),
    (1, 97, 1, 64, "none"),
    (2, 33, 3, 24, "float_per_head"),
    (1, 300, 1, 32, "denoising"),
]


def _core_case_id(case):
    return "N{}-L{}-H{}-D{}-{}".format(*case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CORE_CASES, ids=_core_case_id)
def test_core_matches_float64(case, dtype):
    N, L, H, D, kind = case
    q, k, v = core_inputs(N, L, H, D, dtype)
    mask = make_mask(kind, N, H, L)
    mask = None if mask is None else mask.to(DEVICE)
    grad_out = torch.randn(N, L, H, D, device=DEVICE).to(dtype)
    got = core_grads(q, k, v, mask, grad_out)
    want = reference_grads(q, k, v, mask, grad_out)
    atol, rtol = CORE_TOL[dtype]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.dtype == dtype and g.shape == (N, L, H, D), name
        assert_close(g, w, atol, rtol, f"{name} ({kind}, {dtype})")
    if kind in ("bool", "float", "float_per_head"):  # the fully blocked row: no output, no gradient
        assert not got[0][:, L // 2].any() and not got[1][:, L // 2].any()


def _every_tile():
    return [pytest.param(block_d, tile, id=f"d{block_d}-{tile[0]}x{tile[1]}")
            for block_d, tiles in attn_triton._TILES.items() for tile in tiles]


@pytest.mark.parametrize("block_d,tile", _every_tile())
def test_every_tile(block_d, tile):
    """Each tile the dispatcher can pick on a GPU (the interpreter picks the largest), at a length that is
    no tile multiple and a head dim the tile pads."""
    N, L, H, D = 1, 77, 2, block_d - 3
    q, k, v = core_inputs(N, L, H, D, torch.float32, seed=1)
    mask = make_mask("bool", N, H, L).to(DEVICE)
    grad_out = torch.randn(N, L, H, D, device=DEVICE)
    got = core_grads(q, k, v, mask, grad_out, tile=tile)
    want = reference_grads(q, k, v, mask, grad_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, *CORE_TOL[torch.float32], name)


@GPU_ONLY
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,L,kind", [(1, 400, "none"), (1, 401, "bool"), (2, 500, "denoising"), (32, 400, "none"),
                                      (1, 1000, "float")])
def test_core_long(N, L, kind, dtype):
    H, D = 8, 32
    q, k, v = core_inputs(N, L, H, D, dtype)
    mask = make_mask(kind, N, H, L)
    mask = None if mask is None else mask.to(DEVICE)
    grad_out = torch.randn(N, L, H, D, device=DEVICE).to(dtype)
    got = core_grads(q, k, v, mask, grad_out)
    want = reference_grads(q, k, v, mask, grad_out)
    atol, rtol = CORE_TOL[dtype]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, atol, rtol, name)


def test_sdpa_layout_matches_sdpa():
    """``attention`` (SDPA's [N, H, L, D] layout, here non-contiguous) through autograd against SDPA,
    whose boolean masks mark the allowed pairs."""
    N, H, L, D = 2, 2, 21, 32
    base = [torch.randn(N, L, H, D, device=DEVICE) for _ in range(3)]
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in base)  # [N, H, L, D], strided
    mask = make_mask("bool", N, H, L, blocked_row=False).to(DEVICE)
    out = attn_triton.attention(q, k, v, mask)
    grad_out = torch.randn_like(out)
    got = [out] + list(torch.autograd.grad(out, (q, k, v), grad_out))
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=~mask)
    want = [ref] + list(torch.autograd.grad(ref, (q2, k2, v2), grad_out))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert g.shape == w.shape, name
        assert_close(g.detach(), w, *FP32_TOL, name)


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------

OP_CASES = [  # N, L, E, H, mask (head dim E / H)
    (2, 1, 64, 2, "none"),
    (2, 7, 64, 4, "bool"),
    (1, 97, 128, 2, "float"),
    (2, 33, 48, 2, "float_per_head"),
    (1, 300, 32, 1, "denoising"),
]


def _op_case_id(case):
    return "N{}-L{}-E{}-H{}-{}".format(*case)


def _op_inputs(N, L, E, pos_batch=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, L, E, generator=gen, dtype=torch.float64).to(DEVICE)
    pos = torch.randn(pos_batch, L, E, generator=gen, dtype=torch.float64).to(DEVICE)
    return x, pos


def _check_op(case, dtype):
    N, L, E, H, kind = case
    module64 = mha(E, H)
    x64, pos64 = _op_inputs(N, L, E)
    mask = make_mask(kind, N, H, L, blocked_row=False)  # rows torch's low-precision kernels also handle
    mask = None if mask is None else mask.to(DEVICE)
    grad_out = torch.randn(N, L, E, dtype=torch.float64, device=DEVICE)
    low = [t.to(dtype) for t in (x64, pos64, *mha_params(module64))]
    got = op_grads(low[0], low[1], low[2:], H, mask, grad_out)
    # float64 oracle on the same rounded inputs: nn.MultiheadAttention, and the op's reference
    with torch.no_grad():
        for p, v in zip(mha_params(module64), low[2:]):
            p.copy_(v.double())
    want = mha_grads(module64, low[0].double(), low[1].double(), mask, grad_out)
    reference = op_grads(low[0].double(), low[1].double(), [t.double() for t in low[2:]], H, mask, grad_out, "reference")
    for name, w, r in zip(GRAD_NAMES, want, reference):
        assert_close(r, w, 1e-10, 1e-8, f"reference vs nn.MultiheadAttention: {name}")
    if dtype == torch.float32:
        for name, g, w in zip(GRAD_NAMES, got, want):
            assert g.dtype == dtype and g.shape == w.shape, name
            assert_close(g, w, *FP32_TOL, name)
        return
    # low precision: within twice PyTorch's own error against float64 (its nn.MultiheadAttention in dtype)
    torch_low = mha_grads(low_precision_module(module64, dtype), low[0], low[1], mask, grad_out.to(dtype))
    for name, g, t, w in zip(GRAD_NAMES, got, torch_low, want):
        assert g.dtype == dtype and g.shape == w.shape, name
        assert torch.isfinite(g).all(), name
        err = (g.double() - w).abs().max().item()
        torch_err = (t.double() - w).abs().max().item()
        scale = max(w.abs().max().item(), 1.0)  # floored as in assert_close
        assert err <= 2 * torch_err + TINY_ATOL * scale, f"{name}: {err:.3g} vs torch {torch_err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", OP_CASES, ids=_op_case_id)
def test_op_matches_multihead_attention(case, dtype):
    _check_op(case, dtype)


@GPU_ONLY
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(2, 400, 256, 8, "none"), (1, 401, 256, 8, "none"), (2, 500, 256, 8, "denoising"),
                                  (1, 1000, 256, 8, "none"), (8, 300, 256, 8, "bool")], ids=_op_case_id)
def test_op_long(case, dtype):
    _check_op(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["bool", "float", "float_per_head"])
def test_fully_blocked_row(kind, dtype):
    """A query row blocked everywhere attends to nothing: the op returns out_proj's bias there and every
    gradient is finite (float32: equal to nn.MultiheadAttention's in float64)."""
    N, L, E, H = 2, 9, 64, 2
    module64 = mha(E, H)
    x, pos = _op_inputs(N, L, E)
    mask = make_mask(kind, N, H, L).to(DEVICE)
    grad_out = torch.randn(N, L, E, dtype=torch.float64, device=DEVICE)
    low = [t.to(dtype) for t in (x, pos, *mha_params(module64))]
    got = op_grads(low[0], low[1], low[2:], H, mask, grad_out)
    assert torch.equal(got[0][:, L // 2], low[5].expand(N, E))
    for name, g in zip(GRAD_NAMES, got):
        assert torch.isfinite(g).all(), name
    if dtype == torch.float32:
        with torch.no_grad():
            for p, v in zip(mha_params(module64), low[2:]):
                p.copy_(v.double())
        want = mha_grads(module64, low[0].double(), low[1].double(), mask, grad_out)
        for name, g, w in zip(GRAD_NAMES, got, want):
            assert_close(g, w, *FP32_TOL, name)


def test_only_the_needed_grads():
    """pos as [L, E] and as [N, L, E]; every subset of ``needs`` that the backward's branches tell apart
    gives the full call's grads where asked and the empty placeholder elsewhere."""
    N, L, E, H = 2, 5, 32, 1
    params = [p.detach().float() for p in mha_params(mha(E, H))]
    x, pos = (t.float() for t in _op_inputs(N, L, E, pos_batch=N))
    mask = make_mask("bool", N, H, L).to(DEVICE)
    grad_out = torch.randn(N, L, E, device=DEVICE)
    for p in (pos[0], pos):
        full = attn_triton.backward(grad_out, x, p, *params, H, mask, [True] * 6, False)
        want = op_grads(x, p, params, H, mask, grad_out, "reference")[1:]
        for name, g, w in zip(GRAD_NAMES[1:], full, want):
            assert_close(g, w, *FP32_TOL, name)
    for needs in ([True, False, False, False, False, False], [False, True, False, False, False, False],
                  [False, False, True, True, False, False], [False, False, False, False, True, True], [False] * 6):
        grads = attn_triton.backward(grad_out, x, pos, *params, H, mask, needs, False)
        for name, need, g, f in zip(GRAD_NAMES[1:], needs, grads, full):
            if need:
                assert torch.equal(g, f), name
            else:
                assert g.numel() == 0, name
    # no biases: their grads are placeholders even when asked for
    grads = attn_triton.backward(grad_out, x, pos, params[0], None, params[2], None, H, None, [True] * 6, False)
    assert grads[3].numel() == 0 and grads[5].numel() == 0 and grads[0].shape == x.shape


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["none", "denoising"])
def test_cuda_graph_capture_and_replay(kind):
    """Forward and backward capture into a CUDA graph (no host sync, no data-dependent allocation) and
    replay on new inputs as eager computes them."""
    N, L, E, H = 2, 300, 256, 8
    mask = make_mask(kind, N, H, L)
    mask = None if mask is None else mask.to(DEVICE)
    params = [p.detach().half().requires_grad_() for p in mha_params(mha(E, H))]

    def fresh(seed):
        x, pos = _op_inputs(N, L, E, seed=seed)
        return [x.half(), pos.half(), torch.randn(N, L, E, device=DEVICE, dtype=torch.float16)]

    static = fresh(0)
    leaves = [static[0].requires_grad_(), static[1].requires_grad_(), *params]

    def step():
        out = aifi_attention(leaves[0], leaves[1], *leaves[2:], H, mask, backend="triton")
        return (out,) + torch.autograd.grad(out, leaves, static[2])

    for captured, expected in cuda_graph_replays(step, static, fresh):
        for got, want in zip(captured, expected):  # cuBLAS may pick other algorithms under capture
            torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def test_tile_rule(monkeypatch):
    """On a 132-SM GPU batch 1 at L = 400 with 8 heads gets the small tile (every SM busy), batch 8 the
    large one; every tile the rule can return is compiled ahead of time (aot_specs)."""
    monkeypatch.setattr(attn_triton, "_sm_count", lambda index: 132)
    gpu = torch.device("cuda", 0)
    small, large = attn_triton._TILES[32]
    assert attn_triton._tile(400, 1 * 8, 32, gpu) == small
    assert attn_triton._tile(300, 1 * 8, 32, gpu) == small
    assert attn_triton._tile(400, 8 * 8, 32, gpu) == large
    assert attn_triton._tile(400, 32 * 8, 32, gpu) == large
    assert attn_triton._tile(7, 1, 32, gpu) == small
    assert attn_triton._tile(400, 8, 32, torch.device("cpu")) == large  # the interpreter's
    assert [attn_triton._block_d(d) for d in (1, 16, 24, 32, 33, 64)] == [32, 32, 32, 32, 64, 64]
    with pytest.raises(ValueError, match="head dim"):
        attn_triton._block_d(65)
    names = {spec[0] for spec in attn_triton.aot_specs()}
    for block_d, tiles in attn_triton._TILES.items():
        for owned, step, _, _ in tiles:
            for kernel in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq"):
                for t in ("fp16", "bf16", "fp32"):
                    for mask in ("mask", "nomask"):
                        assert f"{kernel}[{t},d{block_d},{owned}x{step},{mask}]" in names


def test_why_not():
    def call(dtypes, device=DEVICE, head_dim=32):
        return backends.Call("aifi_attention", device, dtypes, (("num_heads", 8), ("head_dim", head_dim), ("mask", "none")))

    assert attn_triton.why_not(call((torch.float32,) * 6)) is None
    assert attn_triton.why_not(call((torch.float16,) * 4, head_dim=64)) is None
    assert "float64" in attn_triton.why_not(call((torch.float64,) * 6))
    assert "head dims up to 64" in attn_triton.why_not(call((torch.float32,) * 6, head_dim=65))
    if interpreter():
        assert "interpreter" in attn_triton.why_not(call((torch.bfloat16,) * 6, device="cpu"))
    # the registry: fp64 goes elsewhere, a CPU tensor without the interpreter is refused by the build check
    assert "float64" in backends.why_not("triton", call((torch.float64,) * 6))
