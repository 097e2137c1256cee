"""ms_deform_attn's own input contract, every backend: the accepted variants of a call (layouts,
shapes as tensors, level_start_index, method aliases) and the level limit of the compiled kernels.

What every op shares (bad inputs and their messages, empty tensors, strides, opcheck, gradcheck,
torch.compile, determinism, autocast, backend selection) is in test_op_contract.py, driven by
op_testers/ms_deform_attn.py.
"""

from __future__ import annotations

import pytest
import torch

import rtdetr_kernels
from helpers import backend_params
from msda_oracle import SCALED_TOL, assert_close_scaled, make_inputs, oracle, to_v1
from op_testers.ms_deform_attn import SHAPES, TESTER, v2_layout
from rtdetr_kernels import BackendUnavailableError
from rtdetr_kernels.ms_deform_attn import op as msda_op

BACKENDS = backend_params("ms_deform_attn")


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_valid_variants_are_accepted(device, backend):
    """The variants next to the bad ones in op_testers/ms_deform_attn.py are fine: int32 and int64
    shapes tensors, the right level_start_index as list and tensor, the 'default' alias, the v2
    layout with num_points_list; all give the same result bit for bit."""
    args = TESTER.valid(device)
    reference = rtdetr_kernels.ms_deform_attn(**args, backend=backend)
    for kwargs in (dict(spatial_shapes=torch.tensor(SHAPES, dtype=torch.int32)),
                   dict(spatial_shapes=torch.tensor(SHAPES)),
                   dict(level_start_index=[0, 35]),
                   dict(level_start_index=torch.tensor([0, 35])),
                   dict(method="default")):
        out = rtdetr_kernels.ms_deform_attn(**(args | kwargs), backend=backend)
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
    out = rtdetr_kernels.ms_deform_attn(**v2_layout(dict(args)), backend=backend)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_more_levels_than_the_compiled_kernels_take(device, backend):
    """The compiled kernels take at most MAX_LEVELS levels: asked explicitly they refuse and say so,
    auto falls back; any backend that accepts the call must get it right."""
    shapes = [(1, 1), (2, 1)] * 8 + [(1, 2)]
    assert len(shapes) > msda_op.MAX_LEVELS
    inputs = make_inputs(35, 1, 3, 1, 2, shapes, [1] * len(shapes), dtype=torch.float32)
    value, loc, weights = (inputs[k].float().to(device) for k in ("value", "loc", "weights"))
    loc, weights = to_v1(loc, weights, len(shapes))
    expected = oracle(value, shapes, loc.reshape(1, 3, 1, -1, 2), weights.reshape(1, 3, 1, -1), [1] * len(shapes),
                      inputs["grad_out"])[0]
    auto = rtdetr_kernels.ms_deform_attn(value, shapes, loc, weights)
    assert_close_scaled(auto, torch.from_numpy(expected).reshape(auto.shape), SCALED_TOL[torch.float32], "auto")
    if backend in ("cpu", "cuda"):
        with pytest.raises(BackendUnavailableError, match=f"'{backend}'.*{msda_op.MAX_LEVELS} levels"):
            rtdetr_kernels.ms_deform_attn(value, shapes, loc, weights, backend=backend)
        return
    try:
        out = rtdetr_kernels.ms_deform_attn(value, shapes, loc, weights, backend=backend)
    except BackendUnavailableError as exc:
        assert "levels" in str(exc)
        return
    assert_close_scaled(out, torch.from_numpy(expected).reshape(out.shape), SCALED_TOL[torch.float32], backend)
