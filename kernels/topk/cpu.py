"""The CPU path of top-K selection: the reference's order (``reference.rank_key``: descending, NaN
lowest, equal scores by lower index) with a partial selection instead of a full sort.

``torch.topk`` over the int64 rank keys finds the k-th key in O(T); every token above it is in, and
of the tokens equal to it the lowest-indexed fill the rest (``topk`` itself leaves that choice
unspecified). Only the k chosen keys are then sorted, stably, so ties stay in index order.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from .reference import gather_tokens, rank_key


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


def forward(logits: torch.Tensor, k: int, gather: Sequence[torch.Tensor], pairs: bool):
    N, T, C = logits.shape
    if pairs:
        flat = logits.reshape(N, T * C)
        order = select(rank_key(flat), k)
        scores = flat.gather(1, order)
        indices, classes = order // C, order % C
    else:
        token_scores, token_classes = logits.max(dim=-1)  # the first max class; NaN propagates, as argmax
        indices = select(rank_key(token_scores), k)
        scores = token_scores.gather(1, indices)
        classes = token_classes.gather(1, indices)
    gathered: List[torch.Tensor] = [gather_tokens(t, indices) for t in gather]
    return scores, indices, classes, gathered
