"""Backend registry and selection.

Every op has up to four implementations: ``cuda`` (csrc CUDA kernels in ``_C``), ``triton``,
``cpu`` (csrc C++ kernels in ``_C``) and ``reference`` (pure PyTorch). Each is one
``Implementation`` record (op, backend, its kernels, and ``why_not(call) -> str | None``, which
says why it cannot serve a given call: dtype, shape, option). Dispatch, ``explain``, ``info``,
``check``, the sanitizer cases and the benchmarks' provider lists all read these records.
Build-level availability (is ``_C`` built, with CUDA? is triton importable? is there a GPU?) is
checked here once for all ops.

Selection, first match wins: the ``backend=`` argument of an op, the innermost
``use_backend(...)`` context, the environment variable ``RTDETR_KERNELS_BACKEND``, else ``auto``.
``auto`` walks the device's priority list (CUDA tensors: cuda, triton, reference; CPU tensors:
cpu, reference) and takes the first backend that can serve the call. An explicit backend that
cannot serve the call raises ``BackendUnavailableError`` naming the reason.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from ._extension import extension_error, extension_has_cuda, load_extension  # noqa: F401 (re-exported)

BACKENDS: Tuple[str, ...] = ("cuda", "triton", "cpu", "reference")
AUTO_PRIORITY: Dict[str, Tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}
ENV_VAR = "RTDETR_KERNELS_BACKEND"

logger = logging.getLogger("rtdetr_kernels")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot serve this call; the message says why."""


class Call(NamedTuple):
    """What a backend needs to know to decide whether it can serve a call. (A NamedTuple: made, hashed
    and compared in C, once per eager call.)"""

    op: str
    device_type: str
    dtypes: Tuple[torch.dtype, ...]
    options: Tuple[Tuple[str, object], ...] = ()

    def option(self, name: str, default=None):
        return dict(self.options).get(name, default)


WhyNot = Callable[[Call], Optional[str]]


def always(call: Call) -> Optional[str]:
    """The ``why_not`` of an implementation that serves every call its build can serve."""
    return None


@dataclass(frozen=True)
class Implementation:
    """One (op, backend) record: what it can serve, and its kernels.

    ``kernels()`` returns ``(forward, backward)`` with the signatures of the op's two custom ops
    (without the backend argument); it is called when the backend runs, so a backend's module
    (triton, the extension) is imported only then.
    """

    op: str
    backend: str
    kernels: Callable[[], Tuple[Callable, Callable]]
    why_not: WhyNot = always
    compiled: bool = True  # cpu/cuda kernels in rtdetr_kernels._C (False: composed of PyTorch's kernels)
    # The forward is composed of differentiable PyTorch ops: the eager path lets autograd record through
    # it (its saved tensors, no recomputation) instead of calling the backward kernel, which recomputes
    # the forward; the registered op (compile, export) still uses the backward kernel. Such a forward
    # also takes inputs of any strides and returns contiguous outputs, so the eager path calls it on the
    # arguments as they are.
    autograd: bool = False


_OPS: Dict[str, object] = {}  # op name -> its OpDef (validate, describe, explain)
_IMPLEMENTATIONS: Dict[str, Dict[str, Implementation]] = {}


def define_op(opdef) -> None:
    """Called by ``OpDef.__init__``: the op's definition, found by name."""
    _OPS[opdef.name] = opdef
    _IMPLEMENTATIONS.setdefault(opdef.name, {})


def register(impl: Implementation) -> Implementation:
    """Declare that ``impl.backend`` implements ``impl.op``."""
    if impl.backend not in BACKENDS:
        raise ValueError(f"unknown backend {impl.backend!r}; expected one of {BACKENDS}")
    if impl.op not in _OPS:
        raise ValueError(f"register: op {impl.op!r} is not defined (define its OpDef first)")
    _IMPLEMENTATIONS[impl.op][impl.backend] = impl
    _SELECTED.clear()
    _KERNELS.clear()
    _REMEMBERED.clear()
    return impl


def registered_ops() -> List[str]:
    return sorted(_OPS)


def op_definition(op: str):
    """The OpDef of ``op`` (its validate, describe and explain)."""
    if op not in _OPS:
        raise ValueError(f"op: expected one of {registered_ops()}, got {op!r}")
    return _OPS[op]


def implemented_backends(op: str) -> List[str]:
    """The backends that have a record for ``op``, in BACKENDS order (whether or not built here)."""
    return [b for b in BACKENDS if b in _IMPLEMENTATIONS.get(op, {})]


def implementation(op: str, backend: str) -> Implementation:
    impl = _IMPLEMENTATIONS.get(op, {}).get(backend)
    if impl is None:
        raise BackendUnavailableError(f"{op} has no {backend} implementation")
    return impl


_KERNELS: Dict[Tuple[str, str], Tuple[Callable, Callable]] = {}


def kernels(op: str, backend: str) -> Tuple[Callable, Callable]:
    """``implementation(op, backend).kernels()``, asked once: the record's (forward, backward), whose
    module is imported on that first call (so a backend that never runs is never imported)."""
    found = _KERNELS.get((op, backend))
    if found is None:
        found = _KERNELS[(op, backend)] = implementation(op, backend).kernels()
    return found


# --------------------------------------------------------------------------------------------
# Build-level availability
# --------------------------------------------------------------------------------------------


def extension_namespace():
    """``torch.ops.rtdetr_kernels_C``, the compiled kernels (loading the extension first)."""
    if load_extension() is None:
        raise BackendUnavailableError(f"the compiled extension rtdetr_kernels._C is not available ({extension_error()})")
    return torch.ops.rtdetr_kernels_C


def extension_ops() -> List[str]:
    """The ops the loaded extension defines (``rtdetr_kernels_C::<name>``), as its schemas say."""
    if load_extension() is None:
        return []
    return sorted(s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("rtdetr_kernels_C::"))


@functools.lru_cache(maxsize=None)
def triton_status() -> Tuple[bool, str]:
    """(importable, version-or-reason)."""
    try:
        import triton  # noqa: F401

        return True, triton.__version__
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"


# os.environ's own dict (bytes -> bytes on POSIX), which setting os.environ updates too. ``getenv`` reads
# it directly: os.environ.get is several Python frames and, for an unset variable, a raised and caught
# KeyError, which once per eager call cost tens of microseconds after the kernels had swept the caches.
_ENVIRON_DATA = getattr(os.environ, "_data", None) if os.name == "posix" else None


def getenv(name: str) -> Optional[str]:
    """``os.environ.get(name)``, fast."""
    if isinstance(_ENVIRON_DATA, dict):
        value = _ENVIRON_DATA.get(name.encode())
        return None if value is None else os.fsdecode(value)
    return os.environ.get(name)


def triton_interpreter() -> bool:
    return getenv("TRITON_INTERPRET") not in (None, "", "0")


def build_why_not(backend: str, device_type: str, compiled: bool = True) -> Optional[str]:
    """Reasons that do not depend on the call, only on the build and the device. ``compiled``: the
    record's kernels are in ``_C`` (a cpu record may also be composed of PyTorch's own kernels)."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if backend == "cpu" and device_type != "cpu":
            return f"the cpu backend serves CPU tensors, got {device_type} tensors"
        if backend == "cuda" and device_type != "cuda":
            return f"the cuda backend serves CUDA tensors, got {device_type} tensors"
        if not compiled:
            return None
        if load_extension() is None:
            return f"the compiled extension rtdetr_kernels._C is not available ({extension_error()})"
        if backend == "cuda" and not extension_has_cuda():
            return "rtdetr_kernels._C was built without CUDA kernels (no nvcc/CUDA torch at build time)"
        return None
    if backend == "triton":
        ok, why = triton_status()
        if not ok:
            return why
        if device_type == "cpu" and not triton_interpreter():
            return "triton runs CPU tensors only under the interpreter (set TRITON_INTERPRET=1 before importing triton)"
        if device_type not in ("cpu", "cuda"):
            return f"the triton backend serves CUDA tensors, got {device_type} tensors"
        return None
    return f"unknown backend {backend!r}"


def why_not(backend: str, call: Call) -> Optional[str]:
    """None if ``backend`` can serve ``call``, else a readable reason."""
    if call.op not in _OPS:
        return f"unknown op {call.op!r}"
    impl = _IMPLEMENTATIONS[call.op].get(backend)
    if impl is None:
        return f"{call.op} has no {backend} implementation"
    reason = build_why_not(backend, call.device_type, impl.compiled)
    if reason is None:
        reason = impl.why_not(call)
    return reason


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------

_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("rtdetr_kernels_backend", default=None)


def _check_name(name: str, source: str) -> str:
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside this block on ``name`` ('auto', 'cuda', 'triton', 'cpu', 'reference')."""
    token = _override.set(_check_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _override.reset(token)


def requested_backend(explicit: Optional[str] = None) -> str:
    if explicit is not None:
        return _check_name(explicit, "backend")
    ctx = _override.get()
    if ctx is not None:
        return ctx
    env = getenv(ENV_VAR)
    if env:
        return _check_name(env, ENV_VAR)
    return "auto"


# (call, requested backend, triton interpreter on) -> the backend chosen. A record's why_not depends on
# the call and the build alone, so a choice once made holds until a record is registered. An eager call
# on CPU is a few milliseconds at RT-DETR's sizes, and walking the records again each time was a
# visible part of it (tens of microseconds, once the kernels before it have swept the caches).
_SELECTED: Dict[Tuple[Call, str, bool], str] = {}


def select(call: Call, explicit: Optional[str] = None) -> str:
    """The backend that serves ``call``; raises BackendUnavailableError for an impossible explicit choice."""
    requested = requested_backend(explicit)
    key = (call, requested, triton_interpreter())
    chosen = _SELECTED.get(key)
    if chosen is None:
        chosen = _SELECTED[key] = _select(call, requested)
    return chosen


def _select(call: Call, requested: str) -> str:
    if requested != "auto":
        reason = why_not(requested, call)
        if reason is not None:
            raise BackendUnavailableError(f"{call.op}: backend {requested!r} cannot serve this call: {reason}")
        return requested
    reasons = []
    for backend in AUTO_PRIORITY.get(call.device_type, ("reference",)):
        reason = why_not(backend, call)
        if reason is None:
            if reasons:
                logger.debug("%s: auto chose %s (%s)", call.op, backend, "; ".join(reasons))
            return backend
        reasons.append(f"{backend}: {reason}")
    raise BackendUnavailableError(f"{call.op}: no backend can serve this call: " + "; ".join(reasons))


def choose(call: Call, explicit: Optional[str] = None) -> str:
    """``select`` for use inside ops: under torch.compile the choice is made once, at trace time,
    outside the graph (selection imports the extension and logs, which dynamo cannot trace)."""
    return _choose_constant(call.op, call.device_type, call.dtypes, call.options, explicit)


@torch.compiler.assume_constant_result
def _choose_constant(op, device_type, dtypes, options, explicit) -> str:
    return select(Call(op, device_type, dtypes, options), explicit)


# --------------------------------------------------------------------------------------------
# The eager fast path: validation, description and choice remembered by argument metadata
# --------------------------------------------------------------------------------------------

# (op, call_signature of its arguments, requested backend, triton interpreter on, autocast on for cpu, for
# cuda) -> the backend chosen for a call with those that passed validation. Cleared when a record is registered, and when full.
_REMEMBERED: Dict[tuple, str] = {}
_REMEMBER_AT_MOST = 4096


@functools.lru_cache(maxsize=None)
def _call_signature():
    """``_C.call_signature`` (csrc/signature.cpp), or None where the extension is not built (or predates it)."""
    ext = load_extension()
    if ext is None or not hasattr(ext, "call_signature"):
        return None
    ext.set_signature_types((torch.Tensor, torch.nn.Parameter))
    return ext.call_signature


def remembered(op: str, explicit: Optional[str], args: tuple) -> Tuple[Optional[str], Optional[tuple]]:
    """(the backend chosen earlier for a call of ``op`` whose ``args`` had the same metadata, or None;
    the key to ``remember`` this call's choice under, or None where it cannot be remembered).

    For an op whose ``validate`` reads only its arguments' metadata (tensors' dtype, device and shape;
    plain ints and bools): a hit means a call with this key passed validation, so the public function
    skips ``validate``, ``describe`` and ``select`` (on a 2-core CPU about 200 us once the previous
    kernels have swept the caches, against about 40 us for this). Never under torch.compile (dynamo
    would trace the C call); fake and subclassed tensors have no signature."""
    if torch.compiler.is_compiling():  # first: dynamo's constant True, so it traces nothing below
        return None, None
    signature = _call_signature()
    if signature is None:
        return None, None
    sig = signature(*args)
    if sig is None:
        return None, None
    # what select's own memory is keyed on besides the call (which the signature stands for), and autocast
    key = (op, sig, requested_backend(explicit), triton_interpreter(), torch.is_autocast_enabled("cpu"),
           torch.is_autocast_enabled("cuda"))
    return _REMEMBERED.get(key), key


def remember(key: Optional[tuple], backend: str) -> None:
    """After validation passed and ``backend`` was chosen: remember it under ``remembered``'s key."""
    if key is None:
        return
    if len(_REMEMBERED) >= _REMEMBER_AT_MOST:
        _REMEMBERED.clear()
    _REMEMBERED[key] = backend


def explain(call: Call) -> str:
    """A line per backend saying whether it can serve ``call`` and why not."""
    lines = []
    chosen = None
    try:
        chosen = select(call, "auto")
    except BackendUnavailableError:
        pass
    for backend in BACKENDS:
        reason = why_not(backend, call)
        mark = "*" if backend == chosen else " "
        lines.append(f"{mark} {backend:<9} " + ("ok" if reason is None else f"unavailable: {reason}"))
    return f"{call.op} on {call.device_type} {[str(d).replace('torch.', '') for d in call.dtypes]}:\n" + "\n".join(lines)
