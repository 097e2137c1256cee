"""Bounds checking for Triton kernels run by the interpreter (a CPU stand-in for compute-sanitizer).

The Triton interpreter executes loads and stores through raw host addresses: a masked-in lane that
points outside its tensor reads or writes arbitrary process memory, silently (on a GPU the same
bug is an illegal memory access, or a silent corruption). ``install()`` wraps the interpreter's
memory operations so that every active lane of every load, store and atomic must address bytes
inside the storage of one of the launch's tensor arguments; any other lane raises
``TritonOutOfBounds`` naming the kernel, the operation and the offending address.

Used by tests/conftest.py whenever the tests run under the interpreter.
"""

from __future__ import annotations

import threading
from typing import List, Tuple

import numpy as np

_state = threading.local()


class TritonOutOfBounds(AssertionError):
    pass


def _ranges() -> List[Tuple[int, int]]:
    stack = getattr(_state, "stack", None)
    if not stack:
        raise TritonOutOfBounds("interpreted Triton memory access outside a kernel launch")
    return stack[-1][1]


def check(op: str, ptrs: np.ndarray, mask, itemsize: int) -> None:
    """Every lane of ``ptrs`` enabled by ``mask`` addresses ``itemsize`` bytes inside one range."""
    addrs = np.asarray(ptrs, dtype=np.uint64).reshape(-1)
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask, dtype=bool), np.shape(ptrs)).reshape(-1)
        addrs = addrs[m]
    if addrs.size == 0:
        return
    ok = np.zeros(addrs.shape, dtype=bool)
    ranges = _ranges()
    for start, end in ranges:
        ok |= (addrs >= np.uint64(start)) & (addrs + np.uint64(itemsize) <= np.uint64(end))
    if not ok.all():
        bad = int(addrs[~ok][0])
        where = ", ".join(f"[{s:#x}, {e:#x})" for s, e in ranges)
        nearest = min(ranges, key=lambda r: min(abs(bad - r[0]), abs(bad - r[1])))
        raise TritonOutOfBounds(
            f"{_state.stack[-1][0]}: {op} of {int((~ok).sum())} lane(s) outside every tensor argument; "
            f"first address {bad:#x} ({bad - nearest[0]:+d} bytes from the start of the nearest tensor "
            f"[{nearest[0]:#x}, {nearest[1]:#x})); tensor arguments: {where}")


class _CheckedInterpreter:
    """Proxy for triton's C++ ``interpreter`` module with checked memory operations."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, ptrs, mask, other, dtype):
        check("load", ptrs, mask, np.dtype(dtype).itemsize)
        return self._inner.load(ptrs, mask, other, dtype)

    def store(self, ptrs, value, mask):
        check("store", ptrs, mask, np.asarray(value).dtype.itemsize)
        return self._inner.store(ptrs, value, mask)

    def atomic_rmw(self, op, ptrs, value, mask, sem):
        check("atomic_rmw", ptrs, mask, np.asarray(value).dtype.itemsize)
        return self._inner.atomic_rmw(op, ptrs, value, mask, sem)

    def atomic_cas(self, ptrs, cmp, value, sem):
        check("atomic_cas", ptrs, None, np.asarray(value).dtype.itemsize)
        return self._inner.atomic_cas(ptrs, cmp, value, sem)


def _tensor_ranges(args) -> List[Tuple[int, int]]:
    out = []

    def visit(a):
        if isinstance(a, (tuple, list)):
            for x in a:
                visit(x)
        elif hasattr(a, "untyped_storage"):
            s = a.untyped_storage()
            if s.nbytes() > 0:
                out.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
        elif hasattr(a, "base") and hasattr(a.base, "untyped_storage"):  # TensorDescriptor
            visit(a.base)

    visit(args)
    return out


def install() -> bool:
    """Patch the interpreter (idempotent). False when triton or its interpreter is unavailable."""
    try:
        from triton.runtime import interpreter as interp
    except Exception:
        return False
    if getattr(interp, "_rtdetr_bounds_checked", False):
        return True
    if not all(hasattr(interp._interpreter, n) for n in ("load", "store", "atomic_rmw", "atomic_cas")):
        return False
    interp._interpreter = _CheckedInterpreter(interp._interpreter)
    original = interp.GridExecutor.__call__

    def call(self, *args, **kwargs):
        name = getattr(self.fn, "__name__", "kernel")
        stack = getattr(_state, "stack", None)
        if stack is None:
            stack = _state.stack = []
        stack.append((name, _tensor_ranges((args, tuple(kwargs.values())))))
        try:
            return original(self, *args, **kwargs)
        finally:
            stack.pop()

    interp.GridExecutor.__call__ = call
    interp._rtdetr_bounds_checked = True
    return True
