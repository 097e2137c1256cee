"""ms_deform_attn under torch.use_deterministic_algorithms(True), every backend.

Many sampling points land on the same few cells, so a backward that scatters grad_value with float
atomics (or any order-dependent reduction) would give run-to-run differences in the last bits. In
deterministic mode two runs on fresh-but-identical inputs must give bitwise-equal output and grads,
and those grads must match the default (possibly non-deterministic) path to float32 accuracy.
"""

from __future__ import annotations

import pytest
import torch

from helpers import OpCalls, backend_params, interpreter
from msda_oracle import SCALED_TOL, check_against_oracle, make_inputs, oracle, run

BACKENDS = backend_params("ms_deform_attn")
SHAPES = [(2, 2), (1, 1), (3, 3)]
POINTS = [4, 4, 4]
N, M = 2, 2


def _sizes(device, backend):
    """(Lq, D): smaller under the Triton interpreter, which is ~1000x slower than compiled code."""
    return (13, 4) if backend == "triton" and device == "cpu" and interpreter() else (48, 16)


@pytest.fixture
def deterministic():
    """Turns deterministic mode on for the test and restores whatever was set before."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _colliding_inputs(dtype, LQ, D):
    """Fresh tensors each call, identical values: every point of a level falls in the cell whose
    corners are the level's first 2x2 pixels, so each of those value entries receives
    contributions from Lq * P points per (n, head)."""
    inputs = make_inputs(40, N, LQ, M, D, SHAPES, POINTS, dtype=dtype, loc_dtype=torch.float32)
    gen = torch.Generator().manual_seed(41)
    W = torch.tensor([w for (h, w), p in zip(SHAPES, POINTS) for _ in range(p)], dtype=torch.float64)
    H = torch.tensor([h for (h, w), p in zip(SHAPES, POINTS) for _ in range(p)], dtype=torch.float64)
    pixel = 0.05 + 0.9 * torch.rand(N, LQ, M, sum(POINTS), 2, generator=gen, dtype=torch.float64)  # in (0, 1) px
    inputs["loc"] = ((pixel + 0.5) / torch.stack([W, H], -1)).float().double()
    return inputs


def _run(device, backend, dtype):
    inputs = _colliding_inputs(dtype, *_sizes(device, backend))
    return inputs, run(backend, device, inputs["value"], SHAPES, inputs["loc"], inputs["weights"], inputs["grad_out"],
                       dtype=dtype, loc_dtype=torch.float32, num_points_list=POINTS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic_mode_is_bitwise_reproducible(device, backend, dtype, deterministic):
    with OpCalls("ms_deform_attn_backward") as spy:
        inputs, first = _run(device, backend, dtype)
    assert [call[-2] for call in spy.calls] == [True], "the backward op was not told to be deterministic"  # (..., deterministic, backend)
    _, second = _run(device, backend, dtype)
    for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), first, second):
        assert torch.equal(a, b), f"{backend} {name}: runs differ by up to {float((a - b).abs().max()):.3e}"
    # and the reproducible answer is the right one
    expected = oracle(inputs["value"], SHAPES, inputs["loc"], inputs["weights"], POINTS, inputs["grad_out"])
    if dtype == torch.float32:
        check_against_oracle(first, expected, torch.float32, f"{backend}/deterministic")
    # only the 4 hot value entries per level and (n, head) receive grads, each from Lq * P points
    D = inputs["value"].shape[-1]
    assert 0 < (first[1].abs() > 0).sum() <= N * M * D * 4 * len(SHAPES)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic_matches_default_mode(device, backend):
    _, default = _run(device, backend, torch.float32)
    enabled = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _, reproducible = _run(device, backend, torch.float32)
    finally:
        torch.use_deterministic_algorithms(enabled)
    # both are float32 sums of the same <= 192 terms per element, in possibly different orders
    for got, want in zip(reproducible, default):
        scale = max(float(want.abs().max()), 1.0)
        assert float((got - want).abs().max()) <= SCALED_TOL[torch.float32] * scale
