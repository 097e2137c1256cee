"""The CPU path of top-K selection: the reference's order (``reference.rank_key``: descending, NaN
lowest, equal scores by lower index) with a partial selection instead of a full sort.

``forward`` is the compiled kernel (csrc/topk/cpu.cpp: one streaming pass per image keeping the k best
in a heap, the class max and its class computed in the same pass, gathers as row copies) when the
extension is built with it, else ``forward_torch``, composed of PyTorch's kernels:

For 32-bit-or-narrower scores the rank key fits in 32 bits, so key and token index pack into one
int64 that is unique per token and orders ties by lower index: one ``torch.topk`` gives the exact
order. float64 keys take 64 bits: there ``topk`` finds the k-th key in O(T); every token above it is
in, of the tokens equal to it the lowest-indexed fill the rest (``topk`` itself leaves that choice
unspecified), and only the k chosen keys are sorted, stably. Gathers are ``index_select`` of whole
rows of the [N * T, *] view (about 10x faster on CPU than ``torch.gather`` with an expanded index,
which computes an offset per element).

The backward is PyTorch's either way: it writes rows back with ``index_copy_`` (``index_add_`` for
the pairs form).
"""

from __future__ import annotations

import functools
from typing import List, Sequence

import torch

from .. import backends
from .reference import gather_tokens, rank_key, scores_grad


_INT32_MIN = -(1 << 31)


def _plain_topk_if_exact(scores: torch.Tensor, k: int):
    """(values, indices) of torch.topk where its order is the reference's: no NaN (topk ranks NaN
    highest, so a row with one has NaN first) and no two equal values among the k + 1 largest of a row
    (so no tie, nor -0.0 next to +0.0, whose order topk leaves open); else None. One read back to the
    host; about half the work of the packed keys on distinct scores."""
    N, T = scores.shape
    values, indices = scores.topk(min(k + 1, T), dim=1)
    inexact = torch.isnan(values[:, 0]).any()
    if values.shape[1] > 1:
        inexact = inexact | (values[:, 1:] == values[:, :-1]).any()
    if bool(inexact):
        return None
    return values[:, :k], indices[:, :k]


def select_32bit(scores: torch.Tensor, k: int, with_values: bool = False):
    """scores [N, T] of float32 or narrower -> indices [N, k] in the reference's order; with
    ``with_values``, (values or None where the selection did not compute them, indices)."""
    N, T = scores.shape
    if scores.device.type == "cpu" and N > 0:  # a check that reads back to the host: CPU tensors only
        plain = _plain_topk_if_exact(scores, k)
        if plain is not None:
            return plain if with_values else plain[1]
    s = scores.float() + 0.0  # exact; -0.0 + 0.0 is +0.0, so both zeros get one key
    bits = s.view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits (monotone)
    key = key.masked_fill(s != s, _INT32_MIN).to(torch.int64)  # NaN lowest
    # (key, index) packed: high word the key, low word 2^32 - 1 - index (lower index ranks first)
    packed = (key << 32) | _low_words(T, scores.device)
    indices = packed.topk(k, dim=1).indices
    return (None, indices) if with_values else indices


@functools.lru_cache(maxsize=16)
def _low_words(T: int, device: torch.device) -> torch.Tensor:
    """2^32 - 1 - arange(T) as int64, made once per size (three fewer ops a call); a normal tensor even
    when first asked for under inference_mode."""
    with torch.inference_mode(False):
        return (1 << 32) - 1 - torch.arange(T, device=device, dtype=torch.int64)


def select(keys: torch.Tensor, k: int) -> torch.Tensor:
    """keys [N, T] int64 -> indices [N, k] of the k largest keys, equal keys by lower index."""
    N, T = keys.shape
    if N == 0:
        return keys.new_empty(0, k)
    kth = keys.topk(k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values  # [N, 1]
    above = keys > kth
    at = keys == kth
    room = k - above.sum(dim=1, keepdim=True)  # how many of the tokens at the k-th key get in
    chosen = above | (at & (at.cumsum(dim=1) <= room))
    indices = chosen.nonzero()[:, 1].reshape(N, k)  # ascending token index within each row
    order = torch.sort(keys.gather(1, indices), dim=1, descending=True, stable=True).indices
    return indices.gather(1, order)


@functools.lru_cache(maxsize=None)
def compiled_forward():
    """``rtdetr_kernels_C::topk_select_forward`` where the extension is loaded and has its CPU kernel
    (an extension built before csrc/topk/cpu.cpp existed has only the CUDA one), else None."""
    if backends.load_extension() is None:
        return None
    if not torch._C._dispatch_has_kernel_for_dispatch_key("rtdetr_kernels_C::topk_select_forward", "CPU"):
        return None
    return backends.extension_namespace().topk_select_forward


def forward(logits: torch.Tensor, k: int, gather: Sequence[torch.Tensor], pairs: bool):
    kernel = compiled_forward()
    if kernel is None:
        return forward_torch(logits, k, gather, pairs)
    scores, indices, classes, gathered = kernel(logits, k, list(gather), pairs)
    return scores, indices, classes, list(gathered)


def forward_torch(logits: torch.Tensor, k: int, gather: Sequence[torch.Tensor], pairs: bool):
    """The forward in PyTorch's kernels (where the extension is not built)."""
    N, T, C = logits.shape
    choose = select_32bit if logits.dtype != torch.float64 else (lambda scores, k: select(rank_key(scores), k))
    if pairs:
        flat = logits.reshape(N, T * C)
        if logits.dtype != torch.float64:
            scores, order = select_32bit(flat, k, with_values=True)
        else:
            scores, order = None, choose(flat, k)
        if scores is None:
            scores = flat.gather(1, order)
        indices = torch.div(order, C, rounding_mode="floor")
        classes = order - indices * C
        rows = _flat_rows(indices, T)
    else:
        # Ranking needs only the class max; which class is the max is needed for the k chosen tokens
        # alone. ``amax`` is about 3x faster than ``max`` with indices on CPU (0.33 against 1.15 ms at
        # [1, 8400, 80] float32), and ``max`` over the k gathered rows gives exactly the values and
        # classes it gives there over all rows (the first max class; NaN propagates, as argmax).
        indices = choose(logits.amax(dim=-1), k)
        rows = _flat_rows(indices, T)
        scores, classes = logits.reshape(N * T, C).index_select(0, rows).max(dim=-1)
        scores, classes = scores.view(N, k), classes.view(N, k)
    gathered: List[torch.Tensor] = [_gather_rows(t, indices, rows) for t in gather]
    return scores, indices, classes, gathered


def _flat_rows(indices: torch.Tensor, T: int) -> torch.Tensor:
    """indices [N, k] -> rows of the [N * T, *] view, [N * k]."""
    N = indices.shape[0]
    return (indices + torch.arange(N, device=indices.device).unsqueeze(1) * T).reshape(-1)


def _rows_view(t: torch.Tensor):
    """t [N, T, *] as a [N * T, R] view, or None where that would need a copy."""
    N, T = t.shape[:2]
    try:
        return t.view(N * T, -1) if t.numel() else None
    except RuntimeError:
        return None


def _gather_rows(source: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """index_select of whole rows (about 10x faster on CPU than a gather with an expanded index)."""
    N, k = indices.shape
    view = _rows_view(source)
    if view is None:
        return gather_tokens(source, indices)
    return view.index_select(0, rows).view(N, k, *source.shape[2:])


def backward(grad_scores, indices, classes, grad_gathered, num_tokens, num_classes, pairs, need_logits, need_gather,
             deterministic):
    """Scatters into zeros: the scores' gradient to its class entry, each gathered gradient to its
    token's row (index_copy_; index_add_ for the pairs form, where a token can be chosen more than
    once: on CPU both run in index order, so the result is deterministic)."""
    N, k = indices.shape
    T, C = num_tokens, num_classes
    if need_logits:
        grad_logits = scores_grad(grad_scores, indices, classes, T, C)
    else:
        grad_logits = grad_scores.new_empty(0)
    rows = _flat_rows(indices, T)
    grads = []
    for grad, need in zip(grad_gathered, need_gather):
        if not need:
            grads.append(grad.new_empty(0))
            continue
        rest = grad.shape[2:]
        out = grad.new_zeros(N, T, *rest)
        if out.numel():
            view = out.view(N * T, -1)
            src = grad.reshape(N * k, -1)
            if pairs:
                view.index_add_(0, rows, src)
            else:
                view.index_copy_(0, rows, src)
        grads.append(out)
    return grad_logits, grads
