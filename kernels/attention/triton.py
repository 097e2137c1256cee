"""Triton kernels for AIFI attention: a flash-style attention core (forward, and a deterministic
backward without atomics) and the op's host functions around it.

Semantics are those of ``reference.aifi_attention_reference``: per (batch, head) ``softmax(q k^T /
sqrt(D) + mask) v``, where a boolean mask marks the blocked pairs (True = blocked) and a floating
mask is added to the scores; [L, L] masks apply to every (batch, head), [N * H, L, L] ones per
(batch, head) with the head fastest. A query row that is blocked everywhere attends to nothing: its
output is 0 and no gradient flows through it (no NaN, as the reference and PyTorch's SDPA).

The core
--------
q, k, v, the output and the gradients are [N, L, H, D] views with unit stride along D and any other
strides, so the op's kernels read q and k straight out of the one [N, L, 2E] projection and v out of
the [N, L, E] one, and write the output as [N, L, E] for the output projection: no head permutes,
no copies. One program owns BLOCK_M query rows of one (batch, head) and walks the keys in blocks of
BLOCK_N with an online softmax (fp32 scores, running max and sum, an fp32 accumulator; probabilities
go to the PV product in the input dtype, as FlashAttention does). Scores are kept in log2 units
(``qk * log2(e) / sqrt(D)``) for exp2. The head dim is padded to BLOCK_D (32 or 64) with masked
loads; lengths need not be tile multiples (keys past L are -inf, queries past L are not stored).
fp32 inputs use TF32x3 products (three TF32 tensor-core products, close to fp32's precision; not plain
TF32, as torch's fp32 matmuls are fp32 by default).

The forward also writes the per-row log2-sum-exp (``lse``; +inf for a blocked row, so that the
backward's ``exp2(s - lse)`` is 0 there). The backward is FlashAttention-2's: one kernel per block
of keys that walks the queries and accumulates dk and dv in registers, and one per block of queries
that walks the keys for dq. Both recompute ``delta = rowsum(dO * O)`` for the rows they visit: one
launch fewer than a pre-pass, which counts at batch 1, where launches dominate
(research/attention_topk_and_style.md 1.1). Nothing is accumulated with atomics, so the gradients are
bitwise reproducible.

Configurations (all listed in ``aot_specs``, 54 kernels): dtype fp16/bf16/fp32 x with or without a
mask x the tiles of ``_TILES`` (two at BLOCK_D 32, RT-DETR's head dim, one at 64), for each of the
three kernels. Which mask a masked call has is a runtime flag (one compiled kernel for both): a bool
mask reaches the kernels as its uint8 view (no copy), a floating one as float32 (other float dtypes
are cast: the reference adds it in float32). Head dims above 64 are left to the other backends;
every BLOCK_D and tile is one more set of kernels to compile ahead of time (seconds each).

The op
------
forward: one GEMM for q and k on ``x + pos``, one for v on x, the core, the output projection.
backward: recomputes the projections and the core's output (the op saves only its inputs), then
the output projection's grads, the core's backward written straight into one [N, L, 2E] buffer
for (dq, dk) and one [N, L, E] for dv, and the input projection's grads as GEMMs on those. The
GEMMs are torch's (cuBLAS), in the input dtype with fp32 accumulation, as nn.MultiheadAttention.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import backends
from .._library import empty_grad
from ..ms_deform_attn.triton import _trips  # a runtime loop bound that the 3.6 interpreter accepts

_LOG2E = math.log2(math.e)
_LOG2E_IN_KERNEL = tl.constexpr(_LOG2E)
# fp32 products as three TF32 tensor-core products (close to fp32's precision; plain TF32 is tl.dot's fp32
# default, IEEE fp32 runs on the FMA units and compiles to thousands of FMAs); no effect on fp16/bf16
_DOT_PRECISION = tl.constexpr("tf32x3")
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_DS = (32, 64)  # head dims pad up to one of these (each is one more set of compiled kernels)
MAX_HEAD_DIM = _BLOCK_DS[-1]
# (rows a program owns, rows each step of its loop visits, warps, pipeline stages) by BLOCK_D, smallest
# owned block first: the forward and dq programs own query rows and step over keys, the dk/dv program
# owns key rows and steps over queries. ``_tile`` takes the largest owned block that still gives every
# SM a program: batch 1 at L = 400 with 8 heads runs the small tile, batch 8 the large one.
_TILES = {32: ((16, 64, 2, 2), (64, 64, 4, 2)),
          64: ((32, 64, 4, 2),)}


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _masked_scores(s, bool_ptrs, float_ptrs, mask_is_bool, row_ok, col_ok, HAS_MASK: tl.constexpr,
                   TRANSPOSED: tl.constexpr):
    """Scores ``s`` (log2 units) with the attention mask applied and keys past L at -inf.

    ``s`` is [rows, cols] (queries x keys), or [cols, rows] when TRANSPOSED (the dk/dv kernel's keys x
    queries); ``bool_ptrs`` / ``float_ptrs`` point at its elements in this (batch, head)'s two masks, of
    which the one ``mask_is_bool`` names is read (a runtime choice: one compiled kernel serves both)."""
    key_ok = col_ok[:, None] if TRANSPOSED else col_ok[None, :]
    if HAS_MASK:
        live = key_ok & (row_ok[None, :] if TRANSPOSED else row_ok[:, None])
        blocked = tl.load(bool_ptrs, mask=live & (mask_is_bool != 0), other=0)
        add = tl.load(float_ptrs, mask=live & (mask_is_bool == 0), other=0.0)
        s = tl.where(key_ok & (blocked == 0), s + add * _LOG2E_IN_KERNEL, float("-inf"))
    else:
        s = tl.where(key_ok, s, float("-inf"))
    return s


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


# Scalars that are not specialised on (== 1, % 16): one compiled kernel for every length, head count and
# mask kind, the kernels aot_specs lists. The tensor strides are: % 16 gives aligned vector loads.
_SCALARS = ["L", "H", "D", "stride_mz", "stride_ml", "mask_is_bool"]


@triton.jit(do_not_specialize=_SCALARS)
def _attn_fwd_kernel(
    q_ptr,  # [N, L, H, D] (strides below, unit stride along D): fp16/bf16/fp32
    k_ptr,  # [N, L, H, D] q's dtype
    v_ptr,  # [N, L, H, D] q's dtype
    bool_mask_ptr,  # [N * H or 1, L, L] uint8, nonzero = blocked (read when HAS_MASK and mask_is_bool)
    float_mask_ptr,  # [N * H or 1, L, L] fp32, added to the scores (read when HAS_MASK and not mask_is_bool)
    o_ptr,  # [N, L, H, D] q's dtype, written
    lse_ptr,  # [N * H, L] fp32, written: log2-sum-exp of each row's scores (+inf: a blocked row)
    L, H, D, qk_scale,  # qk_scale = log2(e) / sqrt(D)
    stride_qn, stride_qh, stride_ql, stride_kn, stride_kh, stride_kl,
    stride_vn, stride_vh, stride_vl, stride_on, stride_oh, stride_ol,
    stride_mz, stride_ml,  # mask strides over (batch * H + head) (0 for an [L, L] mask) and rows
    mask_is_bool,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,
):
    z = tl.program_id(1).to(tl.int64)  # batch * H + head
    b = z // H
    h = z % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * stride_qn + h * stride_qh + rows[:, None] * stride_ql + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    cols = tl.arange(0, BLOCK_N)  # the step's keys, from its first; the pointers advance by a step
    k_ptrs = k_ptr + b * stride_kn + h * stride_kh + cols[:, None] * stride_kl + d[None, :]
    v_ptrs = v_ptr + b * stride_vn + h * stride_vh + cols[:, None] * stride_vl + d[None, :]
    mask_offs = rows[:, None] * stride_ml + cols[None, :]
    bool_ptrs = bool_mask_ptr + z * stride_mz + mask_offs
    float_ptrs = float_mask_ptr + z * stride_mz + mask_offs
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, _trips(L), BLOCK_N):
        col_ok = cols < L - start
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=_DOT_PRECISION) * qk_scale
        s = _masked_scores(s, bool_ptrs, float_ptrs, mask_is_bool, row_ok, col_ok, HAS_MASK, False)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet: no -inf - -inf
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=_DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kl
        v_ptrs += BLOCK_N * stride_vl
        if HAS_MASK:
            bool_ptrs += BLOCK_N
            float_ptrs += BLOCK_N
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * stride_on + h * stride_oh + rows[:, None] * stride_ol + d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(lse_ptr + z * L + rows, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Backward: dk and dv per block of keys, dq per block of queries
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=_SCALARS)
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr,  # [N, L, H, D] fp16/bf16/fp32 (strides below, unit stride along D)
    o_ptr,  # [N, L, H, D] the forward's output
    do_ptr,  # [N, L, H, D] its gradient
    lse_ptr,  # [N * H, L] fp32, the forward's
    bool_mask_ptr, float_mask_ptr,  # as the forward's
    dk_ptr, dv_ptr,  # [N, L, H, D] q's dtype, written
    L, H, D, qk_scale, sm_scale,  # sm_scale = 1 / sqrt(D)
    stride_qn, stride_qh, stride_ql, stride_kn, stride_kh, stride_kl,
    stride_vn, stride_vh, stride_vl, stride_on, stride_oh, stride_ol,
    stride_don, stride_doh, stride_dol, stride_dkn, stride_dkh, stride_dkl,
    stride_dvn, stride_dvh, stride_dvl,
    stride_mz, stride_ml, mask_is_bool,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per step
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,
):
    z = tl.program_id(1).to(tl.int64)
    b = z // H
    h = z % H
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < L
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * stride_kn + h * stride_kh + cols[:, None] * stride_kl + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * stride_vn + h * stride_vh + cols[:, None] * stride_vl + d[None, :], mask=kv_mask, other=0.0)
    rows = tl.arange(0, BLOCK_M)  # the step's queries, from its first; the pointers advance by a step
    q_ptrs = q_ptr + b * stride_qn + h * stride_qh + rows[:, None] * stride_ql + d[None, :]
    o_ptrs = o_ptr + b * stride_on + h * stride_oh + rows[:, None] * stride_ol + d[None, :]
    do_ptrs = do_ptr + b * stride_don + h * stride_doh + rows[:, None] * stride_dol + d[None, :]
    lse_ptrs = lse_ptr + z * L + rows
    mask_offs = rows[None, :] * stride_ml + cols[:, None]  # [keys, queries]
    bool_ptrs = bool_mask_ptr + z * stride_mz + mask_offs
    float_ptrs = float_mask_ptr + z * stride_mz + mask_offs
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(0, _trips(L), BLOCK_M):
        row_ok = rows < L - start
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        do = tl.load(do_ptrs, mask=q_mask, other=0.0)
        o = tl.load(o_ptrs, mask=q_mask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))  # rows past L: p = 0
        s_t = tl.dot(k, tl.trans(q), input_precision=_DOT_PRECISION) * qk_scale  # [keys, queries]
        s_t = _masked_scores(s_t, bool_ptrs, float_ptrs, mask_is_bool, row_ok, col_ok, HAS_MASK, True)
        p_t = tl.exp2(s_t - lse[None, :])
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=_DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=_DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=_DOT_PRECISION)
        q_ptrs += BLOCK_M * stride_ql
        o_ptrs += BLOCK_M * stride_ol
        do_ptrs += BLOCK_M * stride_dol
        lse_ptrs += BLOCK_M
        if HAS_MASK:
            bool_ptrs += BLOCK_M * stride_ml
            float_ptrs += BLOCK_M * stride_ml
    dk = dk * sm_scale
    tl.store(dk_ptr + b * stride_dkn + h * stride_dkh + cols[:, None] * stride_dkl + d[None, :],
             dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + b * stride_dvn + h * stride_dvh + cols[:, None] * stride_dvl + d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=_SCALARS)
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr,  # [N, L, H, D] as the dk/dv kernel's
    lse_ptr,  # [N * H, L] fp32
    bool_mask_ptr, float_mask_ptr,
    dq_ptr,  # [N, L, H, D] q's dtype, written
    L, H, D, qk_scale, sm_scale,
    stride_qn, stride_qh, stride_ql, stride_kn, stride_kh, stride_kl,
    stride_vn, stride_vh, stride_vl, stride_on, stride_oh, stride_ol,
    stride_don, stride_doh, stride_dol, stride_dqn, stride_dqh, stride_dql,
    stride_mz, stride_ml, mask_is_bool,
    HAS_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per step
    BLOCK_D: tl.constexpr,
):
    z = tl.program_id(1).to(tl.int64)
    b = z // H
    h = z % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * stride_qn + h * stride_qh + rows[:, None] * stride_ql + d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_ptr + b * stride_don + h * stride_doh + rows[:, None] * stride_dol + d[None, :], mask=q_mask, other=0.0)
    o = tl.load(o_ptr + b * stride_on + h * stride_oh + rows[:, None] * stride_ol + d[None, :], mask=q_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    lse = tl.load(lse_ptr + z * L + rows, mask=row_ok, other=float("inf"))
    cols = tl.arange(0, BLOCK_N)  # the step's keys, from its first; the pointers advance by a step
    k_ptrs = k_ptr + b * stride_kn + h * stride_kh + cols[:, None] * stride_kl + d[None, :]
    v_ptrs = v_ptr + b * stride_vn + h * stride_vh + cols[:, None] * stride_vl + d[None, :]
    mask_offs = rows[:, None] * stride_ml + cols[None, :]
    bool_ptrs = bool_mask_ptr + z * stride_mz + mask_offs
    float_ptrs = float_mask_ptr + z * stride_mz + mask_offs
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, _trips(L), BLOCK_N):
        col_ok = cols < L - start
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=_DOT_PRECISION) * qk_scale
        s = _masked_scores(s, bool_ptrs, float_ptrs, mask_is_bool, row_ok, col_ok, HAS_MASK, False)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=_DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=_DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kl
        v_ptrs += BLOCK_N * stride_vl
        if HAS_MASK:
            bool_ptrs += BLOCK_N
            float_ptrs += BLOCK_N
    dq = dq * sm_scale
    tl.store(dq_ptr + b * stride_dqn + h * stride_dqh + rows[:, None] * stride_dql + d[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------
# Host side: the core
# --------------------------------------------------------------------------------------------


def why_not(call) -> Optional[str]:
    """None when these kernels can serve ``call`` (an aifi_attention backends.Call), else the reason."""
    for dtype in call.dtypes:
        if dtype not in _KERNEL_DTYPES:
            return (f"the Triton attention kernels support float16, bfloat16 and float32, got {dtype} "
                    "(use the cpu or reference backend for float64)")
    if call.device_type == "cpu" and backends.triton_interpreter() and torch.bfloat16 in tuple(call.dtypes):
        return "bfloat16 is computed wrongly by the Triton interpreter (CPU tensors); use a GPU for bfloat16"
    head_dim = call.option("head_dim", 1)
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        return f"the Triton attention kernels support head dims up to {MAX_HEAD_DIM}, got {head_dim}"
    return None


def _block_d(D: int) -> int:
    for block_d in _BLOCK_DS:
        if D <= block_d:
            return block_d
    raise ValueError(f"head dim {D} > {MAX_HEAD_DIM}: the Triton attention kernels cannot serve it")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _tile(L: int, heads: int, block_d: int, device: torch.device) -> Tuple[int, int, int, int]:
    """(owned rows, step rows, warps, stages) for ``heads`` (batch * heads) programs per block of rows.

    On a GPU, the largest owned block that still gives every SM a program. Under the interpreter the
    largest: its cost is proportional to programs x steps, tens of ms a step (tests run the others
    directly)."""
    tiles = _TILES[block_d]
    if device.type != "cuda":
        return tiles[-1]
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    for tile in reversed(tiles):
        if triton.cdiv(L, tile[0]) * heads >= sms:
            return tile
    return tiles[0]


def _kernel_masks(attn_mask: Optional[torch.Tensor], lse: torch.Tensor):
    """(bool mask as uint8, float mask as fp32, mask_is_bool, its z stride, its row stride) as the
    kernels take them; the mask the call does not have is a stand-in pointer (lse), never read."""
    if attn_mask is None:
        return lse.view(torch.uint8), lse, 0, 0, 0
    L = attn_mask.shape[-1]
    stride_z = 0 if attn_mask.dim() == 2 else L * L
    if attn_mask.dtype == torch.bool:
        return attn_mask.contiguous().view(torch.uint8), lse, 1, stride_z, L
    return lse.view(torch.uint8), attn_mask.float().contiguous(), 0, stride_z, L


def _strides(t: torch.Tensor) -> Tuple[int, int, int]:
    """(batch, head, row) strides of an [N, L, H, D] view."""
    if t.stride(3) != 1:
        raise ValueError(f"the attention kernels need a unit stride along the head dim, got strides {t.stride()}")
    return t.stride(0), t.stride(2), t.stride(1)


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device; make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def core_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                 out: Optional[torch.Tensor] = None, tile: Optional[Tuple[int, int, int, int]] = None):
    """softmax(q k^T / sqrt(D) + mask) v per (batch, head) for [N, L, H, D] views (unit stride along D).

    attn_mask: None, or [L, L] / [N * H, L, L], bool (True = blocked) or floating (added). ``out``: an
    [N, L, H, D] view to write (default: a new contiguous tensor). ``tile``: one of ``_TILES`` instead
    of the automatic choice (tests). Returns (out, lse [N * H, L] fp32)."""
    N, L, H, D = q.shape
    if out is None:
        out = q.new_empty(N, L, H, D)
    lse = torch.empty(N * H, L, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    block_d = _block_d(D)
    owned, step, warps, stages = tile or _tile(L, N * H, block_d, q.device)
    bool_mask, float_mask, is_bool, stride_mz, stride_ml = _kernel_masks(attn_mask, lse)
    with _device_guard(q):
        _attn_fwd_kernel[(triton.cdiv(L, owned), N * H)](
            q, k, v, bool_mask, float_mask, out, lse, L, H, D, _LOG2E / math.sqrt(D),
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), stride_mz, stride_ml, is_bool,
            HAS_MASK=attn_mask is not None, BLOCK_M=owned, BLOCK_N=step, BLOCK_D=block_d, num_warps=warps,
            num_stages=stages)
    return out, lse


def core_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, dq: Optional[torch.Tensor] = None,
                  dk: Optional[torch.Tensor] = None, dv: Optional[torch.Tensor] = None,
                  tile: Optional[Tuple[int, int, int, int]] = None):
    """(dq, dk, dv) of ``core_forward`` given its output, lse and the output's gradient (all [N, L, H, D]
    views with unit stride along D). ``dq``, ``dk``, ``dv``: views to write (default: new tensors)."""
    N, L, H, D = q.shape
    dq = q.new_empty(N, L, H, D) if dq is None else dq
    dk = q.new_empty(N, L, H, D) if dk is None else dk
    dv = q.new_empty(N, L, H, D) if dv is None else dv
    if q.numel() == 0:
        return dq, dk, dv
    block_d = _block_d(D)
    owned, step, warps, stages = tile or _tile(L, N * H, block_d, q.device)
    bool_mask, float_mask, is_bool, stride_mz, stride_ml = _kernel_masks(attn_mask, lse)
    scales = (_LOG2E / math.sqrt(D), 1.0 / math.sqrt(D))
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out))
    grid = (triton.cdiv(L, owned), N * H)
    meta = dict(HAS_MASK=attn_mask is not None, BLOCK_D=block_d, num_warps=warps, num_stages=stages)
    with _device_guard(q):
        _attn_bwd_dkdv_kernel[grid](
            q, k, v, out, grad_out, lse, bool_mask, float_mask, dk, dv, L, H, D, *scales, *common, *_strides(dk),
            *_strides(dv), stride_mz, stride_ml, is_bool, BLOCK_M=step, BLOCK_N=owned, **meta)
        _attn_bwd_dq_kernel[grid](
            q, k, v, out, grad_out, lse, bool_mask, float_mask, dq, L, H, D, *scales, *common, *_strides(dq),
            stride_mz, stride_ml, is_bool, BLOCK_M=owned, BLOCK_N=step, **meta)
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask):
        out, lse = core_forward(q, k, v, attn_mask)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.attn_mask = attn_mask
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = core_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.attn_mask)
        return dq, dk, dv, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The core alone, differentiable, in SDPA's layout: q, k, v [N, H, L, D] -> [N, H, L, D].

    Unlike SDPA (and like nn.MultiheadAttention and the op) a boolean ``attn_mask`` marks the blocked
    pairs; [L, L] or [N * H, L, L]. For tests and benchmarks of the core."""
    out = _Attention.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
    return out.transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Host side: the op
# --------------------------------------------------------------------------------------------


def _project(x, pos, in_proj_weight, in_proj_bias):
    """(x + pos, [q | k] [N, L, 2E], v [N, L, E]): one GEMM for q and k, one for v."""
    E = x.shape[-1]
    qk_in = x if pos is None else x + pos
    b = in_proj_bias
    qk = F.linear(qk_in, in_proj_weight[:2 * E], None if b is None else b[:2 * E])
    v = F.linear(x, in_proj_weight[2 * E:], None if b is None else b[2 * E:])
    return qk_in, qk, v


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[N, L, H * D] (a view with unit stride along the last dim) -> [N, L, H, D]."""
    return t.unflatten(-1, (num_heads, t.shape[-1] // num_heads))


def _attend(qk: torch.Tensor, v: torch.Tensor, num_heads: int, attn_mask):
    """(attended [N, L, E], lse) of the core on the projections."""
    E = v.shape[-1]
    attended = torch.empty_like(v)
    q, k = _heads(qk[..., :E], num_heads), _heads(qk[..., E:], num_heads)
    _, lse = core_forward(q, k, _heads(v, num_heads), attn_mask, out=_heads(attended, num_heads))
    return attended, lse


def forward(x: torch.Tensor, pos: Optional[torch.Tensor], in_proj_weight: torch.Tensor,
            in_proj_bias: Optional[torch.Tensor], out_proj_weight: torch.Tensor, out_proj_bias: Optional[torch.Tensor],
            num_heads: int, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    _, qk, v = _project(x, pos, in_proj_weight, in_proj_bias)
    attended, _ = _attend(qk, v, num_heads, attn_mask)
    return F.linear(attended, out_proj_weight, out_proj_bias)


def _reduce_to(grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``grad`` [N, L, E] summed over the dims that ``like`` (pos: [1, L, E], [L, E] or [N, L, E]) broadcasts."""
    if like.dim() == 2:
        return grad.sum(0)
    if like.shape[0] == 1 and grad.shape[0] != 1:
        return grad.sum(0, keepdim=True)
    return grad


def backward(grad_output, x, pos, in_w, in_b, out_w, out_b, num_heads, attn_mask, needs, deterministic):
    """The grads of (x, pos, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias), each where
    ``needs`` says so (else an empty placeholder). Deterministic whatever ``deterministic`` says: no
    kernel here accumulates with atomics."""
    with _device_guard(x):
        return _backward(grad_output, x, pos, in_w, in_b, out_w, out_b, num_heads, attn_mask, needs)


def _backward(grad_output, x, pos, in_w, in_b, out_w, out_b, num_heads, attn_mask, needs):
    need_x, need_pos, need_in_w, need_in_b, need_out_w, need_out_b = (bool(n) for n in needs)
    need_pos = need_pos and pos is not None
    need_in_b = need_in_b and in_b is not None
    need_out_b = need_out_b and out_b is not None
    N, L, E = x.shape
    grads = [empty_grad(x) for _ in range(6)]  # distinct placeholders: a custom op's outputs must not alias
    g = grad_output.to(x.dtype).reshape(N * L, E)
    if need_out_b:
        grads[5] = g.sum(0)
    need_core = need_x or need_pos or need_in_w or need_in_b
    if not (need_core or need_out_w):
        return tuple(grads)
    qk_in, qk, v = _project(x, pos, in_w, in_b)
    attended, lse = _attend(qk, v, num_heads, attn_mask)
    if need_out_w:
        grads[4] = g.t().mm(attended.view(N * L, E))
    if not need_core:
        return tuple(grads)
    d_attended = g.mm(out_w).view(N, L, E)
    d_qk = torch.empty_like(qk)  # [dq | dk]
    dv = torch.empty_like(v)
    q, k = _heads(qk[..., :E], num_heads), _heads(qk[..., E:], num_heads)
    core_backward(_heads(d_attended, num_heads), q, k, _heads(v, num_heads), _heads(attended, num_heads), lse,
                  attn_mask, dq=_heads(d_qk[..., :E], num_heads), dk=_heads(d_qk[..., E:], num_heads),
                  dv=_heads(dv, num_heads))
    d_qk2, dv2 = d_qk.view(N * L, 2 * E), dv.view(N * L, E)
    if need_in_w:
        grad_in_w = torch.empty_like(in_w)
        torch.mm(d_qk2.t(), qk_in.reshape(N * L, E), out=grad_in_w[:2 * E])
        torch.mm(dv2.t(), x.reshape(N * L, E), out=grad_in_w[2 * E:])
        grads[2] = grad_in_w
    if need_in_b:
        grad_in_b = torch.empty_like(in_b)
        torch.sum(d_qk2, 0, out=grad_in_b[:2 * E])
        torch.sum(dv2, 0, out=grad_in_b[2 * E:])
        grads[3] = grad_in_b
    if need_x or need_pos:
        d_qk_in = d_qk2.mm(in_w[:2 * E])  # the grad of x + pos
        if need_pos:
            grads[1] = _reduce_to(d_qk_in.view(N, L, E), pos)
        if need_x:
            grads[0] = torch.addmm(d_qk_in, dv2, in_w[2 * E:]).view(N, L, E)
    return tuple(grads)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# --------------------------------------------------------------------------------------------

_TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _strides_sig(*names: str) -> dict:
    return {f"stride_{n}{s}": "i32" for n in names for s in "nhl"}


def aot_specs() -> list:
    """(name, jit_fn, signature, constexprs, options) for every kernel configuration the host code can
    launch: for each of the three kernels, 3 dtypes x (with, without a mask) x the tiles of every
    BLOCK_D in ``_TILES``."""
    specs = []
    masks = {"bool_mask_ptr": "*u8", "float_mask_ptr": "*fp32"}
    mask_scalars = {"stride_mz": "i32", "stride_ml": "i32", "mask_is_bool": "i32"}
    for t in _TL_NAMES.values():
        qkv = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}"}
        fwd_scalars = {"L": "i32", "H": "i32", "D": "i32", "qk_scale": "fp32"}
        bwd_scalars = dict(fwd_scalars, sm_scale="fp32")
        bwd_inputs = {**qkv, "o_ptr": f"*{t}", "do_ptr": f"*{t}", "lse_ptr": "*fp32", **masks}
        kernels = (
            ("attn_fwd", _attn_fwd_kernel, False,
             {**qkv, **masks, "o_ptr": f"*{t}", "lse_ptr": "*fp32", **fwd_scalars, **_strides_sig("q", "k", "v", "o"),
              **mask_scalars}),
            ("attn_bwd_dkdv", _attn_bwd_dkdv_kernel, True,
             {**bwd_inputs, "dk_ptr": f"*{t}", "dv_ptr": f"*{t}", **bwd_scalars,
              **_strides_sig("q", "k", "v", "o", "do", "dk", "dv"), **mask_scalars}),
            ("attn_bwd_dq", _attn_bwd_dq_kernel, False,
             {**bwd_inputs, "dq_ptr": f"*{t}", **bwd_scalars, **_strides_sig("q", "k", "v", "o", "do", "dq"),
              **mask_scalars}),
        )
        for block_d, tiles in _TILES.items():
            for owned, step, warps, stages in tiles:
                for has_mask in (False, True):
                    for name, fn, owns_keys, sig in kernels:
                        rows, cols = (step, owned) if owns_keys else (owned, step)
                        const = {"HAS_MASK": has_mask, "BLOCK_M": rows, "BLOCK_N": cols, "BLOCK_D": block_d}
                        specs.append((f"{name}[{t},d{block_d},{owned}x{step},{'mask' if has_mask else 'nomask'}]", fn,
                                      sig, const, {"num_warps": warps, "num_stages": stages}))
    return specs
