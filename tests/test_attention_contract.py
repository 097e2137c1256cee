"""aifi_attention's contract: parity with nn.MultiheadAttention as RT-DETR calls it (q = k = x + pos,
v = x, batch first, need_weights=False), masks, low precision, gradients, opcheck of both custom
ops, torch.compile(fullgraph=True), every bad input and its message, empty batch, backend selection.
"""

from __future__ import annotations

import pytest
import torch

import rtdetr_kernels
from helpers import OpCalls
from rtdetr_kernels import BackendUnavailableError, backends
from rtdetr_kernels.attention import aifi_attention, aifi_attention_reference
from rtdetr_kernels.attention import op as attention_op

# (embed dim E, heads); RT-DETR's AIFI and decoder use 256 x 8, 64 x 4 has a different head dim
SIZES = [(256, 8), (64, 4)]
TINY_ATOL = 1e-5  # relative to the largest reference magnitude


def _mha(E, H, dtype=torch.float64, seed=0):
    """An nn.MultiheadAttention with random (non-zero) biases, as after training."""
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_(0, 0.5)
        mha.out_proj.bias.normal_(0, 0.5)
    return mha.to(dtype)


def _params(mha):
    return mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight, mha.out_proj.bias


def _expected(mha, x, pos, attn_mask=None):
    q = x if pos is None else x + pos
    return mha(q, q, x, attn_mask=attn_mask, need_weights=False)[0]


def _inputs(N, L, E, dtype=torch.float64, pos_batch=1):
    x = torch.randn(N, L, E, dtype=dtype)
    pos = None if pos_batch is None else torch.randn(pos_batch, L, E, dtype=dtype)
    return x, pos


# --------------------------------------------------------------------------------------------
# Parity with nn.MultiheadAttention
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,atol,rtol", [(torch.float64, 1e-12, 1e-10), (torch.float32, 2e-5, 1e-4)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("L", [1, 7, 400])
@pytest.mark.parametrize("E,H", SIZES, ids=["E256h8", "E64h4"])
def test_matches_multihead_attention(E, H, L, dtype, atol, rtol):
    mha = _mha(E, H, dtype)
    for pos_batch in (1, 2, None):  # [1, L, E] as AIFI, [N, L, E] as the decoder, no pos
        x, pos = _inputs(2, L, E, dtype, pos_batch)
        with torch.no_grad():
            out = aifi_attention(x, pos, *_params(mha), H)
            torch.testing.assert_close(out, _expected(mha, x, pos), atol=atol, rtol=rtol)
            assert out.dtype == dtype and out.shape == x.shape


def test_pos_as_2d_and_no_biases():
    mha = torch.nn.MultiheadAttention(64, 4, bias=False, batch_first=True).double()
    x, pos = _inputs(3, 9, 64)
    with torch.no_grad():
        expected = _expected(mha, x, pos)
        torch.testing.assert_close(aifi_attention(x, pos[0], *_params(mha), 4), expected)
        torch.testing.assert_close(aifi_attention(x, pos.expand(3, 9, 64), *_params(mha), 4), expected)


def _mask(kind, N, H, L, per_head):
    shape = (N * H, L, L) if per_head else (L, L)
    blocked = torch.rand(shape) < 0.4
    blocked[..., 0, :] = False
    blocked[..., -1, :] = True  # a query row that may see nothing
    if kind == "bool":
        return blocked
    additive = torch.randn(shape, dtype=torch.float64)
    return additive.masked_fill(blocked, float("-inf"))


@pytest.mark.parametrize("per_head", [False, True], ids=["LxL", "NHxLxL"])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_masks_match_multihead_attention(kind, per_head):
    E, H, N, L = 64, 4, 2, 11
    mha = _mha(E, H)
    x, pos = _inputs(N, L, E)
    mask = _mask(kind, N, H, L, per_head)
    tensors = [t.detach().requires_grad_() for t in (x, pos, *_params(mha))]
    out = aifi_attention(tensors[0], tensors[1], *tensors[2:], H, mask)
    expected = _expected(mha, x, pos, mask)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)
    # the fully blocked row attends to nothing: the op returns out_proj's bias there, without NaN
    torch.testing.assert_close(out[:, -1], mha.out_proj.bias.expand(N, E).detach(), atol=1e-12, rtol=0)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    reference_tensors = [t.detach().requires_grad_() for t in (x, pos)]
    mha.zero_grad()
    _expected(mha, *reference_tensors, mask).backward(grad_out)
    for got, want in zip(tensors, reference_tensors + [p.grad for p in _params(mha)]):
        want = want.grad if isinstance(want, torch.Tensor) and want.requires_grad else want
        assert torch.isfinite(got.grad).all()
        torch.testing.assert_close(got.grad, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("L", [7, 400])
def test_low_precision_within_twice_torch_error(dtype, L):
    """|out - ref64| <= 2 |torch(lowprec) - ref64| + atol, for the output and every gradient."""
    E, H, N = 256, 8, 2
    mha64 = _mha(E, H)
    x64, pos64 = _inputs(N, L, E)
    low = [t.to(dtype) for t in (x64, pos64, *_params(mha64))]
    rounded = [t.double() for t in low]  # the fp64 reference sees the same rounded inputs
    grad_out = torch.randn(N, L, E, dtype=torch.float64)

    def ours(tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        out = aifi_attention(tensors[0], tensors[1], *tensors[2:], H)
        out.backward(grad_out.to(out.dtype))
        return [out] + [t.grad for t in tensors]

    def torch_mha(tensors):
        x, pos, *params = [t.detach().requires_grad_() for t in tensors]
        mha = torch.nn.MultiheadAttention(E, H, batch_first=True).to(tensors[0].dtype)
        with torch.no_grad():
            for p, v in zip(_params(mha), params):
                p.copy_(v)
        out = _expected(mha, x, pos)
        out.backward(grad_out.to(out.dtype))
        return [out, x.grad, pos.grad] + [p.grad for p in _params(mha)]

    reference = ours(rounded)
    got = ours(low)
    assert got[0].dtype == dtype
    for name, g, t, r in zip(["out"] + ["x", "pos", "in_w", "in_b", "out_w", "out_b"], got, torch_mha(low), reference):
        err = (g.double() - r).abs().max().item()
        torch_err = (t.double() - r).abs().max().item()
        scale = r.abs().max().item()
        assert err <= 2 * torch_err + TINY_ATOL * scale, f"{name}: {err} vs torch {torch_err}"


# --------------------------------------------------------------------------------------------
# Gradients, torch.library
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_gradcheck_float64(mask_kind):
    E, H, N, L = 4, 2, 2, 3
    mha = _mha(E, H)
    x, pos = _inputs(N, L, E)
    mask = None if mask_kind is None else _mask(mask_kind, N, H, L, per_head=mask_kind == "float")
    tensors = [t.detach().clone().requires_grad_() for t in (x, pos, *_params(mha))]

    def fn(*tensors):
        return aifi_attention(tensors[0], tensors[1], *tensors[2:], H, mask)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_backward_computes_only_the_needed_grads():
    mha = _mha(64, 4)
    x, pos = _inputs(2, 7, 64)
    for p in _params(mha):
        p.requires_grad_(False)
    x.requires_grad_()
    out = aifi_attention(x, pos, *_params(mha), 4)
    with OpCalls("aifi_attention_backward") as spy:
        out.backward(torch.randn_like(out))
    assert [list(call[-1]) for call in spy.calls] == [[True, False, False, False, False, False]]
    assert x.grad is not None and pos.grad is None


def _op_args(pos=True, bias=True, mask=None):
    E, H, N, L = 8, 2, 2, 5
    mha = _mha(E, H, torch.float32)
    x, p = _inputs(N, L, E, torch.float32)
    in_w, in_b, out_w, out_b = (t.detach().clone() for t in _params(mha))
    return (x, p if pos else None, in_w, in_b if bias else None, out_w, out_b if bias else None, H, mask, "reference")


@pytest.mark.parametrize("variant", ["full", "strided", "bool_mask", "float_mask_no_pos_no_bias"])
def test_opcheck(variant):
    if variant == "full":
        args = _op_args()
    elif variant == "strided":
        x, pos, in_w, *rest = _op_args()
        args = (x.transpose(0, 1).contiguous().transpose(0, 1), pos, in_w.t().contiguous().t(), *rest)
    elif variant == "bool_mask":
        args = _op_args(mask=_mask("bool", 2, 2, 5, per_head=False))
    else:
        args = _op_args(pos=False, bias=False, mask=_mask("float", 2, 2, 5, per_head=True).float())
    grad_args = tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and i < 6 else t for i, t in enumerate(args))
    torch.library.opcheck(torch.ops.rtdetr_kernels.aifi_attention.default, grad_args)
    plain = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    grad_out = torch.randn_like(plain[0])
    backward = torch.ops.rtdetr_kernels.aifi_attention_backward.default
    for needs in ([True] * 6, [True, False, False, False, False, False], [False, True, True, True, False, True]):
        torch.library.opcheck(backward, (grad_out,) + plain + (needs,))


def test_torch_compile_fullgraph():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    E, H = 16, 2
    mha = _mha(E, H, torch.float32)

    @torch.compile(backend=counter, fullgraph=True)
    def layer(x, pos, mask):
        return aifi_attention(x, pos, *_params(mha), H, mask, backend="reference") * 2

    for L in (6, 9):  # the decoder's query count varies with denoising
        x, pos = (t.requires_grad_() for t in _inputs(2, L, E, torch.float32))
        mask = torch.rand(L, L) < 0.3
        torch._dynamo.mark_dynamic(x, 1)
        torch._dynamo.mark_dynamic(pos, 1)
        torch._dynamo.mark_dynamic(mask, 0)
        torch._dynamo.mark_dynamic(mask, 1)
        out = layer(x, pos, mask)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)
        eager_x, eager_pos = (t.detach().requires_grad_() for t in (x, pos))
        expected = aifi_attention(eager_x, eager_pos, *_params(mha), H, mask) * 2
        expected.backward(grad_out)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(x.grad, eager_x.grad)
        torch.testing.assert_close(pos.grad, eager_pos.grad)
    assert counter.frame_count == 1, f"recompiled for a new length ({counter.frame_count} compiles)"


def test_autocast_follows_the_autocast_dtype():
    mha = _mha(64, 4, torch.float32)
    x, pos = _inputs(2, 7, 64, torch.float32)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aifi_attention(x.bfloat16(), pos, *_params(mha), 4)  # AMP's mixed dtypes are accepted
    with torch.no_grad():
        expected = aifi_attention(x.bfloat16(), pos.bfloat16(), *(p.bfloat16() for p in _params(mha)), 4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    out.float().sum().backward()  # gradients reach the float32 leaves through the casts
    assert x.grad.dtype == torch.float32 and mha.in_proj_weight.grad.dtype == torch.float32
    assert mha.in_proj_weight.grad.abs().sum() > 0


def test_non_contiguous_inputs():
    mha = _mha(64, 4)
    x, pos = _inputs(2, 7, 64)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)
    in_w_t = mha.in_proj_weight.detach().t().contiguous().t()
    assert not x_t.is_contiguous() and not in_w_t.is_contiguous()
    with torch.no_grad():
        out = aifi_attention(x_t, pos, in_w_t, *_params(mha)[1:], 4)
        torch.testing.assert_close(out, aifi_attention(x, pos, *_params(mha), 4))  # BLAS may sum in another order


def test_empty_batch():
    mha = _mha(64, 4)
    x = torch.randn(0, 7, 64, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(1, 7, 64, dtype=torch.float64, requires_grad=True)
    out = aifi_attention(x, pos, *_params(mha), 4)
    assert out.shape == (0, 7, 64)
    out.sum().backward()
    assert x.grad.shape == x.shape and (pos.grad == 0).all() and (mha.in_proj_weight.grad == 0).all()


def test_reference_is_the_public_op():
    mha = _mha(64, 4)
    x, pos = _inputs(2, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(aifi_attention(x, pos, *_params(mha), 4),
                                   aifi_attention_reference(x, pos, *_params(mha), 4), atol=0, rtol=0)


# --------------------------------------------------------------------------------------------
# Bad inputs: (id, how to break the valid call, exception, what the message must name)
# --------------------------------------------------------------------------------------------


def _valid_args():
    E, H, N, L = 8, 2, 2, 5
    mha = _mha(E, H, torch.float32)
    x, pos = _inputs(N, L, E, torch.float32)
    in_w, in_b, out_w, out_b = (t.detach() for t in _params(mha))
    return dict(x=x, pos=pos, in_proj_weight=in_w, in_proj_bias=in_b, out_proj_weight=out_w, out_proj_bias=out_b,
                num_heads=H, attn_mask=None)


BAD_INPUTS = [
    ("x_int", lambda a: a.update(x=a["x"].long()), TypeError, "x"),
    ("x_not_tensor", lambda a: a.update(x=a["x"].tolist()), TypeError, "x"),
    ("x_rank2", lambda a: a.update(x=a["x"][0]), ValueError, "x"),
    ("x_rank4", lambda a: a.update(x=a["x"][None]), ValueError, "x"),
    ("heads_not_dividing", lambda a: a.update(num_heads=3), ValueError, "num_heads"),
    ("heads_zero", lambda a: a.update(num_heads=0), ValueError, "num_heads"),
    ("heads_float", lambda a: a.update(num_heads=2.0), TypeError, "num_heads"),
    ("x_zero_width", lambda a: a.update(x=a["x"][..., :0]), ValueError, "num_heads"),
    ("in_w_shape", lambda a: a.update(in_proj_weight=a["in_proj_weight"][:16]), ValueError, "in_proj_weight"),
    ("in_w_transposed", lambda a: a.update(in_proj_weight=a["in_proj_weight"].t()), ValueError, "in_proj_weight"),
    ("in_b_shape", lambda a: a.update(in_proj_bias=a["in_proj_bias"][:8]), ValueError, "in_proj_bias"),
    ("out_w_shape", lambda a: a.update(out_proj_weight=a["out_proj_weight"][:, :4]), ValueError, "out_proj_weight"),
    ("out_b_shape", lambda a: a.update(out_proj_bias=a["out_proj_bias"][None]), ValueError, "out_proj_bias"),
    ("in_w_missing", lambda a: a.update(in_proj_weight=None), TypeError, "in_proj_weight"),
    ("out_w_dtype", lambda a: a.update(out_proj_weight=a["out_proj_weight"].double()), TypeError, "out_proj_weight"),
    ("in_b_dtype", lambda a: a.update(in_proj_bias=a["in_proj_bias"].half()), TypeError, "in_proj_bias"),
    ("pos_dtype", lambda a: a.update(pos=a["pos"].double()), TypeError, "pos"),
    ("pos_length", lambda a: a.update(pos=a["pos"][:, :4]), ValueError, "pos"),
    ("pos_batch", lambda a: a.update(pos=a["pos"].expand(3, 5, 8)), ValueError, "pos"),
    ("pos_rank4", lambda a: a.update(pos=a["pos"][None]), ValueError, "pos"),
    ("mask_int", lambda a: a.update(attn_mask=torch.zeros(5, 5, dtype=torch.int64)), TypeError, "attn_mask"),
    ("mask_shape", lambda a: a.update(attn_mask=torch.zeros(5, 4, dtype=torch.bool)), ValueError, "attn_mask"),
    ("mask_batch_not_heads", lambda a: a.update(attn_mask=torch.zeros(2, 5, 5, dtype=torch.bool)), ValueError, "attn_mask"),
    ("mask_not_tensor", lambda a: a.update(attn_mask=[[True]]), TypeError, "attn_mask"),
    # devices (the meta device stands in for a second device on a CPU-only machine)
    ("pos_device", lambda a: a.update(pos=a["pos"].to("meta")), ValueError, "pos"),
    ("in_w_device", lambda a: a.update(in_proj_weight=a["in_proj_weight"].to("meta")), ValueError, "in_proj_weight"),
    ("out_b_device", lambda a: a.update(out_proj_bias=a["out_proj_bias"].to("meta")), ValueError, "out_proj_bias"),
    ("mask_device", lambda a: a.update(attn_mask=torch.zeros(5, 5, dtype=torch.bool, device="meta")), ValueError, "attn_mask"),
    ("backend_unknown", lambda a: a.update(backend="tpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_names_the_argument(case):
    name, breaks, error, argument = case
    args = _valid_args()
    breaks(args)
    with pytest.raises(error, match=argument):
        aifi_attention(**args)


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


def test_backends_and_explain(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    args = _valid_args()
    for backend in ("triton", "cuda", "cpu"):
        with pytest.raises(BackendUnavailableError, match=f"has no {backend} implementation"):
            aifi_attention(**args, backend=backend)
    expected = aifi_attention(**args, backend="reference")
    torch.testing.assert_close(aifi_attention(**args), expected, atol=0, rtol=0)
    text = rtdetr_kernels.explain("aifi_attention", **args)
    assert "* reference ok" in text and "has no triton implementation" in text
    assert attention_op.OP in backends.registered_ops()
