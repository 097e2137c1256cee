"""Top-K query selection as a torch.library op: validation, the op's definition, its backends.

Two custom ops carry the work (see ``TopKSelect``): ``rtdetr_kernels::topk_select`` (class max or
every (token, class) pair, ranking, gather; it also returns the class index of each chosen score,
which the backward needs) and ``rtdetr_kernels::topk_select_backward`` (scatters the gradients back).
The gathered tensors travel as a ``Tensor[]``. Backends: ``reference`` (the spec), ``cpu`` (the C++
forward kernel of csrc/topk/cpu.cpp when the extension is built, else PyTorch's kernels; the backward
is PyTorch's scatters either way: see cpu.py), ``triton`` (triton.py), ``cuda`` (csrc/topk, when built).

No autocast kernel is registered: selection and copying involve no arithmetic, so the op keeps
the dtypes it is given under autocast (the Autocast keys fall through).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .. import backends
from .._library import OpDef, check_int, check_tensor, empty_grad
from . import reference

OP = "topk_select"


@dataclass(frozen=True)
class Problem:
    """A validated call."""

    logits: torch.Tensor  # [N, T, C]
    k: int
    gather: Tuple[torch.Tensor, ...]  # each [N, T, *]
    pairs: bool = False  # rank every (token, class) pair instead of each token's class max


# --------------------------------------------------------------------------------------------
# Validation: the one place where top-K inputs are checked
# --------------------------------------------------------------------------------------------


def validate(logits: torch.Tensor, k: int, gather: Sequence[torch.Tensor] = (), pairs: bool = False,
             names: Tuple[str, str] = ("logits", "T (tokens)")) -> Problem:
    """``names``: how the messages call the scores argument and its token count (the post-processor
    form calls them ``scores`` and queries)."""
    scores_name, tokens = names
    check_tensor(scores_name, logits)
    if logits.dim() != 3:
        raise ValueError(f"{scores_name}: expected shape [N, T, C] (3 dims; use C = 1 for plain scores), got {list(logits.shape)}")
    N, T, C = logits.shape
    if C == 0:
        raise ValueError(f"{scores_name}: expected at least one class, got shape [N, T, C] = {list(logits.shape)}")
    candidates = T * C if pairs else T
    check_int("k", k, low=1, high=candidates,
              what=lambda: f" ({tokens}{' x classes' if pairs else ''} = {candidates}; {scores_name} shape {list(logits.shape)})")
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
            raise ValueError(f"{name}: expected device {logits.device} ({scores_name}' device), got {t.device}")
        if t.dim() < 2 or tuple(t.shape[:2]) != (N, T):
            raise ValueError(f"{name}: expected shape [N, T, *] with N = {N}, T = {T} ({scores_name}' first dims), got {list(t.shape)}")
    return Problem(logits, k, gather, bool(pairs))


def describe(problem: Problem) -> backends.Call:
    dtypes = (problem.logits.dtype,) + tuple(t.dtype for t in problem.gather)
    # only sizes that stay static under torch.compile (the token count varies with the input size)
    options = (("k", problem.k), ("classes", problem.logits.shape[-1]), ("gather", len(problem.gather)),
               ("pairs", problem.pairs))
    return backends.Call(OP, problem.logits.device.type, dtypes, options)


# --------------------------------------------------------------------------------------------
# The op and its backends
# --------------------------------------------------------------------------------------------


class TopKSelect(OpDef):
    """No autocast kernel: selection and copying involve no arithmetic, so the op keeps the dtypes
    it is given under autocast (the Autocast keys fall through)."""

    name = OP
    undefined_grads_ok = True  # an unused output's gradient (None) is not scattered
    # -> scores [N, k], indices [N, k] int64, classes [N, k] int64, gathered [N, k, *] each
    forward_schema = "(Tensor logits, SymInt k, Tensor[] gather, bool pairs) -> (Tensor, Tensor, Tensor, Tensor[])"
    # -> grad_logits [N, T, C], grads of the gathered sources [N, T, *]; an empty tensor for each
    # gradient not needed
    backward_schema = ("(Tensor grad_scores, Tensor indices, Tensor classes, Tensor[] grad_gathered, SymInt num_tokens, "
                       "SymInt num_classes, bool pairs, bool need_logits, bool[] need_gather) -> (Tensor, Tensor[])")

    def fake_forward(self, logits, k, gather, pairs, backend):
        N = logits.shape[0]
        return (logits.new_empty(N, k), logits.new_empty(N, k, dtype=torch.int64),
                logits.new_empty(N, k, dtype=torch.int64), [t.new_empty(N, k, *t.shape[2:]) for t in gather])

    def fake_backward(self, grad_scores, indices, classes, grad_gathered, num_tokens, num_classes, pairs, need_logits,
                      need_gather, deterministic, backend):
        N = indices.shape[0]
        grad_logits = grad_scores.new_empty(N, num_tokens, num_classes) if need_logits else empty_grad(grad_scores)
        return grad_logits, [g.new_empty(N, num_tokens, *g.shape[2:]) if need else empty_grad(g)
                             for g, need in zip(grad_gathered, need_gather)]

    def save(self, inputs, output):
        logits, k, gather, pairs = inputs
        _, indices, classes, _ = output
        return (indices, classes), (logits.shape[1], logits.shape[2], pairs)

    def grads(self, saved, meta, needs, grad_outputs, backward):
        indices, classes = saved
        grad_scores, _, _, grad_gathered = grad_outputs
        # the scores' gradient, where the scores were used (an unused output's gradient is None: nothing
        # to scatter; logits' gradient then comes from its gathered copy alone, if any)
        need_logits = bool(needs[0]) and grad_scores is not None
        need_gather = [bool(n) and g is not None for n, g in zip(needs[2], grad_gathered)]
        grads_in = [g if need else empty_grad(indices) for g, need in zip(grad_gathered, need_gather)]
        if grad_scores is None:  # only gathered outputs were used
            grad_scores = torch.zeros(indices.shape, dtype=grads_in[0].dtype if grads_in else torch.float32,
                                      device=indices.device)
        grad_logits, grads = backward(grad_scores, indices, classes, grads_in, *meta, need_logits, need_gather)
        return (grad_logits if need_logits else None, None, [g if need else None for g, need in zip(grads, need_gather)],
                None)

    validate = staticmethod(validate)
    describe = staticmethod(describe)


TOPK = TopKSelect()


def _reference_forward(logits, k, gather, pairs):
    scores, indices, classes, gathered = reference.topk_select_reference(logits, k, gather, pairs)
    return scores, indices, classes, list(gathered)


def _reference_backward(grad_scores, indices, classes, grad_gathered, num_tokens, num_classes, pairs, need_logits,
                        need_gather, deterministic):
    N = indices.shape[0]
    if need_logits:
        grad_logits = reference.scores_grad(grad_scores, indices, classes, num_tokens, num_classes)
    else:
        grad_logits = empty_grad(grad_scores)
    grads = []
    for grad, need in zip(grad_gathered, need_gather):
        if not need:
            grads.append(empty_grad(grad))
        elif pairs:  # a token chosen for several classes: its gradients add up (deterministically)
            rows = torch.arange(N, device=indices.device).unsqueeze(1).expand_as(indices)
            grads.append(grad.new_zeros(N, num_tokens, *grad.shape[2:]).index_put_((rows, indices), grad, accumulate=True))
        else:  # indices are unique within a row: plain scatters
            rest = grad.shape[2:]
            grads.append(grad.new_zeros(N, num_tokens, *rest).scatter_(1, reference.token_index(indices, rest), grad))
    return grad_logits, grads


backends.register(backends.Implementation(OP, "reference", lambda: (_reference_forward, _reference_backward)))


def _cpu_kernels():
    from . import cpu

    return cpu.forward, cpu.backward


backends.register(backends.Implementation(OP, "cpu", _cpu_kernels, compiled=False))


def _triton_kernels():
    from . import triton as triton_impl

    return triton_impl.forward, triton_impl.backward


def _why_not_triton(call: backends.Call) -> Optional[str]:
    from . import triton as triton_impl

    return triton_impl.why_not(call)


backends.register(backends.Implementation(OP, "triton", _triton_kernels, _why_not_triton))


def _cuda_kernels():
    ops = backends.extension_namespace()
    return ops.topk_select_forward, ops.topk_select_backward


_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _why_not_cuda(call: backends.Call) -> Optional[str]:
    """csrc/topk: rank float16/bfloat16/float32 scores (gathered tensors of any dtype)."""
    if call.dtypes and call.dtypes[0] not in _CUDA_DTYPES:
        return (f"the CUDA top-k kernels rank float16, bfloat16 and float32 scores, got {call.dtypes[0]} "
                "(float64 runs on the reference backend)")
    return None


backends.register(backends.Implementation(OP, "cuda", _cuda_kernels, _why_not_cuda))


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
        backend: 'auto' (default), 'cuda', 'triton', 'cpu' or 'reference'.

    Returns:
        scores [N, k] in logits' dtype (differentiable: flows to the chosen class entry of logits),
        indices [N, k] int64, and a tuple with one [N, k, *] tensor per ``gather`` entry
        (differentiable: scattered back to the chosen tokens).
    """
    chosen, key = backends.remembered(OP, backend, (logits, k, gather, False))  # validate reads only metadata
    if chosen is None:
        problem = validate(logits, k, gather)
        gather = problem.gather  # a tuple (gather may have been any iterable)
        chosen = backends.choose(describe(problem), backend)
        backends.remember(key, chosen)
    scores, indices, _, gathered = TOPK(logits, k, list(gather), False, chosen)
    return scores, indices, tuple(gathered)


def topk_select_flat(
    scores: torch.Tensor,
    k: int,
    gather: Sequence[torch.Tensor] = (),
    *,
    sigmoid: bool = False,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...]]:
    """The post-processor's form: top-k over all (query, class) pairs.

    RT-DETR's ``RTDETRPostProcessor`` takes ``topk(sigmoid(logits).flatten(1), k)`` and splits the flat
    index into ``label = index % C`` and ``query = index // C``. This is the same op ranking every
    (query, class) pair (same ordering rules: equal scores by lower query, then lower class, which is
    the order of rfdetr's ``argsort(..., descending=True, stable=True)``), gathering the per-query
    tensors at each chosen pair's query in the same call.

    Args:
        scores: [N, Q, C] floating (sigmoid scores or logits).
        k: pairs to keep, 1 <= k <= Q * C.
        gather: per-query tensors [N, Q, *] (boxes) gathered at each chosen pair's query.
        sigmoid: ``scores`` are logits: rank ``torch.sigmoid(scores)`` (computed in ``scores``' dtype,
            as the post-processors do) and return those probabilities. Ranking the probabilities is not
            ranking the logits: float32 sigmoid rounds to exactly 1.0 above a logit of about 17 (float16
            above about 8), and such saturated pairs are equal (ordered by lower query, then class).
        backend: 'auto' (default) or one of the backends (the sigmoid is torch's on every backend, so the
            probabilities are bit-identical to the codebases').

    Returns:
        scores [N, k] (probabilities with ``sigmoid``), labels [N, k] int64, query indices [N, k] int64,
        gathered ([N, k, *], ...). Differentiable in ``scores`` (through the sigmoid) and ``gather``.
    """
    if not isinstance(sigmoid, bool):
        raise TypeError(f"sigmoid: expected a bool, got {type(sigmoid).__name__}")
    chosen, key = backends.remembered(OP, backend, (scores, k, gather, True))  # validate reads only metadata
    if chosen is None:
        problem = validate(scores, k, gather, pairs=True, names=("scores", "Q (queries)"))
        gather = problem.gather  # a tuple (gather may have been any iterable)
        chosen = backends.choose(describe(problem), backend)
        backends.remember(key, chosen)
    ranked = torch.sigmoid(scores) if sigmoid else scores
    top_scores, queries, labels, gathered = TOPK(ranked, k, list(gather), True, chosen)
    return top_scores, labels, queries, tuple(gathered)


explain = TOPK.explain
