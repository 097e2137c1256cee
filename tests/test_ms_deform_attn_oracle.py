"""ms_deform_attn against an independent float64 oracle (tests/msda_oracle.py), every backend.

Forward and all three gradients, the v1 6-D and the v2 flattened layouts, both discrete clamps,
knots and exact borders, out-of-range and non-finite locations, and parity with the grid_sample
formulation RT-DETR ships. Each backend runs in float64 where it serves it, else float32 (tolerances:
msda_oracle.SCALED_TOL).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import backend_params, deterministic_algorithms, interpreter
from msda_oracle import (METHODS, SCALED_TOL, assert_close_scaled, best_float_dtype, check_against_oracle, make_inputs,
                         oracle, oracle_scalar, random_locations, run, to_v1)
from rtdetr_kernels.ms_deform_attn import ms_deform_attn_grid_sample

BACKENDS = backend_params("ms_deform_attn")

# (id, N, Lq, M, D, shapes (H, W), points per level, layout)
CASES = [
    ("d1_single", 1, 1, 1, 1, [(5, 7)], [1], "v1"),
    ("d3_odd", 2, 13, 1, 3, [(5, 7), (1, 1), (3, 2)], [4, 4, 4], "v1"),
    ("d32_heads8", 1, 13, 8, 32, [(10, 10), (5, 5), (3, 3)], [4, 4, 4], "v1"),
    ("d64_l4_p1", 2, 5, 8, 64, [(6, 9), (3, 5), (2, 3), (1, 1)], [1, 1, 1, 1], "v1"),
    ("v2_points_132", 2, 7, 8, 32, [(5, 7), (4, 3), (2, 2)], [1, 3, 2], "v2"),
    ("v2_equal_points", 1, 13, 1, 3, [(7, 5), (3, 4)], [4, 4], "v2"),
]
# RT-DETR's real decoder call (640 px, 300 queries); too slow for the Triton interpreter.
REAL_CASE = ("rtdetr_640", 1, 300, 8, 32, [(80, 80), (40, 40), (20, 20)], [4, 4, 4], "v1")


def _skip_slow_for_interpreter(device: str, backend: str) -> None:
    if backend == "triton" and device == "cpu" and interpreter():
        pytest.skip("too large for the Triton interpreter; runs on GPU")


def _call_args(inputs, shapes, points, layout):
    """(loc, weights, kwargs) in the requested layout; the oracle always uses the canonical one."""
    if layout == "v1":
        loc, weights = to_v1(inputs["loc"], inputs["weights"], len(shapes))
        return loc, weights, {}
    return inputs["loc"], inputs["weights"], {"num_points_list": list(points)}


def _check_case(device, backend, case, seed, **method):
    name, N, Lq, M, D, shapes, points, layout = case
    inputs = make_inputs(seed, N, Lq, M, D, shapes, points)
    loc, weights, kwargs = _call_args(inputs, shapes, points, layout)
    kwargs.update(method)
    dtype = best_float_dtype(backend, device, inputs, shapes, num_points_list=list(points), **method)
    if dtype != torch.float64:  # re-draw so that locations are float32-exact and float32-safe
        inputs = make_inputs(seed, N, Lq, M, D, shapes, points, dtype=dtype)
        loc, weights, _ = _call_args(inputs, shapes, points, layout)
    result = run(backend, device, inputs["value"], shapes, loc, weights, inputs["grad_out"], dtype=dtype, **kwargs)
    expected = oracle(inputs["value"], shapes, inputs["loc"], inputs["weights"], points, inputs["grad_out"], **method)
    check_against_oracle(result, expected, dtype, f"{backend}/{name}/{dtype}")
    return inputs, result, expected


# --------------------------------------------------------------------------------------------
# The oracle itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,clamp", [("bilinear", "per_axis"), ("discrete", "per_axis"), ("discrete", "official")])
def test_vectorised_oracle_matches_scalar_loop(method, clamp):
    shapes, points = [(3, 5), (4, 2), (1, 1)], [2, 1, 3]
    inputs = make_inputs(11, 2, 3, 2, 3, shapes, points, low=-2.0, high=1.0)
    loc = inputs["loc"].clone()
    loc[0, 0, 0, 0] = torch.tensor([0.5 / 5, 1.5 / 3])  # a knot in both axes
    loc[0, 1, 1, 1] = torch.tensor([float("nan"), 0.5])
    loc[1, 2, 0, 2] = torch.tensor([-0.5 / 2, 0.5])  # pixel x = -1 exactly: skipped
    loc[1, 0, 1, 3] = torch.tensor([float("inf"), 0.3])
    args = (inputs["value"], shapes, loc, inputs["weights"], points, inputs["grad_out"], method, clamp)
    for got, want in zip(oracle(*args), oracle_scalar(*args)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # the reads are not all zero (a broken gather would make both oracles trivially agree)
    assert np.abs(oracle(*args)[0]).min(axis=-1).max() > 0.1


# --------------------------------------------------------------------------------------------
# Random locations, bilinear
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bilinear_matches_oracle(device, backend, case):
    inputs, result, expected = _check_case(device, backend, case, seed=1)
    # the draw covers in-range and out-of-range points alike (the test would notice a kernel that
    # drops either kind)
    name, N, Lq, M, D, shapes, points, layout = case
    pixel_x = inputs["loc"][..., 0] * torch.tensor([w for (h, w), p in zip(shapes, points) for _ in range(p)]) - 0.5
    assert (pixel_x < -1).any() or N * Lq * M * sum(points) < 8
    assert np.abs(expected[0]).max() > 0.1


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bilinear_matches_oracle_rtdetr_shape(device, backend):
    _skip_slow_for_interpreter(device, backend)
    _check_case(device, backend, REAL_CASE, seed=2)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_v1_and_v2_layouts_agree(device, backend):
    """The same problem passed as 6-D [N,Lq,M,L,P,2] and flattened [N,Lq,M,L*P,2] gives the same result."""
    shapes, points = [(5, 7), (3, 2)], [3, 3]
    inputs = make_inputs(3, 1, 13, 2, 3, shapes, points, dtype=torch.float32)
    loc_v1, w_v1 = to_v1(inputs["loc"], inputs["weights"], 2)
    common = (backend, device, inputs["value"], shapes)
    v1 = run(*common, loc_v1, w_v1, inputs["grad_out"], dtype=torch.float32)
    v2 = run(*common, inputs["loc"], inputs["weights"], inputs["grad_out"], dtype=torch.float32, num_points_list=[3, 3])
    v2_implicit = run(*common, inputs["loc"], inputs["weights"], inputs["grad_out"], dtype=torch.float32)
    for a, b, c in zip(v1, v2, v2_implicit):
        torch.testing.assert_close(a.reshape(b.shape), b, rtol=0, atol=0)
        torch.testing.assert_close(c, b, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Knots and exact borders
# --------------------------------------------------------------------------------------------

# Power-of-two sizes make every special location exactly representable and loc*W - 0.5 exact in
# float32 and float64 alike, so knots are hit exactly whatever the kernel's rounding or FMA use.
KNOT_SHAPES = [(4, 8), (2, 1), (1, 1), (8, 2)]
KNOT_POINTS = [3, 3, 3, 3]


def _special_pixels(size: int):
    # every knot from the lower border -1 to the upper border `size`, plus normalised 0 and 1
    return [float(k) for k in range(-1, size + 1)] + [-0.5, size - 0.5]


def _knot_locations(gen, N, Lq, M):
    loc = random_locations(gen, N, Lq, M, KNOT_SHAPES, KNOT_POINTS, dtype=torch.float32)
    column = 0
    for (H, W), P in zip(KNOT_SHAPES, KNOT_POINTS):
        for j in range(column, column + P):
            for axis, size in ((0, W), (1, H)):
                specials = torch.tensor(_special_pixels(size), dtype=torch.float64)
                pick = specials[torch.randint(len(specials), (N, Lq, M), generator=gen)]
                # each coordinate is special in about 2/3 of the points, random (off-knot) otherwise
                use = torch.rand(N, Lq, M, generator=gen) < 0.67
                loc[..., j, axis] = torch.where(use, (pick + 0.5) / size, loc[..., j, axis])
        column += P
    return loc


@pytest.mark.parametrize("method", METHODS, ids=[m[0] for m in METHODS])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_knots_and_exact_borders(device, backend, dtype, method):
    """Locations on pixel centres, edges and rounding ties: every backend picks the oracle's cell, the
    oracle's one-sided location gradient and the oracle's nearest pixel (the kernels round like it)."""
    name, op_method, oracle_method = method
    gen = torch.Generator().manual_seed(4)
    N, Lq, M, D = 1, 13, 2, 3
    inputs = make_inputs(4, N, Lq, M, D, KNOT_SHAPES, KNOT_POINTS, dtype=torch.float32)
    loc = _knot_locations(gen, N, Lq, M)
    if dtype == torch.float64 and best_float_dtype(backend, device, inputs, KNOT_SHAPES, **op_method) != torch.float64:
        pytest.skip(f"{backend} on {device} does not serve float64")
    result = run(backend, device, inputs["value"], KNOT_SHAPES, loc, inputs["weights"], inputs["grad_out"], dtype=dtype,
                 **op_method)
    expected = oracle(inputs["value"], KNOT_SHAPES, loc, inputs["weights"], KNOT_POINTS, inputs["grad_out"],
                      **oracle_method)
    check_against_oracle(result, expected, dtype, f"{backend}/knots/{name}/{dtype}")
    W = torch.tensor([w for (h, w), p in zip(KNOT_SHAPES, KNOT_POINTS) for _ in range(p)], dtype=torch.float64)
    H = torch.tensor([h for (h, w), p in zip(KNOT_SHAPES, KNOT_POINTS) for _ in range(p)], dtype=torch.float64)
    px, py = loc[..., 0] * W - 0.5, loc[..., 1] * H - 0.5
    on_border = (px == -1) | (px == W) | (py == -1) | (py == H)
    assert on_border.sum() >= 10 and (px == W - 1).sum() >= 3 and (px == 0).sum() >= 3
    if op_method:
        return  # nearest sampling reads a clamped pixel on the borders; it has no location gradient
    # bilinear: points exactly on the borders x = -1, x = W, y = -1, y = H are skipped: no grads at all
    _, _, grad_loc, grad_weights = result
    assert (grad_loc[on_border] == 0).all(), "a point on the exact border got a location gradient"
    assert (grad_weights[on_border] == 0).all(), "a point on the exact border got a weight gradient"


# --------------------------------------------------------------------------------------------
# Out-of-range and non-finite locations
# --------------------------------------------------------------------------------------------

FAR = [-3e38, -1e30, -1e6, -5.0, -0.7, 1.7, 5.0, 1e6, 1e30, 3e38]  # all float32-representable
NON_FINITE = [float("nan"), float("inf"), -float("inf")]


def _plant(gen, loc, values, fraction):
    """Put values from ``values`` into about ``fraction`` of the coordinates; returns the mask of points hit."""
    values = torch.tensor(values, dtype=torch.float64)
    pick = values[torch.randint(len(values), loc.shape, generator=gen)]
    use = torch.rand(loc.shape, generator=gen) < fraction
    use[0, 0, 0, 0] = torch.tensor([True, True])  # at least one point with both coordinates planted
    return torch.where(use, pick, loc), use.any(-1)


@pytest.mark.parametrize("method", ["bilinear", "discrete"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_out_of_range_locations(device, backend, method):
    shapes, points = [(5, 7), (1, 1), (7, 3)], [2, 2, 2]
    inputs = make_inputs(5, 2, 13, 2, 3, shapes, points, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    loc, _ = _plant(gen, inputs["loc"], FAR, 0.4)
    dtype = best_float_dtype(backend, device, inputs, shapes, method=method)
    result = run(backend, device, inputs["value"], shapes, loc, inputs["weights"], inputs["grad_out"], dtype=dtype,
                 method=method)
    expected = oracle(inputs["value"], shapes, loc, inputs["weights"], points, inputs["grad_out"], method=method)
    check_against_oracle(result, expected, dtype, f"{backend}/far/{method}/{dtype}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf in the Triton interpreter
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("method", METHODS, ids=[m[0] for m in METHODS])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_finite_locations(device, backend, method, deterministic):
    """NaN/inf locations: no crash, finite outputs, the point contributes nothing and gets zero grads
    (on both grad_value paths)."""
    name, op_method, oracle_method = method
    shapes, points = [(5, 7), (1, 1), (3, 2)], [2, 2, 2]
    inputs = make_inputs(6, 2, 13, 2, 3, shapes, points, dtype=torch.float32)
    gen = torch.Generator().manual_seed(6)
    loc, hit = _plant(gen, inputs["loc"], NON_FINITE, 0.25)
    dtype = best_float_dtype(backend, device, inputs, shapes, **op_method)
    with deterministic_algorithms(deterministic):
        result = run(backend, device, inputs["value"], shapes, loc, inputs["weights"], inputs["grad_out"], dtype=dtype,
                     **op_method)
    expected = oracle(inputs["value"], shapes, loc, inputs["weights"], points, inputs["grad_out"], **oracle_method)
    check_against_oracle(result, expected, dtype, f"{backend}/nonfinite/{name}/{dtype}")  # also checks finiteness
    assert hit.sum() > 20
    _, _, grad_loc, grad_weights = result
    assert (grad_loc[hit] == 0).all() and (grad_weights[hit] == 0).all()


# --------------------------------------------------------------------------------------------
# Discrete (RT-DETRv2 nearest) sampling
# --------------------------------------------------------------------------------------------

# a landscape level, a portrait level where the official clamp (x to H-1) differs from per-axis,
# a 1x1 level, and non-equal points per level
DISCRETE_SHAPES = [(3, 7), (7, 3), (1, 1), (4, 4)]
DISCRETE_POINTS = [2, 3, 1, 2]


@pytest.mark.parametrize("clamp", ["per_axis", "official"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_discrete_matches_oracle(device, backend, clamp):
    N, Lq, M, D = 2, 13, 2, 3
    # pixel range reaches 2.5 px past every border, so that clamping is exercised on all sides
    inputs = make_inputs(7, N, Lq, M, D, DISCRETE_SHAPES, DISCRETE_POINTS, dtype=torch.float32, low=-2.5, high=2.5)
    dtype = best_float_dtype(backend, device, inputs, DISCRETE_SHAPES, num_points_list=DISCRETE_POINTS,
                             method="discrete", discrete_clamp=clamp)
    result = run(backend, device, inputs["value"], DISCRETE_SHAPES, inputs["loc"], inputs["weights"], inputs["grad_out"],
                 dtype=dtype, num_points_list=DISCRETE_POINTS, method="discrete", discrete_clamp=clamp)
    expected = oracle(inputs["value"], DISCRETE_SHAPES, inputs["loc"], inputs["weights"], DISCRETE_POINTS,
                      inputs["grad_out"], method="discrete", clamp=clamp)
    check_against_oracle(result, expected, dtype, f"{backend}/discrete-{clamp}/{dtype}")
    assert (result[2] == 0).all(), "discrete sampling has no location gradient"
    # the two clamps really differ on this input (otherwise this test could not tell them apart)
    other = oracle(inputs["value"], DISCRETE_SHAPES, inputs["loc"], inputs["weights"], DISCRETE_POINTS,
                   inputs["grad_out"], method="discrete", clamp="official" if clamp == "per_axis" else "per_axis")
    assert np.abs(other[0] - expected[0]).max() > 0.1


# --------------------------------------------------------------------------------------------
# Parity with the grid_sample formulation (RT-DETR / Deformable-DETR's pure-PyTorch core)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_grid_sample_parity(device, backend):
    """Interior locations (in (0, 1), off the knots) in float64: the op and grid_sample agree on the
    forward and every grad. (They legitimately differ at the exact border -1 and for NaN, §1.4.)"""
    shapes, points = [(6, 9), (3, 5), (1, 1)], [4, 4, 4]
    N, Lq, M, D = 2, 13, 4, 8
    inputs = make_inputs(8, N, Lq, M, D, shapes, points, low=-0.5, high=-0.5)
    dtype = best_float_dtype(backend, device, inputs, shapes)
    if dtype != torch.float64:
        inputs = make_inputs(8, N, Lq, M, D, shapes, points, dtype=dtype, low=-0.5, high=-0.5)
    loc, weights = to_v1(inputs["loc"], inputs["weights"], len(shapes))
    assert ((loc > 0) & (loc < 1)).all()
    result = run(backend, device, inputs["value"], shapes, loc, weights, inputs["grad_out"], dtype=dtype)

    tensors = [t.clone().requires_grad_() for t in (inputs["value"], loc, weights)]
    expected = ms_deform_attn_grid_sample(tensors[0], shapes, tensors[1], tensors[2])
    expected.backward(inputs["grad_out"])
    tol = SCALED_TOL[dtype]
    for name, got, want in zip(("output", "grad_value", "grad_locations", "grad_weights"), result,
                               (expected.detach(), *(t.grad for t in tensors))):
        assert_close_scaled(got, want, tol, f"{backend} vs grid_sample: {name}")
