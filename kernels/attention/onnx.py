"""ONNX translations of ``rtdetr_kernels::aifi_attention`` (used by ``rtdetr_kernels.onnx``).

The export option ``attention`` picks the form:

- ``"matmul"`` (default, any opset): the projections as MatMul + Add on the packed weights, per head
  ``Softmax(q k^T / sqrt(D) + mask) v`` with MatMul/Softmax, the output projection.
- ``"attention23"``: the same projections around the opset-23 ``Attention`` op (q, k, v as
  [N, H, L, D]); the model must be exported at opset >= 23 (``rtdetr_kernels.onnx.export`` picks 23).

Both follow the op exactly: a bool mask marks the blocked pairs (True = blocked; ``Attention`` takes
the allowed ones, so it gets the negation), a float mask is added to the scores, [N * H, L, L] masks
are per (batch, head); a query row blocked everywhere attends to nothing (its attention output is 0,
so the op returns the output bias), which plain Softmax would turn into NaN. Low-precision inputs
compute in float32 and round once at the end, as the op does.
"""

from __future__ import annotations

import math

import torch
from onnxscript import ir
from onnxscript import opset18 as op
from onnxscript import opset23

OPTION = "attention"
CHOICES = ("matmul", "attention23")
DEFAULT = "matmul"

_LOW = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _ints(values):
    return op.Constant(value_ints=[int(v) for v in values])


def _cast(x, dtype):
    return x if x is None or x.dtype == dtype else op.Cast(x, to=dtype)


def _scalar(v: float, dtype):
    return op.Cast(op.Constant(value_float=float(v)), to=dtype)


def _linear(x, weight, bias, rows=None):
    """x @ weight[rows].T + bias[rows] (rows: (start, end) of the packed weight, or all)."""
    if rows is not None:
        weight = op.Slice(weight, _ints([rows[0]]), _ints([rows[1]]), _ints([0]))
        bias = None if bias is None else op.Slice(bias, _ints([rows[0]]), _ints([rows[1]]), _ints([0]))
    y = op.MatMul(x, op.Transpose(weight, perm=[1, 0]))
    return y if bias is None else op.Add(y, bias)


def _projections(x, pos, in_w, in_b, num_heads, dt):
    E = int(x.shape[2])
    D = E // num_heads
    x_c = _cast(x, dt)
    qk_in = x_c if pos is None else op.Add(x_c, _cast(pos, dt))
    in_w, in_b = _cast(in_w, dt), _cast(in_b, dt)

    def heads(t):  # [N, L, E] -> [N, H, L, D]
        return op.Transpose(op.Reshape(t, _ints([0, 0, num_heads, D])), perm=[0, 2, 1, 3])

    q = heads(_linear(qk_in, in_w, in_b, (0, E)))
    k = heads(_linear(qk_in, in_w, in_b, (E, 2 * E)))
    v = heads(_linear(x_c, in_w, in_b, (2 * E, 3 * E)))
    return q, k, v, E, D


def _mask_4d(attn_mask, num_heads, L):
    """[L, L] as is (broadcast), [N * H, L, L] as [N, H, L, L]."""
    if len(attn_mask.shape) == 2:
        return attn_mask
    return op.Reshape(attn_mask, _ints([-1, num_heads, L, L]))


def _blocked_rows(mask, dt):
    """[..., L, 1]: the query rows the mask blocks everywhere (bool: all True; float: all -inf). Read
    off the mask, not the scores (the same rows for finite inputs), and as an all() over booleans: OpenVINO
    2026.4's CPU ReduceMax of a row of -inf returns the lowest finite float, not -inf."""
    if mask.dtype != ir.DataType.BOOL:
        mask = op.IsInf(mask, detect_positive=0)
    return op.Cast(op.ReduceMin(op.Cast(mask, to=ir.DataType.INT32), _ints([-1]), keepdims=1), to=ir.DataType.BOOL)


def _finish(attended, out_w, out_b, E, out_dtype, dt):
    """[N, H, L, D] -> heads concatenated -> output projection, in x's dtype."""
    merged = op.Reshape(op.Transpose(attended, perm=[0, 2, 1, 3]), _ints([0, 0, E]))
    return _cast(_linear(merged, _cast(out_w, dt), _cast(out_b, dt)), out_dtype)


def _dtypes(x):
    out_dtype = x.dtype
    return out_dtype, (ir.DataType.FLOAT if out_dtype in _LOW else out_dtype)


def matmul(x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, attn_mask, backend):
    out_dtype, dt = _dtypes(x)
    num_heads = int(num_heads)
    q, k, v, E, D = _projections(x, pos, in_proj_weight, in_proj_bias, num_heads, dt)
    scores = op.MatMul(op.Mul(q, _scalar(1.0 / math.sqrt(D), dt)), op.Transpose(k, perm=[0, 1, 3, 2]))
    if attn_mask is None:
        weights = op.Softmax(scores, axis=-1)
    else:
        mask = _mask_4d(attn_mask, num_heads, int(x.shape[1]))
        if mask.dtype == ir.DataType.BOOL:
            scores = op.Where(mask, _scalar(float("-inf"), dt), scores)
        else:
            mask = _cast(mask, dt)
            scores = op.Add(scores, mask)
        blocked = _blocked_rows(mask, dt)
        # a blocked row's softmax is 0/0 (NaN): its output is replaced after the MatMul (zeroing the
        # scores or the softmax there instead trips OpenVINO 2026.4's CPU kernel fusion)
        weights = op.Softmax(scores, axis=-1)
        return _finish(op.Where(blocked, _scalar(0.0, dt), op.MatMul(weights, v)), out_proj_weight, out_proj_bias, E,
                       out_dtype, dt)
    return _finish(op.MatMul(weights, v), out_proj_weight, out_proj_bias, E, out_dtype, dt)


def attention23(x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, attn_mask, backend):
    out_dtype, dt = _dtypes(x)
    num_heads = int(num_heads)
    q, k, v, E, D = _projections(x, pos, in_proj_weight, in_proj_bias, num_heads, dt)
    if attn_mask is None:
        attended, _, _, _ = opset23.Attention(q, k, v, scale=1.0 / math.sqrt(D))
    else:
        mask = _mask_4d(attn_mask, num_heads, int(x.shape[1]))
        if mask.dtype == ir.DataType.BOOL:
            allowed = op.Not(mask)  # Attention's bool mask marks the pairs that take part
        else:
            mask = allowed = _cast(mask, dt)
        blocked = _blocked_rows(mask, dt)
        attended, _, _, _ = opset23.Attention(q, k, v, allowed, scale=1.0 / math.sqrt(D))
        attended = op.Where(blocked, _scalar(0.0, dt), attended)
    return _finish(attended, out_proj_weight, out_proj_bias, E, out_dtype, dt)


TRANSLATIONS = {"matmul": matmul, "attention23": attention23}


def translations(choice: str = DEFAULT) -> dict:
    """{the op's overload: its translation} for the ``attention`` option ``choice``."""
    if choice not in TRANSLATIONS:
        raise ValueError(f"attention: expected one of {CHOICES}, got {choice!r}")
    return {torch.ops.rtdetr_kernels.aifi_attention.default: TRANSLATIONS[choice]}
