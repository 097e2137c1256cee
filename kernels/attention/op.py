"""AIFI / positional self-attention as a torch.library op: validation, the op's definition, its backends.

Two custom ops carry the work, ``rtdetr_kernels::aifi_attention`` and
``rtdetr_kernels::aifi_attention_backward`` (see ``AIFIAttention``). Both take the validated tensors
as the user passed them (pos, biases and mask optional) and the head count. Backends: cuda (CUDA C++
core, kernels/attention/cuda.py), triton, cpu (kernels/attention/cpu.py) and the reference.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from .. import backends
from .._library import AUTOCAST, FLOAT_DTYPES, OpDef, autocast_enabled, check_int, check_tensor, differentiate, fake_grad
from . import reference

OP = "aifi_attention"


class Problem(NamedTuple):
    """A validated call (a NamedTuple: made in C, once per eager call)."""

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
    check_tensor("x", x)
    if x.dim() != 3:
        raise ValueError(f"x: expected shape [N, L, E] (3 dims, batch first), got {list(x.shape)}")
    N, L, E = x.shape
    device = x.device
    # Under autocast the op casts every input to the autocast dtype, so AMP's mixed dtypes are fine.
    same_dtype = None if autocast_enabled(device.type) else x.dtype
    check_int("num_heads", num_heads, low=1)
    if E == 0 or E % num_heads != 0:
        raise ValueError(f"num_heads: the embedding size E = {E} (x's last dim) must be a positive multiple of num_heads = {num_heads}")
    for name, t, shape, meaning in (("in_proj_weight", in_proj_weight, (3 * E, E), "[3E, E]"),
                                    ("in_proj_bias", in_proj_bias, (3 * E,), "[3E]"),
                                    ("out_proj_weight", out_proj_weight, (E, E), "[E, E]"),
                                    ("out_proj_bias", out_proj_bias, (E,), "[E]")):
        if t is None and name.endswith("bias"):
            continue
        check_tensor(name, t, dtype=same_dtype, device=device, like="x")
        _check_shape(name, t, shape, meaning)
    if pos is not None:
        check_tensor("pos", pos, dtype=same_dtype, device=device, like="x")
        if pos.dim() not in (2, 3) or tuple(pos.shape[-2:]) != (L, E) or (pos.dim() == 3 and pos.shape[0] not in (1, N)):
            raise ValueError(f"pos: expected shape [1, L, E], [N, L, E] or [L, E] with [N, L, E] = {[N, L, E]} (x's shape), got {list(pos.shape)}")
    if attn_mask is not None:
        _check_mask(attn_mask, x, N, L, num_heads)
    return Problem(x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, attn_mask)


def _check_mask(attn_mask, x: torch.Tensor, N: int, L: int, num_heads: int) -> None:
    check_tensor("attn_mask", attn_mask, dtypes=None, device=x.device, like="x")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in FLOAT_DTYPES:
        raise TypeError(f"attn_mask: expected a bool (True = blocked) or floating (additive) tensor, got {attn_mask.dtype}")
    if tuple(attn_mask.shape) not in ((L, L), (N * num_heads, L, L)):
        raise ValueError(f"attn_mask: expected shape [L, L] = {[L, L]} or [N * num_heads, L, L] = {[N * num_heads, L, L]}, got {list(attn_mask.shape)}")


def describe(problem: Problem) -> backends.Call:
    dtypes = tuple(t.dtype for t in problem.tensors if t is not None)
    mask = "none" if problem.attn_mask is None else ("bool" if problem.attn_mask.dtype == torch.bool else "float")
    E = problem.x.shape[-1]
    options = (("num_heads", problem.num_heads), ("head_dim", E // problem.num_heads), ("mask", mask))
    return backends.Call(OP, problem.x.device.type, dtypes, options)


# --------------------------------------------------------------------------------------------
# The op and its backends
# --------------------------------------------------------------------------------------------

_PARAMS = ("x", "pos", "in_proj_weight", "in_proj_bias", "out_proj_weight", "out_proj_bias")


class AIFIAttention(OpDef):
    name = OP
    forward_schema = ("(Tensor x, Tensor? pos, Tensor in_proj_weight, Tensor? in_proj_bias, Tensor out_proj_weight, "
                      "Tensor? out_proj_bias, SymInt num_heads, Tensor? attn_mask) -> Tensor")
    # Grads of (x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias); an empty
    # tensor where ``needs`` is False or the input is None.
    backward_schema = ("(Tensor grad_output, Tensor x, Tensor? pos, Tensor in_proj_weight, Tensor? in_proj_bias, "
                       "Tensor out_proj_weight, Tensor? out_proj_bias, SymInt num_heads, Tensor? attn_mask, bool[] needs) "
                       "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
    # As nn.MultiheadAttention under autocast (its linears): every floating input follows the
    # autocast dtype; a float mask keeps its precision (the reference adds it in float32).
    autocast_policy = (AUTOCAST,) * len(_PARAMS)

    def fake_forward(self, x, *rest):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def fake_backward(self, grad_output, x, pos, in_w, in_b, out_w, out_b, num_heads, attn_mask, needs, deterministic,
                      backend):
        return tuple(fake_grad(t, need, x) for t, need in zip((x, pos, in_w, in_b, out_w, out_b), needs))

    def save(self, inputs, output):
        *tensors, num_heads, attn_mask = inputs
        return (*tensors, attn_mask), num_heads

    def grads(self, saved, meta, needs, grad_outputs, backward):
        needs = [bool(n) for n in needs[:len(_PARAMS)]]
        grads = backward(grad_outputs[0], *saved[:-1], meta, saved[-1], needs)
        return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None)

    validate = staticmethod(validate)
    describe = staticmethod(describe)


ATTENTION = AIFIAttention()


def _reference_backward(grad_output, x, pos, in_w, in_b, out_w, out_b, num_heads, attn_mask, needs, deterministic):
    return differentiate(lambda *t: reference.aifi_attention_reference(*t, num_heads, attn_mask),
                         (x, pos, in_w, in_b, out_w, out_b), needs, grad_output)


backends.register(backends.Implementation(OP, "reference", lambda: (reference.aifi_attention_reference, _reference_backward)))


def _cpu_kernels():
    from . import cpu

    return cpu.forward(), cpu.backward


# autograd: in eager mode the backward is PyTorch's own through the GEMMs and SDPA (as
# nn.MultiheadAttention's), not a recomputation of the forward: about 1.3x faster forward+backward on CPU
backends.register(backends.Implementation(OP, "cpu", _cpu_kernels, compiled=False, autograd=True))


def _triton_kernels():
    from . import triton as triton_impl

    return triton_impl.forward, triton_impl.backward


def _why_not_triton(call: backends.Call) -> Optional[str]:
    from . import triton as triton_impl

    return triton_impl.why_not(call)


backends.register(backends.Implementation(OP, "triton", _triton_kernels, _why_not_triton))


def _cuda_kernels():
    from . import cuda

    return cuda.forward, cuda.backward


def _why_not_cuda(call: backends.Call) -> Optional[str]:
    from . import cuda

    return cuda.why_not(call)


# Host functions (kernels/attention/cuda.py) around the compiled core in _C (csrc/attention/): the
# build-level reasons (not built with CUDA, not a CUDA tensor) come from backends.build_why_not.
backends.register(backends.Implementation(OP, "cuda", _cuda_kernels, _why_not_cuda))


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
        backend: 'auto' (default), 'cuda', 'triton', 'cpu' or 'reference' (``explain`` says which
            serves a call, and why not the others).

    Returns:
        [N, L, E] in x's dtype; math in float32 (float64 for float64 x).
    """
    args = (x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, attn_mask)
    chosen, key = backends.remembered(OP, backend, args)  # validate reads only metadata, so it can be skipped
    if chosen is None:
        chosen = backends.choose(describe(validate(*args)), backend)  # validate returns these same arguments
        backends.remember(key, chosen)
    return ATTENTION(*args, chosen)




explain = ATTENTION.explain
