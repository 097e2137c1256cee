"""Direct tests of kernels/ms_deform_attn/triton.py against reference.ms_deform_attn_reference: the
cases only the Triton kernels have.

Points split over two chunks of 16, D = 70 (the forward splits the channels, the backward loops over
them) with AMP's mixed dtypes, 16 levels, the needed-grads-only paths of the host functions, and the
backend's reasons for refusing a call. On a GPU-less machine the kernels run on CPU tensors under the
Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1); there bf16 is skipped (the
interpreter computes it wrongly).

What every backend shares is tested across backends elsewhere: knots, non-finite and out-of-range
locations (test_ms_deform_attn_oracle.py), determinism and the deterministic grad_value path
(test_ms_deform_attn_determinism.py), empty inputs and the public op's autograd
(test_op_contract.py).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import interpreter  # noqa: E402
from rtdetr_kernels import backends  # noqa: E402
from rtdetr_kernels.ms_deform_attn import reference  # noqa: E402
from rtdetr_kernels.ms_deform_attn import triton as msda_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreter():
    pytest.skip("no GPU and TRITON_INTERPRET is not set: the Triton kernels cannot run here", allow_module_level=True)

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
METHODS = {0: ("bilinear", "per_axis"), 1: ("discrete", "per_axis"), 2: ("discrete", "official")}
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def _flat(shapes):
    return [s for hw in shapes for s in hw]


def _make(N, Lq, M, D, shapes, points, dtype=torch.float32, loc_dtype=None, lo=-0.1, hi=1.1):
    S = sum(h * w for h, w in shapes)
    PT = sum(points)
    value = torch.randn(N, S, M, D, device=DEVICE).to(dtype)
    loc = (torch.rand(N, Lq, M, PT, 2, device=DEVICE) * (hi - lo) + lo).to(loc_dtype or dtype)
    weights = torch.rand(N, Lq, M, PT, device=DEVICE).to(loc_dtype or dtype)
    return value, loc, weights


def _reference(value, loc, weights, shapes, points, method, grad_output=None):
    """Reference output, and (if grad_output) its grads w.r.t. value, locations, weights."""
    kind, clamp = METHODS[method]
    v = value.detach().clone().requires_grad_(grad_output is not None)
    l = loc.detach().clone().requires_grad_(grad_output is not None and method == 0)
    w = weights.detach().clone().requires_grad_(grad_output is not None)
    with torch.enable_grad():
        out = reference.ms_deform_attn_reference(v, shapes, l, w, points, kind, clamp)
        if grad_output is None:
            return out.detach(), None
        out.backward(grad_output)
    gl = l.grad if method == 0 else torch.zeros_like(loc)
    return out.detach(), (v.grad, gl, w.grad)


def _close(actual, expected, dtype, what, scale=1.0):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol * scale, msg=what)


CASES = [
    # N, Lq, M, D, shapes, points
    (2, 5, 3, 5, [(5, 7), (3, 4), (1, 3)], [1, 3, 2]),
    (1, 3, 2, 1, [(4, 3)], [3]),
    (1, 4, 2, 32, [(6, 5), (3, 3)], [4, 4]),
    (1, 2, 2, 3, [(3, 4), (2, 3), (2, 2)], [6, 7, 5]),  # 18 points: two chunks of 16
]


@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: f"case{i}")
@pytest.mark.parametrize("method", [0, 1, 2], ids=["bilinear", "discrete_per_axis", "discrete_official"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_match_reference(case, method, dtype):
    N, Lq, M, D, shapes, points = CASES[case]
    value, loc, weights = _make(N, Lq, M, D, shapes, points, dtype)
    out = msda_triton.forward(value, loc, weights, _flat(shapes), points, method)
    go = torch.randn_like(out)
    ref, (rgv, rgl, rgw) = _reference(value, loc, weights, shapes, points, method, go)
    _close(out, ref, dtype, "output")
    gv, gl, gw = msda_triton.backward(go, value, loc, weights, _flat(shapes), points, method, True, True, True, False)
    scale = 4.0 if dtype != torch.float32 else 1.0
    _close(gv, rgv, dtype, "grad_value", scale)
    _close(gw, rgw, dtype, "grad_weights", scale)
    if method == 0:
        _close(gl, rgl, dtype, "grad_locations", 4.0 * max(h for h, w in shapes))
    else:
        assert gl.dtype == loc.dtype and gl.shape == loc.shape and not gl.any()


def test_mixed_dtypes_and_wide_channels():
    shapes, points = [(3, 4), (2, 3)], [2, 3]
    # fp16 value with fp32 locations/weights (AMP), D > 64 (forward splits D, backward loops over it)
    value, loc, weights = _make(1, 3, 2, 70, shapes, points, torch.float16, loc_dtype=torch.float32)
    out = msda_triton.forward(value, loc, weights, _flat(shapes), points, 0)
    go = torch.randn_like(out)
    ref, (rgv, rgl, rgw) = _reference(value, loc, weights, shapes, points, 0, go)
    _close(out, ref, torch.float16, "output")
    gv, gl, gw = msda_triton.backward(go, value, loc, weights, _flat(shapes), points, 0, True, True, True, False)
    assert gv.dtype == torch.float16 and gl.dtype == torch.float32 and gw.dtype == torch.float32
    _close(gv, rgv, torch.float16, "grad_value", 4.0)
    torch.testing.assert_close(gw, rgw, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(gl, rgl, atol=5e-2, rtol=1e-2)
    # fp32 value with fp16 locations and float64 weights: cast up inside, grads in the input dtypes
    value = value.float()
    loc16, w64 = loc.half(), weights.double()
    out = msda_triton.forward(value, loc16, w64, _flat(shapes), points, 0)
    ref, _ = _reference(value, loc16, w64, shapes, points, 0)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    gv, gl, gw = msda_triton.backward(torch.randn_like(out), value, loc16, w64, _flat(shapes), points, 0, False, True, True, False)
    assert gv.numel() == 0 and gl.dtype == torch.float16 and gw.dtype == torch.float64


def test_many_levels():
    shapes = [(1 + l % 3, 1 + (l * 5) % 4) for l in range(16)]
    points = [1 + l % 2 for l in range(16)]
    value, loc, weights = _make(1, 2, 1, 3, shapes, points, torch.float32)
    for method in (0, 2):
        out = msda_triton.forward(value, loc, weights, _flat(shapes), points, method)
        go = torch.randn_like(out)
        ref, (rgv, rgl, rgw) = _reference(value, loc, weights, shapes, points, method, go)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
        gv, gl, gw = msda_triton.backward(go, value, loc, weights, _flat(shapes), points, method, True, True, True, True)
        torch.testing.assert_close(gv, rgv, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(gw, rgw, atol=2e-5, rtol=1e-5)


def test_only_needed_grads():
    shapes, points = [(3, 3)], [2]
    value, loc, weights = _make(1, 2, 2, 4, shapes, points)
    go = torch.randn(1, 2, 2, 4, device=DEVICE)
    _, (rgv, rgl, rgw) = _reference(value, loc, weights, shapes, points, 0, go)
    gv, gl, gw = msda_triton.backward(go, value, loc, weights, _flat(shapes), points, 0, False, True, False, False)
    assert gv.numel() == 0 and gw.numel() == 0
    torch.testing.assert_close(gl, rgl, atol=1e-4, rtol=1e-5)
    gv, gl, gw = msda_triton.backward(go, value, loc, weights, _flat(shapes), points, 0, True, False, False, False)
    assert gl.numel() == 0 and gw.numel() == 0
    torch.testing.assert_close(gv, rgv, atol=2e-5, rtol=1e-5)
    # discrete: the location grad is a zero tensor, not empty
    gv, gl, gw = msda_triton.backward(go, value, loc, weights, _flat(shapes), points, 1, False, True, False, False)
    assert gl.shape == loc.shape and not gl.any() and gv.numel() == 0 and gw.numel() == 0


def test_why_not():
    def call(dtypes, device=DEVICE, levels=3, method=0):
        return backends.Call("ms_deform_attn", device, dtypes, (("method", method), ("levels", levels), ("channels", 32)))

    assert msda_triton.why_not(call((torch.float32,) * 3)) is None
    assert msda_triton.why_not(call((torch.float16, torch.float32, torch.float32), method=2)) is None
    assert "float64" in msda_triton.why_not(call((torch.float64,) * 3))
    assert "16 levels" in msda_triton.why_not(call((torch.float32,) * 3, levels=17))
    if interpreter():
        assert "interpreter" in msda_triton.why_not(call((torch.bfloat16, torch.float32, torch.float32), device="cpu"))
