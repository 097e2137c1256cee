"""ONNX translation of ``rtdetr_kernels::topk_select`` (used by ``rtdetr_kernels.onnx``).

``TopK`` + gathers: per token ``ReduceMax`` / ``ArgMax`` over the classes (the first class reaching the
max, ``select_last_index=0``), ``TopK(k, axis=1, largest=1, sorted=1)`` on the token scores, the
classes by ``GatherElements`` and every per-token tensor by ``GatherND(batch_dims=1)``. The pairs form
(the post-processor's top-k over every (token, class)) ranks the flattened [N, T * C] scores and splits
the flat index into ``index // C`` and ``index % C``. Low-precision scores are ranked in float32
(exact and order-preserving); the values come back in their own dtype.

Order: the ONNX spec defines ``TopK``'s tie order as the op's ("given two equivalent values ... the
element with the lower index will appear first"), so equal scores keep the lower token (and, in
pairs form, the lower class) first, as ``rtdetr_kernels.topk_select`` does. What the spec does not
define is NaN: the op ranks a NaN score below everything, ``TopK`` leaves it to the runtime; and
``-0.0`` vs ``+0.0`` compare equal in both. Models whose scores can be NaN rank them as the runtime
does (tests/test_export_onnx.py records what ONNX Runtime and OpenVINO do).
"""

from __future__ import annotations

import torch
from onnxscript import ir
from onnxscript import opset18 as op

OPTION = "topk"
CHOICES = ("topk",)
DEFAULT = "topk"

_LOW = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


def _ints(values):
    return op.Constant(value_ints=[int(v) for v in values])


def topk(logits, k, gather, pairs, backend):
    dtype = logits.dtype
    ranked = op.Cast(logits, to=ir.DataType.FLOAT) if dtype in _LOW else logits
    k_ = _ints([int(k)])
    if pairs:
        C = int(logits.shape[2])
        flat = op.Reshape(ranked, _ints([0, -1]))
        values, order = op.TopK(flat, k_, axis=1, largest=1, sorted=1)
        c = _ints([C])
        indices, classes = op.Div(order, c), op.Mod(order, c)
    else:
        token_scores = op.ReduceMax(ranked, _ints([2]), keepdims=0)  # [N, T]
        token_classes = op.ArgMax(ranked, axis=2, keepdims=0, select_last_index=0)
        values, indices = op.TopK(token_scores, k_, axis=1, largest=1, sorted=1)
        classes = op.GatherElements(token_classes, indices, axis=1)
    scores = op.Cast(values, to=dtype) if dtype in _LOW else values
    index = op.Unsqueeze(indices, _ints([-1]))  # [N, k, 1]
    gathered = _ValueList()
    for t in gather:
        g = op.GatherND(t, index, batch_dims=1)
        g.dtype, g.shape = t.dtype, ir.Shape([t.shape[0], int(k), *t.shape[2:]])
        gathered.append(g)
    return scores, indices, classes, gathered


class _ValueList(list):
    """The ``Tensor[]`` output (the gathered tensors). torch.onnx's exporter (2.11 to 2.14) maps an FX
    node's outputs to a flat sequence of values, naming each one; a nested list has no name, so this
    list takes one (its items, the real values, are reached through the FX graph's getitem nodes) and
    says it has no producing node. Shapes and dtypes of the items are set here, as the exporter
    does for plain outputs."""

    name = None

    def producer(self):
        return None


TRANSLATIONS = {"topk": topk}


def translations(choice: str = DEFAULT) -> dict:
    """{the op's overload: its translation} for the ``topk`` option ``choice``."""
    if choice not in TRANSLATIONS:
        raise ValueError(f"topk: expected one of {CHOICES}, got {choice!r}")
    return {torch.ops.rtdetr_kernels.topk_select.default: TRANSLATIONS[choice]}
