"""The host side of aifi_attention's cuda backend (kernels/attention/cuda.py), on the CPU.

The projections, the output projection and the assembly of every gradient (x, pos in each of its
shapes, the packed input projection, the output projection, biases, only the needed ones) run as
written, with a float64 PyTorch stand-in for the compiled core that keeps the core's contract: q, k, v
as [N, L, H, D] views, output [N, L, H, D], base-2 logsumexp [N, H, L] (+inf for a query that sees
nothing), the backward's q and k gradients packed as [N, L, 2, H, D]. The kernels themselves run in
tests/test_attention_cuda.py (GPU only).
"""

from __future__ import annotations

import math

import pytest
import torch

from rtdetr_kernels import backends
from rtdetr_kernels.attention import cuda as cuda_host
from rtdetr_kernels.attention import reference
from rtdetr_kernels.attention.op import _reference_backward


class TorchCore:
    """The compiled core's two ops in float64 PyTorch, for CPU tensors."""

    @staticmethod
    def _attention(q, k, v, mask, scale):
        N, L, H, _ = q.shape
        s = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) * scale
        if mask is not None:
            m = mask if mask.dim() == 2 else mask.reshape(N, H, L, L)
            s = s.masked_fill(m, float("-inf")) if m.dtype == torch.bool else s + m.to(s.dtype)
        blocked = (s == float("-inf")).all(-1, keepdim=True)
        s = torch.where(blocked, torch.zeros_like(s), s)
        p = torch.where(blocked, torch.zeros_like(s), torch.softmax(s, -1))
        lse = torch.where(blocked[..., 0], torch.full_like(s[..., 0], math.inf), torch.logsumexp(s, -1)) / math.log(2)
        return (p @ v.transpose(1, 2)).transpose(1, 2).contiguous(), lse

    def aifi_attention_core_forward(self, q, k, v, mask, scale):
        assert q.shape == k.shape == v.shape and q.stride(-1) == 1 and k.stride(-1) == 1
        return self._attention(q, k, v, mask, scale)

    def aifi_attention_core_backward(self, grad_out, q, k, v, out, lse, mask, scale):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            again, again_lse = self._attention(*leaves, mask, scale)
            dq, dk, dv = torch.autograd.grad(again, leaves, grad_out)
        torch.testing.assert_close(again.detach(), out)  # what the forward gave
        torch.testing.assert_close(again_lse.detach(), lse)
        return torch.stack([dq, dk], 2), dv.contiguous()  # the core returns contiguous tensors


@pytest.fixture
def torch_core(monkeypatch):
    monkeypatch.setattr(cuda_host, "_core", lambda: TorchCore())


def _args(N, L, E, H, pos_shape="1LE", bias=True, mask=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    pos = {"1LE": (1, L, E), "NLE": (N, L, E), "LE": (L, E), None: None}[pos_shape]
    return [randn(N, L, E), None if pos is None else randn(*pos), randn(3 * E, E, scale=E ** -0.5),
            randn(3 * E, scale=0.5) if bias else None, randn(E, E, scale=E ** -0.5),
            randn(E, scale=0.5) if bias else None, H, mask]


def _mask(kind, N, H, L):
    gen = torch.Generator().manual_seed(7)
    if kind is None:
        return None
    shape = (N * H, L, L) if kind.endswith("per_head") else (L, L)
    blocked = torch.rand(shape, generator=gen) < 0.4
    blocked[..., -1, :] = True  # a query that sees nothing
    if kind.startswith("bool"):
        return blocked
    return torch.randn(shape, generator=gen, dtype=torch.float64).masked_fill(blocked, float("-inf"))


@pytest.mark.parametrize("pos_shape,bias,mask", [("1LE", True, None), ("NLE", True, "bool"), ("LE", False, "float"),
                                                 (None, True, "bool_per_head"), ("1LE", False, "float_per_head")])
def test_forward_and_every_gradient_match_the_reference(torch_core, pos_shape, bias, mask):
    N, L, E, H = 3, 11, 24, 4
    args = _args(N, L, E, H, pos_shape, bias, _mask(mask, N, H, L))
    expected = reference.aifi_attention_reference(*args)
    torch.testing.assert_close(cuda_host.forward(*args), expected, atol=1e-12, rtol=1e-10)
    grad = torch.randn(N, L, E, dtype=torch.float64)
    needs = [t is not None for t in args[:6]]
    got = cuda_host.backward(grad, *args, needs, False)
    want = _reference_backward(grad, *args, needs, False)
    for name, g, w in zip(("x", "pos", "in_w", "in_b", "out_w", "out_b"), got, want):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("needs", [[True, False, False, False, False, False], [False, True, False, False, False, False],
                                   [False, False, True, False, False, False], [False, False, False, True, False, False],
                                   [False, False, False, False, True, False], [False, False, False, False, False, True],
                                   [False, True, True, True, False, True]])
def test_only_the_needed_gradients(torch_core, needs, monkeypatch):
    N, L, E, H = 2, 7, 16, 2
    args = _args(N, L, E, H, mask=_mask("bool", N, H, L))
    grad = torch.randn(N, L, E, dtype=torch.float64)
    calls = []
    core = TorchCore()
    monkeypatch.setattr(cuda_host, "_core", lambda: calls.append(1) or core)
    got = cuda_host.backward(grad, *args, needs, False)
    want = _reference_backward(grad, *args, needs, False)
    for need, g, w in zip(needs, got, want):
        assert g.shape == w.shape and (need or g.numel() == 0)
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)
    assert len({id(g) for g in got}) == 6, "the placeholders must be distinct tensors (outputs must not alias)"
    if needs == [False] * 5 + [True]:
        assert not calls, "out_proj_bias's gradient needs no attention"


def test_empty_batch(torch_core):
    args = _args(0, 5, 16, 2)
    assert cuda_host.forward(*args).shape == (0, 5, 16)
    grads = cuda_host.backward(torch.randn(0, 5, 16, dtype=torch.float64), *args, [True] * 6, False)
    for g, t in zip(grads, args[:6]):
        assert g.shape == t.shape and not g.any()


def test_why_not_names_the_reason():
    def call(dtype, head_dim, device="cuda"):
        return backends.Call("aifi_attention", device, (dtype,) * 6, (("num_heads", 2), ("head_dim", head_dim), ("mask", "none")))

    assert "float64" in cuda_host.why_not(call(torch.float64, 32))
    assert "256" in cuda_host.why_not(call(torch.float16, 512))
    assert cuda_host.why_not(call(torch.bfloat16, 24)) is None
    assert cuda_host.why_not(call(torch.float32, 256)) is None
    assert "CUDA tensors" in backends.why_not("cuda", call(torch.float32, 32, device="cpu"))


def test_the_record_runs_the_core_ops():
    """test_build checks that a compiled record's kernels are registered: these are the core's ops."""
    forward, backward = backends.implementation("aifi_attention", "cuda").kernels()
    assert forward._qualified_op_name == "rtdetr_kernels_C::aifi_attention_core_forward"
    assert backward._qualified_op_name == "rtdetr_kernels_C::aifi_attention_core_backward"
    ext = backends.load_extension()
    if ext is not None and ext.WITH_CUDA:
        names = backends.extension_ops()
        assert forward._qualified_op_name in names and backward._qualified_op_name in names
