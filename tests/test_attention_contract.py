"""aifi_attention's own contract: parity with nn.MultiheadAttention as RT-DETR calls it (q = k = x + pos,
v = x, batch first, need_weights=False), masks, low precision, only the needed gradients.

What every op shares (bad inputs and their messages, empty batch, strides, opcheck, gradcheck,
torch.compile, determinism, autocast, backend selection) is in test_op_contract.py, driven by
op_testers/aifi_attention.py.
"""

from __future__ import annotations

import pytest
import torch

from helpers import OpCalls, backend_params
from op_testers import recorded
from op_testers.aifi_attention import random_mask
from rtdetr_kernels import BackendUnavailableError
from rtdetr_kernels.attention import aifi_attention, aifi_attention_reference

BACKENDS = backend_params("aifi_attention")

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


@pytest.mark.parametrize("per_head", [False, True], ids=["LxL", "NHxLxL"])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_masks_match_multihead_attention(device, backend, kind, per_head):
    E, H, N, L = 64, 4, 2, 11
    mha = _mha(E, H)
    x, pos = _inputs(N, L, E)
    mask = random_mask(kind, N, H, L, per_head)
    tensors = [t.detach().to(device).requires_grad_() for t in (x, pos, *_params(mha))]
    try:
        out = aifi_attention(tensors[0], tensors[1], *tensors[2:], H, mask.to(device), backend=backend)
    except BackendUnavailableError as exc:  # float64 (exact comparison) is not served everywhere
        pytest.skip(str(exc))
    out = out.cpu()
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
        torch.testing.assert_close(got.grad.cpu(), want, atol=1e-10, rtol=1e-8)


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
# Gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_backward_computes_only_the_needed_grads(device, backend):
    mha = _mha(64, 4, torch.float32)
    x, pos = (t.to(device) for t in _inputs(2, 7, 64, torch.float32))
    params = [p.detach().to(device) for p in _params(mha)]
    x.requires_grad_()
    with OpCalls("aifi_attention_backward") as spy:  # the spy also routes the forward through the registered op
        out = aifi_attention(x, pos, *params, 4, backend=backend)
        out.backward(torch.randn_like(out))
    needs = [list(recorded("aifi_attention_backward", call, "needs")) for call in spy.calls]
    assert needs == [[True, False, False, False, False, False]]
    assert x.grad is not None and pos.grad is None


def test_the_reference_backend_is_the_reference():
    mha = _mha(64, 4)
    x, pos = _inputs(2, 7, 64)
    with torch.no_grad():
        torch.testing.assert_close(aifi_attention(x, pos, *_params(mha), 4, backend="reference"),
                                   aifi_attention_reference(x, pos, *_params(mha), 4), atol=0, rtol=0)




@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "float_mask"])
def test_cpu_eager_autograd_matches_the_registered_backward(masked):
    """The cpu backend's eager path lets autograd record through its GEMMs and SDPA (no recomputation);
    the registered op (compile, export) runs its backward kernel instead. Same gradients, and neither
    path lets a gradient reach a floating mask."""
    from rtdetr_kernels.attention import op as attention_op

    mha = _mha(64, 4)
    N, L = 2, 9
    x, pos = _inputs(N, L, 64, pos_batch=N)
    mask = torch.randn(L, L, dtype=torch.float64).requires_grad_() if masked else None
    grad_out = torch.randn(N, L, 64, dtype=torch.float64)

    def run(call):
        tensors = [t.detach().clone().requires_grad_() for t in (x, pos, *_params(mha))]
        out = call(tensors)
        out.backward(grad_out)
        return out, [t.grad for t in tensors]

    def eager(tensors):
        return aifi_attention(*tensors, 4, mask, backend="cpu")

    def registered(tensors):
        return attention_op.ATTENTION.forward_op(*tensors, 4, mask, "cpu")

    out_eager, grads_eager = run(eager)
    out_registered, grads_registered = run(registered)
    # the eager graph is PyTorch's own (the last op: the output projection), not one custom-op node
    assert "aifi_attention" not in type(out_eager.grad_fn).__name__.lower()
    assert "_Eager" not in type(out_eager.grad_fn).__name__
    torch.testing.assert_close(out_eager, out_registered, atol=1e-13, rtol=1e-12)
    for a, b in zip(grads_eager, grads_registered):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    if masked:
        assert mask.grad is None
