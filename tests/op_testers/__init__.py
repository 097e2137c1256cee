"""One "tester" per registered op: what the generic contract suite (tests/test_op_contract.py) needs
to know about it, in the manner of torchvision's RoIOpTester.

A tester says how to build fresh random valid inputs at odd sizes, how to call the op on a backend,
which bad inputs must raise what (and name which argument), the empty and re-strided variants of a
call, the canonical arguments of the registered custom ops for ``opcheck``, the float64 calls for
``gradcheck``, the dimension that varies under ``torch.compile``, and what autocast does to each
argument. The suite runs every generic test for every (op, device, backend) in the registry, so a
new backend is covered by being registered, and a new op by adding its tester to ``TESTERS``.

Arguments travel as a dict of the public function's keyword arguments (``args``); the tensors that
take gradients are the entries named in ``grad_names`` (a tuple entry contributes its floating
tensors).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

Args = Dict[str, Any]


@dataclass(frozen=True)
class BadInput:
    """A way to break a valid call: ``edit(args)`` changes the arguments in place; the call must raise
    ``error`` with a message matching ``argument`` (the argument's name, a regex)."""

    id: str
    edit: Callable[[Args], Any]
    error: type
    argument: str


@dataclass(frozen=True)
class EmptyCase:
    """A valid call with an empty dimension; ``grads``: the arguments that require grad (default: all
    of ``grad_names``); ``shapes``: the expected shapes of the op's outputs."""

    args: Args
    shapes: Sequence[Tuple[int, ...]]
    grads: Optional[Sequence[str]] = None


@dataclass(frozen=True)
class OpcheckCase:
    """Positional arguments of ``torch.ops.rtdetr_kernels.<op>.default`` and of several calls of
    ``<op>_backward.default`` (one per combination of needed gradients); ``public``: the same call
    through the public function, for the registry to say whether the backend serves it."""

    forward: tuple
    backward: Sequence[tuple]
    public: Args


def schema_names(op_name: str) -> List[str]:
    """The argument names of ``rtdetr_kernels::<op_name>``, in order."""
    return [a.name for a in getattr(torch.ops.rtdetr_kernels, op_name).default._schema.arguments]


def op_args(op_name: str, **values) -> tuple:
    """The positional arguments of ``rtdetr_kernels::<op_name>`` from named values, in the schema's
    order (so a tester follows a schema change by name, and a new argument fails here, named)."""
    names = schema_names(op_name)
    missing = [n for n in names if n not in values]
    unknown = [n for n in values if n not in names]
    assert not missing and not unknown, f"rtdetr_kernels::{op_name}{names}: missing {missing}, unknown {unknown}"
    return tuple(values[n] for n in names)


def recorded(op_name: str, call_args: tuple, name: str):
    """The argument ``name`` of a recorded call of ``rtdetr_kernels::<op_name>``."""
    return call_args[schema_names(op_name).index(name)]


def get_path(args: Args, path: str):
    """``args["name"]`` or ``args["name"][i]`` for a path "name" or "name[i]"."""
    name, index = _split(path)
    return args[name] if index is None else args[name][index]


def set_path(args: Args, path: str, value) -> None:
    name, index = _split(path)
    if index is None:
        args[name] = value
    else:
        entries = list(args[name])
        entries[index] = value
        args[name] = type(args[name])(entries)


def _mover(path: str, device: str) -> Callable[[Args], None]:
    def edit(args: Args) -> None:
        set_path(args, path, get_path(args, path).to(device))

    return edit


def _split(path: str) -> Tuple[str, Optional[int]]:
    match = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", path)
    assert match, path
    return match.group(1), None if match.group(2) is None else int(match.group(2))


class OpTester:
    """The facts about one op that the generic suite needs; subclasses fill them in."""

    op: str  # the registry's name, also the custom ops' names rtdetr_kernels::<op>, <op>_backward
    grad_names: Tuple[str, ...]  # the differentiable arguments
    bad_inputs: Sequence[BadInput] = ()
    device_bound: Sequence[str] = ()  # argument paths that must be on the first tensor's device
    # float32 comparisons with the reference backend and across strides (relative to |expected|max)
    tolerance: Tuple[float, float] = (1e-5, 1e-5)  # atol, rtol
    empty_cases: Sequence[str] = ()
    opcheck_cases: Sequence[str] = ()
    gradcheck_cases: Sequence[str] = ()
    compile_sizes: Tuple[int, int] = (7, 13)

    # -- calling the op --------------------------------------------------------------------

    def function(self, **args):
        """The public function."""
        raise NotImplementedError

    def outputs(self, result) -> Tuple[torch.Tensor, ...]:
        """The public function's result as a flat tuple of tensors."""
        return (result,)

    def call(self, args: Args, backend: Optional[str]) -> Tuple[torch.Tensor, ...]:
        kwargs = dict(args) if backend is None else dict(args, backend=backend)
        return self.outputs(self.function(**kwargs))

    def valid(self, device: str, seed: int = 0) -> Args:
        """Fresh random valid float32 arguments at odd sizes (the sizes the bad inputs refer to)."""
        raise NotImplementedError

    def describe(self, args: Args):
        """The registry's ``backends.Call`` for this call (what ``why_not`` decides on)."""
        raise NotImplementedError

    def every_bad_input(self) -> List[BadInput]:
        """``bad_inputs`` and, for each ``device_bound`` argument, that argument on another device
        (the meta device stands in for a second device on a CPU-only machine)."""
        moved = [BadInput(f"{path}_other_device", _mover(path, "meta"), ValueError, re.escape(path))
                 for path in self.device_bound]
        return list(self.bad_inputs) + moved

    def backend_of(self, forward_args: tuple) -> str:
        """The backend a recorded call of the forward op was resolved to."""
        return recorded(self.op, forward_args, "backend")

    # -- variants --------------------------------------------------------------------------

    def empty(self, case: str, device: str) -> EmptyCase:
        raise NotImplementedError

    def non_contiguous(self, device: str) -> Tuple[Args, List[Args]]:
        """Valid arguments and the same values in other strides (each variant non-contiguous)."""
        raise NotImplementedError

    def broadcast(self, device: str) -> Tuple[Args, Args]:
        """Valid arguments and the same values where some tensors are stride-0 expands (the same
        row for every batch entry, say)."""
        raise NotImplementedError

    def opcheck(self, case: str, device: str, backend: str) -> OpcheckCase:
        raise NotImplementedError

    def gradcheck(self, case: str, device: str) -> Args:
        """float64 arguments for gradcheck over ``grad_names``."""
        raise NotImplementedError

    def compile_args(self, device: str, size: int) -> Tuple[Args, Sequence[Tuple[str, int]]]:
        """Arguments where one size is ``size``, and the (argument path, dim) pairs that carry it."""
        raise NotImplementedError

    # -- autocast, determinism -------------------------------------------------------------

    def autocast_args(self, device: str, low: torch.dtype) -> Args:
        """What a user passes under autocast (float32 leaves, or AMP's mixed dtypes)."""
        return self.valid(device)

    def autocast_cast(self, args: Args, low: torch.dtype) -> Args:
        """``args`` cast as the op documents its autocast policy (default: no autocast kernel, kept)."""
        return dict(args)

    def deterministic_flag(self, backward_args: tuple) -> bool:
        """The deterministic flag a recorded call of the backward op carries (every backward op takes one)."""
        return recorded(f"{self.op}_backward", backward_args, "deterministic")


def tensor_dtypes(args: tuple) -> List[torch.dtype]:
    """The dtypes of the tensors (also inside lists) of a recorded op call, in order."""
    dtypes = []
    for a in args:
        if isinstance(a, torch.Tensor):
            dtypes.append(a.dtype)
        elif isinstance(a, (list, tuple)):
            dtypes.extend(t.dtype for t in a if isinstance(t, torch.Tensor))
    return dtypes


def _load() -> Dict[str, OpTester]:
    from . import aifi_attention, ms_deform_attn, topk_select

    return {t.op: t for t in (ms_deform_attn.TESTER, aifi_attention.TESTER, topk_select.TESTER)}


TESTERS: Dict[str, OpTester] = _load()
