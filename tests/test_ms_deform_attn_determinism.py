"""ms_deform_attn under torch.use_deterministic_algorithms(True), every backend and sampling method.

Many sampling points land on the same few cells, so a backward that scatters grad_value with float
atomics (or any order-dependent reduction) would give run-to-run differences in the last bits. In
deterministic mode two runs on fresh-but-identical inputs must give bitwise-equal output and grads,
and those grads must match the default (possibly non-deterministic) path to float32 accuracy; the
location and weight grads do not depend on which grad_value path ran. (That the flag reaches the
backward op is checked for every op in test_op_contract.py.)
"""

from __future__ import annotations

import pytest
import torch

from helpers import OpCalls, backend_params, deterministic_algorithms, interpreter
from msda_oracle import METHODS, SCALED_TOL, assert_close_scaled, check_against_oracle, make_inputs, oracle, run
from op_testers import recorded

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
    with deterministic_algorithms(True):
        yield


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


def _run(device, backend, dtype, method=None, need=(True, True, True)):
    inputs = _colliding_inputs(dtype, *_sizes(device, backend))
    return inputs, run(backend, device, inputs["value"], SHAPES, inputs["loc"], inputs["weights"], inputs["grad_out"],
                       dtype=dtype, loc_dtype=torch.float32, num_points_list=POINTS, need=need, **(method or {}))


@pytest.mark.parametrize("method", METHODS, ids=[m[0] for m in METHODS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic_mode_is_bitwise_reproducible(device, backend, dtype, method, deterministic):
    name, op_method, oracle_method = method
    inputs, first = _run(device, backend, dtype, op_method)
    _, second = _run(device, backend, dtype, op_method)
    for what, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), first, second):
        assert torch.equal(a, b), f"{backend} {what}: runs differ by up to {float((a - b).abs().max()):.3e}"
    # and the reproducible answer is the right one
    expected = oracle(inputs["value"], SHAPES, inputs["loc"], inputs["weights"], POINTS, inputs["grad_out"], **oracle_method)
    if dtype == torch.float32:
        check_against_oracle(first, expected, torch.float32, f"{backend}/{name}/deterministic")
    # only the 4 hot value entries per level and (n, head) receive grads, each from Lq * P points
    D = inputs["value"].shape[-1]
    assert 0 < (first[1].abs() > 0).sum() <= N * M * D * 4 * len(SHAPES)


@pytest.mark.parametrize("method", METHODS, ids=[m[0] for m in METHODS])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic_matches_default_mode(device, backend, method):
    _, default = _run(device, backend, torch.float32, method[1])
    with deterministic_algorithms(True):
        _, reproducible = _run(device, backend, torch.float32, method[1])
    # both are float32 sums of the same <= 192 terms per element, in possibly different orders
    for got, want in zip(reproducible, default):
        scale = max(float(want.abs().max()), 1.0)
        assert float((got - want).abs().max()) <= SCALED_TOL[torch.float32] * scale
    # the location and weight grads do not depend on the grad_value path
    assert torch.equal(reproducible[2], default[2]) and torch.equal(reproducible[3], default[3])


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_deterministic_value_grad_only_fp16(device, backend, deterministic):
    """fp16 value, float32 locations and weights, only grad_value asked for: the backward op is asked
    for that gradient alone, and the deterministic path gets it right."""
    with OpCalls("ms_deform_attn_backward") as spy:
        inputs, (_, grad_value, grad_loc, grad_weights) = _run(device, backend, torch.float16, need=(True, False, False))
    op = "ms_deform_attn_backward"
    assert [[recorded(op, c, n) for n in ("need_value", "need_locations", "need_weights", "deterministic")]
            for c in spy.calls] == [[True, False, False, True]]
    assert grad_loc is None and grad_weights is None
    expected = oracle(inputs["value"], SHAPES, inputs["loc"], inputs["weights"], POINTS, inputs["grad_out"])[1]
    # fp16 rounding of sums of up to 192 terms (the oracle sees the same fp16-rounded inputs)
    assert_close_scaled(grad_value, torch.from_numpy(expected).reshape(grad_value.shape), 4e-3, f"{backend} grad_value")
