"""Triton kernels for top-K selection: rank keys, a per-image radix select with a sorted finish, row gathers.

The order is the reference's (``reference.rank_key``): descending, NaN lowest, -0.0 == +0.0, equal scores
by lower index. Every score is read as float32 (exact for every served dtype) and mapped to an
order-preserving int32 key: the IEEE bits, with the magnitude bits of negative values flipped, NaN set
to INT32_MIN. As uint32 (sign bit flipped) the keys order like the scores.

Kernels
-------
1. ``_keys_kernel``, grid (token blocks, N): each program reads a [BLOCK_T, C] tile of logits (any
   strides; classes in chunks of BLOCK_C), takes the class max and its first class (a NaN counts as
   the max, as ``torch.max``), and writes the token's key and class (int32). The post-processor form
   (``pairs``) runs it on the [N, T * C, 1] view: every (token, class) pair is a candidate (its class
   is written as the candidate index modulo C).
2. ``_select_kernel``, one program per image: finds the k-th largest key by a radix select, 8 bits a
   pass from the top (4 passes; each a ``tl.histogram`` of the digit over the keys that share the
   prefix found so far, in chunks of CHUNK keys: T int32 keys, L1/L2-resident). It knows then the
   threshold key and how many keys equal to it get in; one compaction pass writes the keys above it
   and the lowest-indexed equal ones (exactly k) as packed int64 words
   ``key << 32 | (2^32 - 1 - index)`` into a [N, k] workspace (positions from prefix sums: the
   result is deterministic), and the program reads them back (after a barrier) and ranks them: a
   word's rank is the number of larger words (the words are unique, so the ranks are the exact
   order; a [RANK_I, RANK_J] compare tile a step, loops bounded by k, so one compiled kernel serves
   every k). This rank sort compiles in a fraction of the time of ``tl.sort``'s bitonic network (whose
   width must be a constexpr: one kernel per width, 144 s to compile at 4096 here), and runs under the
   interpreter in milliseconds where tl.sort takes about a second a program. It
   writes scores (the logits' entries, copied as 16- or 32-bit words, so fp16 and bf16 share one
   compiled kernel), indices and classes. k > MAX_SORT (2048): the kernel only compacts; the k words
   are sorted with ``torch.sort`` and ``_emit_kernel`` unpacks them.
   The select reads T * 4 bytes a pass, against the T * C * itemsize the class max reads once, so
   the kernel that needs many programs per image is the first one; the select stays one program per
   image (a multi-program histogram needs a launch, or a grid-wide barrier, per pass, which costs
   more than it saves at RT-DETR's sizes).
3. ``_rows_kernel``: the gathers, every source in one launch (up to four per launch). Rows are moved as
   int32 words (a [N, T, *] tensor whose trailing dims are contiguous and a multiple of 4 bytes is
   viewed as [N, T, W] int32 words), so one compiled kernel serves every dtype; other sources (odd
   fp16 widths, bool rows, non-contiguous trailing dims) are gathered by ``torch.gather``. With
   SCATTER it moves rows the other way: the backward writes each gathered gradient row back at its
   token into zeros. Indices are distinct within an image, so this is deterministic by construction.

Backward: the scores' gradient goes to the chosen class entry of a zero [N, T, C] (``torch.scatter_``,
one launch); the gathered gradients are scattered back by ``_rows_kernel`` (the post-processor form,
where a query can be chosen for several classes, accumulates with ``index_put_``, deterministic).

Configurations (all listed in ``aot_specs``): keys: logits dtype x BLOCK_C in {1, 8, 32, 128};
select: 16/32-bit score words x (ranked, or compaction only); emit: words; rows: 1..4 sources x
BLOCK_W in {4, 32, 128} x gather/scatter.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from .. import backends
from .reference import gather_tokens, scores_grad, token_index

MAX_SORT = 2048  # widest in-kernel sort; larger k are sorted with torch.sort
_BLOCK_CS = (1, 8, 32, 128)
_SELECT_WARPS = 8
_EMIT_BLOCK = 1024
_KEYS_TILE = 4096  # BLOCK_T * BLOCK_C
_CHUNK = 4096  # keys per step of the select
_BLOCK_WS = (4, 32, 128)
_ROWS_TILE = 2048  # BLOCK_R * BLOCK_W
_MAX_SLOTS = 4
_RANK_I = 128  # words ranked a step
_RANK_J = 8  # words compared with them a step (on a GPU)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _trips(n):
    """A loop bound that is a runtime argument, as ``range`` takes it: compiled, ``n`` itself."""
    return n


if not isinstance(_trips, triton.runtime.JITFunction):
    # Under TRITON_INTERPRET a scalar is a 1-element array, and triton 3.6's interpreter turns a tensor
    # loop bound into an int with int(array), which numpy >= 2.4 rejects; the interpreter runs kernels
    # as Python, so give it an int.
    def _trips(n):  # noqa: F811
        return int(n.handle.data.reshape(-1)[0]) if isinstance(n, tl.tensor) else int(n)


# --------------------------------------------------------------------------------------------
# Kernel 1: keys
# --------------------------------------------------------------------------------------------


@triton.jit
def _order_key(x):
    """float32 -> int32 whose signed order is x's order (-0.0 and +0.0 one key; NaN not handled)."""
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(x == 0.0, 0, key)


@triton.jit
def _keys_kernel(logits_ptr, keys_ptr, cls_ptr, T, C, pair_c, s_n, s_t, s_c, BLOCK_T: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """Keys and classes of T candidates; ``pair_c``: 1, or the class count of the pairs view (whose
    candidate t is the pair (t // pair_c, t % pair_c))."""
    pid_t = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    row = logits_ptr + n * s_n + t.to(tl.int64)[:, None] * s_t
    cols = tl.arange(0, BLOCK_C)
    best = tl.full([BLOCK_T], -2147483648, tl.int32)  # below every key
    best_c = tl.zeros([BLOCK_T], tl.int32)
    for c0 in range(0, _trips(C), BLOCK_C):
        c = c0 + cols
        ok = t_ok[:, None] & (c < C)[None, :]
        x = tl.load(row + c.to(tl.int64)[None, :] * s_c, mask=ok, other=0.0).to(tl.float32)
        key = _order_key(x)
        key = tl.where(x != x, 2147483647, key)  # NaN is the max (torch.max propagates it)
        key = tl.where(ok, key, -2147483648)
        chunk_best = tl.max(key, axis=1)
        chunk_c = tl.min(tl.where(key == chunk_best[:, None], c[None, :], 2147483647), axis=1)
        better = chunk_best > best  # strictly: an earlier chunk keeps its ties
        best_c = tl.where(better, chunk_c, best_c)
        best = tl.where(better, chunk_best, best)
    rank = tl.where(best == 2147483647, -2147483648, best)  # NaN ranks lowest
    tl.store(keys_ptr + n * T + t, rank, mask=t_ok)
    tl.store(cls_ptr + n * T + t, best_c + t % pair_c, mask=t_ok)


# --------------------------------------------------------------------------------------------
# Kernel 2: radix select, compaction, rank sort
# --------------------------------------------------------------------------------------------


@triton.jit
def _emit(packed, j, j_ok, n, logits_ptr, cls_ptr, scores_ptr, idx_ptr, classes_ptr, T, k, pair_c, s_n, s_t, s_c):
    """Unpack words (to ranks j) into scores, indices and classes."""
    cand = (~packed) & tl.full([1], 4294967295, tl.int64)  # the candidate index (the low word holds 2^32 - 1 - it)
    cand = tl.where(j_ok, cand, 0)
    tok = cand // pair_c
    cls = tl.load(cls_ptr + n * T + cand, mask=j_ok, other=0).to(tl.int64)
    score = tl.load(logits_ptr + n * s_n + tok * s_t + cls * s_c, mask=j_ok)
    out = n * k + j
    tl.store(scores_ptr + out, score, mask=j_ok)
    tl.store(idx_ptr + out, tok, mask=j_ok)
    tl.store(classes_ptr + out, cls, mask=j_ok)


@triton.jit
def _select_kernel(keys_ptr, cls_ptr, logits_ptr, work_ptr, scores_ptr, idx_ptr, classes_ptr, T, k, pair_c,
                   s_n, s_t, s_c, CHUNK: tl.constexpr, SORT: tl.constexpr, RANK_I: tl.constexpr,
                   RANK_J: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    base = n * T
    lanes = tl.arange(0, CHUNK)
    # loop bounds as range(_trips(...)) at each loop: triton 3.6's interpreter turns a bound kept in a
    # variable back into a tensor inside another loop
    # the k-th largest key, a radix select from the top, 8 bits a pass: the digit histogram of the keys
    # that share the prefix found so far (tl.histogram has no mask in older triton: keys off the prefix
    # are counted in bin 0 and taken out again)
    bins = tl.arange(0, 256)
    prefix = tl.zeros([1], tl.uint32)
    prefix_mask = tl.zeros([1], tl.uint32)  # the bits of the prefix found so far
    need = tl.zeros([1], tl.int32) + k  # keys still to choose among those with the prefix
    for p in range(4):  # a loop, not unrolled: one copy of the pass in the binary
        shift = tl.full([1], 24, tl.uint32) - (8 * p)
        hist = tl.zeros([256], tl.int32)
        for i in range(_trips(tl.cdiv(T, CHUNK))):
            offs = i * CHUNK + lanes
            ok = offs < T
            u = tl.load(keys_ptr + base + offs, mask=ok, other=0).to(tl.uint32, bitcast=True) ^ 0x80000000
            match = ok & ((u & prefix_mask) == prefix)
            digit = tl.where(match, ((u >> shift) & 255).to(tl.int32), 0)
            off = CHUNK - tl.sum(match.to(tl.int32), axis=0)
            hist += tl.histogram(digit, 256) - tl.where(bins == 0, off, 0)
        above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0)  # keys with the prefix and a larger digit
        pick = (above < need) & (above + hist >= need)
        prefix = prefix | (tl.sum(tl.where(pick, bins, 0), axis=0).to(tl.uint32) << shift)
        prefix_mask = prefix_mask | (tl.full([1], 255, tl.uint32) << shift)
        need = need - tl.sum(tl.where(pick, above, 0), axis=0)
    thr = prefix
    room = need  # keys equal to thr that get in (the k - room above it all do)
    # compaction: every key above thr, then the lowest-indexed keys equal to it, k in all
    taken = tl.zeros([1], tl.int32)
    equal = tl.zeros([1], tl.int32)
    for i in range(_trips(tl.cdiv(T, CHUNK))):
        offs = i * CHUNK + lanes
        ok = offs < T
        u = tl.load(keys_ptr + base + offs, mask=ok, other=0).to(tl.uint32, bitcast=True) ^ 0x80000000
        eq = (ok & (u == thr)).to(tl.int32)
        eq_before = tl.cumsum(eq, axis=0) - eq + equal
        take = ((ok & (u > thr)) | ((eq != 0) & (eq_before < room))).to(tl.int32)
        pos = tl.cumsum(take, axis=0) - take + taken
        signed = (u ^ 0x80000000).to(tl.int32, bitcast=True).to(tl.int64)
        packed = (signed << 32) | (tl.full([1], 4294967295, tl.int64) - offs.to(tl.int64))
        tl.store(work_ptr + n * k + pos, packed, mask=take != 0)
        taken += tl.sum(take, axis=0)
        equal += tl.sum(eq, axis=0)
    if SORT:  # rank sort: a word's rank is the number of larger words (they are unique)
        tl.debug_barrier()  # the workspace writes above are visible to the whole program
        for bi in range(_trips(tl.cdiv(k, RANK_I))):
            ri = bi * RANK_I + tl.arange(0, RANK_I)
            ri_ok = ri < k
            words = tl.load(work_ptr + n * k + ri, mask=ri_ok, other=-9223372036854775808)
            rank = tl.zeros([RANK_I], tl.int32)
            for bj in range(_trips(tl.cdiv(k, RANK_J))):
                rj = bj * RANK_J + tl.arange(0, RANK_J)
                other = tl.load(work_ptr + n * k + rj, mask=rj < k, other=-9223372036854775808)
                rank += tl.sum((other[None, :] > words[:, None]).to(tl.int32), axis=1)
            _emit(words, rank, ri_ok, n, logits_ptr, cls_ptr, scores_ptr, idx_ptr, classes_ptr, T, k, pair_c,
                  s_n, s_t, s_c)


@triton.jit
def _emit_kernel(work_ptr, cls_ptr, logits_ptr, scores_ptr, idx_ptr, classes_ptr, T, k, pair_c, s_n, s_t, s_c,
                 BLOCK: tl.constexpr):
    """The finish of k > MAX_SORT: the workspace's words, sorted by torch.sort, unpacked."""
    n = tl.program_id(1).to(tl.int64)
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    j_ok = j < k
    words = tl.load(work_ptr + n * k + j, mask=j_ok, other=0)
    _emit(words, j, j_ok, n, logits_ptr, cls_ptr, scores_ptr, idx_ptr, classes_ptr, T, k, pair_c, s_n, s_t, s_c)


# --------------------------------------------------------------------------------------------
# Kernel 3: row gathers / scatters
# --------------------------------------------------------------------------------------------


@triton.jit
def _move_rows(big_ptr, small_ptr, n, tok, r, r_ok, s_n, s_t, W, BLOCK_W: tl.constexpr, SCATTER: tl.constexpr):
    """Rows of int32 words between big [N, T, W] (strides s_n, s_t, 1) and small [N * k, W] (contiguous)."""
    big_row = big_ptr + n * s_n + tok * s_t
    small_row = small_ptr + r.to(tl.int64) * W
    lanes = tl.arange(0, BLOCK_W)
    for w0 in range(0, _trips(W), BLOCK_W):
        w = w0 + lanes
        ok = r_ok[:, None] & (w < W)[None, :]
        if SCATTER:
            v = tl.load(small_row[:, None] + w[None, :], mask=ok)
            tl.store(big_row[:, None] + w[None, :], v, mask=ok)
        else:
            v = tl.load(big_row[:, None] + w[None, :], mask=ok)
            tl.store(small_row[:, None] + w[None, :], v, mask=ok)


@triton.jit
def _rows_kernel(idx_ptr, rows, k,
                 big0, small0, sn0, st0, w0,
                 big1, small1, sn1, st1, w1,
                 big2, small2, sn2, st2, w2,
                 big3, small3, sn3, st3, w3,
                 NUM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr, SCATTER: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < rows
    tok = tl.load(idx_ptr + r, mask=r_ok, other=0)
    n = (r // k).to(tl.int64)
    _move_rows(big0, small0, n, tok, r, r_ok, sn0, st0, w0, BLOCK_W, SCATTER)
    if NUM > 1:
        _move_rows(big1, small1, n, tok, r, r_ok, sn1, st1, w1, BLOCK_W, SCATTER)
    if NUM > 2:
        _move_rows(big2, small2, n, tok, r, r_ok, sn2, st2, w2, BLOCK_W, SCATTER)
    if NUM > 3:
        _move_rows(big3, small3, n, tok, r, r_ok, sn3, st3, w3, BLOCK_W, SCATTER)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def why_not(call) -> Optional[str]:
    """None when these kernels can serve ``call`` (a backends.Call), else the reason."""
    dtype = call.dtypes[0] if call.dtypes else torch.float32
    if dtype not in _KERNEL_DTYPES:
        return f"the Triton top-k kernels rank float16, bfloat16 and float32 scores, got {dtype} (use the cpu or reference backend for float64)"
    return None


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _block_c(C: int) -> int:
    return next((b for b in _BLOCK_CS if b >= C), _BLOCK_CS[-1])


def _rank_j() -> int:
    """Columns of the rank sort's [RANK_I, RANK_J] compare tile: narrow on a GPU (registers), wide under
    the interpreter (numpy: fewer steps)."""
    return 128 if backends.triton_interpreter() else _RANK_J


def _block_w(W: int) -> int:
    return next((b for b in _BLOCK_WS if b >= W), _BLOCK_WS[-1])


def _words(t: torch.Tensor) -> Optional[torch.Tensor]:
    """t [N, T, *] as a [N, T, W] int32 view (trailing dims contiguous, a whole number of words), or None."""
    N, T = t.shape[:2]
    row = 1
    for s in t.shape[2:]:
        row *= s
    if (row * t.element_size()) % 4 or row == 0:
        return None
    try:
        v = t.view(N, T, row)
        if row == 1:  # a size-1 last dim: any stride will do, torch's dtype view wants 1
            v = v.as_strided((N, T, 1), (v.stride(0), v.stride(1), 1))
        elif v.stride(2) != 1:
            return None
        return v.view(torch.int32)
    except RuntimeError:  # not viewable as rows, or strides not in whole words
        return None


def _move(pairs_list, indices: torch.Tensor, k: int, scatter: bool) -> None:
    """One _rows_kernel launch per up-to-four (big [N, T, W], small [N * k, W]) word views."""
    rows = indices.numel()
    for start in range(0, len(pairs_list), _MAX_SLOTS):
        group = pairs_list[start:start + _MAX_SLOTS]
        block_w = _block_w(max(big.shape[2] for big, _ in group))
        block_r = _ROWS_TILE // block_w
        args = []
        for big, small in group:
            args += [big, small, big.stride(0), big.stride(1), big.shape[2]]
        for _ in range(_MAX_SLOTS - len(group)):
            args += list(args[:5])
        grid = (triton.cdiv(rows, block_r),)
        _rows_kernel[grid](indices, rows, k, *args, NUM=len(group), BLOCK_R=block_r, BLOCK_W=block_w, SCATTER=scatter,
                           num_warps=4)


def _gather(sources: Sequence[torch.Tensor], indices: torch.Tensor) -> List[torch.Tensor]:
    N, k = indices.shape
    outs: List[Optional[torch.Tensor]] = [None] * len(sources)
    moves = []
    for i, src in enumerate(sources):
        out = src.new_empty(N, k, *src.shape[2:])
        big = _words(src)
        if big is None or indices.numel() == 0:
            outs[i] = gather_tokens(src, indices) if indices.numel() else out
            continue
        outs[i] = out
        moves.append((big, out.view(N * k, -1).view(torch.int32)))
    if moves:
        _move(moves, indices, k, scatter=False)
    return outs


def forward(logits: torch.Tensor, k: int, gather: Sequence[torch.Tensor], pairs: bool):
    N, T, C = logits.shape
    dev = logits.device
    scores = logits.new_empty(N, k)
    indices = torch.empty(N, k, dtype=torch.int64, device=dev)
    classes = torch.empty(N, k, dtype=torch.int64, device=dev)
    if N == 0:
        return scores, indices, classes, [t.new_empty(0, k, *t.shape[2:]) for t in gather]
    with _device_guard(logits):
        if pairs:
            view, TT, CC = logits.reshape(N, T * C, 1), T * C, 1
        else:
            view, TT, CC = logits, T, C
        keys = torch.empty(N, TT, dtype=torch.int32, device=dev)
        cls = torch.empty(N, TT, dtype=torch.int32, device=dev)
        pair_c = C if pairs else 1
        block_c = _block_c(CC)
        block_t = _KEYS_TILE // block_c
        _keys_kernel[(triton.cdiv(TT, block_t), N)](view, keys, cls, TT, CC, pair_c, view.stride(0), view.stride(1),
                                                     view.stride(2), BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
        work = torch.empty(N, k, dtype=torch.int64, device=dev)
        sort = k <= MAX_SORT
        strides = (logits.stride(0), logits.stride(1), logits.stride(2))
        # scores are copied, never computed: the kernels move them as 16- or 32-bit words (one compiled
        # select serves fp16 and bf16)
        word = torch.int16 if logits.element_size() == 2 else torch.int32
        logits_w, scores_w = logits.view(word), scores.view(word)
        _select_kernel[(N,)](keys, cls, logits_w, work, scores_w, indices, classes, TT, k, pair_c, *strides,
                             CHUNK=_CHUNK, SORT=sort, RANK_I=_RANK_I, RANK_J=_rank_j(), num_warps=_SELECT_WARPS)
        if not sort:
            work = torch.sort(work, dim=1, descending=True).values
            _emit_kernel[(triton.cdiv(k, _EMIT_BLOCK), N)](work, cls, logits_w, scores_w, indices, classes, TT, k,
                                                          pair_c, *strides, BLOCK=_EMIT_BLOCK, num_warps=4)
        gathered = _gather(gather, indices)
    return scores, indices, classes, gathered


def backward(grad_scores, indices, classes, grad_gathered, num_tokens, num_classes, pairs, need_logits, need_gather,
             deterministic):
    N, k = indices.shape
    T, C = num_tokens, num_classes
    if need_logits:
        grad_logits = scores_grad(grad_scores, indices, classes, T, C)
    else:
        grad_logits = grad_scores.new_empty(0)
    grads: List[torch.Tensor] = []
    moves = []
    with _device_guard(indices):
        for grad, need in zip(grad_gathered, need_gather):
            if not need:
                grads.append(grad.new_empty(0))
                continue
            rest = grad.shape[2:]
            out = grad.new_zeros(N, T, *rest)
            grads.append(out)
            if N * k == 0:
                continue
            if pairs:  # a token chosen for several classes: its gradients add up (deterministically)
                rows = torch.arange(N, device=indices.device).unsqueeze(1).expand_as(indices)
                out.index_put_((rows, indices), grad, accumulate=True)
                continue
            big = _words(out)
            if big is None:
                out.scatter_(1, token_index(indices, rest), grad)
                continue
            small = grad.contiguous().view(N * k, -1)
            moves.append((big, small.view(torch.int32)))
        if moves:
            _move(moves, indices, k, scatter=True)
    return grad_logits, grads


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# --------------------------------------------------------------------------------------------

_TL_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def aot_specs() -> list:
    """(name, jit_fn, signature, constexprs, options) for every kernel configuration the host code can launch:
    keys: 3 dtypes x 4 BLOCK_C; select: 16/32-bit score words x (ranked, compaction only); emit: words;
    rows: 1..4 sources x 3 BLOCK_W x gather/scatter."""
    specs = []
    for dtype in _KERNEL_DTYPES:
        d = _TL_NAMES[dtype]
        for block_c in _BLOCK_CS:
            sig = {"logits_ptr": f"*{d}", "keys_ptr": "*i32", "cls_ptr": "*i32", "T": "i32", "C": "i32", "pair_c": "i32",
               "s_n": "i32",
                   "s_t": "i32", "s_c": "i32"}
            specs.append((f"topk_keys[{d},c{block_c}]", _keys_kernel, sig,
                          {"BLOCK_T": _KEYS_TILE // block_c, "BLOCK_C": block_c}, {"num_warps": 4}))
    common = {"T": "i32", "k": "i32", "pair_c": "i32", "s_n": "i32", "s_t": "i32", "s_c": "i32"}
    for w in ("i16", "i32"):
        sig = {"keys_ptr": "*i32", "cls_ptr": "*i32", "logits_ptr": f"*{w}", "work_ptr": "*i64",
               "scores_ptr": f"*{w}", "idx_ptr": "*i64", "classes_ptr": "*i64", **common}
        for sort in (True, False):
            specs.append((f"topk_select[{w},{'sort' if sort else 'nosort'}]", _select_kernel, sig,
                          {"CHUNK": _CHUNK, "SORT": sort, "RANK_I": _RANK_I, "RANK_J": _RANK_J},
                          {"num_warps": _SELECT_WARPS}))
        sig = {"work_ptr": "*i64", "cls_ptr": "*i32", "logits_ptr": f"*{w}", "scores_ptr": f"*{w}",
               "idx_ptr": "*i64", "classes_ptr": "*i64", **common}
        specs.append((f"topk_emit[{w}]", _emit_kernel, sig, {"BLOCK": _EMIT_BLOCK}, {"num_warps": 4}))
    slot = {"big{i}": "*i32", "small{i}": "*i32", "sn{i}": "i32", "st{i}": "i32", "w{i}": "i32"}
    sig = {"idx_ptr": "*i64", "rows": "i32", "k": "i32"}
    for i in range(_MAX_SLOTS):
        sig.update({name.format(i=i): ty for name, ty in slot.items()})
    for num in range(1, _MAX_SLOTS + 1):
        for block_w in _BLOCK_WS:
            for scatter in (False, True):
                specs.append((f"topk_rows[{num},w{block_w},{'scatter' if scatter else 'gather'}]", _rows_kernel, sig,
                              {"NUM": num, "BLOCK_R": _ROWS_TILE // block_w, "BLOCK_W": block_w, "SCATTER": scatter},
                              {"num_warps": 4}))
    return specs
