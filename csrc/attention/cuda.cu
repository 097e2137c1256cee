// Attention-core CUDA kernels for AIFI attention: flash-style forward (writing the per-row
// logsumexp) and a deterministic backward (a dk/dv kernel over key tiles looping over the query
// tiles, and a separate dq kernel), with an optional bool (True = blocked) or additive float mask.
//
// Two paths:
// - fp16/bf16, head dim 16, 32 or 64: tensor cores through mma.sync.m16n8k16 (inline PTX, sm_80+),
//   fragments loaded from shared memory with ldmatrix. A CTA has 2 warps, each owning 16 rows, so a
//   query (or key) tile is 32 rows: batch 1, L = 400, 8 heads is 13 x 8 = 104 CTAs (a 128-row tile,
//   as FlashAttention-2 uses, would be 32). The kernels iterate over 64-row tiles of the other side.
//   Scores, softmax and accumulation are float32; P and dS are rounded to the input type for the
//   next MMA (as FlashAttention does), every output once at the end.
// - everything else (fp32; fp16/bf16 at other head dims up to 256): SIMT, a group of TPR lanes (a
//   power of two) per row, each lane owning 8 channels; dot products are reduced over the group
//   with shuffles; all math in float32.
//
// Softmax runs in base 2: s2 = (q.k * scale + mask) * log2(e). The logsumexp is stored in that unit.
// A query that sees no key (every score -inf: a fully blocked row) gets output 0 and lse = +inf, so
// that the backward's p = exp2(s2 - lse) is 0 there: no gradient flows through it (the reference's
// definition). Rows and keys past L are zero-filled in shared memory and never stored.
// Offsets are 64-bit; a CTA index is < 2^31 (checked by the launchers).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <type_traits>

#include "attention/cuda_launch.h"

namespace rtdetr_kernels {
namespace attention {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kInf = __builtin_huge_valf();

// ------------------------------------------------------------------------------------------------
// Shared helpers
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Two floats as one 32-bit register of two 16-bit values (the first in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ T* row_ptr(const View& t, int64_t n, int64_t h, int64_t l) {
  return static_cast<T*>(t.ptr) + n * t.sn + l * t.sl + h * t.sh;
}

// The additive term (in base-2 units) of the mask for query row i and key j, both < L; -inf blocks.
__device__ __forceinline__ float mask_term(const Problem& p, int64_t bh, int64_t i, int64_t j) {
  const int64_t offset = bh * p.mask_bh_stride + i * p.L + j;
  if (p.mask_kind == MaskKind::kBool) return static_cast<const uint8_t*>(p.mask)[offset] ? -kInf : 0.f;
  return static_cast<const float*>(p.mask)[offset] * kLog2e;
}

// The scaled, masked score in base-2 units, -inf for a key past the end.
__device__ __forceinline__ float score2(const Problem& p, float dot, float scale2, int64_t bh, int64_t i, int64_t j) {
  if (j >= p.L) return -kInf;
  float s = dot * scale2;
  if (p.mask_kind != MaskKind::kNone && i < p.L) s += mask_term(p, bh, i, j);
  return s;
}

// ------------------------------------------------------------------------------------------------
// Tensor-core path: mma.sync m16n8k16 (row.col, f32 accumulators), ldmatrix
// ------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

constexpr int kWarps = 2;             // warps per CTA, 16 rows each
constexpr int kRows = 16 * kWarps;    // rows a CTA owns (queries in fwd/dq, keys in dk/dv)
constexpr int kTile = 64;             // rows of the other side per iteration
constexpr int kThreads = 32 * kWarps;

// A shared-memory tile of ROWS x D elements, rows padded by 8 elements (16 bytes) so that the 8 row
// addresses of an ldmatrix phase fall in distinct bank groups for D = 16, 32, 64.
template <typename T, int ROWS, int D>
struct Tile {
  static constexpr int kStride = D + 8;
  alignas(16) T data[ROWS][kStride];
};

// rows [row0, row0 + ROWS) of the (n, h) slice of `t` into the tile, 16-byte chunks, zeros past L.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(Tile<T, ROWS, D>& tile, const View& t, int64_t n, int64_t h, int64_t row0,
                                          int64_t L) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  for (int c = threadIdx.x; c < ROWS * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (row0 + r < L) value = *reinterpret_cast<const uint4*>(row_ptr<const T>(t, n, h, row0 + r) + col);
    *reinterpret_cast<uint4*>(&tile.data[r][col]) = value;
  }
}

// The A fragments (16 rows x D, row-major) of rows [row0, row0 + 16) of a tile.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_a(uint32_t (&a)[D / 16][4], const Tile<T, ROWS, D>& tile, int row0) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks)
    ldmatrix_x4(a[ks], &tile.data[row0 + (lane & 7) + ((lane >> 3) & 1) * 8][ks * 16 + (lane >> 4) * 8]);
}

// acc[16 x NR] += A[16 x D] . B^T, B = the tile's NR rows (rows are the output columns).
template <typename T, int NR, int D>
__device__ __forceinline__ void gemm_abt(float (&acc)[NR / 8][4], const uint32_t (&a)[D / 16][4],
                                         const Tile<T, NR, D>& b) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int np = 0; np < NR / 16; ++np) {
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t r[4];
      ldmatrix_x4(r, &b.data[np * 16 + (lane & 7) + (lane >> 4) * 8][ks * 16 + ((lane >> 3) & 1) * 8]);
      mma16816<T>(acc[2 * np], a[ks], r[0], r[1]);
      mma16816<T>(acc[2 * np + 1], a[ks], r[2], r[3]);
    }
  }
}

// acc[16 x D] += P[16 x KR] . B, P given as f32 accumulators (rounded to T here), B = the tile's
// KR rows x D.
template <typename T, int KR, int D>
__device__ __forceinline__ void gemm_pb(float (&acc)[D / 8][4], const float (&pacc)[KR / 8][4],
                                        const Tile<T, KR, D>& b) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < KR / 16; ++kk) {
    const uint32_t pa[4] = {pack2<T>(pacc[2 * kk][0], pacc[2 * kk][1]), pack2<T>(pacc[2 * kk][2], pacc[2 * kk][3]),
                            pack2<T>(pacc[2 * kk + 1][0], pacc[2 * kk + 1][1]),
                            pack2<T>(pacc[2 * kk + 1][2], pacc[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t r[4];
      ldmatrix_x4_trans(r, &b.data[kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8][dp * 16 + (lane >> 4) * 8]);
      mma16816<T>(acc[2 * dp], pa, r[0], r[1]);
      mma16816<T>(acc[2 * dp + 1], pa, r[2], r[3]);
    }
  }
}

// Store an accumulator [16 x D] (rows row0 + g and row0 + g + 8 of this lane) times `mul`.
template <typename T, int D>
__device__ __forceinline__ void store_acc(const float (&acc)[D / 8][4], const View& t, int64_t n, int64_t h,
                                          int64_t row0, int64_t L, const float (&mul)[2]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = row0 + g + half * 8;
    if (row >= L) continue;
    T* out = row_ptr<T>(t, n, h, row);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const uint32_t v = pack2<T>(acc[dt][2 * half] * mul[half], acc[dt][2 * half + 1] * mul[half]);
      *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * tq) = v;
    }
  }
}

struct Tiling {
  int64_t tiles;  // row tiles per (n, h)
  int64_t bh, n, h, row0;
};

__device__ __forceinline__ Tiling tiling(const Problem& p, int rows) {
  Tiling t;
  t.tiles = (p.L + rows - 1) / rows;
  t.bh = static_cast<int64_t>(blockIdx.x) / t.tiles;
  t.row0 = (static_cast<int64_t>(blockIdx.x) % t.tiles) * rows;
  t.n = t.bh / p.H;
  t.h = t.bh % p.H;
  return t;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) forward_mma_kernel(const Problem p, const View q, const View k,
                                                               const View v, const View out, float* __restrict__ lse) {
  __shared__ Tile<T, kRows, D> sQ;
  __shared__ Tile<T, kTile, D> sK, sV;
  const Tiling tl = tiling(p, kRows);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const float scale2 = p.scale * kLog2e;

  load_tile(sQ, q, tl.n, tl.h, tl.row0, p.L);
  __syncthreads();
  uint32_t qa[D / 16][4];
  load_a(qa, sQ, warp * 16);
  const int64_t rows[2] = {tl.row0 + warp * 16 + g, tl.row0 + warp * 16 + g + 8};

  float o[D / 8][4] = {};
  float m[2] = {-kInf, -kInf}, l[2] = {0.f, 0.f};  // l: this lane's partial row sums
  for (int64_t k0 = 0; k0 < p.L; k0 += kTile) {
    __syncthreads();  // the previous tile has been read
    load_tile(sK, k, tl.n, tl.h, k0, p.L);
    load_tile(sV, v, tl.n, tl.h, k0, p.L);
    __syncthreads();
    float s[kTile / 8][4] = {};
    gemm_abt(s, qa, sK);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float mx = -kInf;
#pragma unroll
      for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[j][2 * half + e];
          x = score2(p, x, scale2, tl.bh, rows[half], k0 + j * 8 + 2 * tq + e);
          mx = fmaxf(mx, x);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m[half], mx);
      const float m_use = m_new == -kInf ? 0.f : m_new;  // all -inf so far: exp2(-inf - 0) = 0, no NaN
      const float alpha = exp2f(m[half] - m_use);
      m[half] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[j][2 * half + e];
          x = exp2f(x - m_use);
          sum += x;
        }
      }
      l[half] = l[half] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * half] *= alpha;
        o[dt][2 * half + 1] *= alpha;
      }
    }
    gemm_pb(o, s, sV);
  }
  float inv[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float total = l[half];
    total += __shfl_xor_sync(0xffffffffu, total, 1);
    total += __shfl_xor_sync(0xffffffffu, total, 2);
    inv[half] = total > 0.f ? 1.f / total : 0.f;  // a row that sees nothing: output 0
    if (tq == 0 && rows[half] < p.L)
      lse[tl.bh * p.L + rows[half]] = total > 0.f ? m[half] + log2f(total) : kInf;
  }
  store_acc<T, D>(o, out, tl.n, tl.h, tl.row0 + warp * 16, p.L, inv);
}

// lse and delta of query rows [row0, row0 + ROWS) into shared memory; +inf / 0 past L (p = 0 there).
template <int ROWS>
__device__ __forceinline__ void load_row_stats(float (&s_lse)[ROWS], float (&s_delta)[ROWS], const float* lse,
                                               const float* delta, int64_t bh, int64_t row0, int64_t L) {
  for (int r = threadIdx.x; r < ROWS; r += blockDim.x) {
    const bool inside = row0 + r < L;
    s_lse[r] = inside ? lse[bh * L + row0 + r] : kInf;
    s_delta[r] = inside ? delta[bh * L + row0 + r] : 0.f;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dkdv_mma_kernel(const Problem p, const View grad_out, const View q,
                                                            const View k, const View v, const float* __restrict__ lse,
                                                            const float* __restrict__ delta, const View dk,
                                                            const View dv) {
  __shared__ Tile<T, kRows, D> sK, sV;
  __shared__ Tile<T, kTile, D> sQ, sdO;
  __shared__ float s_lse[kTile], s_delta[kTile];
  const Tiling tl = tiling(p, kRows);  // this CTA's keys
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const float scale2 = p.scale * kLog2e;

  load_tile(sK, k, tl.n, tl.h, tl.row0, p.L);
  load_tile(sV, v, tl.n, tl.h, tl.row0, p.L);
  __syncthreads();
  uint32_t ka[D / 16][4], va[D / 16][4];
  load_a(ka, sK, warp * 16);
  load_a(va, sV, warp * 16);
  const int64_t keys[2] = {tl.row0 + warp * 16 + g, tl.row0 + warp * 16 + g + 8};

  float dkacc[D / 8][4] = {}, dvacc[D / 8][4] = {};
  for (int64_t i0 = 0; i0 < p.L; i0 += kTile) {
    __syncthreads();
    load_tile(sQ, q, tl.n, tl.h, i0, p.L);
    load_tile(sdO, grad_out, tl.n, tl.h, i0, p.L);
    load_row_stats(s_lse, s_delta, lse, delta, tl.bh, i0, p.L);
    __syncthreads();
    float pt[kTile / 8][4] = {};  // S^T, then P^T: rows = this warp's keys, columns = queries
    gemm_abt(pt, ka, sQ);
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * tq + (e & 1);
        const int64_t key = keys[e >> 1], query = i0 + col;
        float x = pt[j][e] * scale2;
        if (p.mask_kind != MaskKind::kNone && key < p.L && query < p.L) x += mask_term(p, tl.bh, query, key);
        pt[j][e] = exp2f(x - s_lse[col]);  // 0 for queries past L and rows that see nothing (lse = +inf)
      }
    }
    gemm_pb(dvacc, pt, sdO);  // dV += P^T dO
    float dpt[kTile / 8][4] = {};
    gemm_abt(dpt, va, sdO);  // dP^T = V dO^T
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * tq + (e & 1);
        dpt[j][e] = pt[j][e] * (dpt[j][e] - s_delta[col]);  // dS^T
      }
    }
    gemm_pb(dkacc, dpt, sQ);  // dK += dS^T Q
  }
  const float k_mul[2] = {p.scale, p.scale}, v_mul[2] = {1.f, 1.f};
  store_acc<T, D>(dkacc, dk, tl.n, tl.h, tl.row0 + warp * 16, p.L, k_mul);
  store_acc<T, D>(dvacc, dv, tl.n, tl.h, tl.row0 + warp * 16, p.L, v_mul);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_mma_kernel(const Problem p, const View grad_out, const View q,
                                                          const View k, const View v, const float* __restrict__ lse,
                                                          const float* __restrict__ delta, const View dq) {
  __shared__ Tile<T, kRows, D> sQ, sdO;
  __shared__ Tile<T, kTile, D> sK, sV;
  const Tiling tl = tiling(p, kRows);  // this CTA's queries
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
  const float scale2 = p.scale * kLog2e;

  load_tile(sQ, q, tl.n, tl.h, tl.row0, p.L);
  load_tile(sdO, grad_out, tl.n, tl.h, tl.row0, p.L);
  __syncthreads();
  uint32_t qa[D / 16][4], doa[D / 16][4];
  load_a(qa, sQ, warp * 16);
  load_a(doa, sdO, warp * 16);
  const int64_t rows[2] = {tl.row0 + warp * 16 + g, tl.row0 + warp * 16 + g + 8};
  float row_lse[2], row_delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const bool inside = rows[half] < p.L;
    row_lse[half] = inside ? lse[tl.bh * p.L + rows[half]] : kInf;
    row_delta[half] = inside ? delta[tl.bh * p.L + rows[half]] : 0.f;
  }

  float dqacc[D / 8][4] = {};
  for (int64_t k0 = 0; k0 < p.L; k0 += kTile) {
    __syncthreads();
    load_tile(sK, k, tl.n, tl.h, k0, p.L);
    load_tile(sV, v, tl.n, tl.h, k0, p.L);
    __syncthreads();
    float s[kTile / 8][4] = {};
    gemm_abt(s, qa, sK);
    float dp[kTile / 8][4] = {};
    gemm_abt(dp, doa, sV);  // dP = dO V^T
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e >> 1;
        const float x = score2(p, s[j][e], scale2, tl.bh, rows[half], k0 + j * 8 + 2 * tq + (e & 1));
        const float prob = exp2f(x - row_lse[half]);
        s[j][e] = prob * (dp[j][e] - row_delta[half]);  // dS
      }
    }
    gemm_pb(dqacc, s, sK);  // dQ += dS K
  }
  const float q_mul[2] = {p.scale, p.scale};
  store_acc<T, D>(dqacc, dq, tl.n, tl.h, tl.row0 + warp * 16, p.L, q_mul);
}

// ------------------------------------------------------------------------------------------------
// SIMT path: a group of TPR lanes per row, 8 channels per lane, float32 math
// ------------------------------------------------------------------------------------------------

constexpr int kSimtThreads = 128;
constexpr int kPerLane = 8;  // channels per lane
constexpr int kChunk = 16;   // keys per register chunk of the forward

struct Group {
  int tpr;     // lanes per row (power of two, <= 32)
  int sub;     // lane within the group
  int rows;    // rows per CTA
  int local;   // this group's row within the CTA
};

__device__ __forceinline__ Group make_group(int tpr_log2) {
  Group gr;
  gr.tpr = 1 << tpr_log2;
  gr.sub = threadIdx.x & (gr.tpr - 1);
  gr.rows = kSimtThreads >> tpr_log2;
  gr.local = threadIdx.x >> tpr_log2;
  return gr;
}

// Sum over the group's lanes (every lane of the warp calls it: groups never straddle a warp).
__device__ __forceinline__ float group_sum(float v, int tpr) {
  for (int offset = tpr >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// This lane's 8 channels of row `row` (zeros past L or past D).
template <typename T>
__device__ __forceinline__ void load_lane(float (&x)[kPerLane], const View& t, int64_t n, int64_t h, int64_t row,
                                          const Problem& p, int sub) {
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int64_t d = static_cast<int64_t>(sub) * kPerLane + e;
    x[e] = (row < p.L && d < p.D) ? to_float(row_ptr<const T>(t, n, h, row)[d]) : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_lane(const float (&x)[kPerLane], float mul, const View& t, int64_t n, int64_t h,
                                           int64_t row, const Problem& p, int sub) {
  if (row >= p.L) return;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int64_t d = static_cast<int64_t>(sub) * kPerLane + e;
    if (d < p.D) row_ptr<T>(t, n, h, row)[d] = from_float<T>(x[e] * mul);
  }
}

// rows [row0, row0 + rows) x channels [0, width) of the (n, h) slice into shared memory (float,
// row stride `width`), zeros past L and past D; consecutive threads read consecutive channels.
template <typename T>
__device__ __forceinline__ void load_simt_tile(float* tile, int rows, int width, const View& t, int64_t n, int64_t h,
                                               int64_t row0, const Problem& p) {
  for (int idx = threadIdx.x; idx < rows * width; idx += kSimtThreads) {
    const int r = idx / width, d = idx % width;
    tile[idx] = (row0 + r < p.L && d < p.D) ? to_float(row_ptr<const T>(t, n, h, row0 + r)[d]) : 0.f;
  }
}

__device__ __forceinline__ float dot_lane(const float (&x)[kPerLane], const float* y) {
  const float4 a = *reinterpret_cast<const float4*>(y), b = *reinterpret_cast<const float4*>(y + 4);
  return x[0] * a.x + x[1] * a.y + x[2] * a.z + x[3] * a.w + x[4] * b.x + x[5] * b.y + x[6] * b.z + x[7] * b.w;
}

__device__ __forceinline__ void axpy_lane(float (&acc)[kPerLane], float a, const float* y) {
  const float4 u = *reinterpret_cast<const float4*>(y), w = *reinterpret_cast<const float4*>(y + 4);
  acc[0] += a * u.x; acc[1] += a * u.y; acc[2] += a * u.z; acc[3] += a * u.w;
  acc[4] += a * w.x; acc[5] += a * w.y; acc[6] += a * w.z; acc[7] += a * w.w;
}

// Shared memory of the SIMT kernels: two tiles of `tile` rows x width floats (+ 2 x tile floats).
__device__ __forceinline__ int simt_tile_rows(int width) { return width <= 128 ? 32 : 16; }

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) forward_simt_kernel(const Problem p, const View q, const View k,
                                                                    const View v, const View out,
                                                                    float* __restrict__ lse, int tpr_log2) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const Group gr = make_group(tpr_log2);
  const int width = gr.tpr * kPerLane, tile = simt_tile_rows(width);
  float* sK = smem;
  float* sV = smem + tile * width;
  const Tiling tl = tiling(p, gr.rows);
  const int64_t row = tl.row0 + gr.local;
  const float scale2 = p.scale * kLog2e;

  float qx[kPerLane], o[kPerLane] = {};
  load_lane<T>(qx, q, tl.n, tl.h, row, p, gr.sub);
  float m = -kInf, l = 0.f;
  for (int64_t k0 = 0; k0 < p.L; k0 += tile) {
    __syncthreads();
    load_simt_tile<T>(sK, tile, width, k, tl.n, tl.h, k0, p);
    load_simt_tile<T>(sV, tile, width, v, tl.n, tl.h, k0, p);
    __syncthreads();
    for (int c0 = 0; c0 < tile; c0 += kChunk) {
      float s[kChunk];
      float mx = -kInf;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        const float dot = group_sum(dot_lane(qx, sK + (c0 + j) * width + gr.sub * kPerLane), gr.tpr);
        s[j] = score2(p, dot, scale2, tl.bh, row, k0 + c0 + j);
        mx = fmaxf(mx, s[j]);
      }
      const float m_new = fmaxf(m, mx);
      const float m_use = m_new == -kInf ? 0.f : m_new;
      const float alpha = exp2f(m - m_use);
      m = m_new;
      l *= alpha;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) o[e] *= alpha;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        const float prob = exp2f(s[j] - m_use);
        l += prob;
        axpy_lane(o, prob, sV + (c0 + j) * width + gr.sub * kPerLane);
      }
    }
  }
  store_lane<T>(o, l > 0.f ? 1.f / l : 0.f, out, tl.n, tl.h, row, p, gr.sub);
  if (gr.sub == 0 && row < p.L) lse[tl.bh * p.L + row] = l > 0.f ? m + log2f(l) : kInf;
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) dkdv_simt_kernel(const Problem p, const View grad_out, const View q,
                                                                 const View k, const View v,
                                                                 const float* __restrict__ lse,
                                                                 const float* __restrict__ delta, const View dk,
                                                                 const View dv, int tpr_log2) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const Group gr = make_group(tpr_log2);
  const int width = gr.tpr * kPerLane, tile = simt_tile_rows(width);
  float* sQ = smem;
  float* sdO = sQ + tile * width;
  float* s_lse = sdO + tile * width;
  float* s_delta = s_lse + tile;
  const Tiling tl = tiling(p, gr.rows);  // this CTA's keys
  const int64_t key = tl.row0 + gr.local;
  const float scale2 = p.scale * kLog2e;

  float kx[kPerLane], vx[kPerLane], dkacc[kPerLane] = {}, dvacc[kPerLane] = {};
  load_lane<T>(kx, k, tl.n, tl.h, key, p, gr.sub);
  load_lane<T>(vx, v, tl.n, tl.h, key, p, gr.sub);
  for (int64_t i0 = 0; i0 < p.L; i0 += tile) {
    __syncthreads();
    load_simt_tile<T>(sQ, tile, width, q, tl.n, tl.h, i0, p);
    load_simt_tile<T>(sdO, tile, width, grad_out, tl.n, tl.h, i0, p);
    for (int r = threadIdx.x; r < tile; r += kSimtThreads) {
      const bool inside = i0 + r < p.L;
      s_lse[r] = inside ? lse[tl.bh * p.L + i0 + r] : kInf;
      s_delta[r] = inside ? delta[tl.bh * p.L + i0 + r] : 0.f;
    }
    __syncthreads();
    for (int i = 0; i < tile; ++i) {
      const float* qi = sQ + i * width + gr.sub * kPerLane;
      const float* doi = sdO + i * width + gr.sub * kPerLane;
      const float dot = group_sum(dot_lane(kx, qi), gr.tpr);
      const float dp = group_sum(dot_lane(vx, doi), gr.tpr);
      const int64_t query = i0 + i;
      float x = dot * scale2;
      if (p.mask_kind != MaskKind::kNone && key < p.L && query < p.L) x += mask_term(p, tl.bh, query, key);
      const float prob = exp2f(x - s_lse[i]);
      const float ds = prob * (dp - s_delta[i]);
      axpy_lane(dvacc, prob, doi);
      axpy_lane(dkacc, ds, qi);
    }
  }
  store_lane<T>(dkacc, p.scale, dk, tl.n, tl.h, key, p, gr.sub);
  store_lane<T>(dvacc, 1.f, dv, tl.n, tl.h, key, p, gr.sub);
}

template <typename T>
__global__ void __launch_bounds__(kSimtThreads) dq_simt_kernel(const Problem p, const View grad_out, const View q,
                                                               const View k, const View v,
                                                               const float* __restrict__ lse,
                                                               const float* __restrict__ delta, const View dq,
                                                               int tpr_log2) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const Group gr = make_group(tpr_log2);
  const int width = gr.tpr * kPerLane, tile = simt_tile_rows(width);
  float* sK = smem;
  float* sV = sK + tile * width;
  const Tiling tl = tiling(p, gr.rows);  // this CTA's queries
  const int64_t row = tl.row0 + gr.local;
  const float scale2 = p.scale * kLog2e;

  float qx[kPerLane], dox[kPerLane], dqacc[kPerLane] = {};
  load_lane<T>(qx, q, tl.n, tl.h, row, p, gr.sub);
  load_lane<T>(dox, grad_out, tl.n, tl.h, row, p, gr.sub);
  const bool inside = row < p.L;
  const float row_lse = inside ? lse[tl.bh * p.L + row] : kInf;
  const float row_delta = inside ? delta[tl.bh * p.L + row] : 0.f;
  for (int64_t k0 = 0; k0 < p.L; k0 += tile) {
    __syncthreads();
    load_simt_tile<T>(sK, tile, width, k, tl.n, tl.h, k0, p);
    load_simt_tile<T>(sV, tile, width, v, tl.n, tl.h, k0, p);
    __syncthreads();
    for (int j = 0; j < tile; ++j) {
      const float* kj = sK + j * width + gr.sub * kPerLane;
      const float dot = group_sum(dot_lane(qx, kj), gr.tpr);
      const float dp = group_sum(dot_lane(dox, sV + j * width + gr.sub * kPerLane), gr.tpr);
      const float prob = exp2f(score2(p, dot, scale2, tl.bh, row, k0 + j) - row_lse);
      axpy_lane(dqacc, prob * (dp - row_delta), kj);
    }
  }
  store_lane<T>(dqacc, p.scale, dq, tl.n, tl.h, row, p, gr.sub);
}

// delta[bh, i] = sum_d grad_out[n, i, h, d] * out[n, i, h, d], one thread per row.
template <typename T>
__global__ void delta_kernel(const Problem p, const View grad_out, const View out, float* __restrict__ delta) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.N * p.H * p.L) return;
  const int64_t bh = idx / p.L, row = idx % p.L, n = bh / p.H, h = bh % p.H;
  const T* go = row_ptr<const T>(grad_out, n, h, row);
  const T* o = row_ptr<const T>(out, n, h, row);
  float acc = 0.f;
  for (int64_t d = 0; d < p.D; ++d) acc += to_float(go[d]) * to_float(o[d]);
  delta[idx] = acc;
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

int tpr_log2_of(int64_t D) {
  int log2 = 0;
  while ((int64_t(kPerLane) << log2) < D) ++log2;
  return log2;  // <= 5 for D <= 256
}

size_t simt_smem_bytes(int tpr_log2) {
  const int width = kPerLane << tpr_log2, tile = width <= 128 ? 32 : 16;
  return (2 * static_cast<size_t>(tile) * width + 2 * tile) * sizeof(float);
}

bool grid_of(const Problem& p, int rows, unsigned* grid) {
  const int64_t ctas = p.N * p.H * ((p.L + rows - 1) / rows);
  if (ctas <= 0 || ctas >= (int64_t(1) << 31)) return false;
  *grid = static_cast<unsigned>(ctas);
  return true;
}

template <typename T>
cudaError_t forward_typed(const Problem& p, View q, View k, View v, View out, float* lse, cudaStream_t stream) {
  unsigned grid = 0;
  if constexpr (!std::is_same<T, float>::value) {
    if (tensor_core_head_dim(p.D)) {
      if (!grid_of(p, kRows, &grid)) return cudaErrorInvalidConfiguration;
      if (p.D == 16) forward_mma_kernel<T, 16><<<grid, kThreads, 0, stream>>>(p, q, k, v, out, lse);
      if (p.D == 32) forward_mma_kernel<T, 32><<<grid, kThreads, 0, stream>>>(p, q, k, v, out, lse);
      if (p.D == 64) forward_mma_kernel<T, 64><<<grid, kThreads, 0, stream>>>(p, q, k, v, out, lse);
      return cudaSuccess;
    }
  }
  const int tpr_log2 = tpr_log2_of(p.D);
  if (!grid_of(p, kSimtThreads >> tpr_log2, &grid)) return cudaErrorInvalidConfiguration;
  forward_simt_kernel<T><<<grid, kSimtThreads, simt_smem_bytes(tpr_log2), stream>>>(p, q, k, v, out, lse, tpr_log2);
  return cudaSuccess;
}

template <typename T>
cudaError_t backward_typed(const Problem& p, View grad_out, View q, View k, View v, View out, const float* lse,
                           float* delta, View dq, View dk, View dv, cudaStream_t stream) {
  const int64_t rows = p.N * p.H * p.L;
  if (rows >= (int64_t(1) << 31) * 256) return cudaErrorInvalidConfiguration;
  delta_kernel<T><<<static_cast<unsigned>((rows + 255) / 256), 256, 0, stream>>>(p, grad_out, out, delta);
  unsigned grid = 0;
  if constexpr (!std::is_same<T, float>::value) {
    if (tensor_core_head_dim(p.D)) {
      if (!grid_of(p, kRows, &grid)) return cudaErrorInvalidConfiguration;
#define RTDETR_ATTN_BWD(DIM)                                                                         \
  if (p.D == DIM) {                                                                                  \
    dkdv_mma_kernel<T, DIM><<<grid, kThreads, 0, stream>>>(p, grad_out, q, k, v, lse, delta, dk, dv); \
    dq_mma_kernel<T, DIM><<<grid, kThreads, 0, stream>>>(p, grad_out, q, k, v, lse, delta, dq);       \
  }
      RTDETR_ATTN_BWD(16)
      RTDETR_ATTN_BWD(32)
      RTDETR_ATTN_BWD(64)
#undef RTDETR_ATTN_BWD
      return cudaSuccess;
    }
  }
  const int tpr_log2 = tpr_log2_of(p.D);
  if (!grid_of(p, kSimtThreads >> tpr_log2, &grid)) return cudaErrorInvalidConfiguration;
  const size_t smem = simt_smem_bytes(tpr_log2);
  dkdv_simt_kernel<T><<<grid, kSimtThreads, smem, stream>>>(p, grad_out, q, k, v, lse, delta, dk, dv, tpr_log2);
  dq_simt_kernel<T><<<grid, kSimtThreads, smem, stream>>>(p, grad_out, q, k, v, lse, delta, dq, tpr_log2);
  return cudaSuccess;
}

}  // namespace

bool tensor_core_head_dim(int64_t D) { return D == 16 || D == 32 || D == 64; }

cudaError_t launch_forward(const Problem& p, DType dtype, View q, View k, View v, View out, float* lse,
                           cudaStream_t stream) {
  if (p.D < 1 || p.D > kMaxHeadDim) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return forward_typed<float>(p, q, k, v, out, lse, stream);
    case DType::kFloat16: return forward_typed<__half>(p, q, k, v, out, lse, stream);
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(p, q, k, v, out, lse, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(const Problem& p, DType dtype, View grad_out, View q, View k, View v, View out,
                            const float* lse, float* delta, View dq, View dk, View dv, cudaStream_t stream) {
  if (p.D < 1 || p.D > kMaxHeadDim) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32: return backward_typed<float>(p, grad_out, q, k, v, out, lse, delta, dq, dk, dv, stream);
    case DType::kFloat16: return backward_typed<__half>(p, grad_out, q, k, v, out, lse, delta, dq, dk, dv, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(p, grad_out, q, k, v, out, lse, delta, dq, dk, dv, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace attention
}  // namespace rtdetr_kernels
