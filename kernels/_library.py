"""What every op shares: the op definition (two torch.library custom ops over per-backend kernels,
fake tensors, autograd, per-argument autocast, the eager fast path) and the helpers its parts use
(argument checks, differentiating the reference, fake gradients).

An op is one ``OpDef`` (in ``<op>/op.py``) plus one ``Implementation`` record per backend
(``backends.register``). ``OpDef`` defines ``rtdetr_kernels::<op>`` and ``rtdetr_kernels::<op>_backward``
from schema strings; both take the backend chosen by the Python wrapper as their last argument
(the backward also ``deterministic``, from ``torch.are_deterministic_algorithms_enabled()``), and
run that backend's forward or backward kernel from the registry.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

NAMESPACE = "rtdetr_kernels"
if not __name__.startswith(NAMESPACE + "."):  # see __init__.py: the ops are defined by rtdetr_kernels alone
    raise ImportError(f"{__file__} belongs to the 'rtdetr_kernels' package and cannot be imported as {__name__!r}; "
                      "import rtdetr_kernels")

from . import backends  # noqa: E402

_IMPL_LIB = torch.library.Library(NAMESPACE, "IMPL")

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Argument checks (each op's validate() is the one place its inputs are checked; these are the
# pieces it is made of, so every op words the same problem the same way)
# --------------------------------------------------------------------------------------------


def check_tensor(name: str, t: Any, *, dtypes: Optional[Sequence[torch.dtype]] = FLOAT_DTYPES,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None,
                 like: str = "") -> torch.Tensor:
    """``t`` is a tensor of one of ``dtypes`` (or exactly ``dtype``) on ``device``; ``like`` names
    the argument that fixed the expected dtype/device, for the message."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if dtype is not None:
        if t.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype}{_source(like)}, got {t.dtype}")
    elif dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        kind = "a floating tensor" if tuple(dtypes) == FLOAT_DTYPES else "a tensor"
        raise TypeError(f"{name}: expected {kind} ({names}), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}{_source(like)}, got {t.device}")
    return t


def _source(like: str) -> str:
    return f" ({like}'s)" if like else ""


def check_int(name: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None,
              what: Callable[[], str] = lambda: "") -> int:
    """``value`` is an int (a SymInt under tracing; not a bool) with ``low <= value <= high``.
    ``what()`` adds context to the message; it is called only on failure (formatting a symbolic
    size would specialise it under torch.compile)."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"{low} <= {name} <= {high}" if low is not None and high is not None
                  else f"{name} >= {low}" if low is not None else f"{name} <= {high}")
        raise ValueError(f"{name}: expected {bounds}{what()}, got {value}")
    return value


def autocast_enabled(device_type: str) -> bool:
    if device_type not in ("cpu", "cuda"):
        return False
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def autocast_dtype(device_type: str) -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_gpu_dtype() if device_type == "cuda" else torch.get_autocast_cpu_dtype()


# --------------------------------------------------------------------------------------------
# Gradients: placeholders, fakes, and the reference backward
# --------------------------------------------------------------------------------------------


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    """Placeholder returned by backward ops for a gradient nobody asked for."""
    return like.new_empty(0)


def fake_grad(t: Optional[torch.Tensor], need: bool, like: torch.Tensor) -> torch.Tensor:
    """The fake of a backward op's output: a contiguous tensor like ``t`` where its gradient is
    needed, else the empty placeholder."""
    if need and t is not None:
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return empty_grad(like)


class reenable_autograd:
    """Run autograd inside a custom op's implementation.

    A custom op's kernels run below the Autograd dispatch keys (grad mode off, Autograd keys
    excluded); the reference backends compute their backward by differentiating the reference,
    so they switch autograd back on for the duration of that computation.
    """

    _KEYS = [getattr(torch._C.DispatchKey, name) for name in
             ("AutogradFunctionality", "AutogradOther", "AutogradCPU", "AutogradCUDA", "AutogradNestedTensor") if hasattr(torch._C.DispatchKey, name)]

    def __enter__(self):
        self._excluded = [torch._C._dispatch_tls_is_dispatch_key_excluded(k) for k in self._KEYS]
        for key in self._KEYS:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
        self._grad = torch.enable_grad()
        self._grad.__enter__()
        return self

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        for key, was in zip(self._KEYS, self._excluded):
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, was)
        return False


def differentiate(fn: Callable[..., torch.Tensor], inputs: Sequence[Optional[torch.Tensor]], needs: Sequence[bool],
                  grad_output: torch.Tensor, differentiable: Optional[Sequence[bool]] = None) -> Tuple[torch.Tensor, ...]:
    """The reference backends' backward: the gradients of ``fn(*inputs)`` for the inputs where
    ``needs`` is set, by autograd through the reference.

    Per input: its gradient; zeros where it is needed but ``fn`` does not depend on it (or it is
    marked not ``differentiable``, e.g. discrete sampling locations: defined, zero); the empty
    placeholder where it is not needed or None.
    """
    differentiable = differentiable if differentiable is not None else [True] * len(inputs)
    placeholder = next(t for t in inputs if t is not None)
    with reenable_autograd():
        detached = [None if t is None else t.detach().requires_grad_(bool(need and d))
                    for t, need, d in zip(inputs, needs, differentiable)]
        wanted = [t for t in detached if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(fn(*detached), wanted, grad_output, allow_unused=True) if wanted else ())
    result = []
    for t, need in zip(detached, needs):
        if t is None or not need:
            result.append(empty_grad(placeholder))
        elif not t.requires_grad:
            result.append(torch.zeros_like(t))
        else:
            g = next(grads)
            result.append(torch.zeros_like(t) if g is None else g)
    return tuple(result)


# --------------------------------------------------------------------------------------------
# Autocast: one policy per argument
# --------------------------------------------------------------------------------------------

AUTOCAST = "autocast"  # follow the autocast dtype (float32/16/bf16 inputs)
AT_LEAST_FLOAT32 = "float32"  # keep float32 precision: 16-bit inputs go up to float32


def _cast(t, rule, low):
    if rule is None or t is None or not isinstance(t, torch.Tensor):
        return t
    if rule == AUTOCAST:
        return t.to(low) if t.dtype in (torch.float32,) + LOW_PRECISION else t
    return t.float() if t.dtype in LOW_PRECISION else t


def cast_for_autocast(policy: Sequence[Optional[str]], device_type: str, args: Sequence[Any]) -> tuple:
    """``args`` cast per ``policy`` (one rule per leading argument; the rest are kept)."""
    low = autocast_dtype(device_type)
    return tuple(_cast(a, rule, low) for a, rule in zip(args, policy)) + tuple(args[len(policy):])


def _register_autocast(op_name: str, policy: Sequence[Optional[str]]) -> None:
    """An Autocast kernel for ``rtdetr_kernels::<op_name>`` on CPU and CUDA.

    ``torch.library.register_autocast`` casts every floating input to one dtype; our ops need a
    policy per argument (MSDA casts ``value`` to the autocast dtype but keeps the sampling
    locations in float32).
    """
    op = getattr(getattr(torch.ops, NAMESPACE), op_name).default
    for device_type in ("cuda", "cpu"):
        key_name = "Autocast" + ("CUDA" if device_type == "cuda" else "CPU")
        key = getattr(torch._C.DispatchKey, key_name)

        def kernel(*args, _key=key, _device_type=device_type):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*cast_for_autocast(policy, _device_type, args))

        _IMPL_LIB.impl(op_name, kernel, key_name)


# --------------------------------------------------------------------------------------------
# The op definition
# --------------------------------------------------------------------------------------------


def tracing() -> bool:
    """True when a call must be visible as the registered op: compiling, exporting, jit tracing, or
    under a TorchDispatchMode (make_fx, FakeTensorMode, FlopCounterMode, user modes)."""
    # is_compiling first: it is dynamo's constant True, so dynamo never reaches the C-level checks after it
    # (torch._C._is_tracing is torch.jit.is_tracing without its Python wrapper: a frame less per eager call)
    return torch.compiler.is_compiling() or torch._C._is_tracing() or torch._C._len_torch_dispatch_stack() > 0


def _is_tensor_list(a) -> bool:
    return isinstance(a, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in a)


def _flatten(args: Sequence[Any]) -> Tuple[List[Any], List[int]]:
    """Lists of tensors spliced into one flat list (autograd.Function sees only top-level tensors);
    the spec is each argument's length, -1 for a plain argument."""
    flat, spec = [], []
    for a in args:
        if _is_tensor_list(a):
            flat.extend(a)
            spec.append(len(a))
        else:
            flat.append(a)
            spec.append(-1)
    return flat, spec


def _flatten_like(values: Sequence[Any], spec: Sequence[int]) -> List[Any]:
    """``values`` (one per argument; a list, or None, for a spliced one) flattened as ``spec`` says."""
    flat = []
    for v, n in zip(values, spec):
        if n < 0:
            flat.append(v)
        else:
            flat.extend([None] * n if v is None else v)
    return flat


def _unflatten(flat: Sequence[Any], spec: Sequence[int]) -> List[Any]:
    out, i = [], 0
    for n in spec:
        if n < 0:
            out.append(flat[i])
            i += 1
        else:
            out.append(list(flat[i:i + n]))
            i += n
    return out


def _any(needs) -> bool:
    return any(_any(n) if isinstance(n, (list, tuple)) else bool(n) for n in needs)


def _contiguous(a):
    if isinstance(a, torch.Tensor):
        return a.contiguous()
    if _is_tensor_list(a):
        return [t.contiguous() for t in a]
    return a


def _requires_grad(args) -> bool:
    """Whether a tensor among ``args`` (or in a list of tensors there) requires grad. Plain loops: this
    runs on every eager call."""
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)):
            for t in a:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    return True
    return False


class OpDef:
    """One op: ``rtdetr_kernels::<name>`` and ``rtdetr_kernels::<name>_backward`` over the registry.

    Subclasses give the op's facts: the two schemas (without the trailing arguments every op has:
    the forward's ``str backend``, the backward's ``bool deterministic, str backend``), the
    fakes, what the backward saves (``save``) and how autograd's incoming gradients become the
    backward op's arguments and the inputs' gradients (``grads``), the autocast policy, and
    ``validate`` / ``describe`` / the public function. Everything else (op definition, autograd and
    autocast registration, contiguous inputs and outputs, the eager fast path, explain) is here.
    """

    name: str
    # "(Tensor value, ..., SymInt method) -> Tensor"; sizes and counts are SymInt (an int that stays
    # symbolic under torch.compile with dynamic shapes), as torch.library infers for Python ints
    forward_schema: str
    backward_schema: str
    autocast_policy: Optional[Sequence[Optional[str]]] = None  # one rule per leading forward argument
    # ``grads`` takes None for an output whose gradient is undefined (unused); else such gradients
    # arrive as zeros
    undefined_grads_ok: bool = False

    def __init__(self):
        self.forward_op = self._define(self.name, self.forward_schema, self._run_forward, self.fake_forward)
        self.backward_op = self._define(self.name + "_backward", self.backward_schema, self._run_backward,
                                        self.fake_backward, extra="bool deterministic, ")
        self.forward_op.register_autograd(self._autograd_backward, setup_context=self._setup_context)
        if self.autocast_policy is not None:
            _register_autocast(self.name, self.autocast_policy)
        backends.define_op(self)

    # -- the op's facts (subclasses) --------------------------------------------------------

    def fake_forward(self, *args):
        raise NotImplementedError

    def fake_backward(self, *args):
        raise NotImplementedError

    def save(self, inputs: tuple, output) -> Tuple[tuple, Any]:
        """(tensors to save for the backward, other facts it needs) from the forward's inputs
        (without the backend) and output."""
        raise NotImplementedError

    def grads(self, saved: tuple, meta: Any, needs: tuple, grad_outputs: tuple, backward: Callable) -> tuple:
        """The inputs' gradients (None where not needed; a list for a Tensor[] input) from
        autograd's ``grad_outputs``; ``backward(*args)`` runs the backward op on the arguments of
        its schema (``deterministic`` and ``backend`` are appended)."""
        raise NotImplementedError

    # validate(*args, **kwargs) -> problem: the public function's arguments checked (the one place)
    # describe(problem) -> backends.Call: what the backends' why_not decide on
    validate: Callable
    describe: Callable

    # -- shared machinery ------------------------------------------------------------------

    @staticmethod
    def _define(name, schema, run, fake, extra=""):
        args, returns = schema.rsplit("->", 1)
        full = args.rstrip().rstrip(")") + (", " if args.strip() != "()" else "") + extra + "str backend) ->" + returns
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), schema=full)(lambda *a: run(*a))
        op.register_fake(lambda *a: fake(*a))
        return op

    def _kernels(self, backend: str):
        return backends.kernels(self.name, backend)

    def _run_forward(self, *args):
        """The forward op's body: the backend's forward kernel on contiguous inputs."""
        forward = self._kernels(args[-1])[0]
        return self._contiguous_outputs(forward(*[_contiguous(a) for a in args[:-1]]))

    def _run_backward(self, *args):
        *args, backend = args
        _, backward = self._kernels(backend)
        # a grad_output may be a stride-0 expand (out.sum().backward()); the kernels assume contiguous
        return self._contiguous_outputs(backward(*(_contiguous(a) for a in args)))

    @staticmethod
    def _contiguous_outputs(out):
        """The layout the fakes promise, whatever the kernel returned."""
        if isinstance(out, torch.Tensor):
            return out.contiguous()
        return type(out)(_contiguous(o) for o in out)

    def _setup_context(self, ctx, inputs, output):
        tensors, meta = self.save(tuple(inputs[:-1]), output)
        ctx.save_for_backward(*tensors)
        ctx.meta, ctx.backend = meta, inputs[-1]

    def _autograd_backward(self, ctx, *grad_outputs):
        return self._input_grads(ctx, ctx.needs_input_grad, grad_outputs, self.backward_op)

    def _input_grads(self, ctx, needs_input_grad, grad_outputs, backward_op):
        needs = tuple(needs_input_grad[:-1])
        if not _any(needs):
            return tuple([None] * len(n) if isinstance(n, (list, tuple)) else None for n in needs_input_grad)
        # the deterministic flag reaches every backward kernel (fixed when the backward runs)
        deterministic = torch.are_deterministic_algorithms_enabled()
        grads = self.grads(tuple(ctx.saved_tensors), ctx.meta, needs, tuple(grad_outputs),
                           lambda *args: backward_op(*args, deterministic, ctx.backend))
        return tuple(grads) + (None,)

    def __call__(self, *args):
        """Run the op on validated arguments (the backend name last): the registered op when
        tracing, else the same kernels through ``_Eager`` without the custom-op dispatch (tens of
        microseconds a call, as much as a whole kernel at batch 1)."""
        if tracing():
            return self.forward_op(*args)
        # the first argument of every op's forward is a tensor (x, value, logits)
        device_type = args[0].device.type
        if autocast_enabled(device_type):
            # as the registered op's Autocast kernel: cast per policy, then run below autocast
            if self.autocast_policy is not None:
                args = cast_for_autocast(self.autocast_policy, device_type, args)
            with torch.autocast(device_type, enabled=False):
                return self._eager(args)
        return self._eager(args)

    def _eager(self, args):
        if backends.implementation(self.name, args[-1]).autograd:
            # composed of differentiable ATen calls on any strides: autograd records through it as it runs
            return self._kernels(args[-1])[0](*args[:-1])
        if torch.is_grad_enabled() and _requires_grad(args):
            flat, spec = _flatten(args)
            output_spec: List[List[int]] = []  # filled by _Eager.forward
            out = _Eager.apply(self, spec, output_spec, *flat)
            return out if not output_spec else tuple(_unflatten(out, output_spec[0]))
        return self._run_forward(*args)

    def explain(self, *args, **kwargs) -> str:
        """Which backend would serve this call, and why the others would not."""
        kwargs.pop("backend", None)
        return backends.explain(self.describe(self.validate(*args, **kwargs)))

    def cases(self):
        """The op folder's ``cases`` module: ``sample()`` for ``check``, ``sanitizer_cases()``."""
        return importlib.import_module(type(self).__module__.rsplit(".", 1)[0] + ".cases")


class _Eager(torch.autograd.Function):
    """The eager path: the backend's kernels with the op's own save/grads logic, no dispatch."""

    @staticmethod
    def forward(ctx, opdef: OpDef, spec, output_spec, *flat):
        args = _unflatten(flat, spec)
        out = opdef._run_forward(*args)
        opdef._setup_context(ctx, args, out)
        ctx.opdef, ctx.spec, ctx.output_spec = opdef, spec, None
        # An unused output's gradient stays None instead of zeros where the op's ``grads`` handles it
        # (top-K: its scores are often unused, and a zero gradient there is a scatter into a [N, T, C]
        # tensor and an add of it into logits' gradient, about a third of the whole backward on CPU).
        ctx.set_materialize_grads(not opdef.undefined_grads_ok)
        if isinstance(out, torch.Tensor):
            return out
        flat_out, ctx.output_spec = _flatten(out)
        output_spec.append(ctx.output_spec)
        return tuple(flat_out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *flat_grads):
        opdef = ctx.opdef
        grads = flat_grads if ctx.output_spec is None else _unflatten(flat_grads, ctx.output_spec)
        needs = _unflatten(ctx.needs_input_grad[3:], ctx.spec)
        structured = opdef._input_grads(ctx, needs, grads, opdef._run_backward)
        return (None, None, None) + tuple(_flatten_like(structured, ctx.spec))
