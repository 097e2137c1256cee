"""torch.export and AOTInductor for models that call rtdetr_kernels' ops.

``torch.export.export`` of a patched model needs nothing from here: its graph calls the registered ops
(``rtdetr_kernels::ms_deform_attn`` and friends, with the backend chosen at trace time), it runs and
survives ``torch.export.save`` / ``load`` wherever ``rtdetr_kernels`` is imported.

An AOTInductor package must run where only the compiled extension is loaded (a C++ server, or Python
without this package): the Python-defined ops are not there, so ``lower(ep)`` rewrites the graph
before compiling it:

- MSDA becomes a direct call of ``rtdetr_kernels_C::ms_deform_attn_forward`` (the cpu record's kernel;
  the same C++ op has the CUDA kernel), which AOTInductor calls through its proxy executor by name;
  without the extension it becomes the reference's ATen ops;
- attention and top-K (no C++ CPU kernels) become their reference's ATen ops, which Inductor compiles
  like the rest of the model.

Eager, ``torch.compile`` and plain ``torch.export`` are unchanged: the rewrite is a decomposition
table applied by ``ep.run_decompositions``, and the fake (meta) kernels the C++ forward ops need for it
are registered by ``register_extension_fakes()`` (called by ``lower``), in Python.

    package = rtdetr_kernels.export.aoti_package(model, (images,), "model.pt2")
    # serving process, without rtdetr_kernels:
    torch.ops.load_library(extension_library_path)      # rtdetr_kernels/_C*.so
    runner = torch._inductor.aoti_load_package("model.pt2")
    outputs = runner(images)
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch

from . import backends
from ._extension import load_extension

_FAKES_REGISTERED: Dict[str, bool] = {}


def _contiguous(a):
    if isinstance(a, torch.Tensor):
        return a.contiguous()
    if isinstance(a, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in a):
        return [t.contiguous() for t in a]
    return a


def _serving_record(op: str) -> backends.Implementation:
    """The record whose forward the package calls: the cpu record where its kernels are C++ ops of the
    built extension (MSDA), else the reference, the op's executable spec in plain tensor code (attention,
    top-K: their cpu records are composed of PyTorch's kernels too, but may take data-dependent Python
    branches, e.g. top-K's fast path when there are no ties, which a traced graph cannot keep)."""
    impl = backends.implementation(op, "cpu") if "cpu" in backends.implemented_backends(op) else None
    if impl is not None and impl.compiled and backends.build_why_not("cpu", "cpu", True) is None:
        return impl
    return backends.implementation(op, "reference")


def register_extension_fakes() -> list:
    """Fake kernels for the compiled forward ops (``rtdetr_kernels_C::<op>_forward``), taken from the
    op's own fake (same arguments, no backend). Needed to trace graphs that call them (export,
    ``lower``); eager calls never use them. Returns the ops that have one now."""
    if load_extension() is None:
        return []
    done = []
    for op in backends.registered_ops():
        impl = backends.implementation(op, "cpu") if "cpu" in backends.implemented_backends(op) else None
        if impl is None or not impl.compiled:
            continue
        forward = impl.kernels()[0]
        overload = getattr(forward, "default", forward)
        name = overload.name() if hasattr(overload, "name") else None
        if name is None:
            continue
        if name not in _FAKES_REGISTERED:
            opdef = backends.op_definition(op)
            torch.library.register_fake(name)(lambda *args, _opdef=opdef: _opdef.fake_forward(*args, "cpu"))
            _FAKES_REGISTERED[name] = True
        done.append(name)
    return done


def decompositions() -> Dict[Any, Callable]:
    """{``rtdetr_kernels::<op>`` overload: its serving kernel} for ``ep.run_decompositions``: each op
    becomes the forward of the record ``_serving_record`` picks (the backend chosen at trace time is
    not used: the package cannot run Python or Triton kernels)."""
    table = {}
    for op in backends.registered_ops():
        forward = _serving_record(op).kernels()[0]

        def lowered(*args, _forward=forward):
            *args, _backend = args
            out = _forward(*(_contiguous(a) for a in args))
            if isinstance(out, torch.Tensor):
                return out.contiguous()
            return type(out)(_contiguous(o) for o in out)

        table[getattr(torch.ops.rtdetr_kernels, op).default] = lowered
    return table


def lower(ep: "torch.export.ExportedProgram") -> "torch.export.ExportedProgram":
    """``ep`` with rtdetr_kernels' ops replaced by what a Python-free process can run (see the module
    docstring); other ops are left as they are."""
    register_extension_fakes()
    return ep.run_decompositions(decompositions())


def extension_library() -> Optional[str]:
    """The path of the compiled extension (``rtdetr_kernels/_C*.so``) a serving process loads with
    ``torch.ops.load_library``, or None when it is not built."""
    module = load_extension()
    return None if module is None else getattr(module, "__file__", None)


def _dynamic_batch(args: Sequence[Any]):
    batch = torch.export.Dim("batch")
    return tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)


def aoti_package(model: torch.nn.Module, args: Sequence[Any], path: Union[str, os.PathLike], *,
                 dynamic_batch: bool = True, dynamic_shapes=None, inductor_configs: Optional[dict] = None) -> str:
    """Export ``model(*args)``, lower it (``lower``) and compile it with AOTInductor into the package
    ``path`` (a ``.pt2`` file); returns the path. ``dynamic_batch``: dim 0 of every tensor argument is
    a dynamic batch (ignored when ``dynamic_shapes`` is given)."""
    args = tuple(args)
    if dynamic_shapes is None and dynamic_batch:
        dynamic_shapes = _dynamic_batch(args)
    ep = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    return torch._inductor.aoti_compile_and_package(lower(ep), package_path=os.fspath(path),
                                                    inductor_configs=inductor_configs)
