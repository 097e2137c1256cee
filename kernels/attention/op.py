"""AIFI / positional self-attention as a torch.library op: validation, dispatch, autograd, autocast.

Two custom ops carry the work, ``rtdetr_kernels::aifi_attention`` and
``rtdetr_kernels::aifi_attention_backward``. Both take the validated tensors as the user passed
them (pos, biases and mask optional), the head count, and the backend name resolved by the Python
wrapper. Only the ``reference`` backend exists so far; the others say so when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .. import backends
from .._library import NAMESPACE, autocast_dtype, empty_grad, reenable_autograd, register_autocast_policy
from . import reference

OP = "aifi_attention"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Problem:
    """A validated call."""

    x: torch.Tensor  # [N, L, E]
    pos: Optional[torch.Tensor]  # broadcastable to x
    in_proj_weight: torch.Tensor  # [3E, E]
    in_proj_bias: Optional[torch.Tensor]  # [3E]
    out_proj_weight: torch.Tensor  # [E, E]
    out_proj_bias: Optional[torch.Tensor]  # [E]
    num_heads: int
    attn_mask: Optional[torch.Tensor]  # [L, L] or [N * num_heads, L, L], bool or floating

    @property
    def tensors(self) -> Tuple[Optional[torch.Tensor], ...]:
        return (self.x, self.pos, self.in_proj_weight, self.in_proj_bias, self.out_proj_weight, self.out_proj_bias)


# --------------------------------------------------------------------------------------------
# Validation: the one place where attention inputs are checked
# --------------------------------------------------------------------------------------------


def _check_tensor(name: str, t, dtype: Optional[torch.dtype], device: Optional[torch.device]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if dtype is None:
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}: expected a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    elif t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (x's dtype), got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} (x's device), got {t.device}")


def _check_shape(name: str, t: torch.Tensor, expected: Tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name}: expected shape {meaning} = {list(expected)}, got {list(t.shape)}")


def validate(
    x: torch.Tensor,
    pos: Optional[torch.Tensor],
    in_proj_weight: torch.Tensor,
    in_proj_bias: Optional[torch.Tensor],
    out_proj_weight: torch.Tensor,
    out_proj_bias: Optional[torch.Tensor],
    num_heads: int = 8,
    attn_mask: Optional[torch.Tensor] = None,
) -> Problem:
    _check_tensor("x", x, None, None)
    if x.dim() != 3:
        raise ValueError(f"x: expected shape [N, L, E] (3 dims, batch first), got {list(x.shape)}")
    N, L, E = x.shape
    # Under autocast the op casts every input to the autocast dtype, so AMP's mixed dtypes are fine.
    same_dtype = None if _autocast_enabled(x.device.type) else x.dtype
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads: expected an int, got {type(num_heads).__name__}")
    if num_heads <= 0:
        raise ValueError(f"num_heads: expected a positive count, got {num_heads}")
    if E == 0 or E % num_heads != 0:
        raise ValueError(f"num_heads: the embedding size E = {E} (x's last dim) must be a positive multiple of num_heads = {num_heads}")
    for name, t, shape, meaning in (("in_proj_weight", in_proj_weight, (3 * E, E), "[3E, E]"),
                                    ("in_proj_bias", in_proj_bias, (3 * E,), "[3E]"),
                                    ("out_proj_weight", out_proj_weight, (E, E), "[E, E]"),
                                    ("out_proj_bias", out_proj_bias, (E,), "[E]")):
        if t is None and name.endswith("bias"):
            continue
        _check_tensor(name, t, same_dtype, x.device)
        _check_shape(name, t, shape, meaning)
    if pos is not None:
        _check_tensor("pos", pos, same_dtype, x.device)
        if pos.dim() not in (2, 3) or tuple(pos.shape[-2:]) != (L, E) or (pos.dim() == 3 and pos.shape[0] not in (1, N)):
            raise ValueError(f"pos: expected shape [1, L, E], [N, L, E] or [L, E] with [N, L, E] = {[N, L, E]} (x's shape), got {list(pos.shape)}")
    if attn_mask is not None:
        _check_mask(attn_mask, x, N, L, num_heads)
    return Problem(x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, attn_mask)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def _check_mask(attn_mask, x: torch.Tensor, N: int, L: int, num_heads: int) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in FLOAT_DTYPES:
        raise TypeError(f"attn_mask: expected a bool (True = blocked) or floating (additive) tensor, got {attn_mask.dtype}")
    if attn_mask.device != x.device:
        raise ValueError(f"attn_mask: expected device {x.device} (x's device), got {attn_mask.device}")
    if tuple(attn_mask.shape) not in ((L, L), (N * num_heads, L, L)):
        raise ValueError(f"attn_mask: expected shape [L, L] = {[L, L]} or [N * num_heads, L, L] = {[N * num_heads, L, L]}, got {list(attn_mask.shape)}")


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------

backends.register(OP, "reference", lambda call: None)


def _impl(backend: str):
    """(forward, backward) callables of a backend, all with the signature of the custom ops."""
    if backend == "reference":
        return reference.aifi_attention_reference, _reference_backward
    raise ValueError(f"{OP} has no {backend!r} implementation")


def _reference_backward(grad_output, x, pos, in_w, in_b, out_w, out_b, num_heads, attn_mask, needs):
    with reenable_autograd():
        inputs = [None if t is None else t.detach().requires_grad_(need) for t, need in zip((x, pos, in_w, in_b, out_w, out_b), needs)]
        out = reference.aifi_attention_reference(*inputs, num_heads, attn_mask)
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad_output, allow_unused=True)) if wanted else iter(())
    result = []
    for t, need in zip(inputs, needs):
        if t is None or not need:
            result.append(empty_grad(x))
        else:
            g = next(grads)
            result.append(torch.zeros_like(t) if g is None else g)
    return tuple(result)


# --------------------------------------------------------------------------------------------
# The custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::aifi_attention", mutates_args=())
def _forward_op(x: torch.Tensor, pos: Optional[torch.Tensor], in_proj_weight: torch.Tensor,
                in_proj_bias: Optional[torch.Tensor], out_proj_weight: torch.Tensor,
                out_proj_bias: Optional[torch.Tensor], num_heads: int, attn_mask: Optional[torch.Tensor],
                backend: str) -> torch.Tensor:
    forward, _ = _impl(backend)
    out = forward(x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, attn_mask)
    return out.contiguous()  # the layout the fake promises, whatever the inputs' strides


@_forward_op.register_fake
def _(x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, attn_mask, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op(f"{NAMESPACE}::aifi_attention_backward", mutates_args=())
def _backward_op(grad_output: torch.Tensor, x: torch.Tensor, pos: Optional[torch.Tensor], in_proj_weight: torch.Tensor,
                 in_proj_bias: Optional[torch.Tensor], out_proj_weight: torch.Tensor,
                 out_proj_bias: Optional[torch.Tensor], num_heads: int, attn_mask: Optional[torch.Tensor],
                 backend: str, needs: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads of (x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias); an empty
    tensor where ``needs`` is False or the input is None."""
    _, backward = _impl(backend)
    grads = backward(grad_output, x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                     num_heads, attn_mask, list(needs))
    return tuple(g.contiguous() for g in grads)


@_backward_op.register_fake
def _(grad_output, x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, attn_mask, backend, needs):
    def maybe(t, need):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if (need and t is not None) else x.new_empty(0)

    return tuple(maybe(t, need) for t, need in zip((x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias), needs))


def _setup_context(ctx, inputs, output):
    x, pos, in_w, in_b, out_w, out_b, num_heads, attn_mask, backend = inputs
    ctx.save_for_backward(x, pos, in_w, in_b, out_w, out_b, attn_mask)
    ctx.meta = (num_heads, backend)


def _backward(ctx, grad_output):
    x, pos, in_w, in_b, out_w, out_b, attn_mask = ctx.saved_tensors
    num_heads, backend = ctx.meta
    needs = [bool(n) for n in ctx.needs_input_grad[:6]]
    if not any(needs):
        return (None,) * 9
    grads = _backward_op(grad_output, x, pos, in_w, in_b, out_w, out_b, num_heads, attn_mask, backend, needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None, None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_args(device_type: str, args: tuple) -> tuple:
    # As nn.MultiheadAttention under autocast (its linears): every floating input follows the
    # autocast dtype; a float mask keeps its precision (the reference adds it in float32).
    low = autocast_dtype(device_type)
    tensors, rest = args[:6], args[6:]
    cast = tuple(t.to(low) if t is not None and t.dtype in (torch.float32, torch.float16, torch.bfloat16) else t for t in tensors)
    return cast + tuple(rest)


register_autocast_policy("aifi_attention", _autocast_args)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def aifi_attention(
    x: torch.Tensor,
    pos: Optional[torch.Tensor],
    in_proj_weight: torch.Tensor,
    in_proj_bias: Optional[torch.Tensor],
    out_proj_weight: torch.Tensor,
    out_proj_bias: Optional[torch.Tensor],
    num_heads: int = 8,
    attn_mask: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Positional self-attention: ``nn.MultiheadAttention(q=k=x+pos, v=x)`` as RT-DETR's AIFI layer and
    decoder self-attention call it (batch first, ``need_weights=False``).

    Args:
        x: [N, L, E] tokens; float16, bfloat16, float32 or float64.
        pos: position embedding added to queries and keys only, [1, L, E], [N, L, E] or [L, E]; or None.
        in_proj_weight, in_proj_bias: the packed q/k/v projection [3E, E] and [3E] (bias may be None),
            as ``nn.MultiheadAttention`` stores them. Same dtype and device as x.
        out_proj_weight, out_proj_bias: [E, E] and [E] (bias may be None).
        num_heads: heads; E must be a multiple of it.
        attn_mask: None, or [L, L] / [N * num_heads, L, L]; bool with True = blocked, or a floating
            mask added to the scores. No gradient flows to a floating mask.
        backend: 'auto' (default) or 'reference' (the only implementation so far).

    Returns:
        [N, L, E] in x's dtype; math in float32 (float64 for float64 x).
    """
    problem = validate(x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, attn_mask)
    chosen = backends.choose(describe(problem), backend)
    return _forward_op(*problem.tensors, problem.num_heads, problem.attn_mask, chosen)


def describe(problem: Problem) -> backends.Call:
    dtypes = tuple(t.dtype for t in problem.tensors if t is not None)
    mask = "none" if problem.attn_mask is None else ("bool" if problem.attn_mask.dtype == torch.bool else "float")
    E = problem.x.shape[-1]
    options = (("num_heads", problem.num_heads), ("head_dim", E // problem.num_heads), ("mask", mask))
    return backends.Call(OP, problem.x.device.type, dtypes, options)


def explain(x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads=8, attn_mask=None, **kwargs) -> str:
    """Which backend would serve this call, and why the others would not."""
    kwargs.pop("backend", None)
    if kwargs:
        raise TypeError(f"explain: unexpected arguments {sorted(kwargs)}")
    return backends.explain(describe(validate(x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, attn_mask)))
