"""The CPU path of top-K selection: the reference's order (``reference.rank_key``: descending, NaN
lowest, equal scores by lower index) with a partial selection instead of a full sort.

For 32-bit-or-narrower scores the rank key fits in 32 bits, so key and token index pack into one
int64 that is unique per token and orders ties by lower index: one ``torch.topk`` gives the exact
order. float64 keys take 64 bits: there ``topk`` finds the k-th key in O(T); every token above it is
in, of the tokens equal to it the lowest-indexed fill the rest (``topk`` itself leaves that choice
unspecified), and only the k chosen keys are sorted, stably.
"""

from __future__ import annotations

from typing import List, Sequence

import torch

from .reference import gather_tokens, rank_key


_INT32_MIN = -(1 << 31)


def select_32bit(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [N, T] of float32 or narrower -> indices [N, k] in the reference's order."""
    N, T = scores.shape
    s = scores.float() + 0.0  # exact; -0.0 + 0.0 is +0.0, so both zeros get one key
    bits = s.view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits (monotone)
    key = key.masked_fill(s != s, _INT32_MIN).to(torch.int64)  # NaN lowest
    # (key, index) packed: high word the key, low word 2^32 - 1 - index (lower index ranks first)
    packed = (key << 32) | ((1 << 32) - 1 - torch.arange(T, device=scores.device, dtype=torch.int64))
    return packed.topk(k, dim=1).indices


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
    choose = select_32bit if logits.dtype != torch.float64 else (lambda scores, k: select(rank_key(scores), k))
    if pairs:
        flat = logits.reshape(N, T * C)
        order = choose(flat, k)
        scores = flat.gather(1, order)
        indices, classes = order // C, order % C
    else:
        token_scores, token_classes = logits.max(dim=-1)  # the first max class; NaN propagates, as argmax
        indices = choose(token_scores, k)
        scores = token_scores.gather(1, indices)
        classes = token_classes.gather(1, indices)
    gathered: List[torch.Tensor] = [gather_tokens(t, indices) for t in gather]
    return scores, indices, classes, gathered
