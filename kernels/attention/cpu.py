"""The CPU path of AIFI attention: GEMMs for q and k on x + pos and for v on x, PyTorch's fused SDPA
kernel for the core, the output projection. The same math as the reference (fp32 compute for
fp16/bf16 inputs, fp64 for fp64; a fully blocked query row attends to nothing), in fewer, larger
kernels: the reference materialises the [N, H, L, L] scores and runs the softmax and masking as
separate passes.

``forward()`` is ``rtdetr_kernels_C::aifi_attention_cpu_forward`` (csrc/attention/cpu.cpp: these same
ATen calls made from C++, bitwise the same output) when the extension is built with it, else
``forward_torch``. On a 2-core host the compiled one is 3-4% faster at RT-DETR's sizes and 1.2x at a
few tokens: after the GEMMs have swept the caches, the Python between the calls costs several times
what a warm loop measures. Both are composed of ATen calls, so autograd records through either.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .. import backends
from .._library import differentiate
from .reference import compute_dtype


def _as(t: Optional[torch.Tensor], dt: torch.dtype) -> Optional[torch.Tensor]:
    """``t.to(dt)`` without the call where it is already of that dtype (a few microseconds each, which
    at short lengths add up to a tenth of the whole op)."""
    return t if t is None or t.dtype == dt else t.to(dt)


@functools.lru_cache(maxsize=None)
def compiled_forward():
    """``rtdetr_kernels_C::aifi_attention_cpu_forward`` where the extension is loaded and has it (an
    extension built before csrc/attention/cpu.cpp existed does not), else None."""
    if backends.load_extension() is None:
        return None
    if not torch._C._dispatch_has_kernel_for_dispatch_key("rtdetr_kernels_C::aifi_attention_cpu_forward",
                                                          "CompositeImplicitAutograd"):
        return None
    return backends.extension_namespace().aifi_attention_cpu_forward.default


def forward():
    """The backend's forward: the compiled op where it is built, else ``forward_torch`` (returned, not
    wrapped: the eager path calls it with no Python frame between)."""
    return compiled_forward() or forward_torch


def forward_torch(x: torch.Tensor, pos: Optional[torch.Tensor], in_proj_weight: torch.Tensor,
                  in_proj_bias: Optional[torch.Tensor], out_proj_weight: torch.Tensor,
                  out_proj_bias: Optional[torch.Tensor], num_heads: int, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The forward in PyTorch's kernels, called from Python (where the extension is not built)."""
    N, L, E = x.shape
    D = E // num_heads
    dt = compute_dtype(x.dtype)
    x_c = _as(x, dt)
    qk_in = x_c if pos is None else x_c + _as(pos, dt)
    # a GEMM each for q, k and v (csrc/attention/cpu.cpp says why not one for q and k)
    w_q, w_k, w_v = _as(in_proj_weight, dt).split((E, E, E))
    b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else _as(in_proj_bias, dt).split((E, E, E))
    q = F.linear(qk_in, w_q, b_q).view(N, L, num_heads, D).transpose(1, 2)  # each [N, H, L, D]
    k = F.linear(qk_in, w_k, b_k).view(N, L, num_heads, D).transpose(1, 2)
    v = F.linear(x_c, w_v, b_v).view(N, L, num_heads, D).transpose(1, 2)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.detach()  # no gradient flows to a floating mask (the op's contract)
        mask = mask if mask.dim() == 2 else mask.reshape(N, num_heads, L, L)
        # SDPA's boolean masks mark the allowed pairs; ours (nn.MultiheadAttention's) the blocked ones
        mask = ~mask if mask.dtype == torch.bool else _as(mask, dt)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # a fully blocked row gives 0
    out = F.linear(attended.transpose(1, 2).reshape(N, L, E), _as(out_proj_weight, dt), _as(out_proj_bias, dt))
    return _as(out, x.dtype)


def backward(grad_output, x, pos, in_w, in_b, out_w, out_b, num_heads, attn_mask, needs, deterministic):
    return differentiate(lambda *t: forward()(*t, num_heads, attn_mask), (x, pos, in_w, in_b, out_w, out_b), needs,
                         grad_output)
