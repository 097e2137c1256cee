"""The CUDA path of AIFI attention: the projections as torch GEMMs (one GEMM for q and k on x + pos,
one for v on x, the output projection) around the compiled attention core
(``torch.ops.rtdetr_kernels_C.aifi_attention_core_forward`` / ``_backward``, csrc/attention/).

The core reads q and k straight out of the [N, L, 2E] projection (strided views, no copies) and writes
the heads concatenated, [N, L, E], which is the output projection's input; its backward writes the
q and k gradients into one [N, L, 2E] tensor, which is the q/k GEMM's gradient. GEMMs run in the
input dtype (as nn.MultiheadAttention does: cuBLAS accumulates fp16/bf16 products in fp32); the core
computes the softmax and its accumulation in fp32 and rounds once.

The backward recomputes the projections and the attention forward (the op saves only its inputs), then
runs the core's backward: deterministic kernels (no atomics), so ``deterministic`` changes nothing.
A query row that sees no key gets attention output 0 (the op returns ``out_proj_bias`` there) and
passes no gradient, as the reference defines it.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from .. import backends
from .._library import empty_grad

FORWARD_OP = "rtdetr_kernels_C::aifi_attention_core_forward"
BACKWARD_OP = "rtdetr_kernels_C::aifi_attention_core_backward"
MAX_HEAD_DIM = 256  # csrc/attention/cuda_launch.h kMaxHeadDim
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def why_not(call: backends.Call) -> Optional[str]:
    """Reasons beyond the build and the device (backends.build_why_not checks those)."""
    bad = [d for d in call.dtypes if d not in DTYPES]
    if bad:
        return f"the cuda kernels serve float32, float16 and bfloat16, got {str(bad[0]).replace('torch.', '')}"
    head_dim = call.option("head_dim", 0)
    if head_dim > MAX_HEAD_DIM:
        return f"the cuda kernels serve head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    return None


def _core():
    return backends.extension_namespace()


def _project(x, pos, in_w, in_b, num_heads):
    """(qk_in, q, k, v): q and k [N, L, H, D] views into one [N, L, 2E] GEMM output, v [N, L, H, D]."""
    N, L, E = x.shape
    D = E // num_heads
    qk_in = x if pos is None else x + pos
    qk = F.linear(qk_in, in_w[:2 * E], None if in_b is None else in_b[:2 * E])
    v = F.linear(x, in_w[2 * E:], None if in_b is None else in_b[2 * E:])
    qk5 = qk.view(N, L, 2, num_heads, D)
    return qk_in, qk5[:, :, 0], qk5[:, :, 1], v.view(N, L, num_heads, D)


def forward(x: torch.Tensor, pos: Optional[torch.Tensor], in_proj_weight: torch.Tensor,
            in_proj_bias: Optional[torch.Tensor], out_proj_weight: torch.Tensor, out_proj_bias: Optional[torch.Tensor],
            num_heads: int, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    N, L, E = x.shape
    _, q, k, v = _project(x, pos, in_proj_weight, in_proj_bias, num_heads)
    attended, _ = _core().aifi_attention_core_forward(q, k, v, attn_mask, 1.0 / math.sqrt(E // num_heads))
    return F.linear(attended.view(N, L, E), out_proj_weight, out_proj_bias)


def _sum_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` [N, L, E] summed over the dims ``like`` (pos: [L, E], [1, L, E] or [N, L, E]) broadcasts."""
    if like.dim() == 2:
        return grad.sum(0)
    if like.shape[0] == 1 and grad.shape[0] != 1:
        return grad.sum(0, keepdim=True)
    return grad


def backward(grad_output, x, pos, in_w, in_b, out_w, out_b, num_heads, attn_mask, needs, deterministic) -> tuple:
    N, L, E = x.shape
    need_x, need_pos, need_in_w, need_in_b, need_out_w, need_out_b = (bool(n) for n in needs)
    need_pos = need_pos and pos is not None
    need_in_b = need_in_b and in_b is not None
    need_out_b = need_out_b and out_b is not None
    need_attention = need_x or need_pos or need_in_w or need_in_b
    grads: List[torch.Tensor] = [empty_grad(x) for _ in range(6)]  # distinct: outputs must not alias
    g = grad_output.to(x.dtype).reshape(N * L, E)
    if need_out_b:
        grads[5] = g.sum(0)
    if not (need_attention or need_out_w):
        return tuple(grads)
    scale = 1.0 / math.sqrt(E // num_heads)
    qk_in, q, k, v = _project(x, pos, in_w, in_b, num_heads)
    mask = attn_mask  # the core reads a bool mask as it is, a floating one in float32
    attended, lse = _core().aifi_attention_core_forward(q, k, v, mask, scale)
    if need_out_w:
        grads[4] = g.t().mm(attended.view(N * L, E))
    if not need_attention:
        return tuple(grads)
    d_attended = g.mm(out_w).view(N, L, num_heads, E // num_heads)
    d_qk, d_v = _core().aifi_attention_core_backward(d_attended, q, k, v, attended, lse, mask, scale)
    d_qk = d_qk.view(N * L, 2 * E)
    d_v = d_v.view(N * L, E)
    if need_x or need_pos:
        d_qk_in = d_qk.mm(in_w[:2 * E])  # [N * L, E]
        if need_x:
            grads[0] = torch.addmm(d_qk_in, d_v, in_w[2 * E:]).view(N, L, E)
        if need_pos:
            grads[1] = _sum_to(d_qk_in.view(N, L, E), pos).reshape(pos.shape)
    if need_in_w:
        grads[2] = torch.cat([d_qk.t().mm(qk_in.reshape(N * L, E)), d_v.t().mm(x.reshape(N * L, E))])
    if need_in_b:
        grads[3] = torch.cat([d_qk.sum(0), d_v.sum(0)])
    return tuple(grads)


# test_build checks that the compiled kernels a compiled record runs are registered for its device:
# these host functions run the core's two ops.
forward._qualified_op_name = FORWARD_OP
backward._qualified_op_name = BACKWARD_OP
