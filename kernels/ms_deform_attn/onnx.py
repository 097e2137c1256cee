"""ONNX translations of ``rtdetr_kernels::ms_deform_attn`` (used by ``rtdetr_kernels.onnx``).

Three forms, chosen by the export option ``msda``:

- ``"grid_sample"`` (default): per level one ``GridSample`` (opset >= 16, bilinear, zeros padding,
  align_corners=0; the location ``x`` maps to the grid value ``2x - 1``), then the weighted sum over the
  points: the graph Deformable-DETR / RT-DETR export themselves, with the same numbers as the op on
  finite locations (zero padding is the op's "skip a point outside (-1, W) x (-1, H)" rule).
- ``"gather"``: no ``GridSample``, for runtimes that lack it (TensorRT < 8.5, NPUs): the op's own
  bilinear math (``x = loc_x * W - 0.5``, floor, four corners, validity masks) on every point of every
  level at once, with per-point constants for the level sizes and offsets, one ``GatherND`` of all
  corners from ``value``, then the weighted sum. NaN locations contribute nothing, as in the op.
- ``"tensorrt"``: one ``MultiscaleDeformableAttnPlugin_TRT`` node (domain ``trt``) so that TensorRT runs
  its own plugin: inputs value [N, S, M, D], spatial_shapes [L, 2] int32, level_start_index [L] int32,
  sampling_locations [N, Lq, M, L, P, 2], attention_weights [N, Lq, M, L, P], all floats in value's dtype
  (float32 or float16); output [N, Lq, M, D]. The plugin samples bilinearly with equal points per level
  and computes in value's dtype (its fp16 path in half precision throughout).

RT-DETRv2's ``discrete`` method (nearest sampling, either clamp) is a gather in every form (upstream's
discrete path is the GridSample-free one); the ``tensorrt`` form has no translation for it, nor for
per-level point counts, nor for other dtypes than float32/float16: exporting those fails there and
then, naming the option.

Low-precision inputs compute in float32 and round once at the end, as the op does; float64 stays float64.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

from ..onnx import UnsupportedExport
from .constants import BILINEAR, DISCRETE_OFFICIAL, METHOD_NAMES

OPTION = "msda"
CHOICES = ("grid_sample", "gather", "tensorrt")
DEFAULT = "grid_sample"
TRT_DOMAIN = "trt"
TRT_PLUGIN = "MultiscaleDeformableAttnPlugin_TRT"
trt = Opset(TRT_DOMAIN, 1)

_LOW = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_DTYPE_NAMES = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16",
                ir.DataType.DOUBLE: "float64"}


def _ints(values: Sequence[int]):
    return op.Constant(value_ints=[int(v) for v in values])


def _dim(x, i: int):
    """x's size along axis i as a 1-D int64 tensor (a constant where it is static)."""
    d = x.shape[i] if x.shape is not None else None
    if isinstance(d, int):
        return _ints([d])
    return op.Shape(x, start=i, end=i + 1)


def _compute_dtype(dtype) -> "ir.DataType":
    return ir.DataType.FLOAT if dtype in _LOW else dtype


def _cast(x, dtype):
    return x if x.dtype == dtype else op.Cast(x, to=dtype)


def _scalar(v: float, dtype):
    return op.Cast(op.Constant(value_float=float(v)), to=dtype)


def _const(values, dtype):
    """A 1-D constant of ``dtype`` (float constants are built in float64, then cast: exact for ints)."""
    if dtype == ir.DataType.INT64:
        return _ints(values)
    return op.Cast(op.Constant(value=ir.tensor([float(v) for v in values], dtype=ir.DataType.DOUBLE)), to=dtype)


def _pairs(spatial_shapes: Sequence[int]) -> List[tuple]:
    return list(zip([int(s) for s in spatial_shapes[0::2]], [int(s) for s in spatial_shapes[1::2]]))


def _inputs(value, sampling_locations, attention_weights):
    out_dtype = value.dtype
    dt = _compute_dtype(out_dtype)
    return out_dtype, dt, _cast(value, dt), _cast(sampling_locations, dt), _cast(attention_weights, dt)


# --------------------------------------------------------------------------------------------
# grid_sample: per-level GridSample, then the weighted sum
# --------------------------------------------------------------------------------------------


def grid_sample(value, sampling_locations, attention_weights, spatial_shapes, points_per_level, method, backend):
    if method != BILINEAR:
        return gather(value, sampling_locations, attention_weights, spatial_shapes, points_per_level, method, backend)
    N, Lq = _dim(value, 0), _dim(sampling_locations, 1)  # shapes of the inputs (a Cast's output has none yet)
    M, D = int(value.shape[2]), int(value.shape[3])
    out_dtype, dt, value, loc, weights = _inputs(value, sampling_locations, attention_weights)
    v_t = op.Transpose(value, perm=[0, 2, 3, 1])  # [N, M, D, S]
    grid = op.Sub(op.Mul(loc, _scalar(2.0, dt)), _scalar(1.0, dt))
    grid = op.Transpose(grid, perm=[0, 2, 1, 3, 4])  # [N, M, Lq, sum(P), 2]
    samples, start, p0 = [], 0, 0
    for (H, W), P in zip(_pairs(spatial_shapes), points_per_level):
        P = int(P)
        v_l = op.Slice(v_t, _ints([start]), _ints([start + H * W]), _ints([3]))
        v_l = op.Reshape(v_l, _ints([-1, D, H, W]))  # [N*M, D, H, W]
        g_l = op.Slice(grid, _ints([p0]), _ints([p0 + P]), _ints([3]))
        g_l = op.Reshape(g_l, op.Concat(_ints([-1]), Lq, _ints([P, 2]), axis=0))  # [N*M, Lq, P, 2]
        samples.append(op.GridSample(v_l, g_l, align_corners=0, mode="bilinear", padding_mode="zeros"))
        start += H * W
        p0 += P
    sampled = samples[0] if len(samples) == 1 else op.Concat(*samples, axis=3)  # [N*M, D, Lq, sum(P)]
    w = op.Reshape(op.Transpose(weights, perm=[0, 2, 1, 3]), op.Concat(_ints([-1, 1]), Lq, _ints([p0]), axis=0))
    out = op.ReduceSum(op.Mul(sampled, w), _ints([3]), keepdims=0)  # [N*M, D, Lq]
    out = op.Reshape(out, op.Concat(N, _ints([M, D]), Lq, axis=0))
    return _cast(op.Transpose(out, perm=[0, 3, 1, 2]), out_dtype)  # [N, Lq, M, D]


# --------------------------------------------------------------------------------------------
# gather: the op's own sampling math, one GatherND of every corner of every point
# --------------------------------------------------------------------------------------------


def _per_point(spatial_shapes, points_per_level):
    """Per point (sum(P) entries): its level's H, W and first token."""
    Hs, Ws, starts, start = [], [], [], 0
    for (H, W), P in zip(_pairs(spatial_shapes), points_per_level):
        Hs += [H] * int(P)
        Ws += [W] * int(P)
        starts += [start] * int(P)
        start += H * W
    return Hs, Ws, starts


def _bilinear_corners(x_in, y_in, Hs, Ws, starts, dt):
    """(token index, corner weight) per corner, each [N, Lq, M, sum(P)]: the reference's bilinear rule."""
    Wf, Hf = _const(Ws, dt), _const(Hs, dt)
    half, zero, one = _scalar(0.5, dt), _scalar(0.0, dt), _scalar(1.0, dt)
    x = op.Sub(op.Mul(x_in, Wf), half)
    y = op.Sub(op.Mul(y_in, Hf), half)
    minus_one = _scalar(-1.0, dt)
    valid = op.And(op.And(op.Greater(x, minus_one), op.Greater(y, minus_one)), op.And(op.Less(x, Wf), op.Less(y, Hf)))
    x = op.Where(valid, x, zero)  # NaN/inf never reach the arithmetic (their weights are zeroed below)
    y = op.Where(valid, y, zero)
    x0, y0 = op.Floor(x), op.Floor(y)
    lx, ly = op.Sub(x, x0), op.Sub(y, y0)
    hx, hy = op.Sub(one, lx), op.Sub(one, ly)
    x0i, y0i = op.Cast(x0, to=ir.DataType.INT64), op.Cast(y0, to=ir.DataType.INT64)
    Wi, start = _ints(Ws), _ints(starts)
    Wm1, Hm1 = _ints([w - 1 for w in Ws]), _ints([h - 1 for h in Hs])
    zero_i, one_i = _ints([0]), _ints([1])
    corners = []
    for dy, dx, wy, wx in ((0, 0, hy, hx), (0, 1, hy, lx), (1, 0, ly, hx), (1, 1, ly, lx)):
        xi = op.Add(x0i, one_i) if dx else x0i
        yi = op.Add(y0i, one_i) if dy else y0i
        inside = op.And(op.And(valid, op.And(op.GreaterOrEqual(xi, zero_i), op.LessOrEqual(xi, Wm1))),
                        op.And(op.GreaterOrEqual(yi, zero_i), op.LessOrEqual(yi, Hm1)))
        xc = op.Max(op.Min(xi, Wm1), zero_i)
        yc = op.Max(op.Min(yi, Hm1), zero_i)
        index = op.Add(start, op.Add(op.Mul(yc, Wi), xc))
        corners.append((index, op.Where(inside, op.Mul(wy, wx), zero)))
    return corners


def _discrete_corner(x_in, y_in, Hs, Ws, starts, clamp_official: bool, dt):
    """RT-DETRv2's nearest sampling: ix = int(x * W + 0.5) clamped (floor equals the op's truncation
    once clamped at 0), the sample dropped when x lands past W - 1 or the location is not finite."""
    zero = _scalar(0.0, dt)
    finite = op.And(op.Not(op.Or(op.IsNaN(x_in), op.IsInf(x_in))), op.Not(op.Or(op.IsNaN(y_in), op.IsInf(y_in))))
    x = op.Where(finite, x_in, zero)
    y = op.Where(finite, y_in, zero)
    half = _scalar(0.5, dt)
    x_max = [h - 1 for h in Hs] if clamp_official else [w - 1 for w in Ws]
    fx = op.Floor(op.Add(op.Mul(x, _const(Ws, dt)), half))
    fy = op.Floor(op.Add(op.Mul(y, _const(Hs, dt)), half))
    ix = op.Cast(op.Max(op.Min(fx, _const(x_max, dt)), zero), to=ir.DataType.INT64)
    iy = op.Cast(op.Max(op.Min(fy, _const([h - 1 for h in Hs], dt)), zero), to=ir.DataType.INT64)
    Wm1 = _ints([w - 1 for w in Ws])
    inside = op.And(finite, op.LessOrEqual(ix, Wm1))
    index = op.Add(_ints(starts), op.Add(op.Mul(iy, _ints(Ws)), op.Min(ix, Wm1)))
    index = op.Where(inside, index, _ints([0]))
    return [(index, op.Cast(inside, to=dt))]


def gather(value, sampling_locations, attention_weights, spatial_shapes, points_per_level, method, backend):
    D = int(value.shape[3])
    out_dtype, dt, value, loc, weights = _inputs(value, sampling_locations, attention_weights)
    Hs, Ws, starts = _per_point(spatial_shapes, points_per_level)
    total = len(Hs)
    x_in = op.Gather(loc, op.Constant(value_int=0), axis=4)  # [N, Lq, M, sum(P)]
    y_in = op.Gather(loc, op.Constant(value_int=1), axis=4)
    if method == BILINEAR:
        corners = _bilinear_corners(x_in, y_in, Hs, Ws, starts, dt)
    else:
        corners = _discrete_corner(x_in, y_in, Hs, Ws, starts, method == DISCRETE_OFFICIAL, dt)
    C = len(corners)
    last = _ints([-1])
    index = op.Concat(*[op.Unsqueeze(i, last) for i, _ in corners], axis=4) if C > 1 else op.Unsqueeze(corners[0][0], last)
    cw = op.Concat(*[op.Unsqueeze(w, last) for _, w in corners], axis=4) if C > 1 else op.Unsqueeze(corners[0][1], last)
    cw = op.Mul(cw, op.Unsqueeze(weights, last))  # [N, Lq, M, sum(P), C]: attention weight x corner weight
    # [N, M, Lq * sum(P) * C, 1]: Reshape's 0 copies N and M
    index = op.Reshape(op.Transpose(index, perm=[0, 2, 1, 3, 4]), _ints([0, 0, -1, 1]))
    cw = op.Reshape(op.Transpose(cw, perm=[0, 2, 1, 3, 4]), _ints([0, 0, -1, 1]))
    v_t = op.Transpose(value, perm=[0, 2, 1, 3])  # [N, M, S, D]
    sampled = op.GatherND(v_t, index, batch_dims=2)  # [N, M, K, D]
    out = op.Reshape(op.Mul(sampled, cw), _ints([0, 0, -1, total * C, D]))  # [N, M, Lq, sum(P) * C, D]
    out = op.ReduceSum(out, _ints([3]), keepdims=0)  # [N, M, Lq, D]
    return _cast(op.Transpose(out, perm=[0, 2, 1, 3]), out_dtype)


# --------------------------------------------------------------------------------------------
# tensorrt: TensorRT's own plugin node
# --------------------------------------------------------------------------------------------


def tensorrt(value, sampling_locations, attention_weights, spatial_shapes, points_per_level, method, backend):
    if method != BILINEAR:
        kind, clamp = METHOD_NAMES[method]
        raise UnsupportedExport(f"msda='tensorrt': method={kind!r} (discrete_clamp={clamp!r}) has no translation: "
                         f"{TRT_PLUGIN} samples bilinearly only; export with msda='gather' (or 'grid_sample')")
    points = [int(p) for p in points_per_level]
    if len(set(points)) != 1:
        raise UnsupportedExport(f"msda='tensorrt': num_points_list={points} (per-level point counts) has no translation: "
                         f"{TRT_PLUGIN} takes the same number of points on every level; export with msda='gather' "
                         "or msda='grid_sample'")
    if value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        raise UnsupportedExport(f"msda='tensorrt': value dtype {_DTYPE_NAMES.get(value.dtype, value.dtype)} has no translation: {TRT_PLUGIN} takes "
                         "float32 or float16; export in one of those or with msda='gather'")
    shapes = _pairs(spatial_shapes)
    L, P = len(shapes), points[0]
    dtype = value.dtype
    loc = op.Reshape(_cast(sampling_locations, dtype), _ints([0, 0, 0, L, P, 2]))
    weights = op.Reshape(_cast(attention_weights, dtype), _ints([0, 0, 0, L, P]))
    starts, acc = [], 0
    for H, W in shapes:
        starts.append(acc)
        acc += H * W
    spatial = op.Constant(value=ir.tensor([[H, W] for H, W in shapes], dtype=ir.DataType.INT32))
    level_start = op.Constant(value=ir.tensor(starts, dtype=ir.DataType.INT32))
    return Op(trt, TRT_PLUGIN, _trt_schema())(value, spatial, level_start, loc, weights)


def _trt_schema():
    """The plugin's signature as an ONNX schema (not registered: onnxscript needs one to record the node;
    the ONNX checker does not check nodes of an unregistered domain)."""
    from onnx.defs import OpSchema

    T, I = "T", "I"
    inputs = [OpSchema.FormalParameter(name, t, doc) for name, t, doc in (
        ("value", T, "[N, S, M, D]"), ("spatial_shapes", I, "[L, 2] (H, W) per level"),
        ("level_start_index", I, "[L]"), ("sampling_locations", T, "[N, Lq, M, L, P, 2]"),
        ("attention_weights", T, "[N, Lq, M, L, P]"))]
    return OpSchema(TRT_PLUGIN, TRT_DOMAIN, 1, doc="TensorRT's multi-scale deformable attention plugin", inputs=inputs,
                    outputs=[OpSchema.FormalParameter("output", T, "[N, Lq, M, D]")],
                    type_constraints=[(T, ["tensor(float)", "tensor(float16)"], "value dtype"),
                                      (I, ["tensor(int32)"], "shapes and level starts")])


TRANSLATIONS = {"grid_sample": grid_sample, "gather": gather, "tensorrt": tensorrt}


def translations(choice: str = DEFAULT) -> dict:
    """{the op's overload: its translation} for the ``msda`` option ``choice``."""
    if choice not in TRANSLATIONS:
        raise ValueError(f"msda: expected one of {CHOICES}, got {choice!r}")
    return {torch.ops.rtdetr_kernels.ms_deform_attn.default: TRANSLATIONS[choice]}
