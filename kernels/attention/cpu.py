"""The CPU path of AIFI attention: one GEMM for q and k on x + pos, one for v on x, PyTorch's fused
SDPA kernel for the core, the output projection. The same math as the reference (fp32 compute for
fp16/bf16 inputs, fp64 for fp64; a fully blocked query row attends to nothing), in fewer, larger
kernels: the reference materialises the [N, H, L, L] scores and runs the softmax and masking as
separate passes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._library import differentiate
from .reference import compute_dtype


def _as(t: Optional[torch.Tensor], dt: torch.dtype) -> Optional[torch.Tensor]:
    """``t.to(dt)`` without the call where it is already of that dtype (a few microseconds each, which
    at short lengths add up to a tenth of the whole op)."""
    return t if t is None or t.dtype == dt else t.to(dt)


def forward(x: torch.Tensor, pos: Optional[torch.Tensor], in_proj_weight: torch.Tensor,
            in_proj_bias: Optional[torch.Tensor], out_proj_weight: torch.Tensor, out_proj_bias: Optional[torch.Tensor],
            num_heads: int, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    N, L, E = x.shape
    D = E // num_heads
    dt = compute_dtype(x.dtype)
    x_c = _as(x, dt)
    qk_in = x_c if pos is None else x_c + _as(pos, dt)
    w_qk, w_v = _as(in_proj_weight, dt).split((2 * E, E))
    b_qk, b_v = (None, None) if in_proj_bias is None else _as(in_proj_bias, dt).split((2 * E, E))
    qk = F.linear(qk_in, w_qk, b_qk)  # [N, L, 2E]: q and k in one GEMM
    v = F.linear(x_c, w_v, b_v)
    q, k = qk.view(N, L, 2, num_heads, D).permute(2, 0, 3, 1, 4).unbind(0)  # each [N, H, L, D]
    v = v.view(N, L, num_heads, D).transpose(1, 2)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.detach()  # no gradient flows to a floating mask (the op's contract)
        mask = mask if mask.dim() == 2 else mask.view(N, num_heads, L, L)
        # SDPA's boolean masks mark the allowed pairs; ours (nn.MultiheadAttention's) the blocked ones
        mask = ~mask if mask.dtype == torch.bool else _as(mask, dt)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # a fully blocked row gives 0
    out = F.linear(attended.transpose(1, 2).reshape(N, L, E), _as(out_proj_weight, dt), _as(out_proj_bias, dt))
    return _as(out, x.dtype)


def backward(grad_output, x, pos, in_w, in_b, out_w, out_b, num_heads, attn_mask, needs, deterministic):
    return differentiate(lambda *t: forward(*t, num_heads, attn_mask), (x, pos, in_w, in_b, out_w, out_b), needs,
                         grad_output)
