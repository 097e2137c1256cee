"""Top-K query selection in plain PyTorch: the executable spec and the fallback.

RT-DETR picks its decoder queries as ``topk(logits.max(-1).values, k, dim=1)`` and gathers the
encoder memory, logits and boxes of the chosen tokens. This op is that, with the order made exact:

- a token's score is the max over its classes, ``logits.max(-1)``; its class is the first class
  that reaches the max (lowest class index). A token with a NaN class logit has score NaN (and
  that NaN's class), as ``torch.max`` gives;
- tokens are ranked by score, descending: +inf highest, then finite values, then -inf, and NaN
  below everything (a broken token never displaces a real candidate; it is picked only when fewer
  than k tokens are not NaN). -0.0 and +0.0 are equal;
- equal scores are ordered by token index, lower first (``torch.topk`` leaves this unspecified
  and CPU and CUDA differ);
- the k best tokens come out in that order: scores [N, k] (the class-max values, NaN as is),
  indices [N, k] int64, and every per-token tensor of ``gather`` ([N, T, *]) at those tokens
  ([N, k, *]), values copied as they are (the +inf box logits of invalid anchors stay +inf).

Gradients: the score of a chosen token flows back to its class entry of logits; a gathered
tensor's gradient is scattered back to the chosen tokens (indices are unique within a row).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch


def rank_key(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is the ranking above: equal for equal floats, NaN lowest."""
    s = scores.to(torch.float64)  # exact for every float dtype
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0.0 -> +0.0
    bits = s.view(torch.int64)
    # IEEE bits read as a signed integer order positive floats correctly and negative ones
    # backwards; flipping the magnitude bits of negatives makes the whole line monotone.
    key = torch.where(bits < 0, bits ^ torch.iinfo(torch.int64).max, bits)
    return torch.where(torch.isnan(s), torch.full_like(key, torch.iinfo(torch.int64).min), key)


def token_index(indices: torch.Tensor, trailing: Sequence[int]) -> torch.Tensor:
    """indices [N, k] expanded to [N, k, *trailing], the index of a gather/scatter along dim 1."""
    N, k = indices.shape
    return indices.reshape(N, k, *([1] * len(trailing))).expand(N, k, *trailing)


def scores_grad(grad_scores: torch.Tensor, indices: torch.Tensor, classes: torch.Tensor, num_tokens: int,
                num_classes: int) -> torch.Tensor:
    """The chosen scores' gradient [N, k] scattered to their (token, class) entries of zeros [N, T, C]
    (the pairs are distinct within a row, so a plain scatter is exact and deterministic)."""
    N = indices.shape[0]
    flat = indices * num_classes + classes
    return grad_scores.new_zeros(N, num_tokens * num_classes).scatter_(1, flat, grad_scores).reshape(
        N, num_tokens, num_classes)


def gather_tokens(source: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """source [N, T, *], indices [N, k] -> [N, k, *]."""
    return torch.gather(source, 1, token_index(indices, source.shape[2:]))


def topk_select_reference(
    logits: torch.Tensor, k: int, gather: Sequence[torch.Tensor] = (), pairs: bool = False
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Tuple[torch.Tensor, ...]]:
    """logits [N, T, C] -> scores [N, k], indices [N, k], classes [N, k], gathered ([N, k, *], ...).

    ``classes`` is the class index of each chosen score (where its gradient goes). With ``pairs``
    every (token, class) pair is a candidate (the post-processor's top-k over ``scores.flatten(1)``):
    equal scores by lower token, then lower class, and a token may be chosen for several classes.
    """
    if pairs:
        N, T, C = logits.shape
        flat = logits.reshape(N, T * C)
        order = torch.sort(rank_key(flat), dim=1, descending=True, stable=True).indices[:, :k]
        scores = torch.gather(flat, 1, order)
        indices, classes = (order // C).contiguous(), (order % C).contiguous()
    else:
        token_classes = torch.argmax(logits, dim=-1)  # [N, T]: the first max class; a NaN counts as the max
        token_scores = torch.gather(logits, 2, token_classes.unsqueeze(-1)).squeeze(-1)
        order = torch.sort(rank_key(token_scores), dim=1, descending=True, stable=True).indices
        indices = order[:, :k].contiguous()
        scores = torch.gather(token_scores, 1, indices)
        classes = torch.gather(token_classes, 1, indices)
    return scores, indices, classes, tuple(gather_tokens(t, indices) for t in gather)
