"""AIFI / positional self-attention in plain PyTorch: the executable spec and the fallback.

The op is what RT-DETR's AIFI layer and decoder self-attention compute with
``nn.MultiheadAttention(E, num_heads, batch_first=True)(x + pos, x + pos, x, attn_mask=...,
need_weights=False)[0]``:

- ``q = (x + pos) W_q^T + b_q``, ``k = (x + pos) W_k^T + b_k``, ``v = x W_v^T + b_v``, where
  ``[W_q; W_k; W_v]`` is the packed ``in_proj_weight`` [3E, E] (and ``in_proj_bias`` [3E]) exactly as
  ``nn.MultiheadAttention`` stores them;
- per head h (head dim D = E / num_heads): ``softmax(q_h k_h^T / sqrt(D) + mask) v_h``;
- heads concatenated, then ``out_proj``.

Masks follow ``nn.MultiheadAttention``: a boolean mask marks the pairs that are NOT allowed (True =
blocked), a floating mask is added to the scores; [L, L] applies to every batch entry and head,
[N * num_heads, L, L] per (batch, head) with the head index fastest. A query row that is blocked
everywhere attends to nothing: its attention output is 0 (so the op returns ``out_proj_bias``) and
no gradient flows through it, as PyTorch's SDPA ("safe softmax") does.

Math runs in float32 for low-precision inputs (float64 for float64); the output has x's dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def aifi_attention_reference(
    x: torch.Tensor,
    pos: Optional[torch.Tensor],
    in_proj_weight: torch.Tensor,
    in_proj_bias: Optional[torch.Tensor],
    out_proj_weight: torch.Tensor,
    out_proj_bias: Optional[torch.Tensor],
    num_heads: int,
    attn_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """x [N, L, E], pos broadcastable to x or None, weights as nn.MultiheadAttention -> [N, L, E]."""
    N, L, E = x.shape
    D = E // num_heads
    dt = compute_dtype(x.dtype)

    def cast(t):
        return None if t is None else t.to(dt)

    x_c = x.to(dt)
    qk_in = x_c if pos is None else x_c + pos.to(dt)
    w_q, w_k, w_v = cast(in_proj_weight).chunk(3)
    b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else cast(in_proj_bias).chunk(3)

    def heads(t):  # [N, L, E] -> [N, H, L, D]
        return t.reshape(N, L, num_heads, D).transpose(1, 2)

    q = heads(F.linear(qk_in, w_q, b_q))
    k = heads(F.linear(qk_in, w_k, b_k))
    v = heads(F.linear(x_c, w_v, b_v))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # [N, H, L, L]
    if attn_mask is not None:
        mask = attn_mask if attn_mask.dim() == 2 else attn_mask.reshape(N, num_heads, L, L)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(mask, float("-inf"))
        else:
            scores = scores + mask.to(dt)
    # Rows with no allowed key: softmax would be 0/0; they attend to nothing instead, and the
    # scores are replaced before the softmax so that no NaN reaches the backward either.
    blocked = (scores == float("-inf")).all(-1, keepdim=True)
    scores = torch.where(blocked, torch.zeros_like(scores), scores)
    weights = torch.where(blocked, torch.zeros_like(scores), torch.softmax(scores, dim=-1))
    attended = (weights @ v).transpose(1, 2).reshape(N, L, E)
    return F.linear(attended, cast(out_proj_weight), cast(out_proj_bias)).to(x.dtype)
