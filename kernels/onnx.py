"""ONNX export of models that call rtdetr_kernels' ops (``torch.onnx.export(..., dynamo=True)``).

Each op registers its translations next to its backends, in ``<op>/onnx.py``: ``OPTION`` (the export
option that picks a form), ``CHOICES``, ``DEFAULT`` and ``translations(choice) -> {op overload:
onnxscript function}``. ``translation_table`` collects them into one ``custom_translation_table``::

    onnx_program = torch.onnx.export(model, args, dynamo=True,
                                     custom_translation_table=rtdetr_kernels.onnx.translation_table())

and ``export`` does that with dynamic batch, the ONNX checker and a check that the standard forms left
no custom-domain node::

    rtdetr_kernels.onnx.export(model, (images,), "model.onnx")                  # GridSample MSDA
    rtdetr_kernels.onnx.export(model, (images,), "model.onnx", msda="gather")   # no GridSample
    rtdetr_kernels.onnx.export(model, (images,), "model.onnx", msda="tensorrt") # TensorRT's MSDA plugin

Options (see each op's ``onnx.py`` for the graphs): ``msda`` = 'grid_sample' | 'gather' | 'tensorrt';
``attention`` = 'matmul' (MatMul/Softmax, any opset) | 'attention23' (the opset-23 ``Attention`` op);
``topk`` = 'topk' (``TopK`` + gathers). An op option a form cannot express (e.g. ``method='discrete'``
with ``msda='tensorrt'``) fails during export with an error naming it.

onnxscript (and onnx) are needed only here; ``import rtdetr_kernels`` does not import them.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch

from . import backends

ATTENTION23_OPSET = 23


class UnsupportedExport(ValueError):
    """An op call that the chosen export form cannot express (raised while translating; the message names
    the option and the op argument). ``export`` raises it as is rather than wrapped in torch.onnx's errors."""


def _unsupported(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UnsupportedExport):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _module_name(op: str) -> str:
    """``<op folder>.onnx`` next to the op's ``op.py``."""
    return type(backends.op_definition(op)).__module__.rsplit(".", 1)[0] + ".onnx"


def _op_module(op: str):
    return importlib.import_module(_module_name(op))


def options() -> Dict[str, Tuple[str, Tuple[str, ...], str]]:
    """{op: (option name, choices, default)} for every op with ONNX translations."""
    result = {}
    for op in backends.registered_ops():
        try:
            module = _op_module(op)
        except ModuleNotFoundError as exc:
            if exc.name != _module_name(op):
                raise
            continue
        result[op] = (module.OPTION, tuple(module.CHOICES), module.DEFAULT)
    return result


def translation_table(**choices: str) -> Dict[Any, Any]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: every op's translation,
    each in the form its option names (``msda='gather'``, ``attention='attention23'``, ...; defaults
    otherwise). An unknown option or choice raises ValueError naming it."""
    table: Dict[Any, Any] = {}
    known = options()
    names = {option: op for op, (option, _, _) in known.items()}
    unknown = sorted(set(choices) - set(names))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown export option; expected one of {sorted(names)}")
    for op, (option, allowed, default) in known.items():
        choice = choices.get(option, default)
        if choice not in allowed:
            raise ValueError(f"{option}: expected one of {allowed}, got {choice!r}")
        table.update(_op_module(op).translations(choice))
    return table


def custom_domains(model) -> list:
    """The (domain, op_type) of every node outside the standard ONNX domains (nested functions included)."""
    standard = ("", "ai.onnx", "ai.onnx.ml")
    found = []
    graphs = [model.graph] + [f for f in model.functions]
    for g in graphs:
        for node in g.node:
            if node.domain not in standard and not any(node.domain == f.domain and node.op_type == f.name
                                                       for f in model.functions):
                found.append((node.domain, node.op_type))
    return found


def _check_batch_dynamic(proto, args) -> None:
    """torch.onnx turns a dimension the model's code fixes into a constant without a word; say so."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    for value, arg in zip(proto.graph.input, tensors):
        dims = value.type.tensor_type.shape.dim
        if arg.dim() > 0 and dims and not dims[0].dim_param:
            why = ("torch.export specialises dimensions of size 1: export with an example batch of 2 or more"
                   if dims[0].dim_value == 1 else "the model's own code specialises it during export")
            raise ValueError(f"dynamic_batch: the exported graph fixes the batch size of input {value.name!r} at "
                             f"{dims[0].dim_value}: {why}; or export with dynamic_batch=False (one batch size)")


def export(model: "torch.nn.Module | torch.export.ExportedProgram", args: Sequence[Any], path: Optional[Union[str, os.PathLike]] = None, *,
           msda: Optional[str] = None, attention: Optional[str] = None, topk: Optional[str] = None,
           dynamic_batch: bool = True, dynamic_shapes=None, input_names: Optional[Sequence[str]] = None,
           output_names: Optional[Sequence[str]] = None, opset_version: Optional[int] = None,
           check: bool = True, **kwargs):
    """Export ``model(*args)`` to ONNX with rtdetr_kernels' translations; returns the ``ONNXProgram``
    (saved to ``path`` when given, weights inside the file). ``model`` may be an ``ExportedProgram``
    (``torch.export.export`` once, then translate it in several forms; its dynamic shapes are kept).

    ``dynamic_batch``: dim 0 of every tensor argument is a dynamic ``batch`` (ignored when
    ``dynamic_shapes`` is given). ``attention='attention23'`` needs opset >= 23 and picks it when
    ``opset_version`` is None. ``check``: run the ONNX checker, and in the standard forms (every
    option but ``msda='tensorrt'``) make sure no custom-domain node is left. Other keyword arguments
    go to ``torch.onnx.export``.
    """
    import onnx

    choices = {k: v for k, v in (("msda", msda), ("attention", attention), ("topk", topk)) if v is not None}
    table = translation_table(**choices)
    if attention == "attention23":
        if opset_version is None:
            opset_version = ATTENTION23_OPSET
        elif opset_version < ATTENTION23_OPSET:
            raise ValueError(f"attention='attention23': the ONNX Attention op needs opset_version >= "
                             f"{ATTENTION23_OPSET}, got {opset_version}")
    args = tuple(args)
    given_shapes = dynamic_shapes is not None
    if isinstance(model, torch.export.ExportedProgram):  # exported once, translated in several forms
        given_shapes = True  # its shapes are the ones it was exported with
    elif dynamic_shapes is None and dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
    try:
        program = torch.onnx.export(model, args, dynamo=True, custom_translation_table=table,
                                    dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names,
                                    opset_version=opset_version, **kwargs)
    except Exception as exc:
        reason = _unsupported(exc)
        if reason is None:
            raise
        raise UnsupportedExport(str(reason)) from exc
    proto = program.model_proto
    if dynamic_batch and dynamic_shapes is not None and not given_shapes:
        _check_batch_dynamic(proto, args)
    if check:
        onnx.checker.check_model(proto, full_check=False)
        if msda != "tensorrt":
            left = custom_domains(proto)
            if left:
                raise RuntimeError(f"ONNX export left custom-domain nodes in a standard form: {left}")
    if path is not None:
        program.save(os.fspath(path), external_data=False)
    return program
