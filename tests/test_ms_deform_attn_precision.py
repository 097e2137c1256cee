"""ms_deform_attn in low and mixed precision against the float64 oracle, every backend.

Rule (flash-attention's): for the output and every gradient,
    max|backend - oracle64| <= 2 * max|torch_lowprec - oracle64| + atol,
where the oracle is fed exactly the low-precision inputs (upcast), so only arithmetic error counts,
and torch_lowprec is what the PyTorch reference pipeline computes at that precision:

- pure float32 / float16 / bfloat16: ``ms_deform_attn_grid_sample`` run entirely in that dtype
  (CPU grid_sample implements float16 and bfloat16, forward and backward, so no emulation is needed);
- mixed (16-bit value, float32 locations and weights, which is what AMP produces in RT-DETR):
  grid_sample's autocast rule runs the reference in float32 ("widest input type", §1.4.4), and the
  op returns value's dtype, so the baseline is the float32 grid_sample result rounded once to value's
  dtype (output, grad_value); grad_locations and grad_weights stay float32.

The pure 16-bit grid_sample also computes the pixel coordinates in 16 bits, which makes its location
gradients wrong by up to ~100 (in pixel-scaled units) and the rule above very loose. So a second,
tighter rule checks what ARCHITECTURE.md promises ("low-precision inputs compute in fp32 and round
once at the end"): the same inequality with the baseline being float32 grid_sample on the upcast
inputs, each result rounded once to its tensor's dtype.
"""

from __future__ import annotations

import pytest
import torch

import rtdetr_kernels
from helpers import backend_params, interpreter, skip_if_interpreted_bf16
from msda_oracle import make_inputs, oracle, run, to_v1
from rtdetr_kernels.ms_deform_attn import ms_deform_attn_grid_sample

BACKENDS = backend_params("ms_deform_attn")

# (id, value dtype, locations/weights dtype)
DTYPES = [
    ("f32", torch.float32, torch.float32),
    ("f16", torch.float16, torch.float16),
    ("bf16", torch.bfloat16, torch.bfloat16),
    ("bf16_value_f32_loc", torch.bfloat16, torch.float32),
    ("f16_value_f32_loc", torch.float16, torch.float32),
]

# atol, relative to the largest magnitude of the oracle tensor, in units of the tensor's own machine
# epsilon: one ulp at the top of the range. It only matters where the baseline happens to be nearly
# exact (a grid_sample that also rounds once can land within a fraction of an ulp of the oracle on
# every element); an error of a few ulps, a wrong tap or coordinate math in 16 bits still fails.
ATOL_ULPS = 1.0

SHAPES = [(10, 12), (5, 6), (3, 3)]
POINTS = [4, 4, 4]


def _torch_baseline(inputs, shapes, value_dtype, loc_dtype, compute=None):
    """(out, grad_value, grad_loc, grad_weights) of grid_sample run in ``compute`` (default: the
    dtype the PyTorch pipeline uses for these inputs), each rounded to its tensor's dtype, in float64."""
    if compute is None:
        compute = value_dtype if value_dtype == loc_dtype else torch.float32
    loc, weights = to_v1(inputs["loc"], inputs["weights"], len(shapes))
    tensors = [t.to(compute).requires_grad_() for t in (inputs["value"], loc, weights)]
    out = ms_deform_attn_grid_sample(tensors[0], shapes, tensors[1], tensors[2])
    out = out.to(value_dtype)  # a no-op except for mixed, where the op returns value's dtype
    out.backward(inputs["grad_out"].to(value_dtype))
    grads = [t.grad.to(d) for t, d in zip(tensors, (value_dtype, loc_dtype, loc_dtype))]
    return [t.detach().double() for t in (out, grads[0], grads[1].reshape(inputs["loc"].shape),
                                         grads[2].reshape(inputs["weights"].shape))]


def _check_rule(result, baseline, expected, dtypes, label):
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    for name, got, base, want, dtype in zip(names, result, baseline, expected, dtypes):
        want = torch.from_numpy(want).reshape(got.shape)
        base = base.reshape(got.shape)
        assert torch.isfinite(got).all(), f"{label} {name}: non-finite values"
        err = float((got - want).abs().max())
        base_err = float((base - want).abs().max())
        atol = ATOL_ULPS * torch.finfo(dtype).eps * float(want.abs().max())
        assert err <= 2 * base_err + atol, (
            f"{label} {name}: max error {err:.3e} > 2 * baseline error {base_err:.3e} + atol {atol:.1e} ({dtype})")


def _check_both_rules(result, inputs, shapes, expected, value_dtype, loc_dtype, label):
    dtypes = (value_dtype, value_dtype, loc_dtype, loc_dtype)
    _check_rule(result, _torch_baseline(inputs, shapes, value_dtype, loc_dtype), expected, dtypes,
                f"{label} vs torch low-precision grid_sample:")
    _check_rule(result, _torch_baseline(inputs, shapes, value_dtype, loc_dtype, torch.float32), expected, dtypes,
                f"{label} vs float32 math rounded once:")


@pytest.mark.parametrize("name,value_dtype,loc_dtype", DTYPES, ids=[d[0] for d in DTYPES])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_low_precision_vs_oracle(device, backend, name, value_dtype, loc_dtype):
    skip_if_interpreted_bf16(device, backend, value_dtype)
    N, Lq, M, D = 2, 13, 8, 32
    if backend == "triton" and device == "cpu" and interpreter():
        M = 2
    # inputs rounded to the dtypes the backend sees; locations off the knots after that rounding
    inputs = make_inputs(20, N, Lq, M, D, SHAPES, POINTS, dtype=value_dtype, loc_dtype=loc_dtype)
    loc, weights = to_v1(inputs["loc"], inputs["weights"], len(SHAPES))
    result = run(backend, device, inputs["value"], SHAPES, loc, weights, inputs["grad_out"],
                 dtype=value_dtype, loc_dtype=loc_dtype)
    expected = oracle(inputs["value"], SHAPES, inputs["loc"], inputs["weights"], POINTS, inputs["grad_out"])
    _check_both_rules(result, inputs, SHAPES, expected, value_dtype, loc_dtype, f"{backend}/{name}")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_autocast_bf16(device, backend):
    """torch.autocast(bf16) around float32 inputs: value runs in bf16, locations and weights stay
    float32, the output is bf16, grads come back in the inputs' float32, and the accuracy is that of
    float32 math rounded once (the mixed-precision rule above)."""
    skip_if_interpreted_bf16(device, backend, torch.bfloat16)
    N, Lq, M, D = 1, 13, 2, 32
    inputs = make_inputs(21, N, Lq, M, D, SHAPES, POINTS, dtype=torch.bfloat16, loc_dtype=torch.float32)
    loc, weights = to_v1(inputs["loc"], inputs["weights"], len(SHAPES))
    tensors = [t.to(device=device, dtype=torch.float32).requires_grad_() for t in (inputs["value"], loc, weights)]
    with torch.autocast(device, dtype=torch.bfloat16):  # (the dtypes reaching the op: test_op_contract.py)
        out = rtdetr_kernels.ms_deform_attn(tensors[0], SHAPES, tensors[1], tensors[2], backend=backend)
    assert out.dtype == torch.bfloat16
    out.backward(inputs["grad_out"].to(device=device, dtype=torch.bfloat16))
    assert [t.grad.dtype for t in tensors] == [torch.float32] * 3
    result = [out.detach().double().cpu()] + [t.grad.double().cpu() for t in tensors]
    expected = oracle(inputs["value"], SHAPES, inputs["loc"], inputs["weights"], POINTS, inputs["grad_out"])
    # grad_value: the op returns it in bf16 (value's dtype inside autocast); the cast back to the
    # float32 leaf is exact, so the bf16 bound applies
    _check_both_rules(result, inputs, SHAPES, expected, torch.bfloat16, torch.float32, f"{backend}/autocast")
