"""The CPU kernels are compiled twice (AVX2+FMA, and the baseline instruction set) and specialised for
the head sizes D = 32 and 64: every build and specialisation must match the float64 oracle, forward and
all three gradients, including points exactly on bilinear knots and borders. RTDETR_KERNELS_CPU_ISA=baseline selects the baseline."""

from __future__ import annotations

import pytest
import torch

import rtdetr_kernels
from rtdetr_kernels import backends
from helpers import require_extension
from msda_oracle import check_against_oracle, make_inputs, oracle, run
from test_ms_deform_attn_oracle import KNOT_POINTS, KNOT_SHAPES, _knot_locations

SHAPES = [(7, 9), (4, 3), (2, 2)]
POINTS = [3, 2, 2]


def _isas():
    ext = backends.load_extension()
    native = getattr(ext, "CPU_ISA", "baseline") if ext is not None else "baseline"
    return sorted({native, "baseline"})


@pytest.fixture(params=_isas())
def isa(request, monkeypatch):
    require_extension()
    if request.param == "baseline":
        monkeypatch.setenv("RTDETR_KERNELS_CPU_ISA", "baseline")
    else:
        monkeypatch.delenv("RTDETR_KERNELS_CPU_ISA", raising=False)
    return request.param


@pytest.mark.parametrize("D", [32, 64, 16, 5])  # 16: generic loops, vector grad_value write-out
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["bilinear", "discrete"])
def test_cpu_builds_match_oracle(isa, D, dtype, method):
    inputs = make_inputs(seed=11 * D + (dtype == torch.float32), N=2, Lq=13, M=3, D=D, shapes=SHAPES, points=POINTS,
                         dtype=dtype)
    expected = oracle(inputs["value"], SHAPES, inputs["loc"], inputs["weights"], POINTS, inputs["grad_out"],
                      method=method)
    got = run("cpu", "cpu", inputs["value"], SHAPES, inputs["loc"], inputs["weights"], inputs["grad_out"],
              dtype=dtype, num_points_list=POINTS, method=method)
    if method == "discrete":  # no location gradient by definition; the oracle's is zero
        got = (*got[:2], torch.zeros_like(got[2]), got[3])
    check_against_oracle(got, expected, dtype, f"{isa} D={D}")


@pytest.mark.parametrize("D", [32, 64, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_builds_on_knots(isa, D, dtype):
    """Points exactly on bilinear knots and on the -1 / H, W borders (power-of-two sizes make them exact in
    every dtype): the cell, the skipped-point rule and the one-sided location gradient must be the
    reference's in every build and head-size specialisation."""
    gen = torch.Generator().manual_seed(D)
    N, Lq, M = 1, 11, 2
    inputs = make_inputs(D, N, Lq, M, D, KNOT_SHAPES, KNOT_POINTS, dtype=torch.float32)
    loc = _knot_locations(gen, N, Lq, M)
    expected = oracle(inputs["value"], KNOT_SHAPES, loc, inputs["weights"], KNOT_POINTS, inputs["grad_out"])
    got = run("cpu", "cpu", inputs["value"], KNOT_SHAPES, loc, inputs["weights"], inputs["grad_out"], dtype=dtype)
    check_against_oracle(got, expected, dtype, f"{isa} knots D={D}")


def test_builds_agree_in_float64(monkeypatch):
    if len(_isas()) < 2:
        pytest.skip("this machine runs the baseline build only")
    inputs = make_inputs(seed=5, N=2, Lq=17, M=4, D=32, shapes=SHAPES, points=POINTS)
    args = (inputs["value"], SHAPES, inputs["loc"], inputs["weights"], inputs["grad_out"])
    native = run("cpu", "cpu", *args, num_points_list=POINTS)
    monkeypatch.setenv("RTDETR_KERNELS_CPU_ISA", "baseline")
    baseline = run("cpu", "cpu", *args, num_points_list=POINTS)
    for a, b, what in zip(native, baseline, ("output", "grad_value", "grad_locations", "grad_weights")):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("D", [32, 64, 24, 13, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_rows_convert_exactly(isa, D, dtype):
    """float16/bfloat16 value and grad_out rows are widened to float32 (8 channels at a time in the AVX2
    build, then a scalar tail) and everything else runs as in float32; so with inputs that are exact in
    the low precision, the result is the float32 result rounded once: within one unit of the low
    precision's rounding, far below any wrong conversion (a lost channel or a mis-shifted word)."""
    inputs = make_inputs(seed=3 * D, N=2, Lq=9, M=2, D=D, shapes=SHAPES, points=POINTS, dtype=dtype,
                         loc_dtype=torch.float32)
    args = (inputs["value"], SHAPES, inputs["loc"], inputs["weights"], inputs["grad_out"])
    low = run("cpu", "cpu", *args, dtype=dtype, loc_dtype=torch.float32, num_points_list=POINTS)
    wide = run("cpu", "cpu", *args, dtype=torch.float32, num_points_list=POINTS)
    eps = torch.finfo(dtype).eps
    for got, want, what in zip(low, wide, ("output", "grad_value", "grad_locations", "grad_weights")):
        if what in ("output", "grad_value"):  # rounded once to the low precision
            want = want.to(dtype).double()
        scale = max(float(want.abs().max()), 1.0)
        assert float((got - want).abs().max()) <= eps * scale, f"{isa} {dtype} D={D} {what}"


@pytest.mark.parametrize("D", [32, 64, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_output_rounds_like_torch(isa, D, dtype):
    """The float32 result is narrowed to float16/bfloat16 exactly as torch's conversion does (round to
    nearest even, overflow to inf, subnormals, NaN), exactly: one point per head, placed on a pixel
    centre (bilinear weights 1, 0, 0, 0), so the float32 result is exactly fl32(weight * value)."""
    gen = torch.Generator().manual_seed(D + (dtype == torch.bfloat16))
    N, Lq, M, H, W = 2, 7, 3, 4, 8
    big = 60000.0 if dtype == torch.float16 else 3.0e38
    value = (torch.randn(N, H * W, M, D, generator=gen) * torch.tensor([1e-6, 1.0, 1e3, big])[
        torch.randint(0, 4, (N, H * W, M, D), generator=gen)]).to(dtype)
    ys = torch.randint(0, H, (N, Lq, M, 1), generator=gen)
    xs = torch.randint(0, W, (N, Lq, M, 1), generator=gen)
    value[0, int(ys[0, 0, 0]) * W + int(xs[0, 0, 0]), 0, :3] = torch.tensor([float("nan"), float("-inf"), 1e-30])
    loc = torch.stack([(xs + 0.5) / W, (ys + 0.5) / H], dim=-1).float()  # exact pixel centres
    weights = (torch.rand(N, Lq, M, 1, generator=gen) * 3).float()
    got = rtdetr_kernels.ms_deform_attn(value, torch.tensor([[H, W]]), loc, weights, backend="cpu")
    rows = value.float()[torch.arange(N)[:, None, None], (ys * W + xs)[..., 0], torch.arange(M)]  # [N, Lq, M, D]
    want = (weights * rows).to(dtype).reshape(N, Lq, M * D)
    assert got.dtype == dtype
    same = (got == want) | (got.isnan() & want.isnan())  # exact; a zero's sign is not compared (0 + -0 = 0)
    assert bool(same.all()), f"{isa} {dtype} D={D}: {int((~same).sum())} outputs differ, e.g. {got[~same][:4]} vs {want[~same][:4]}"
    assert bool(want.isinf().any()) and bool(want.isnan().any())  # the special values were exercised
