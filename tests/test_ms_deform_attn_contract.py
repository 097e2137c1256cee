"""ms_deform_attn's input and integration contract, every backend.

Bad inputs and their messages, empty tensors, non-contiguous inputs, stride-0 grad_output, opcheck
of both custom ops, float64 gradcheck, torch.compile(fullgraph=True) with a dynamic query count, and
backend selection (argument, context manager, environment variable, explain).
"""

from __future__ import annotations

import pytest
import torch

import rtdetr_kernels
from helpers import OpCalls, backend_params, interpreter
from msda_oracle import SCALED_TOL, assert_close_scaled, best_float_dtype, make_inputs, oracle, run, to_v1
from rtdetr_kernels import BackendUnavailableError, backends, use_backend
from rtdetr_kernels.ms_deform_attn import op as msda_op

BACKENDS = backend_params("ms_deform_attn")
SHAPES = [(5, 7), (2, 3)]  # S = 41
N, LQ, M, D, L, P = 2, 3, 2, 3, 2, 2


def _valid(dtype=torch.float32):
    inputs = make_inputs(30, N, LQ, M, D, SHAPES, [P] * L, dtype=dtype)
    loc, weights = to_v1(inputs["loc"], inputs["weights"], L)
    return inputs["value"].to(dtype), loc.to(dtype), weights.to(dtype)


# --------------------------------------------------------------------------------------------
# Bad inputs: (id, how to break the valid call, exception, what the message must name)
# --------------------------------------------------------------------------------------------


def _bad(value, loc, weights):
    """The valid call as a dict of arguments that each case below edits."""
    return dict(value=value, spatial_shapes=SHAPES, sampling_locations=loc, attention_weights=weights)


def _v2(a, points=(2, 2)):
    n, lq, m, l, p, _ = a["sampling_locations"].shape
    a["sampling_locations"] = a["sampling_locations"].reshape(n, lq, m, l * p, 2)
    a["attention_weights"] = a["attention_weights"].reshape(n, lq, m, l * p)
    a["num_points_list"] = list(points)
    return a


BAD_INPUTS = [
    # dtypes
    ("value_int", lambda a: a.update(value=a["value"].long()), TypeError, "value"),
    ("locations_int", lambda a: a.update(sampling_locations=a["sampling_locations"].int()), TypeError, "sampling_locations"),
    ("weights_bool", lambda a: a.update(attention_weights=a["attention_weights"] > 0), TypeError, "attention_weights"),
    ("value_not_tensor", lambda a: a.update(value=a["value"].tolist()), TypeError, "value"),
    # ranks
    ("value_rank3", lambda a: a.update(value=a["value"].flatten(2)), ValueError, "value"),
    ("value_rank5", lambda a: a.update(value=a["value"][None]), ValueError, "value"),
    ("locations_rank4", lambda a: a.update(sampling_locations=a["sampling_locations"].flatten(2, 4)), ValueError, "sampling_locations"),
    ("locations_rank7", lambda a: a.update(sampling_locations=a["sampling_locations"][None]), ValueError, "sampling_locations"),
    ("weights_rank4", lambda a: a.update(attention_weights=a["attention_weights"].flatten(3)), ValueError, "attention_weights"),
    # mismatched sizes
    ("locations_batch", lambda a: a.update(sampling_locations=a["sampling_locations"][:1]), ValueError, "sampling_locations"),
    ("locations_heads", lambda a: a.update(sampling_locations=a["sampling_locations"][:, :, :1]), ValueError, "sampling_locations"),
    ("locations_levels", lambda a: a.update(sampling_locations=a["sampling_locations"][:, :, :, :1]), ValueError, "sampling_locations"),
    ("locations_xyz", lambda a: a.update(sampling_locations=torch.cat([a["sampling_locations"]] * 2, -1)[..., :3]), ValueError, "sampling_locations"),
    ("weights_batch", lambda a: a.update(attention_weights=a["attention_weights"][:1]), ValueError, "attention_weights"),
    ("weights_queries", lambda a: a.update(attention_weights=a["attention_weights"][:, :2]), ValueError, "attention_weights"),
    ("weights_heads", lambda a: a.update(attention_weights=a["attention_weights"][:, :, :1]), ValueError, "attention_weights"),
    ("weights_points", lambda a: a.update(attention_weights=a["attention_weights"][..., :1]), ValueError, "attention_weights"),
    ("value_zero_heads", lambda a: a.update(value=a["value"][:, :, :0]), ValueError, "value"),
    # spatial shapes
    ("shapes_sum_too_small", lambda a: a.update(spatial_shapes=[(5, 7), (2, 2)]), ValueError, "spatial_shapes"),
    ("shapes_sum_too_large", lambda a: a.update(spatial_shapes=[(5, 7), (3, 3)]), ValueError, "spatial_shapes"),
    ("shapes_swapped_levels_count", lambda a: a.update(spatial_shapes=[(5, 7), (2, 3), (0, 4)]), ValueError, "spatial_shapes"),
    ("shapes_zero_height", lambda a: a.update(spatial_shapes=[(0, 7), (2, 3)]), ValueError, "spatial_shapes"),
    ("shapes_negative_width", lambda a: a.update(spatial_shapes=[(5, -7), (2, 3)]), ValueError, "spatial_shapes"),
    ("shapes_empty", lambda a: a.update(spatial_shapes=[]), ValueError, "spatial_shapes"),
    ("shapes_triples", lambda a: a.update(spatial_shapes=[(5, 7, 1), (2, 3, 1)]), ValueError, "spatial_shapes"),
    ("shapes_float_tensor", lambda a: a.update(spatial_shapes=torch.tensor(SHAPES, dtype=torch.float32)), TypeError, "spatial_shapes"),
    ("shapes_tensor_1d", lambda a: a.update(spatial_shapes=torch.tensor([5, 7, 2, 3])), ValueError, "spatial_shapes"),
    ("shapes_tensor_Lx3", lambda a: a.update(spatial_shapes=torch.tensor([[5, 7, 1], [2, 3, 1]])), ValueError, "spatial_shapes"),
    ("shapes_float_sizes", lambda a: a.update(spatial_shapes=[(5.0, 7.0), (2.0, 3.0)]), TypeError, "spatial_shapes"),
    ("shapes_not_sequence", lambda a: a.update(spatial_shapes=5), TypeError, "spatial_shapes"),
    # devices (the meta device stands in for a second device on a CPU-only machine)
    ("locations_other_device", lambda a: a.update(sampling_locations=a["sampling_locations"].to("meta")), ValueError, "sampling_locations"),
    ("weights_other_device", lambda a: a.update(attention_weights=a["attention_weights"].to("meta")), ValueError, "attention_weights"),
    # points per level
    ("points_list_short", lambda a: _v2(a, (4,)), ValueError, "num_points_list"),
    ("points_list_bad_sum", lambda a: _v2(a, (1, 2)), ValueError, "num_points_list"),
    ("points_list_non_positive", lambda a: _v2(a, (4, 0)), ValueError, "num_points_list"),
    ("points_v2_not_divisible", lambda a: (_v2(a), a.pop("num_points_list"), a.update(
        sampling_locations=a["sampling_locations"][:, :, :, :3], attention_weights=a["attention_weights"][..., :3])),
     ValueError, "num_points_list"),
    ("points_v1_unequal_list", lambda a: a.update(num_points_list=[1, 3]), ValueError, "sampling_locations"),
    ("points_v1_wrong_list", lambda a: a.update(num_points_list=[3, 3]), ValueError, "num_points_list"),
    # options
    ("method_unknown", lambda a: a.update(method="nearest"), ValueError, "method"),
    ("clamp_unknown", lambda a: a.update(method="discrete", discrete_clamp="both_h"), ValueError, "discrete_clamp"),
    ("level_start_list", lambda a: a.update(level_start_index=[0, 36]), ValueError, "level_start_index"),
    ("level_start_tensor", lambda a: a.update(level_start_index=torch.tensor([1, 35])), ValueError, "level_start_index"),
    ("level_start_length", lambda a: a.update(level_start_index=torch.tensor([0])), ValueError, "level_start_index"),
    ("backend_unknown", lambda a: a.update(backend="tpu"), ValueError, "backend"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_bad_input_names_the_argument(device, backend, case):
    name, breaks, error, argument = case
    args = _bad(*(t.to(device) for t in _valid()))
    args.setdefault("backend", backend)
    breaks(args)
    with pytest.raises(error, match=argument):
        rtdetr_kernels.ms_deform_attn(**args)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_valid_variants_are_accepted(device, backend):
    """The variants next to the bad ones above are fine: int32 shapes tensor, right level_start_index
    as list and tensor, 'default' alias, v2 layout with num_points_list."""
    value, loc, weights = (t.to(device) for t in _valid())
    reference = rtdetr_kernels.ms_deform_attn(value, SHAPES, loc, weights, backend=backend)
    for kwargs in (dict(spatial_shapes=torch.tensor(SHAPES, dtype=torch.int32)),
                   dict(spatial_shapes=torch.tensor(SHAPES)),
                   dict(level_start_index=[0, 35]),
                   dict(level_start_index=torch.tensor([0, 35])),
                   dict(method="default")):
        args = dict(spatial_shapes=SHAPES) | kwargs
        out = rtdetr_kernels.ms_deform_attn(value, args.pop("spatial_shapes"), loc, weights, backend=backend, **args)
        torch.testing.assert_close(out, reference, rtol=0, atol=0)
    v2 = _v2(_bad(value, loc, weights))
    out = rtdetr_kernels.ms_deform_attn(**v2, backend=backend)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second real device (CUDA)")
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_mismatched_real_devices(device, backend):
    value, loc, weights = _valid()
    other = "cpu" if device == "cuda" else "cuda"
    for moved in ("sampling_locations", "attention_weights"):
        args = _bad(value.to(device), loc.to(device), weights.to(device))
        args[moved] = args[moved].to(other)
        with pytest.raises(ValueError, match=moved):
            rtdetr_kernels.ms_deform_attn(**args, backend=backend)


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


# --------------------------------------------------------------------------------------------
# Empty tensors, strides
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("empty", ["batch", "queries"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_empty_inputs(device, backend, empty):
    n, lq = (0, 5) if empty == "batch" else (2, 0)
    inputs = make_inputs(31, max(n, 1), max(lq, 1), M, D, SHAPES, [P] * L, dtype=torch.float32)
    value = inputs["value"][:n].float().to(device).requires_grad_()
    loc, weights = to_v1(inputs["loc"][:n, :lq], inputs["weights"][:n, :lq], L)
    loc = loc.float().to(device).requires_grad_()
    weights = weights.float().to(device).requires_grad_()
    out = rtdetr_kernels.ms_deform_attn(value, SHAPES, loc, weights, backend=backend)
    assert out.shape == (n, lq, M * D) and out.dtype == torch.float32
    out.backward(torch.randn_like(out))
    for t in (value, loc, weights):
        assert t.grad is not None and t.grad.shape == t.shape
        # with no queries, grad_value is a real (non-empty) tensor that must be exactly zero
        assert (t.grad == 0).all()


def _fresh_noncontiguous(device):
    """The valid inputs, plus the same values in permuted / sliced / transposed storage."""
    value, loc, weights = (t.to(device) for t in _valid())
    wide = torch.randn(N, 41, M, 2 * D, device=device)
    wide[..., ::2] = value
    value_sliced = wide[..., ::2]
    value_permuted = value.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    loc_padded = torch.randn(*loc.shape[:-1], 3, device=device)
    loc_padded[..., :2] = loc
    loc_sliced = loc_padded[..., :2]
    loc_permuted = loc.permute(1, 0, 2, 3, 4, 5).contiguous().permute(1, 0, 2, 3, 4, 5)
    weights_transposed = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not any(t.is_contiguous() for t in (value_sliced, value_permuted, loc_sliced, loc_permuted, weights_transposed))
    return (value, loc, weights), [(value_sliced, loc_sliced, weights_transposed), (value_permuted, loc_permuted, weights)]


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_non_contiguous_inputs(device, backend):
    grad_out = torch.randn(N, LQ, M * D, device=device)
    (value, loc, weights), variants = _fresh_noncontiguous(device)

    def forward_backward(*tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]  # keeps the strides
        out = rtdetr_kernels.ms_deform_attn(tensors[0], SHAPES, tensors[1], tensors[2], backend=backend)
        out.backward(grad_out)
        return [out] + [t.grad for t in tensors]

    expected = forward_backward(value, loc, weights)
    for variant in variants:
        for got, want in zip(forward_backward(*variant), expected):
            torch.testing.assert_close(got, want)  # float32 defaults: same math, different strides


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_stride_zero_grad_output(device, backend):
    """out.sum().backward() hands the backward an expanded (stride-0) grad_output."""
    value, loc, weights = (t.to(device) for t in _valid())
    grads = []
    for make_loss in (lambda out: out.sum(), lambda out: (out * torch.ones_like(out)).sum()):
        tensors = [t.clone().requires_grad_() for t in (value, loc, weights)]
        make_loss(rtdetr_kernels.ms_deform_attn(tensors[0], SHAPES, tensors[1], tensors[2], backend=backend)).backward()
        grads.append([t.grad for t in tensors])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
    assert grads[0][0].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# torch.library: opcheck, gradcheck, torch.compile
# --------------------------------------------------------------------------------------------


def _canonical(device, backend, dtype=torch.float32, method=msda_op.BILINEAR):
    inputs = make_inputs(32, N, LQ, M, D, SHAPES, [1, 3], dtype=dtype)
    tensors = [inputs[k].to(device=device, dtype=dtype) for k in ("value", "loc", "weights")]
    flat_shapes = [s for hw in SHAPES for s in hw]
    return tensors, flat_shapes, [1, 3], method, inputs["grad_out"].to(device=device, dtype=dtype).reshape(N, LQ, M, D)


@pytest.mark.parametrize("method", [msda_op.BILINEAR, msda_op.DISCRETE_OFFICIAL], ids=["bilinear", "discrete"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend, method):
    (value, loc, weights), shapes, points, method, grad_out = _canonical(device, backend, method=method)
    if backends.why_not(backend, backends.Call("ms_deform_attn", device, (torch.float32,) * 3,
                                               (("method", method), ("levels", L), ("channels", D)))):
        pytest.skip(f"{backend} does not serve this call")
    forward = torch.ops.rtdetr_kernels.ms_deform_attn.default
    args = (value.requires_grad_(), loc.requires_grad_(), weights.requires_grad_(), shapes, points, method, backend)
    torch.library.opcheck(forward, args)
    backward = torch.ops.rtdetr_kernels.ms_deform_attn_backward.default
    base = (grad_out, value.detach(), loc.detach(), weights.detach(), shapes, points, method, backend)
    for needs in ((True, True, True), (True, False, False), (False, True, True)):
        torch.library.opcheck(backward, base + needs + (False,))


@pytest.mark.parametrize("method", ["bilinear", "discrete"])
@pytest.mark.parametrize("layout", ["v1", "v2_132"])
@pytest.mark.parametrize("device,backend", BACKENDS)
def test_gradcheck_float64(device, backend, layout, method):
    shapes, points = ([(5, 7), (1, 1), (3, 2)], [2, 2, 2]) if layout == "v1" else ([(5, 7), (1, 1), (3, 2)], [1, 3, 2])
    # locations stay >= 1e-3 px from every knot and discrete rounding boundary, and gradcheck's
    # eps = 1e-6 moves a pixel coordinate by at most 7e-6 px, so every difference stays on one piece
    inputs = make_inputs(33, 1, 5, 2, 3, shapes, points)
    if best_float_dtype(backend, device, inputs, shapes, num_points_list=points, method=method) != torch.float64:
        pytest.skip(f"{backend} on {device} does not serve float64")
    loc, weights = (to_v1(inputs["loc"], inputs["weights"], 3) if layout == "v1" else (inputs["loc"], inputs["weights"]))
    tensors = [t.to(device).requires_grad_() for t in (inputs["value"], loc, weights)]
    kwargs = dict(method=method, backend=backend) | ({} if layout == "v1" else dict(num_points_list=points))

    def fn(value, loc, weights):
        return rtdetr_kernels.ms_deform_attn(value, shapes, loc, weights, **kwargs)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("device,backend", [p for p in BACKENDS if p.values[1] in ("reference", "cpu")],
                         ids=lambda p: p if isinstance(p, str) else None)
def test_torch_compile_fullgraph_dynamic_queries(device, backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def decoder_step(value, loc, weights):
        return rtdetr_kernels.ms_deform_attn(value, SHAPES, loc, weights, backend=backend) * 2

    for lq in (7, 13):  # denoising makes the query count vary per batch
        inputs = make_inputs(34 + lq, N, lq, M, D, SHAPES, [P] * L, dtype=torch.float32)
        loc, weights = to_v1(inputs["loc"], inputs["weights"], L)
        tensors = [t.float().to(device).requires_grad_() for t in (inputs["value"], loc, weights)]
        torch._dynamo.mark_dynamic(tensors[1], 1)
        torch._dynamo.mark_dynamic(tensors[2], 1)
        out = decoder_step(*tensors)
        grad_out = inputs["grad_out"].float().to(device)
        out.backward(grad_out)
        eager = run(backend, device, inputs["value"], SHAPES, loc, weights, 2 * inputs["grad_out"], dtype=torch.float32)
        for got, want in zip([out.detach() / 2] + [t.grad for t in tensors], eager):
            torch.testing.assert_close(got.double().cpu(), want)
    assert counter.frame_count == 1, f"recompiled for a new query count ({counter.frame_count} compiles)"


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------


def _served_by(*args, **kwargs) -> str:
    with OpCalls("ms_deform_attn") as spy:
        rtdetr_kernels.ms_deform_attn(*args, **kwargs)
    assert len(spy.calls) == 1
    return spy.calls[0][-1]  # the backend name the public wrapper resolved


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_use_backend_routes_to_the_backend(device, backend, monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    value, loc, weights = (t.to(device) for t in _valid())
    with use_backend(backend):
        assert _served_by(value, SHAPES, loc, weights) == backend
    monkeypatch.setenv(backends.ENV_VAR, backend)
    assert _served_by(value, SHAPES, loc, weights) == backend
    # explicit argument > context manager > environment variable
    with use_backend("reference"):
        assert _served_by(value, SHAPES, loc, weights) == "reference"
        assert _served_by(value, SHAPES, loc, weights, backend=backend) == backend


def test_auto_selection_and_errors(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    value, loc, weights = _valid()
    expected_auto = "cpu" if backends.why_not("cpu", backends.Call("ms_deform_attn", "cpu", (torch.float32,))) is None else "reference"
    assert _served_by(value, SHAPES, loc, weights) == expected_auto
    assert _served_by(value, SHAPES, loc, weights, backend="auto") == expected_auto
    # a backend that cannot serve CPU tensors: explicit, context, env all raise and say why
    with pytest.raises(BackendUnavailableError, match="'cuda'.*CUDA tensors"):
        rtdetr_kernels.ms_deform_attn(value, SHAPES, loc, weights, backend="cuda")
    with use_backend("cuda"), pytest.raises(BackendUnavailableError, match="cuda"):
        rtdetr_kernels.ms_deform_attn(value, SHAPES, loc, weights)
    with pytest.raises(ValueError, match="use_backend.*unknown backend 'tpu'"):
        with use_backend("tpu"):
            pass
    monkeypatch.setenv(backends.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match=f"{backends.ENV_VAR}.*unknown backend 'tpu'"):
        rtdetr_kernels.ms_deform_attn(value, SHAPES, loc, weights)
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        rtdetr_kernels.ms_deform_attn(value, SHAPES, loc, weights)
    with use_backend("reference"):  # the context manager wins over the environment
        assert _served_by(value, SHAPES, loc, weights) == "reference"


def test_explain_names_every_backend():
    value, loc, weights = _valid()
    text = rtdetr_kernels.explain("ms_deform_attn", value, SHAPES, loc, weights)
    lines = text.splitlines()
    for backend in backends.BACKENDS:
        (line,) = [ln for ln in lines if ln[2:].split() and ln[2:].split()[0] == backend]
        reason = backends.why_not(backend, msda_op.describe(msda_op.validate(value, SHAPES, loc, weights)))
        assert ("ok" in line) == (reason is None), line
        if reason is not None:
            assert reason in line
    chosen = [ln[2:].split()[0] for ln in lines if ln.startswith("*")]
    assert chosen == [_served_by(value, SHAPES, loc, weights)]
    with pytest.raises(ValueError, match="op"):
        rtdetr_kernels.explain("no_such_op", value, SHAPES, loc, weights)
    with pytest.raises(ValueError, match="spatial_shapes"):  # explain validates like the op
        rtdetr_kernels.explain("ms_deform_attn", value, [(5, 7)], loc, weights)
