"""Shared by the ms_deform_attn test files: an independent float64 oracle, input makers, runners.

The oracle is written from research/ms_deform_attn.md §1.2 (forward) and §1.3 (the three explicit
gradient formulas) in numpy, independently of ``rtdetr_kernels.ms_deform_attn.reference``:

- ``oracle``: vectorised over (n, q, m) and looping over the points, for every test;
- ``oracle_scalar``: a literal scalar loop, used only to check ``oracle`` on tiny inputs.

Both return ``(out [N, Lq, M, D], grad_value, grad_locations, grad_weights)`` in float64 numpy for
the canonical layout (locations [N, Lq, M, sum(P), 2], weights [N, Lq, M, sum(P)]).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

import rtdetr_kernels
from rtdetr_kernels import BackendUnavailableError, backends
from rtdetr_kernels.ms_deform_attn import op as msda_op

OP = "ms_deform_attn"
Shapes = Sequence[Tuple[int, int]]

# Random locations keep this far (in pixels) from the bilinear knots (integer pixel coordinates,
# which include the validity borders -1 and H/W) and from the discrete rounding boundaries (the same
# set: loc*W + 0.5 is an integer exactly when loc*W - 0.5 is). A float32 kernel computes the pixel
# coordinate with an absolute error of about W * 6e-8 < 1e-5 px for the sizes used here, so 1e-3 px
# guarantees that it picks the same cell (and the same one-sided gradient) as the float64 oracle.
KNOT_MARGIN = 1e-3

# The sampling methods, as (id, the op's arguments, the oracle's arguments)
METHODS = [
    ("bilinear", {}, {}),
    ("discrete_per_axis", dict(method="discrete", discrete_clamp="per_axis"), dict(method="discrete", clamp="per_axis")),
    ("discrete_official", dict(method="discrete", discrete_clamp="official"), dict(method="discrete", clamp="official")),
]


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


def _np(t) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy() if isinstance(t, torch.Tensor) else np.asarray(t, np.float64)


def oracle(value, shapes: Shapes, loc, weights, points: Sequence[int], grad_out,
           method: str = "bilinear", clamp: str = "per_axis"):
    value, loc, weights = _np(value), _np(loc), _np(weights)
    N, S, M, D = value.shape
    Lq = loc.shape[1]
    g = _np(grad_out).reshape(N, Lq, M, D)
    out = np.zeros((N, Lq, M, D))
    grad_value = np.zeros_like(value)
    grad_loc = np.zeros_like(loc)
    grad_weights = np.zeros_like(weights)
    n_idx = np.broadcast_to(np.arange(N)[:, None, None], (N, Lq, M))
    m_idx = np.broadcast_to(np.arange(M)[None, None, :], (N, Lq, M))
    start, column = 0, 0
    for (H, W), P in zip(shapes, points):
        for j in range(column, column + P):
            a = weights[..., j]
            loc_x, loc_y = loc[..., j, 0], loc[..., j, 1]

            def read(yi, xi, ok):
                index = start + np.clip(yi, 0, H - 1).astype(np.int64) * W + np.clip(xi, 0, W - 1).astype(np.int64)
                return index, value[n_idx, index, m_idx] * ok[..., None]

            if method == "bilinear":
                with np.errstate(invalid="ignore", over="ignore"):
                    x = loc_x * W - 0.5
                    y = loc_y * H - 0.5
                    valid = (x > -1) & (y > -1) & (x < W) & (y < H)
                x = np.where(valid, x, 0.0)
                y = np.where(valid, y, 0.0)
                x0, y0 = np.floor(x), np.floor(y)
                lx, ly = x - x0, y - y0
                hx, hy = 1 - lx, 1 - ly
                taps = []
                for dy, dx, tap in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
                    yi, xi = y0 + dy, x0 + dx
                    ok = valid & (xi >= 0) & (xi <= W - 1) & (yi >= 0) & (yi <= H - 1)
                    index, v = read(yi, xi, ok)
                    taps.append((index, tap * ok, v))
                (_, _, v00), (_, _, v01), (_, _, v10), (_, _, v11) = taps
                sampled = sum(tap[..., None] * v for _, tap, v in taps)
                grad_loc[..., j, 0] = np.where(valid, W * a * (g * (hy[..., None] * (v01 - v00) + ly[..., None] * (v11 - v10))).sum(-1), 0.0)
                grad_loc[..., j, 1] = np.where(valid, H * a * (g * (hx[..., None] * (v10 - v00) + lx[..., None] * (v11 - v01))).sum(-1), 0.0)
            else:
                finite = np.isfinite(loc_x) & np.isfinite(loc_y)
                with np.errstate(invalid="ignore", over="ignore"):
                    u = np.where(finite, loc_x * W + 0.5, 0.0)
                    v = np.where(finite, loc_y * H + 0.5, 0.0)
                # int64(t) truncates toward zero (upstream's `.to(torch.int64)`), then clamps
                ix = np.trunc(np.clip(u, -2.0, 1e9))
                iy = np.trunc(np.clip(v, -2.0, 1e9))
                ix = np.clip(ix, 0, (W - 1) if clamp == "per_axis" else (H - 1))
                iy = np.clip(iy, 0, H - 1)
                # official clamp on a portrait level: x in (W-1, H-1] would be an index error upstream;
                # the op's documented choice is that such a sample contributes nothing
                ok = finite & (ix <= W - 1)
                index, sample = read(iy, ix, ok)
                taps = [(index, ok.astype(np.float64), sample)]
                sampled = sample
            out += a[..., None] * sampled
            grad_weights[..., j] = (g * sampled).sum(-1)
            for index, tap, _ in taps:
                np.add.at(grad_value, (n_idx, index, m_idx), (a * tap)[..., None] * g)
        start += H * W
        column += P
    return out, grad_value, grad_loc, grad_weights


def oracle_scalar(value, shapes: Shapes, loc, weights, points: Sequence[int], grad_out,
                  method: str = "bilinear", clamp: str = "per_axis"):
    """§1.2/§1.3 transcribed one scalar at a time (slow; tiny inputs only)."""
    value, loc, weights = _np(value), _np(loc), _np(weights)
    N, S, M, D = value.shape
    Lq = loc.shape[1]
    g = _np(grad_out).reshape(N, Lq, M, D)
    out = np.zeros((N, Lq, M, D))
    gv, gl, gw = np.zeros_like(value), np.zeros_like(loc), np.zeros_like(weights)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                start, j = 0, 0
                for (H, W), P in zip(shapes, points):
                    for _ in range(P):
                        a = weights[n, q, m, j]
                        lx_, ly_ = float(loc[n, q, m, j, 0]), float(loc[n, q, m, j, 1])

                        def v(yy, xx):
                            if 0 <= yy <= H - 1 and 0 <= xx <= W - 1:
                                return value[n, start + yy * W + xx, m, :]
                            return np.zeros(D)

                        if method == "bilinear":
                            x, y = lx_ * W - 0.5, ly_ * H - 0.5
                            if y > -1 and x > -1 and y < H and x < W:
                                x0, y0 = math.floor(x), math.floor(y)
                                lx, ly = x - x0, y - y0
                                hx, hy = 1 - lx, 1 - ly
                                v00, v01, v10, v11 = v(y0, x0), v(y0, x0 + 1), v(y0 + 1, x0), v(y0 + 1, x0 + 1)
                                s = hy * hx * v00 + hy * lx * v01 + ly * hx * v10 + ly * lx * v11
                                out[n, q, m] += a * s
                                gw[n, q, m, j] = g[n, q, m] @ s
                                for yy, xx, tap in ((y0, x0, hy * hx), (y0, x0 + 1, hy * lx), (y0 + 1, x0, ly * hx), (y0 + 1, x0 + 1, ly * lx)):
                                    if 0 <= yy <= H - 1 and 0 <= xx <= W - 1:
                                        gv[n, start + yy * W + xx, m] += a * tap * g[n, q, m]
                                gl[n, q, m, j, 0] = W * a * (g[n, q, m] @ (hy * (v01 - v00) + ly * (v11 - v10)))
                                gl[n, q, m, j, 1] = H * a * (g[n, q, m] @ (hx * (v10 - v00) + lx * (v11 - v01)))
                        elif math.isfinite(lx_) and math.isfinite(ly_):
                            ix = int(max(lx_ * W + 0.5, -2.0))  # int() truncates toward zero
                            iy = int(max(ly_ * H + 0.5, -2.0))
                            ix = min(max(ix, 0), (W - 1) if clamp == "per_axis" else (H - 1))
                            iy = min(max(iy, 0), H - 1)
                            if ix <= W - 1:
                                s = value[n, start + iy * W + ix, m, :]
                                out[n, q, m] += a * s
                                gw[n, q, m, j] = g[n, q, m] @ s
                                gv[n, start + iy * W + ix, m] += a * g[n, q, m]
                        j += 1
                    start += H * W
    return out, gv, gl, gw


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def level_of_columns(shapes: Shapes, points: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(W, H) of the level of every point column, float64 tensors of shape [sum(P)]."""
    ws = [float(w) for (h, w), p in zip(shapes, points) for _ in range(p)]
    hs = [float(h) for (h, w), p in zip(shapes, points) for _ in range(p)]
    return torch.tensor(ws, dtype=torch.float64), torch.tensor(hs, dtype=torch.float64)


def random_locations(gen: torch.Generator, N: int, Lq: int, M: int, shapes: Shapes, points: Sequence[int],
                     *, dtype: torch.dtype = torch.float64, low: float = -1.4, high: float = 0.4,
                     margin: float = KNOT_MARGIN) -> torch.Tensor:
    """[N, Lq, M, sum(P), 2] float64 locations whose pixel coordinates lie in (low, size + high),
    exactly representable in ``dtype`` and at least ``margin`` px from every knot after that rounding."""
    W, H = level_of_columns(shapes, points)
    size = torch.stack([W, H], -1)  # [T, 2]
    shape = (N, Lq, M, len(W), 2)

    def draw():
        pixel = low + torch.rand(shape, generator=gen, dtype=torch.float64) * (size + high - low)
        return ((pixel + 0.5) / size).to(dtype).double()

    loc = draw()
    for _ in range(50):
        pixel = loc * size - 0.5
        bad = (pixel - pixel.round()).abs() < margin
        if not bad.any():
            return loc
        loc = torch.where(bad, draw(), loc)
    raise AssertionError("could not draw locations away from the knots")


def make_inputs(seed: int, N: int, Lq: int, M: int, D: int, shapes: Shapes, points: Sequence[int], *,
                dtype: torch.dtype = torch.float64, loc_dtype: Optional[torch.dtype] = None,
                low: float = -1.4, high: float = 0.4) -> Dict[str, torch.Tensor]:
    """Random float64 inputs, already rounded to the dtypes the backend will see (so the oracle,
    fed the same values, measures only the backend's arithmetic error). Nothing is zero."""
    loc_dtype = loc_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    S = sum(h * w for h, w in shapes)
    T = sum(points)
    value = torch.randn(N, S, M, D, generator=gen, dtype=torch.float64).to(dtype).double()
    loc = random_locations(gen, N, Lq, M, shapes, points, dtype=loc_dtype, low=low, high=high)
    # signed weights in [-1, -0.1] U [0.1, 1]: more general than softmax output, never zero
    weights = (torch.rand(N, Lq, M, T, generator=gen, dtype=torch.float64) * 0.9 + 0.1)
    weights = weights * torch.where(torch.rand(N, Lq, M, T, generator=gen) < 0.3, -1.0, 1.0).double()
    weights = weights.to(loc_dtype).double()
    grad_out = torch.randn(N, Lq, M * D, generator=gen, dtype=torch.float64).to(dtype).double()
    return dict(value=value, loc=loc, weights=weights, grad_out=grad_out)


def to_v1(loc: torch.Tensor, weights: torch.Tensor, L: int):
    """Canonical [N,Lq,M,L*P,2] -> the 6-D v1 layout [N,Lq,M,L,P,2] (equal points per level)."""
    N, Lq, M, T, _ = loc.shape
    return loc.reshape(N, Lq, M, L, T // L, 2), weights.reshape(N, Lq, M, L, T // L)


# --------------------------------------------------------------------------------------------
# Running a backend
# --------------------------------------------------------------------------------------------


def why_not(backend: str, device: str, value, shapes, loc, weights, **kwargs) -> Optional[str]:
    """The backend's own reason for refusing this exact call (dtype, method, levels...), or None."""
    problem = msda_op.validate(value.to(device), shapes, loc.to(device), weights.to(device), **kwargs)
    return backends.why_not(backend, msda_op.describe(problem))


def best_float_dtype(backend: str, device: str, inputs, shapes, **kwargs) -> torch.dtype:
    """float64 where the backend serves it (exact comparison with the oracle), else float32."""
    for dtype in (torch.float64, torch.float32):
        cast = [inputs[k].to(dtype) for k in ("value", "loc", "weights")]
        if why_not(backend, device, cast[0], shapes, cast[1], cast[2], **kwargs) is None:
            return dtype
    pytest.skip(f"{backend} on {device} serves neither float64 nor float32 for this call: "
                f"{why_not(backend, device, *cast[:1], shapes, *cast[1:], **kwargs)}")


def run(backend: str, device: str, value, shapes, loc, weights, grad_out=None, *, dtype=None, loc_dtype=None,
        need=(True, True, True), **kwargs):
    """Forward (and backward with grad_out) through the public op; returns float64 CPU tensors
    (out [N,Lq,M*D], grad_value, grad_loc, grad_weights) with None for grads not requested.
    Skips when the backend declines this call (the skip names its reason)."""
    dtype = dtype or value.dtype
    loc_dtype = loc_dtype or dtype
    tensors = [t.detach().to(device=device, dtype=d).requires_grad_(r)
               for t, d, r in ((value, dtype, need[0]), (loc, loc_dtype, need[1]), (weights, loc_dtype, need[2]))]
    try:
        out = rtdetr_kernels.ms_deform_attn(tensors[0], shapes, tensors[1], tensors[2], backend=backend, **kwargs)
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    assert out.dtype == dtype, f"output dtype {out.dtype}, expected value's dtype {dtype}"
    grads = [None, None, None]
    if grad_out is not None:
        out.backward(grad_out.to(device=device, dtype=out.dtype))
        grads = [t.grad for t in tensors]
        for t, grad in zip(tensors, grads):
            if t.requires_grad:
                assert grad is not None and grad.dtype == t.dtype and grad.shape == t.shape
    as64 = lambda t: None if t is None else t.detach().to("cpu", torch.float64)  # noqa: E731
    return (as64(out), *(as64(g) for g in grads))


# --------------------------------------------------------------------------------------------
# Comparing
# --------------------------------------------------------------------------------------------

# Error bound per compute dtype, relative to the largest magnitude of the expected tensor.
# float64: the kernels and the oracle differ only in summation order (<= 16 terms per output,
# scatter sums of <= a few hundred terms per value grad): ~1e-15 relative; 1e-11 leaves room.
# float32: per-term rounding 6e-8, pixel coordinate error W * 6e-8 <= 1e-5 px moves a bilinear tap by
# <= 1e-5 (|v| ~ 4 max); the location grads scale by W and sum D terms, so relative to their max
# magnitude the error stays ~1e-6; 2e-5 is a 10x margin and still 50x below a wrong corner or tap.
SCALED_TOL = {torch.float64: 1e-11, torch.float32: 2e-5}


def assert_close_scaled(actual, expected, tol: float, what: str) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64).cpu()
    expected = torch.as_tensor(expected, dtype=torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values at {torch.nonzero(~torch.isfinite(actual))[:5].tolist()}"
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1.0)
    diff = (actual - expected).abs()
    if diff.numel() and float(diff.max()) > tol * scale:
        worst = int(diff.argmax())
        index = np.unravel_index(worst, tuple(diff.shape))
        raise AssertionError(
            f"{what}: max |diff| {float(diff.max()):.3e} > {tol:.1e} * {scale:.3g} at index {tuple(int(i) for i in index)} "
            f"(got {float(actual.flatten()[worst]):.10g}, expected {float(expected.flatten()[worst]):.10g}); "
            f"{int((diff > tol * scale).sum())} of {diff.numel()} elements off")


def check_against_oracle(result, expected, dtype: torch.dtype, label: str = "") -> None:
    out, grad_value, grad_loc, grad_weights = result
    e_out, e_gv, e_gl, e_gw = expected
    tol = SCALED_TOL[dtype]
    assert_close_scaled(out, torch.from_numpy(e_out).reshape(out.shape), tol, f"{label} output")
    for name, got, want in (("grad_value", grad_value, e_gv), ("grad_locations", grad_loc, e_gl),
                            ("grad_weights", grad_weights, e_gw)):
        if got is not None:
            assert_close_scaled(got, torch.from_numpy(want).reshape(got.shape), tol, f"{label} {name}")
