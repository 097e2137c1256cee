"""Triton kernels for multi-scale deformable attention: forward, one fused backward, and a
deterministic (atomic-free) grad_value path.

Semantics are those of ``reference.ms_deform_attn_reference`` (research/ms_deform_attn.md §1.2/§1.3):
``x = loc_x * W - 0.5``, ``y = loc_y * H - 0.5``, a point is skipped unless ``-1 < x < W`` and
``-1 < y < H`` (NaN fails), zero padding at the borders; ``discrete`` is RT-DETRv2's nearest sampling
with the per-axis or the upstream ("official") clamp. Coordinates and accumulation are fp32, one
rounding at the end. Kernels are compiled with ``enable_fp_fusion=False`` so that ``loc * W - 0.5``
rounds twice, like the reference (an FMA would move points that sit on a pixel knot).

Layout of the work
------------------
A "row" is one (n, q, m) triple; rows are numbered like the [N, Lq, M] prefix of the location
tensor. Each program owns a [BLOCK_R rows, BLOCK_P points, BLOCK_D channels] tile: all the points of
a row (up to BLOCK_P = 16, e.g. RT-DETR's 3 levels x 4 points, more loop over chunks) are handled at
once, so a program issues one round of location/weight loads and one round of corner gathers
instead of a chain of dependent loads per point (the op is latency-bound at RT-DETR's sizes). Every
point finds its level (H, W, first pixel) from 16 by-value level words (H, W and points packed in
one int64): no metadata tensor, no host sync, and the same compiled kernel serves every image size.
Channels are contiguous in memory, so the corner gathers are vector loads.

Configurations (all listed in ``aot_specs``): BLOCK_D in {16, 32} (D <= 16 -> 16; larger D is split
into chunks of 32: over the grid in the forward, in a loop in the backward), BLOCK_P in {4, 16},
BLOCK_R = max(1, 512 // (BLOCK_P * BLOCK_D)); method bilinear or discrete (the two discrete clamps
differ by a runtime flag). Locations and weights reach the forward as value's dtype or float32 (other
mixes are cast up), and the backward always as float32.

Backward: the same walk recomputes the corners, reduces <g, .> over the channels for the weight and
location grads, and either scatters ``a * w_ij * g`` with fp32 atomics into an fp32 buffer (fast
path) or, when ``deterministic``, writes for every point its base-cell key and its four corner
coefficients. The deterministic path then stable-sorts the keys (torch), finds the segment of every
cell with ``searchsorted`` and runs a gather kernel: one program per (n, m, block of value pixels)
that walks the four neighbouring base cells in a fixed order and accumulates in fp32. The result is
bitwise reproducible.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import backends
from .constants import BILINEAR, DISCRETE_OFFICIAL, DISCRETE_PER_AXIS, MAX_LEVELS
# kernel-level method constexpr: the two discrete clamps differ only by a runtime flag
_K_BILINEAR, _K_DISCRETE = 0, 1

_META_BITS = 20  # H, W and points per level must each be < 2**20 to fit the packed level word
_META_MARK = 1 << 62  # keeps every packed word an int64 (never specialised to i32 or to 1)
_SENTINEL = tl.constexpr(1 << 62)  # sort key of skipped points (after every real cell)

_BLOCK_DS = (16, 32)  # channels per tile: D <= 16 uses 16, else 32 (forward: grid over D chunks; backward: loop)
_BLOCK_PS = (4, 16)  # points per tile: rows with <= 4 points use 4, else 16 (more loop over chunks of 16)
_TILE = 512  # BLOCK_R * BLOCK_P * BLOCK_D target of the forward and backward
_GATHER_TILE = 1024


# --------------------------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _trips(n):
    """A loop bound that is a runtime argument, as ``range`` takes it: compiled, ``n`` itself (the call
    is inlined, so ``range(_trips(n))`` is the same loop as ``range(n)``)."""
    return n


if not isinstance(_trips, triton.runtime.JITFunction):
    # Under TRITON_INTERPRET a scalar argument is a 1-element array, and triton 3.6's interpreter turns
    # a tensor into a loop bound with int(array), which numpy >= 2.4 rejects ("only 0-dimensional arrays
    # can be converted to Python scalars"); the interpreter runs kernels as Python, so give it an int.
    def _trips(n):  # noqa: F811
        return int(n.handle.data.reshape(-1)[0]) if isinstance(n, tl.tensor) else int(n)


@triton.jit
def _level_word(l, lv0, lv1, lv2, lv3, lv4, lv5, lv6, lv7, lv8, lv9, lv10, lv11, lv12, lv13, lv14, lv15):
    """The packed (H, W, P) word of level ``l`` (a runtime index) out of 16 by-value arguments."""
    word = lv15
    word = tl.where(l == 14, lv14, word)
    word = tl.where(l == 13, lv13, word)
    word = tl.where(l == 12, lv12, word)
    word = tl.where(l == 11, lv11, word)
    word = tl.where(l == 10, lv10, word)
    word = tl.where(l == 9, lv9, word)
    word = tl.where(l == 8, lv8, word)
    word = tl.where(l == 7, lv7, word)
    word = tl.where(l == 6, lv6, word)
    word = tl.where(l == 5, lv5, word)
    word = tl.where(l == 4, lv4, word)
    word = tl.where(l == 3, lv3, word)
    word = tl.where(l == 2, lv2, word)
    word = tl.where(l == 1, lv1, word)
    word = tl.where(l == 0, lv0, word)
    H = (word >> 40) & 0xFFFFF
    W = (word >> 20) & 0xFFFFF
    P = word & 0xFFFFF
    return H, W, P  # int64 scalars


@triton.jit
def _bilinear_cell(lx, ly, Hf, Wf):
    """Base cell and fractional weights of one point per row; skipped points get valid=False."""
    x = lx * Wf - 0.5
    y = ly * Hf - 0.5
    valid = (x > -1.0) & (y > -1.0) & (x < Wf) & (y < Hf)  # NaN fails every comparison
    x = tl.where(valid, x, 0.0)
    y = tl.where(valid, y, 0.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    lxw = x - x0f
    lyw = y - y0f
    hxw = 1.0 - lxw
    hyw = 1.0 - lyw
    return valid, x0f.to(tl.int32), y0f.to(tl.int32), lxw, lyw, hxw, hyw


@triton.jit
def _discrete_pixel(lx, ly, H, W, Hf, Wf, clamp_official):
    """RT-DETRv2 nearest sampling: (inside, iy, ix) with ix already clamped to W - 1."""
    finite = ((lx - lx) == 0.0) & ((ly - ly) == 0.0)  # inf - inf and NaN give NaN
    sx = tl.where(finite, lx, 0.0)
    sy = tl.where(finite, ly, 0.0)
    fx = sx * Wf + 0.5
    fy = sy * Hf + 0.5
    fx = tl.minimum(tl.maximum(fx, -1.0), tl.maximum(Hf, Wf) + 1.0)
    fy = tl.minimum(tl.maximum(fy, -1.0), Hf + 1.0)
    ix = fx.to(tl.int32)  # truncation toward zero, as upstream's .to(torch.int64)
    iy = fy.to(tl.int32)
    x_max = tl.where(clamp_official != 0, H - 1, W - 1)
    ix = tl.minimum(tl.maximum(ix, 0), x_max)
    iy = tl.minimum(tl.maximum(iy, 0), H - 1)
    inside = finite & (ix <= W - 1)
    ix = tl.minimum(ix, W - 1)
    return inside, iy, ix


@triton.jit
def _corner(xi, yi, H, W, valid):
    """(inside, clamped pixel index within the level) of one bilinear corner."""
    inside = valid & (xi >= 0) & (xi <= W - 1) & (yi >= 0) & (yi <= H - 1)
    xc = tl.minimum(tl.maximum(xi, 0), W - 1)
    yc = tl.minimum(tl.maximum(yi, 0), H - 1)
    return inside, yc * W + xc


@triton.jit
def _point_levels(p0, PT, L, lv0, lv1, lv2, lv3, lv4, lv5, lv6, lv7, lv8, lv9, lv10, lv11, lv12, lv13, lv14, lv15,
                  BLOCK_P: tl.constexpr):
    """Per point of the chunk [p0, p0 + BLOCK_P): its level's H, W (int32), first pixel and first
    padded cell (int64). Points of a row are grouped by level (level l owns a contiguous slice)."""
    pp = p0 + tl.arange(0, BLOCK_P)
    pmask = pp < PT
    Hp = tl.full([BLOCK_P], 1, dtype=tl.int32)
    Wp = tl.full([BLOCK_P], 1, dtype=tl.int32)
    lstart_p = tl.zeros([BLOCK_P], dtype=tl.int64)
    padstart_p = tl.zeros([BLOCK_P], dtype=tl.int64)
    zero = tl.sum(lstart_p, axis=0)  # an int64 scalar zero for the loop-carried counters
    pstart = zero
    lstart = zero
    padstart = zero
    for l in range(_trips(L)):
        H64, W64, P = _level_word(l, lv0, lv1, lv2, lv3, lv4, lv5, lv6, lv7, lv8, lv9, lv10, lv11, lv12, lv13, lv14, lv15)
        inl = (pp >= pstart) & (pp < pstart + P)
        Hp = tl.where(inl, H64.to(tl.int32), Hp)
        Wp = tl.where(inl, W64.to(tl.int32), Wp)
        lstart_p = tl.where(inl, lstart, lstart_p)
        padstart_p = tl.where(inl, padstart, padstart_p)
        pstart += P
        lstart += H64 * W64
        padstart += (H64 + 1) * (W64 + 1)
    return pp, pmask, Hp, Wp, lstart_p, padstart_p


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["clamp_official", "lv0", "lv1", "lv2", "lv3", "lv4", "lv5", "lv6", "lv7", "lv8",
                               "lv9", "lv10", "lv11", "lv12", "lv13", "lv14", "lv15"])
def _msda_fwd_kernel(
    value_ptr,  # [N, S, M, D] fp16/bf16/fp32
    loc_ptr,  # [N, Lq, M, PT, 2] value's dtype or fp32
    attw_ptr,  # [N, Lq, M, PT] same dtype as loc
    out_ptr,  # [N, Lq, M, D] value's dtype
    rows, Lq, S, M, D, PT, L, clamp_official,
    lv0, lv1, lv2, lv3, lv4, lv5, lv6, lv7, lv8, lv9, lv10, lv11, lv12, lv13, lv14, lv15,
    METHOD: tl.constexpr,  # 0 bilinear, 1 discrete (the clamp is the runtime flag clamp_official)
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)  # int64 row ids (n, q, m)
    rmask = r < rows
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    d3 = d[None, None, :]
    dmask3 = dmask[None, None, :]
    m = r % M
    n = (r // M) // Lq
    vbase = (n * S * M + m)[:, None]  # value row of (n, pixel 0, m), in units of D
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for p0 in range(0, _trips(PT), BLOCK_P):  # one trip unless a row has more than BLOCK_P points
        pp, pmask, Hp, Wp, lstart_p, _ = _point_levels(p0, PT, L, lv0, lv1, lv2, lv3, lv4, lv5, lv6, lv7, lv8, lv9,
                                                       lv10, lv11, lv12, lv13, lv14, lv15, BLOCK_P)
        H = Hp[None, :]
        W = Wp[None, :]
        Hf = H.to(tl.float32)
        Wf = W.to(tl.float32)
        lstart = lstart_p[None, :]
        pt = r[:, None] * PT + pp[None, :]  # [BLOCK_R, BLOCK_P] flat point ids
        live = rmask[:, None] & pmask[None, :]
        lx = tl.load(loc_ptr + pt * 2, mask=live, other=0.0).to(tl.float32)
        ly = tl.load(loc_ptr + pt * 2 + 1, mask=live, other=0.0).to(tl.float32)
        a = tl.load(attw_ptr + pt, mask=live, other=0.0).to(tl.float32)
        if METHOD == 0:
            valid, x0, y0, lxw, lyw, hxw, hyw = _bilinear_cell(lx, ly, Hf, Wf)
            valid = valid & live
            in00, i00 = _corner(x0, y0, H, W, valid)
            in01, i01 = _corner(x0 + 1, y0, H, W, valid)
            in10, i10 = _corner(x0, y0 + 1, H, W, valid)
            in11, i11 = _corner(x0 + 1, y0 + 1, H, W, valid)
            o00 = (vbase + (lstart + i00) * M) * D
            o01 = (vbase + (lstart + i01) * M) * D
            o10 = (vbase + (lstart + i10) * M) * D
            o11 = (vbase + (lstart + i11) * M) * D
            v00 = tl.load(value_ptr + o00[:, :, None] + d3, mask=in00[:, :, None] & dmask3, other=0.0).to(tl.float32)
            v01 = tl.load(value_ptr + o01[:, :, None] + d3, mask=in01[:, :, None] & dmask3, other=0.0).to(tl.float32)
            v10 = tl.load(value_ptr + o10[:, :, None] + d3, mask=in10[:, :, None] & dmask3, other=0.0).to(tl.float32)
            v11 = tl.load(value_ptr + o11[:, :, None] + d3, mask=in11[:, :, None] & dmask3, other=0.0).to(tl.float32)
            w00 = tl.where(in00, hyw * hxw, 0.0)
            w01 = tl.where(in01, hyw * lxw, 0.0)
            w10 = tl.where(in10, lyw * hxw, 0.0)
            w11 = tl.where(in11, lyw * lxw, 0.0)
            s = w00[:, :, None] * v00
            s = s + w01[:, :, None] * v01
            s = s + w10[:, :, None] * v10
            s = s + w11[:, :, None] * v11
        else:
            inside, iy, ix = _discrete_pixel(lx, ly, H, W, Hf, Wf, clamp_official)
            inside = inside & live
            o = (vbase + (lstart + iy * W + ix) * M) * D
            s = tl.load(value_ptr + o[:, :, None] + d3, mask=inside[:, :, None] & dmask3, other=0.0).to(tl.float32)
        acc += tl.sum(a[:, :, None] * s, axis=1)
    tl.store(out_ptr + r[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


# --------------------------------------------------------------------------------------------
# Backward (one kernel for the three grads)
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["clamp_official", "need_lw", "store_loc", "store_w", "lv0", "lv1", "lv2", "lv3", "lv4", "lv5",
                               "lv6", "lv7", "lv8", "lv9", "lv10", "lv11", "lv12", "lv13", "lv14", "lv15"])
def _msda_bwd_kernel(
    grad_out_ptr,  # [N, Lq, M, D] value's dtype
    value_ptr,  # [N, S, M, D]
    loc_ptr,  # [N, Lq, M, PT, 2] fp32
    attw_ptr,  # [N, Lq, M, PT] fp32
    grad_value_ptr,  # [N, S, M, D] fp32, zero-initialised (NEED_V == 1), else unused
    grad_loc_ptr,  # [N, Lq, M, PT, 2] fp32 (written when store_loc), else unused
    grad_attw_ptr,  # [N, Lq, M, PT] fp32 (written when store_w), else unused
    keys_ptr,  # [N * Lq * M * PT] int64 base-cell keys (NEED_V == 2), else unused
    coef_ptr,  # [N * Lq * M * PT, 4] fp32 corner coefficients a * w_ij (NEED_V == 2), else unused
    rows, Lq, S, M, D, PT, L, Spad, clamp_official,
    need_lw,  # read the corners and reduce <g, .> (store_loc or store_w)
    store_loc, store_w,
    lv0, lv1, lv2, lv3, lv4, lv5, lv6, lv7, lv8, lv9, lv10, lv11, lv12, lv13, lv14, lv15,
    METHOD: tl.constexpr,  # 0 bilinear, 1 discrete
    NEED_V: tl.constexpr,  # 0: no grad_value, 1: fp32 atomics, 2: keys + coefficients (deterministic)
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    dd = tl.arange(0, BLOCK_D)
    m = r % M
    n = (r // M) // Lq
    vbase = (n * S * M + m)[:, None]
    nm = (n * M + m)[:, None]  # the (n, m) grid of the deterministic keys
    for p0 in range(0, _trips(PT), BLOCK_P):
        pp, pmask, Hp, Wp, lstart_p, padstart_p = _point_levels(p0, PT, L, lv0, lv1, lv2, lv3, lv4, lv5, lv6, lv7, lv8,
                                                                lv9, lv10, lv11, lv12, lv13, lv14, lv15, BLOCK_P)
        H = Hp[None, :]
        W = Wp[None, :]
        Hf = H.to(tl.float32)
        Wf = W.to(tl.float32)
        lstart = lstart_p[None, :]
        padstart = padstart_p[None, :]
        pt = r[:, None] * PT + pp[None, :]
        live = rmask[:, None] & pmask[None, :]
        lx = tl.load(loc_ptr + pt * 2, mask=live, other=0.0).to(tl.float32)
        ly = tl.load(loc_ptr + pt * 2 + 1, mask=live, other=0.0).to(tl.float32)
        a = tl.load(attw_ptr + pt, mask=live, other=0.0).to(tl.float32)
        gw = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
        if METHOD == 0:
            valid, x0, y0, lxw, lyw, hxw, hyw = _bilinear_cell(lx, ly, Hf, Wf)
            valid = valid & live
            in00, i00 = _corner(x0, y0, H, W, valid)
            in01, i01 = _corner(x0 + 1, y0, H, W, valid)
            in10, i10 = _corner(x0, y0 + 1, H, W, valid)
            in11, i11 = _corner(x0 + 1, y0 + 1, H, W, valid)
            o00 = (vbase + (lstart + i00) * M) * D
            o01 = (vbase + (lstart + i01) * M) * D
            o10 = (vbase + (lstart + i10) * M) * D
            o11 = (vbase + (lstart + i11) * M) * D
            w00 = tl.where(in00, hyw * hxw, 0.0)
            w01 = tl.where(in01, hyw * lxw, 0.0)
            w10 = tl.where(in10, lyw * hxw, 0.0)
            w11 = tl.where(in11, lyw * lxw, 0.0)
            gx = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
            gy = tl.zeros([BLOCK_R, BLOCK_P], dtype=tl.float32)
            for d0 in range(0, _trips(D), BLOCK_D):  # one trip for D <= BLOCK_D
                d = d0 + dd
                dmask = d < D
                d3 = d[None, None, :]
                dmask3 = dmask[None, None, :]
                g = tl.load(grad_out_ptr + r[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                g = g[:, None, :]
                if need_lw != 0:
                    v00 = tl.load(value_ptr + o00[:, :, None] + d3, mask=in00[:, :, None] & dmask3, other=0.0).to(tl.float32)
                    v01 = tl.load(value_ptr + o01[:, :, None] + d3, mask=in01[:, :, None] & dmask3, other=0.0).to(tl.float32)
                    v10 = tl.load(value_ptr + o10[:, :, None] + d3, mask=in10[:, :, None] & dmask3, other=0.0).to(tl.float32)
                    v11 = tl.load(value_ptr + o11[:, :, None] + d3, mask=in11[:, :, None] & dmask3, other=0.0).to(tl.float32)
                    s = w00[:, :, None] * v00
                    s = s + w01[:, :, None] * v01
                    s = s + w10[:, :, None] * v10
                    s = s + w11[:, :, None] * v11
                    gw += tl.sum(g * s, axis=2)
                    dx = hyw[:, :, None] * (v01 - v00) + lyw[:, :, None] * (v11 - v10)
                    dy = hxw[:, :, None] * (v10 - v00) + lxw[:, :, None] * (v11 - v01)
                    gx += tl.sum(g * dx, axis=2)
                    gy += tl.sum(g * dy, axis=2)
                if NEED_V == 1:
                    ga = a[:, :, None] * g
                    tl.atomic_add(grad_value_ptr + o00[:, :, None] + d3, w00[:, :, None] * ga, mask=in00[:, :, None] & dmask3, sem="relaxed")
                    tl.atomic_add(grad_value_ptr + o01[:, :, None] + d3, w01[:, :, None] * ga, mask=in01[:, :, None] & dmask3, sem="relaxed")
                    tl.atomic_add(grad_value_ptr + o10[:, :, None] + d3, w10[:, :, None] * ga, mask=in10[:, :, None] & dmask3, sem="relaxed")
                    tl.atomic_add(grad_value_ptr + o11[:, :, None] + d3, w11[:, :, None] * ga, mask=in11[:, :, None] & dmask3, sem="relaxed")
            if need_lw != 0:
                gx = tl.where(valid, gx * a * Wf, 0.0)
                gy = tl.where(valid, gy * a * Hf, 0.0)
                lmask = live & (store_loc != 0)
                tl.store(grad_loc_ptr + pt * 2, gx, mask=lmask)
                tl.store(grad_loc_ptr + pt * 2 + 1, gy, mask=lmask)
            if NEED_V == 2:
                cell = (y0 + 1) * (W + 1) + (x0 + 1)
                key = tl.where(valid, nm * Spad + padstart + cell, _SENTINEL)
                tl.store(keys_ptr + pt, key, mask=live)
                tl.store(coef_ptr + pt * 4, a * w00, mask=live)
                tl.store(coef_ptr + pt * 4 + 1, a * w01, mask=live)
                tl.store(coef_ptr + pt * 4 + 2, a * w10, mask=live)
                tl.store(coef_ptr + pt * 4 + 3, a * w11, mask=live)
        else:
            inside, iy, ix = _discrete_pixel(lx, ly, H, W, Hf, Wf, clamp_official)
            inside = inside & live
            o = (vbase + (lstart + iy * W + ix) * M) * D
            for d0 in range(0, _trips(D), BLOCK_D):
                d = d0 + dd
                dmask = d < D
                d3 = d[None, None, :]
                dmask3 = dmask[None, None, :]
                g = tl.load(grad_out_ptr + r[:, None] * D + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
                g = g[:, None, :]
                if need_lw != 0:
                    v = tl.load(value_ptr + o[:, :, None] + d3, mask=inside[:, :, None] & dmask3, other=0.0).to(tl.float32)
                    gw += tl.sum(g * v, axis=2)
                if NEED_V == 1:
                    tl.atomic_add(grad_value_ptr + o[:, :, None] + d3, a[:, :, None] * g, mask=inside[:, :, None] & dmask3, sem="relaxed")
            if NEED_V == 2:
                cell = (iy + 1) * (W + 1) + (ix + 1)
                key = tl.where(inside, nm * Spad + padstart + cell, _SENTINEL)
                tl.store(keys_ptr + pt, key, mask=live)
                tl.store(coef_ptr + pt * 4, a, mask=live)
        if need_lw != 0:
            tl.store(grad_attw_ptr + pt, gw, mask=live & (store_w != 0))


@triton.jit(do_not_specialize=["lv0", "lv1", "lv2", "lv3", "lv4", "lv5", "lv6", "lv7", "lv8", "lv9", "lv10",
                               "lv11", "lv12", "lv13", "lv14", "lv15"])
def _msda_grad_value_gather_kernel(
    grad_out_ptr,  # [N, Lq, M, D] value's dtype
    perm_ptr,  # [NP] int64: point ids (flat over [N, Lq, M, PT]) stably sorted by base-cell key
    offs_ptr,  # [N * M * Spad + 1] int64: first sorted position of every padded cell
    coef_ptr,  # [NP, 4] fp32: a * w_ij of every point
    grad_value_ptr,  # [N, S, M, D] value's dtype, fully written
    S, M, D, PT, L, Spad,
    lv0, lv1, lv2, lv3, lv4, lv5, lv6, lv7, lv8, lv9, lv10, lv11, lv12, lv13, lv14, lv15,
    NUM_CORNERS: tl.constexpr,  # 4 bilinear, 1 discrete
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    nm = tl.program_id(0).to(tl.int64)
    n = nm // M
    m = nm % M
    s = tl.program_id(1).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)  # pixels
    smask = s < S
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    zero = nm * 0
    lstart = zero
    padstart = zero
    pix_start = tl.zeros([BLOCK_S], dtype=tl.int64)
    pix_pad = tl.zeros([BLOCK_S], dtype=tl.int64)
    pix_w = tl.full([BLOCK_S], 1, dtype=tl.int64)
    for l in range(_trips(L)):
        H64, W64, P = _level_word(l, lv0, lv1, lv2, lv3, lv4, lv5, lv6, lv7, lv8, lv9, lv10, lv11, lv12, lv13, lv14, lv15)
        inl = (s >= lstart) & (s < lstart + H64 * W64)
        pix_start = tl.where(inl, lstart, pix_start)
        pix_pad = tl.where(inl, padstart, pix_pad)
        pix_w = tl.where(inl, W64, pix_w)
        lstart += H64 * W64
        padstart += (H64 + 1) * (W64 + 1)
    local = tl.where(smask, s - pix_start, 0)
    yy = local // pix_w
    xx = local - yy * pix_w
    acc = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    for c in tl.static_range(NUM_CORNERS):
        # pixel (yy, xx) is corner (c // 2, c % 2) of the base cell (yy - c // 2, xx - c % 2);
        # padded cell coordinates are base + 1
        cell = nm * Spad + pix_pad + (yy - (c // 2) + 1) * (pix_w + 1) + (xx - (c % 2) + 1)
        lo = tl.load(offs_ptr + cell, mask=smask, other=0)
        hi = tl.load(offs_ptr + cell + 1, mask=smask, other=0)
        cnt = hi - lo
        longest = tl.max(cnt, axis=0)
        for j in range(0, _trips(longest)):
            jmask = smask & (j < cnt)
            point = tl.load(perm_ptr + lo + j, mask=jmask, other=0)
            cf = tl.load(coef_ptr + point * 4 + c, mask=jmask, other=0.0)
            row = point // PT
            g = tl.load(grad_out_ptr + row[:, None] * D + d[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc += cf[:, None] * g
    out = grad_value_ptr + ((n * S + s) * M + m)[:, None] * D + d[None, :]
    tl.store(out, acc.to(grad_value_ptr.dtype.element_ty), mask=smask[:, None] & dmask[None, :])


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def why_not(call) -> Optional[str]:
    """None when these kernels can serve ``call`` (a backends.Call), else the reason."""
    value_dtype = call.dtypes[0] if call.dtypes else torch.float32
    if value_dtype not in _KERNEL_DTYPES:
        return f"the Triton MSDA kernels support float16, bfloat16 and float32 values, got {value_dtype} (use the cpu or reference backend for float64)"
    if call.device_type == "cpu" and backends.triton_interpreter() and torch.bfloat16 in tuple(call.dtypes):
        return "bfloat16 is computed wrongly by the Triton interpreter (CPU tensors); use a GPU for bfloat16"
    levels = call.option("levels", 1)
    if levels is not None and levels > MAX_LEVELS:
        return f"at most {MAX_LEVELS} levels are supported, got {levels}"
    method = call.option("method", BILINEAR)
    if method not in (BILINEAR, DISCRETE_PER_AXIS, DISCRETE_OFFICIAL):
        return f"unknown method code {method!r}"
    return None


def _level_words(spatial_shapes: Sequence[int], points_per_level: Sequence[int]) -> Tuple[int, ...]:
    return _level_words_cached(tuple(int(s) for s in spatial_shapes), tuple(int(p) for p in points_per_level))


@functools.lru_cache(maxsize=256)
def _level_words_cached(spatial_shapes: Tuple[int, ...], points_per_level: Tuple[int, ...]) -> Tuple[int, ...]:
    L = len(points_per_level)
    if L > MAX_LEVELS or len(spatial_shapes) != 2 * L:
        raise ValueError(f"spatial_shapes/points_per_level: expected at most {MAX_LEVELS} levels with one (H, W) pair each, "
                         f"got {len(spatial_shapes)} sizes and {L} point counts")
    limit = 1 << _META_BITS
    words = []
    for l in range(MAX_LEVELS):
        if l < L:
            H, W, P = int(spatial_shapes[2 * l]), int(spatial_shapes[2 * l + 1]), int(points_per_level[l])
            if not (0 < H < limit and 0 < W < limit and 0 < P < limit):
                raise ValueError(f"spatial_shapes[{l}] = ({H}, {W}) with {P} points: the Triton MSDA kernels need "
                                 f"0 < H, W, points < {limit}")
            words.append(_META_MARK | (H << 40) | (W << 20) | P)
        else:
            words.append(_META_MARK)
    return tuple(words)


def _block_d(D: int) -> int:
    return _BLOCK_DS[0] if D <= _BLOCK_DS[0] else _BLOCK_DS[1]


def _block_p(PT: int) -> int:
    return _BLOCK_PS[0] if PT <= _BLOCK_PS[0] else _BLOCK_PS[1]


def _tile(block_p: int, block_d: int) -> Tuple[int, int]:
    """(BLOCK_R, num_warps) of the forward and backward for a (BLOCK_P, BLOCK_D) tile."""
    block_r = max(1, _TILE // (block_p * block_d))
    elems = block_r * block_p * block_d
    return block_r, max(1, min(8, elems // 128))


def _kernel_inputs(value, loc, weights):
    """Locations and weights as the kernels take them: both value's dtype or both float32
    (other combinations are cast up to float32, which loses nothing: the math is float32)."""
    if loc.dtype == weights.dtype and loc.dtype in (value.dtype, torch.float32):
        return loc, weights
    return loc.float(), weights.float()


def _launch_opts() -> dict:
    return {} if backends.triton_interpreter() else {"enable_fp_fusion": False}


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device; make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def forward(value, sampling_locations, attention_weights, spatial_shapes, points_per_level, method):
    N, S, M, D = value.shape
    Lq, PT = sampling_locations.shape[1], sampling_locations.shape[3]
    out = value.new_empty(N, Lq, M, D)
    rows = N * Lq * M
    if out.numel() == 0:
        return out
    words = _level_words(spatial_shapes, points_per_level)
    loc, w = _kernel_inputs(value, sampling_locations, attention_weights)
    block_d, block_p = _block_d(D), _block_p(PT)
    block_r, warps = _tile(block_p, block_d)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(D, block_d))
    with _device_guard(value):
        _msda_fwd_kernel[grid](
            value, loc, w, out, rows, Lq, S, M, D, PT, len(points_per_level), int(method == DISCRETE_OFFICIAL), *words,
            METHOD=_K_BILINEAR if method == BILINEAR else _K_DISCRETE, BLOCK_R=block_r, BLOCK_P=block_p,
            BLOCK_D=block_d, num_warps=warps, **_launch_opts())
    return out


def _empty(t):
    return t.new_empty(0)


def backward(grad_output, value, sampling_locations, attention_weights, spatial_shapes, points_per_level, method,
             need_value, need_locations, need_weights, deterministic):
    with _device_guard(value):
        return _backward(grad_output, value, sampling_locations, attention_weights, spatial_shapes, points_per_level,
                         method, need_value, need_locations, need_weights, deterministic)


def _backward(grad_output, value, sampling_locations, attention_weights, spatial_shapes, points_per_level, method,
              need_value, need_locations, need_weights, deterministic):
    N, S, M, D = value.shape
    Lq, PT = sampling_locations.shape[1], sampling_locations.shape[3]
    L = len(points_per_level)
    rows = N * Lq * M
    bilinear = method == BILINEAR
    grad_value = _empty(value)
    grad_loc = _empty(sampling_locations)
    grad_w = _empty(attention_weights)
    if need_locations and not bilinear:  # nearest sampling: defined, zero location gradient
        grad_loc = torch.zeros_like(sampling_locations)
    if rows == 0:
        if need_value:
            grad_value = torch.zeros_like(value)
        if need_locations:
            grad_loc = torch.zeros_like(sampling_locations)
        if need_weights:
            grad_w = torch.zeros_like(attention_weights)
        return grad_value, grad_loc, grad_w
    store_loc = bool(need_locations and bilinear)
    store_w = bool(need_weights)
    if not (need_value or store_loc or store_w):
        return grad_value, grad_loc, grad_w

    words = _level_words(spatial_shapes, points_per_level)
    # the backward takes float32 locations and weights (AMP's layout; the cast is tiny otherwise)
    loc, w = sampling_locations.float(), attention_weights.float()
    g = grad_output if grad_output.dtype == value.dtype else grad_output.to(value.dtype)
    g = g.contiguous()
    dev = value.device
    spad = sum((spatial_shapes[2 * l] + 1) * (spatial_shapes[2 * l + 1] + 1) for l in range(L))

    need_v = 0 if not need_value else (2 if deterministic else 1)
    gv_buf = torch.zeros(value.shape, dtype=torch.float32, device=dev) if need_v == 1 else value
    gl_buf = torch.empty_like(loc) if store_loc else loc
    gw_buf = torch.empty_like(w) if store_w else w
    if need_v == 2:
        keys = torch.empty(rows * PT, dtype=torch.int64, device=dev)
        coef = torch.empty(rows * PT, 4, dtype=torch.float32, device=dev)
    else:
        keys = torch.empty(1, dtype=torch.int64, device=dev)
        coef = torch.empty(1, 4, dtype=torch.float32, device=dev)
    if store_loc or store_w or need_v:
        block_d, block_p = _block_d(D), _block_p(PT)
        block_r, warps = _tile(block_p, block_d)
        grid = (triton.cdiv(rows, block_r),)
        _msda_bwd_kernel[grid](
            g, value, loc, w, gv_buf, gl_buf, gw_buf, keys, coef,
            rows, Lq, S, M, D, PT, L, spad, int(method == DISCRETE_OFFICIAL), int(store_loc or store_w),
            int(store_loc), int(store_w), *words,
            METHOD=_K_BILINEAR if bilinear else _K_DISCRETE, NEED_V=need_v,
            BLOCK_R=block_r, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=warps, **_launch_opts())
    if need_v == 1:
        grad_value = gv_buf if value.dtype == torch.float32 else gv_buf.to(value.dtype)
    elif need_v == 2:
        grad_value = _grad_value_deterministic(g, value, keys, coef, N, S, M, D, PT, L, spad, words, bilinear)
    if store_loc:
        grad_loc = gl_buf if gl_buf.dtype == sampling_locations.dtype else gl_buf.to(sampling_locations.dtype)
    if store_w:
        grad_w = gw_buf if gw_buf.dtype == attention_weights.dtype else gw_buf.to(attention_weights.dtype)
    return grad_value, grad_loc, grad_w


def _grad_value_deterministic(g, value, keys, coef, N, S, M, D, PT, L, spad, words, bilinear):
    """grad_value without float atomics: sort points by base cell, then gather per value pixel."""
    sorted_keys, perm = torch.sort(keys, stable=True)
    num_cells = N * M * spad
    bounds = torch.arange(num_cells + 1, dtype=torch.int64, device=keys.device)
    offs = torch.searchsorted(sorted_keys, bounds)
    grad_value = torch.empty_like(value)
    block_d = _block_d(D)
    block_s = _GATHER_TILE // block_d
    grid = (N * M, triton.cdiv(S, block_s), triton.cdiv(D, block_d))
    _msda_grad_value_gather_kernel[grid](
        g, perm, offs, coef, grad_value, S, M, D, PT, L, spad, *words,
        NUM_CORNERS=4 if bilinear else 1, BLOCK_S=block_s, BLOCK_D=block_d, num_warps=4, **_launch_opts())
    return grad_value


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# --------------------------------------------------------------------------------------------

_TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_LV = {f"lv{i}": "i64" for i in range(MAX_LEVELS)}


def _dtype_pairs():
    """(value dtype, loc/weights dtype) pairs the host code can hand to the kernels."""
    pairs = []
    for v in _KERNEL_DTYPES:
        pairs.append((v, v))
        if v != torch.float32:
            pairs.append((v, torch.float32))
    return pairs


def aot_specs() -> list:
    """(name, jit_fn, signature, constexprs) for every kernel configuration the host code can launch:
    forward: 5 (value, loc/weights) dtype pairs x 2 methods x 2 BLOCK_P x 2 BLOCK_D; backward: 3 value
    dtypes (fp32 locations) x 2 methods x 3 grad_value modes x 2 BLOCK_P x 2 BLOCK_D; gather: 3 x 2 x 2.
    BLOCK_R follows from (BLOCK_P, BLOCK_D)."""
    specs = []
    common = {"rows": "i32", "Lq": "i32", "S": "i32", "M": "i32", "D": "i32", "PT": "i32", "L": "i32"}
    tiles = [(bp, bd) + _tile(bp, bd) for bp in _BLOCK_PS for bd in _BLOCK_DS]
    for vd, ld in _dtype_pairs():
        v, lw = _TL_NAMES[vd], _TL_NAMES[ld]
        for method in (_K_BILINEAR, _K_DISCRETE):
            for bp, bd, br, _ in tiles:
                const = {"METHOD": method, "BLOCK_R": br, "BLOCK_P": bp, "BLOCK_D": bd}
                sig = {"value_ptr": f"*{v}", "loc_ptr": f"*{lw}", "attw_ptr": f"*{lw}", "out_ptr": f"*{v}",
                       **common, "clamp_official": "i32", **_LV}
                specs.append((f"msda_fwd[{v}-{lw},m{method},p{bp},d{bd}]", _msda_fwd_kernel, sig, const))
    for vd in _KERNEL_DTYPES:
        v = _TL_NAMES[vd]
        for method in (_K_BILINEAR, _K_DISCRETE):
            for need_v in (0, 1, 2):
                for bp, bd, br, _ in tiles:
                    const = {"METHOD": method, "NEED_V": need_v, "BLOCK_R": br, "BLOCK_P": bp, "BLOCK_D": bd}
                    sig = {"grad_out_ptr": f"*{v}", "value_ptr": f"*{v}", "loc_ptr": "*fp32", "attw_ptr": "*fp32",
                           "grad_value_ptr": "*fp32" if need_v == 1 else f"*{v}",
                           "grad_loc_ptr": "*fp32", "grad_attw_ptr": "*fp32", "keys_ptr": "*i64", "coef_ptr": "*fp32",
                           **common, "Spad": "i32", "clamp_official": "i32", "need_lw": "i32", "store_loc": "i32",
                           "store_w": "i32", **_LV}
                    specs.append((f"msda_bwd[{v},m{method},v{need_v},p{bp},d{bd}]", _msda_bwd_kernel, sig, const))
        for corners in (4, 1):
            for block_d in _BLOCK_DS:
                const = {"NUM_CORNERS": corners, "BLOCK_S": _GATHER_TILE // block_d, "BLOCK_D": block_d}
                sig = {"grad_out_ptr": f"*{v}", "perm_ptr": "*i64", "offs_ptr": "*i64", "coef_ptr": "*fp32",
                       "grad_value_ptr": f"*{v}", "S": "i32", "M": "i32", "D": "i32", "PT": "i32", "L": "i32",
                       "Spad": "i32", **_LV}
                specs.append((f"msda_grad_value_gather[{v},c{corners},d{block_d}]", _msda_grad_value_gather_kernel, sig, const))
    return specs
