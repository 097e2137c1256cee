"""The cpu backend's forward of aifi_attention, both implementations: the compiled one
(csrc/attention/cpu.cpp, ``rtdetr_kernels_C::aifi_attention_cpu_forward``, called directly) and the
PyTorch composition (kernels/attention/cpu.py ``forward_torch``, what runs where the extension is not
built). They make the same ATen calls, so they must agree bit for bit, outputs and the gradients
autograd records through them, on every dtype, pos layout, bias and mask form, odd lengths, and a
fully blocked query row; and the compiled op must reject a malformed direct call with an error.

test_attention_contract.py runs the cpu backend (whichever forward it has) through the op against
nn.MultiheadAttention and the fp64 reference; this file does not repeat that.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import helpers
from rtdetr_kernels.attention import aifi_attention, cpu as attn_cpu

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
         torch.float64: torch.int64}


def compiled_kernel():
    """The compiled CPU forward, or a skip (a failure where the extension is required)."""
    return helpers.compiled_kernel(attn_cpu.compiled_forward, "csrc/attention/cpu.cpp")


def _gen(*key) -> torch.Generator:
    """A generator seeded by the test's own parameters: fresh values per test, reproducible."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.dtype])


def _inputs(N, L, E, H, dtype, gen, pos_layout="1LE", biases=True, mask=None, grad=False):
    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
        return t.requires_grad_(grad)

    x = rand(N, L, E)
    pos = {"1LE": lambda: rand(1, L, E), "NLE": lambda: rand(N, L, E), "LE": lambda: rand(L, E),
           "none": lambda: None}[pos_layout]()
    w, ow = rand(3 * E, E, scale=E ** -0.5), rand(E, E, scale=E ** -0.5)
    b, ob = (rand(3 * E, scale=0.1), rand(E, scale=0.1)) if biases else (None, None)
    attn_mask = None
    if mask is not None:
        kind, per_head = mask
        shape = (N * H, L, L) if per_head else (L, L)
        if kind == "bool":
            attn_mask = torch.rand(shape, generator=gen) < 0.3
            attn_mask[..., 0, :] = True  # a fully blocked query row: it attends to nothing, output = out bias
        else:
            attn_mask = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2).to(dtype)
    return x, pos, w, b, ow, ob, H, attn_mask


CASES = [
    # (N, L, E, H, pos layout, biases, mask)
    (1, 1, 32, 4, "1LE", True, None),
    (2, 7, 64, 8, "NLE", True, ("bool", False)),
    (1, 97, 256, 8, "1LE", True, None),
    (3, 33, 48, 3, "LE", False, ("bool", True)),
    (2, 50, 64, 4, "none", True, ("float", False)),
    (1, 41, 32, 2, "1LE", False, ("float", True)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:5])) + f"-bias{int(c[5])}-{c[6]}")
def test_compiled_matches_the_torch_composition_bit_for_bit(case, dtype):
    kernel = compiled_kernel()
    N, L, E, H, pos_layout, biases, mask = case
    args = _inputs(N, L, E, H, dtype, _gen(case, str(dtype)), pos_layout, biases, mask)
    want = attn_cpu.forward_torch(*args)
    got = kernel(*args)
    assert got.dtype == dtype and got.shape == (N, L, E)
    assert got.is_contiguous()
    assert torch.equal(bits(got), bits(want)), f"max diff {(got.double() - want.double()).abs().max().item()}"
    assert torch.isfinite(got).all()
    if mask is not None and mask[0] == "bool":  # the blocked row (query 0) is out_proj's bias, not NaN
        ob = args[5]
        expected = torch.zeros(E, dtype=dtype) if ob is None else ob.detach()
        blocked = got[:, 0]  # query 0 of every image is blocked (in every head, for a per-head mask)
        assert torch.equal(bits(blocked), bits(expected.expand_as(blocked).contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]], ids=["bool", "bool-per-head", "float"])
def test_gradients_through_the_compiled_forward_match_bit_for_bit(case, dtype):
    """Autograd records through the compiled op's ATen calls (CompositeImplicitAutograd) as through the
    Python ones: every input's gradient the same bits; none for the mask."""
    kernel = compiled_kernel()
    N, L, E, H, pos_layout, biases, mask = case
    gen_seed = (case, str(dtype), "grad")
    grads = []
    for forward in (attn_cpu.forward_torch, kernel):
        args = _inputs(N, L, E, H, dtype, _gen(*gen_seed), pos_layout, biases, mask, grad=True)
        leaves = [t for t in args[:6] if t is not None]
        grad_out = torch.randn(N, L, E, generator=_gen(*gen_seed, "g"), dtype=torch.float64).to(dtype)
        out = forward(*args)
        grads.append(torch.autograd.grad(out, leaves, grad_out))
        if args[7] is not None:
            assert not args[7].requires_grad
    for want, got in zip(*grads):
        assert torch.equal(bits(got), bits(want))


def test_the_cpu_backend_uses_the_compiled_forward():
    """Where it is built, the backend's forward is the compiled op, through the public function too."""
    compiled_kernel()
    args = _inputs(2, 19, 64, 4, torch.float32, _gen("backend"))
    want = attn_cpu.forward_torch(*args)
    got = aifi_attention(*args, backend="cpu")
    assert torch.equal(got, want)
    from torch.profiler import profile

    with profile() as prof:
        aifi_attention(*args, backend="cpu")
    names = {e.name for e in prof.events()}
    assert "rtdetr_kernels_C::aifi_attention_cpu_forward" in names, sorted(names)[:20]


def test_direct_calls_with_bad_arguments_raise():
    kernel = compiled_kernel()
    x, pos, w, b, ow, ob, H, _ = _inputs(1, 5, 16, 4, torch.float32, _gen("bad"))
    with pytest.raises(RuntimeError, match="x must be"):
        kernel(x[0], pos, w, b, ow, ob, H, None)
    with pytest.raises(RuntimeError, match="multiple of num_heads"):
        kernel(x, pos, w, b, ow, ob, 3, None)
    with pytest.raises(RuntimeError, match="in_proj_weight must be"):
        kernel(x, pos, w[:-1], b, ow, ob, H, None)
    with pytest.raises(RuntimeError):  # ATen's own shape checks
        kernel(x, pos[:, :4], w, b, ow, ob, H, None)
    with pytest.raises(RuntimeError):
        kernel(x, pos, w, b, ow[:, :8], ob, H, None)
    with pytest.raises(RuntimeError):
        kernel(x, pos, w, b, ow, ob, H, torch.zeros(4, 4, dtype=torch.bool))
