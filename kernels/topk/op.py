"""Top-K query selection as a torch.library op: validation, dispatch, autograd.

Two custom ops carry the work, ``rtdetr_kernels::topk_select`` (class max, ranking, gather; it also
returns the class index of each chosen score, which the backward needs) and
``rtdetr_kernels::topk_select_backward`` (scatters the gradients back; indices are unique within a
row, so plain scatters, no atomics). The gathered tensors travel as a ``Tensor[]``. Only the
``reference`` backend exists so far; the others say so when asked for.

No autocast kernel is registered: selection and copying involve no arithmetic, so the op keeps
the dtypes it is given under autocast (the Autocast keys fall through).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from .. import backends
from .._library import NAMESPACE, empty_grad
from . import reference

OP = "topk_select"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Problem:
    """A validated call."""

    logits: torch.Tensor  # [N, T, C]
    k: int
    gather: Tuple[torch.Tensor, ...]  # each [N, T, *]


# --------------------------------------------------------------------------------------------
# Validation: the one place where top-K inputs are checked
# --------------------------------------------------------------------------------------------


def validate(logits: torch.Tensor, k: int, gather: Sequence[torch.Tensor] = ()) -> Problem:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits: expected a tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"logits: expected a floating tensor (float16, bfloat16, float32, float64), got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"logits: expected shape [N, T, C] (3 dims; use C = 1 for plain scores), got {list(logits.shape)}")
    N, T, C = logits.shape
    if C == 0:
        raise ValueError(f"logits: expected at least one class, got shape [N, T, C] = {list(logits.shape)}")
    if isinstance(k, bool) or not isinstance(k, (int, torch.SymInt)):
        raise TypeError(f"k: expected an int, got {type(k).__name__}")
    if not 1 <= k <= T:
        raise ValueError(f"k: expected 1 <= k <= T (tokens), got k = {k} with T = {T} (logits shape {list(logits.shape)})")
    if isinstance(gather, torch.Tensor):
        raise TypeError("gather: expected a sequence of tensors, got a single tensor (wrap it: gather=(t,))")
    try:
        gather = tuple(gather)
    except TypeError:
        raise TypeError(f"gather: expected a sequence of tensors, got {type(gather).__name__}") from None
    for i, t in enumerate(gather):
        name = f"gather[{i}]"
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.device != logits.device:
            raise ValueError(f"{name}: expected device {logits.device} (logits' device), got {t.device}")
        if t.dim() < 2 or tuple(t.shape[:2]) != (N, T):
            raise ValueError(f"{name}: expected shape [N, T, *] with N = {N}, T = {T} (logits' first dims), got {list(t.shape)}")
    return Problem(logits, k, gather)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------

backends.register(OP, "reference", lambda call: None)


def _impl(backend: str):
    """(forward, backward) callables of a backend, all with the signature of the custom ops."""
    if backend == "reference":
        return _reference_forward, _reference_backward
    raise ValueError(f"{OP} has no {backend!r} implementation")


def _reference_forward(logits, k, gather):
    scores, indices, classes, gathered = reference.topk_select_reference(logits, k, gather)
    return scores, indices, classes, list(gathered)


def _reference_backward(grad_scores, indices, classes, grad_gathered, num_tokens, num_classes, need_logits, need_gather):
    N = indices.shape[0]
    if need_logits:
        flat = indices * num_classes + classes  # [N, k] into [N, T * C]
        grad_logits = grad_scores.new_zeros(N, num_tokens * num_classes).scatter_(1, flat, grad_scores)
        grad_logits = grad_logits.reshape(N, num_tokens, num_classes)
    else:
        grad_logits = empty_grad(grad_scores)
    grads = []
    for grad, need in zip(grad_gathered, need_gather):
        if not need:
            grads.append(empty_grad(grad))
            continue
        rest = grad.shape[2:]
        grads.append(grad.new_zeros(N, num_tokens, *rest).scatter_(1, reference.token_index(indices, rest), grad))
    return grad_logits, grads


# --------------------------------------------------------------------------------------------
# The custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op(f"{NAMESPACE}::topk_select", mutates_args=())
def _forward_op(logits: torch.Tensor, k: int, gather: List[torch.Tensor], backend: str
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """-> scores [N, k], indices [N, k] int64, classes [N, k] int64, gathered [N, k, *] each."""
    forward, _ = _impl(backend)
    return forward(logits, k, list(gather))


@_forward_op.register_fake
def _(logits, k, gather, backend):
    N = logits.shape[0]
    return (logits.new_empty(N, k), logits.new_empty(N, k, dtype=torch.int64), logits.new_empty(N, k, dtype=torch.int64),
            [t.new_empty(N, k, *t.shape[2:]) for t in gather])


@torch.library.custom_op(f"{NAMESPACE}::topk_select_backward", mutates_args=())
def _backward_op(grad_scores: torch.Tensor, indices: torch.Tensor, classes: torch.Tensor,
                 grad_gathered: List[torch.Tensor], num_tokens: int, num_classes: int, need_logits: bool,
                 need_gather: List[bool], backend: str) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """-> grad_logits [N, T, C], grads of the gathered sources [N, T, *]; an empty tensor for each
    gradient not needed."""
    _, backward = _impl(backend)
    grad_logits, grads = backward(grad_scores.contiguous(), indices, classes, [g.contiguous() for g in grad_gathered],
                                  num_tokens, num_classes, need_logits, list(need_gather))
    return grad_logits, list(grads)


@_backward_op.register_fake
def _(grad_scores, indices, classes, grad_gathered, num_tokens, num_classes, need_logits, need_gather, backend):
    N = indices.shape[0]
    grad_logits = grad_scores.new_empty(N, num_tokens, num_classes) if need_logits else grad_scores.new_empty(0)
    return grad_logits, [g.new_empty(N, num_tokens, *g.shape[2:]) if need else g.new_empty(0)
                         for g, need in zip(grad_gathered, need_gather)]


def _setup_context(ctx, inputs, output):
    logits, k, gather, backend = inputs
    _, indices, classes, _ = output
    ctx.save_for_backward(indices, classes)
    ctx.meta = (logits.shape[1], logits.shape[2], backend)


def _backward(ctx, grad_scores, grad_indices, grad_classes, grad_gathered):
    indices, classes = ctx.saved_tensors
    num_tokens, num_classes, backend = ctx.meta
    need_logits = bool(ctx.needs_input_grad[0])
    need_gather = [bool(n) and g is not None for n, g in zip(ctx.needs_input_grad[2], grad_gathered)]
    if not (need_logits or any(need_gather)):
        return None, None, [None] * len(need_gather), None
    grads_in = [g if need else empty_grad(indices) for g, need in zip(grad_gathered, need_gather)]
    grad_logits, grads = _backward_op(grad_scores, indices, classes, grads_in, num_tokens, num_classes,
                                      need_logits, need_gather, backend)
    return (grad_logits if need_logits else None, None,
            [g if need else None for g, need in zip(grads, need_gather)], None)


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def topk_select(
    logits: torch.Tensor,
    k: int,
    gather: Sequence[torch.Tensor] = (),
    *,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...]]:
    """RT-DETR query selection: the k tokens with the highest class max, and their rows of ``gather``.

    Equivalent to ``torch.topk(logits.max(-1).values, k, dim=1)`` followed by a gather of each
    tensor in ``gather``, with a defined order (see ``reference``): descending, equal scores by
    lower token index, +inf highest, -inf low, NaN lowest.

    Args:
        logits: [N, T, C] floating (C >= 1; C = 1 for plain per-token scores).
        k: tokens to keep, 1 <= k <= T.
        gather: per-token tensors [N, T, *] (any dtype, logits' device) to gather at the chosen
            tokens; values are copied as they are (inf included).
        backend: 'auto' (default) or 'reference' (the only implementation so far).

    Returns:
        scores [N, k] in logits' dtype (differentiable: flows to the chosen class entry of logits),
        indices [N, k] int64, and a tuple with one [N, k, *] tensor per ``gather`` entry
        (differentiable: scattered back to the chosen tokens).
    """
    problem = validate(logits, k, gather)
    chosen = backends.choose(describe(problem), backend)
    scores, indices, _, gathered = _forward_op(problem.logits, problem.k, list(problem.gather), chosen)
    return scores, indices, tuple(gathered)


def topk_select_flat(
    scores: torch.Tensor,
    k: int,
    gather: Sequence[torch.Tensor] = (),
    *,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...]]:
    """The post-processor's form: top-k over all (query, class) pairs.

    RT-DETR's ``RTDETRPostProcessor`` takes ``topk(scores.flatten(1), k)`` and splits the flat index
    into ``label = index % C`` and ``query = index // C``. This runs ``topk_select`` on the flattened
    scores as [N, Q * C, 1] (same ordering rules: equal scores by lower query, then lower class).

    Args:
        scores: [N, Q, C] floating (sigmoid scores or logits; the order is the same).
        k: pairs to keep, 1 <= k <= Q * C.
        gather: per-query tensors [N, Q, *] (boxes) gathered at each chosen pair's query.

    Returns:
        scores [N, k], labels [N, k] int64, query indices [N, k] int64, gathered ([N, k, *], ...).
    """
    if not isinstance(scores, torch.Tensor) or scores.dtype not in FLOAT_DTYPES:
        raise TypeError(f"scores: expected a floating tensor, got {scores.dtype if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if scores.dim() != 3:
        raise ValueError(f"scores: expected shape [N, Q, C], got {list(scores.shape)}")
    N, Q, C = scores.shape
    top_scores, flat_indices, _ = topk_select(scores.reshape(N, Q * C, 1), k, backend=backend)
    # The per-query tensors obey the op's rules for per-token tensors, with Q tokens (Q >= k >= 1 here).
    validate(scores.new_empty(N, Q, 1), 1, gather)
    labels = flat_indices % C
    queries = flat_indices // C
    return top_scores, labels, queries, tuple(reference.gather_tokens(t, queries) for t in gather)


def describe(problem: Problem) -> backends.Call:
    dtypes = (problem.logits.dtype,) + tuple(t.dtype for t in problem.gather)
    # only sizes that stay static under torch.compile (the token count varies with the input size)
    options = (("k", problem.k), ("classes", problem.logits.shape[-1]), ("gather", len(problem.gather)))
    return backends.Call(OP, problem.logits.device.type, dtypes, options)


def explain(logits, k, gather=(), **kwargs) -> str:
    """Which backend would serve this call, and why the others would not."""
    kwargs.pop("backend", None)
    if kwargs:
        raise TypeError(f"explain: unexpected arguments {sorted(kwargs)}")
    return backends.explain(describe(validate(logits, k, gather)))
