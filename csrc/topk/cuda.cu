// Top-K selection CUDA kernels: order-preserving keys with the class max, a per-image radix select
// with a shared-memory bitonic finish, and a row kernel for the gathers and the backward's scatters.
// No torch headers (see cuda_launch.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "topk/cuda_launch.h"

namespace rtdetr_kernels {
namespace topk {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kKeysThreads = 256;
constexpr int kWarpTokens = 64;     // tokens per block of the warp-per-token key kernel (C >= 16)
constexpr int kSelectThreads = 1024;
constexpr int kSelectWarps = kSelectThreads / 32;
constexpr int32_t kNaNMax = 0x7fffffff;   // a NaN while taking the class max: the max (torch.max propagates it)
constexpr int32_t kLowest = INT32_MIN;    // NaN's rank key, below every other; also "no class yet"

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// float -> int32 whose signed order is x's (-0.0 and +0.0 one key); NaN -> kNaNMax (the class max's rule)
__device__ __forceinline__ int32_t max_key(float x) {
  if (x != x) return kNaNMax;
  if (x == 0.0f) return 0;
  const int32_t b = __float_as_int(x);
  return b ^ ((b >> 31) & 0x7fffffff);
}

__device__ __forceinline__ uint32_t as_unsigned(int32_t key) { return static_cast<uint32_t>(key) ^ 0x80000000u; }

// a (key, class) pair beats another: larger key, or equal key and lower class
__device__ __forceinline__ bool beats(int32_t key, int32_t cls, int32_t best, int32_t best_cls) {
  return key > best || (key == best && cls < best_cls);
}

__device__ __forceinline__ void finish_token(int64_t n, int64_t t, int64_t T, int64_t pair_c, int32_t best,
                                             int32_t best_cls, int32_t* keys, int32_t* classes, int* hist) {
  const int32_t rank = best == kNaNMax ? kLowest : best;  // NaN ranks lowest
  keys[n * T + t] = rank;
  classes[n * T + t] = best_cls + static_cast<int32_t>(t % pair_c);
  atomicAdd(&hist[as_unsigned(rank) >> 24], 1);
}

// one warp per token (C >= 16): lanes stride over the classes, a shuffle reduction takes the first max
template <typename scalar_t>
__global__ void __launch_bounds__(kKeysThreads) keys_warp_kernel(const scalar_t* __restrict__ logits, int64_t s_n,
                                                                 int64_t s_t, int64_t s_c, int64_t T, int64_t C,
                                                                 int64_t pair_c, int32_t* __restrict__ keys,
                                                                 int32_t* __restrict__ classes, int32_t* __restrict__ hist) {
  __shared__ int local[kRadixBins];
  for (int i = threadIdx.x; i < kRadixBins; i += blockDim.x) local[i] = 0;
  __syncthreads();
  const int64_t n = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int warps = kKeysThreads / 32;
  for (int i = warp; i < kWarpTokens; i += warps) {
    const int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpTokens + i;
    if (t >= T) break;  // uniform within the warp
    const scalar_t* row = logits + n * s_n + t * s_t;
    int32_t best = kLowest, best_cls = 0x7fffffff;
    for (int64_t c = lane; c < C; c += 32) {
      const int32_t key = max_key(to_float(row[c * s_c]));
      if (key > best) {  // classes rise along a lane: strictly greater keeps the first
        best = key;
        best_cls = static_cast<int32_t>(c);
      }
    }
    for (int off = 16; off > 0; off >>= 1) {
      const int32_t other = __shfl_xor_sync(kFull, best, off);
      const int32_t other_cls = __shfl_xor_sync(kFull, best_cls, off);
      if (beats(other, other_cls, best, best_cls)) {
        best = other;
        best_cls = other_cls;
      }
    }
    if (lane == 0) finish_token(n, t, T, pair_c, best, best_cls, keys, classes, local);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kRadixBins; i += blockDim.x)
    if (local[i]) atomicAdd(&hist[n * kRadixBins + i], local[i]);
}

// one thread per token (C < 16, and the pairs view with C = 1)
template <typename scalar_t>
__global__ void __launch_bounds__(kKeysThreads) keys_thread_kernel(const scalar_t* __restrict__ logits, int64_t s_n,
                                                                   int64_t s_t, int64_t s_c, int64_t T, int64_t C,
                                                                   int64_t pair_c, int32_t* __restrict__ keys,
                                                                   int32_t* __restrict__ classes, int32_t* __restrict__ hist) {
  __shared__ int local[kRadixBins];
  for (int i = threadIdx.x; i < kRadixBins; i += blockDim.x) local[i] = 0;
  __syncthreads();
  const int64_t n = blockIdx.y;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t < T) {
    const scalar_t* row = logits + n * s_n + t * s_t;
    int32_t best = kLowest, best_cls = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int32_t key = max_key(to_float(row[c * s_c]));
      if (key > best) {
        best = key;
        best_cls = static_cast<int32_t>(c);
      }
    }
    finish_token(n, t, T, pair_c, best, best_cls, keys, classes, local);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kRadixBins; i += blockDim.x)
    if (local[i]) atomicAdd(&hist[n * kRadixBins + i], local[i]);
}

__device__ __forceinline__ void copy_score(const char* logits, int elem_bytes, int64_t offset, char* scores,
                                           int64_t out) {
  if (elem_bytes == 4) {
    reinterpret_cast<uint32_t*>(scores)[out] = reinterpret_cast<const uint32_t*>(logits)[offset];
  } else {
    reinterpret_cast<uint16_t*>(scores)[out] = reinterpret_cast<const uint16_t*>(logits)[offset];
  }
}

__device__ __forceinline__ void emit_one(int64_t word, int64_t n, int64_t j, const int32_t* classes,
                                         const char* logits, int elem_bytes, int64_t s_n, int64_t s_t, int64_t s_c,
                                         int64_t T, int64_t k, int64_t pair_c, char* scores, int64_t* indices,
                                         int64_t* out_classes) {
  const int64_t cand = static_cast<int64_t>(~static_cast<uint64_t>(word) & 0xffffffffull);
  const int64_t tok = cand / pair_c;
  const int64_t cls = classes[n * T + cand];
  copy_score(logits, elem_bytes, n * s_n + tok * s_t + cls * s_c, scores, n * k + j);
  indices[n * k + j] = tok;
  out_classes[n * k + j] = cls;
}

// Shared memory of the select kernel (dynamic): [keys (T uint32, when they fit)] [candidates (P int64, when sorted)]
__global__ void __launch_bounds__(kSelectThreads) select_kernel(
    const int32_t* __restrict__ keys, const int32_t* __restrict__ classes, const int32_t* __restrict__ hist0,
    const char* __restrict__ logits, int elem_bytes, int64_t s_n, int64_t s_t, int64_t s_c, int64_t T, int64_t k,
    int64_t pair_c, bool sort, int64_t sort_width, bool keys_in_smem, int64_t* __restrict__ work,
    char* __restrict__ scores, int64_t* __restrict__ indices, int64_t* __restrict__ out_classes) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* cand = reinterpret_cast<int64_t*>(smem);  // first: 8-byte aligned
  uint32_t* skeys = reinterpret_cast<uint32_t*>(smem + (sort ? sort_width * 8 : 0));
  __shared__ int hist[kRadixBins];
  __shared__ int warp_counts[kSelectWarps];
  __shared__ int warp_offsets[kSelectWarps];
  __shared__ int tile_total;
  __shared__ int taken;
  __shared__ uint32_t s_digit;
  __shared__ int s_need;

  const int64_t n = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int32_t* my_keys = keys + n * T;
  if (keys_in_smem)
    for (int64_t i = tid; i < T; i += kSelectThreads) skeys[i] = as_unsigned(my_keys[i]);
  auto key_at = [&](int64_t i) -> uint32_t { return keys_in_smem ? skeys[i] : as_unsigned(my_keys[i]); };

  uint32_t prefix = 0, mask = 0;
  int need = static_cast<int>(k);  // keys still to choose among those with the prefix
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    for (int i = tid; i < kRadixBins; i += kSelectThreads) hist[i] = pass == 0 ? hist0[n * kRadixBins + i] : 0;
    __syncthreads();
    if (pass > 0) {
      for (int64_t i = tid; i < T; i += kSelectThreads) {
        const uint32_t u = key_at(i);
        if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 0xff], 1);
      }
      __syncthreads();
    }
    if (warp == 0) {  // the digit: lane l owns bins 8l .. 8l+7; suffix sums over lanes from the top
      int own = 0;
      for (int b = 0; b < 8; ++b) own += hist[lane * 8 + b];
      int suffix = own;  // inclusive: lanes >= this one
      for (int off = 1; off < 32; off <<= 1) {
        const int up = __shfl_down_sync(kFull, suffix, off);
        if (lane + off < 32) suffix += up;
      }
      int acc = suffix - own;  // keys with the prefix in higher bins than this lane's
      for (int b = 7; b >= 0; --b) {
        const int h = hist[lane * 8 + b];
        if (acc < need && acc + h >= need) {
          s_digit = static_cast<uint32_t>(lane * 8 + b);
          s_need = need - acc;
        }
        acc += h;
      }
    }
    __syncthreads();
    prefix |= s_digit << shift;
    mask |= 0xffu << shift;
    need = s_need;
    __syncthreads();  // hist and s_digit are rewritten by the next pass
  }
  const uint32_t thr = prefix;
  const int room = need;  // keys equal to thr that get in; the k - room above it all do

  // compaction: every key above thr, and the room lowest-indexed ones equal to it (a block scan of
  // the equal flags in index order); positions by a counter (the sort below makes the order exact)
  if (tid == 0) taken = 0;
  int eq_carry = 0;
  const unsigned lower_lanes = (1u << lane) - 1u;
  __syncthreads();
  for (int64_t base = 0; base < T; base += kSelectThreads) {
    const int64_t i = base + tid;
    const uint32_t u = i < T ? key_at(i) : 0u;
    const bool valid = i < T;
    const bool gt = valid && u > thr;
    const bool eq = valid && u == thr;
    const unsigned ballot = __ballot_sync(kFull, eq);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    if (warp == 0) {
      const int v = warp_counts[lane];
      int incl = v;
      for (int off = 1; off < 32; off <<= 1) {
        const int lo = __shfl_up_sync(kFull, incl, off);
        if (lane >= off) incl += lo;
      }
      warp_offsets[lane] = incl - v;
      if (lane == 31) tile_total = incl;
    }
    __syncthreads();
    const int eq_before = eq_carry + warp_offsets[warp] + __popc(ballot & lower_lanes);
    if (gt || (eq && eq_before < room)) {
      const int pos = atomicAdd(&taken, 1);
      const int64_t word = (static_cast<int64_t>(static_cast<int32_t>(u ^ 0x80000000u)) << 32) |
                           static_cast<int64_t>(0xffffffffull - static_cast<uint64_t>(i));
      if (sort) {
        cand[pos] = word;
      } else {
        work[n * k + pos] = word;
      }
    }
    eq_carry += tile_total;
    __syncthreads();  // warp_counts, warp_offsets and tile_total are rewritten by the next tile
  }
  if (!sort) return;

  // bitonic sort of sort_width words (k words, padded with the lowest word), descending
  for (int64_t i = k + tid; i < sort_width; i += kSelectThreads) cand[i] = INT64_MIN;
  for (int64_t size = 2; size <= sort_width; size <<= 1) {
    for (int64_t stride = size / 2; stride > 0; stride >>= 1) {
      __syncthreads();
      for (int64_t i = tid; i < sort_width / 2; i += kSelectThreads) {
        const int64_t lo = 2 * i - (i & (stride - 1));
        const int64_t hi = lo + stride;
        const bool down = (lo & size) == 0;  // this run ends descending (the last merge is all descending)
        const int64_t a = cand[lo], b = cand[hi];
        if (down ? a < b : a > b) {
          cand[lo] = b;
          cand[hi] = a;
        }
      }
    }
  }
  __syncthreads();
  for (int64_t j = tid; j < k; j += kSelectThreads)
    emit_one(cand[j], n, j, classes, logits, elem_bytes, s_n, s_t, s_c, T, k, pair_c, scores, indices, out_classes);
}

__global__ void emit_kernel(const int64_t* __restrict__ work, const int32_t* __restrict__ classes,
                            const char* __restrict__ logits, int elem_bytes, int64_t s_n, int64_t s_t, int64_t s_c,
                            int64_t T, int64_t k, int64_t pair_c, char* __restrict__ scores,
                            int64_t* __restrict__ indices, int64_t* __restrict__ out_classes) {
  const int64_t n = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= k) return;
  emit_one(work[n * k + j], n, j, classes, logits, elem_bytes, s_n, s_t, s_c, T, k, pair_c, scores, indices,
           out_classes);
}

constexpr int kRowsThreads = 256;
constexpr int kRowsPerBlock = 32;  // one warp per row at a time, 8 warps

__global__ void __launch_bounds__(kRowsThreads) rows_kernel(const int64_t* __restrict__ indices, int64_t N, int64_t k,
                                                            const RowSlots slots, bool scatter) {
  const RowSlot& s = slots.slot[blockIdx.y];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < kRowsPerBlock; r += kRowsThreads / 32) {
    const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + r;
    if (row >= N * k) return;
    const int64_t n = row / k, j = row % k;
    const int64_t tok = indices[row];
    const int64_t big = n * s.big_n + tok * s.big_t, small = n * s.small_n + j * s.small_t;
    const char* from = s.src + (scatter ? small : big);
    char* to = s.dst + (scatter ? big : small);
    if (s.word == 4) {
      const uint32_t* f = reinterpret_cast<const uint32_t*>(from);
      uint32_t* d = reinterpret_cast<uint32_t*>(to);
      for (int64_t w = lane; w < s.row_bytes / 4; w += 32) d[w] = f[w];
    } else {
      for (int64_t b = lane; b < s.row_bytes; b += 32) to[b] = from[b];
    }
  }
}

template <typename scalar_t>
cudaError_t keys_for(const void* logits, int64_t s_n, int64_t s_t, int64_t s_c, int64_t N, int64_t T, int64_t C,
                     int64_t pair_c, int32_t* keys, int32_t* classes, int32_t* hist, cudaStream_t stream) {
  const scalar_t* x = static_cast<const scalar_t*>(logits);
  if (C >= 16) {
    const dim3 grid(static_cast<unsigned>((T + kWarpTokens - 1) / kWarpTokens), static_cast<unsigned>(N));
    keys_warp_kernel<scalar_t><<<grid, kKeysThreads, 0, stream>>>(x, s_n, s_t, s_c, T, C, pair_c, keys, classes, hist);
  } else {
    const dim3 grid(static_cast<unsigned>((T + kKeysThreads - 1) / kKeysThreads), static_cast<unsigned>(N));
    keys_thread_kernel<scalar_t><<<grid, kKeysThreads, 0, stream>>>(x, s_n, s_t, s_c, T, C, pair_c, keys, classes, hist);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_keys(const void* logits, DType dtype, int64_t s_n, int64_t s_t, int64_t s_c, int64_t N, int64_t T,
                        int64_t C, int64_t pair_c, int32_t* keys, int32_t* classes, int32_t* hist, cudaStream_t stream) {
  if (N == 0 || T == 0) return cudaSuccess;
  switch (dtype) {
    case DType::kFloat32: return keys_for<float>(logits, s_n, s_t, s_c, N, T, C, pair_c, keys, classes, hist, stream);
    case DType::kFloat16: return keys_for<__half>(logits, s_n, s_t, s_c, N, T, C, pair_c, keys, classes, hist, stream);
    case DType::kBFloat16:
      return keys_for<__nv_bfloat16>(logits, s_n, s_t, s_c, N, T, C, pair_c, keys, classes, hist, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_select(const int32_t* keys, const int32_t* classes, const int32_t* hist, const void* logits,
                          int elem_bytes, int64_t s_n, int64_t s_t, int64_t s_c, int64_t N, int64_t T, int64_t k,
                          int64_t pair_c, bool sort, int64_t* work, void* scores, int64_t* indices, int64_t* out_classes,
                          cudaStream_t stream) {
  if (N == 0) return cudaSuccess;
  if (k < 1 || k > T || (sort && k > kMaxSortK) || (elem_bytes != 2 && elem_bytes != 4)) return cudaErrorInvalidValue;
  int64_t width = 2;
  while (width < k) width <<= 1;
  const bool keys_in_smem = T <= kSmemKeys;
  const size_t bytes = (sort ? static_cast<size_t>(width) * 8 : 0) + (keys_in_smem ? static_cast<size_t>(T) * 4 : 0);
  if (bytes > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(bytes));
    if (err != cudaSuccess) return err;
  }
  select_kernel<<<static_cast<unsigned>(N), kSelectThreads, bytes, stream>>>(
      keys, classes, hist, static_cast<const char*>(logits), elem_bytes, s_n, s_t, s_c, T, k, pair_c, sort, width,
      keys_in_smem, work, static_cast<char*>(scores), indices, out_classes);
  return cudaGetLastError();
}

cudaError_t launch_emit(const int64_t* work, const int32_t* classes, const void* logits, int elem_bytes, int64_t s_n,
                        int64_t s_t, int64_t s_c, int64_t N, int64_t T, int64_t k, int64_t pair_c, void* scores,
                        int64_t* indices, int64_t* out_classes, cudaStream_t stream) {
  if (N == 0 || k == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((k + 255) / 256), static_cast<unsigned>(N));
  emit_kernel<<<grid, 256, 0, stream>>>(work, classes, static_cast<const char*>(logits), elem_bytes, s_n, s_t, s_c, T,
                                         k, pair_c, static_cast<char*>(scores), indices, out_classes);
  return cudaGetLastError();
}

cudaError_t launch_rows(const int64_t* indices, int64_t N, int64_t k, const RowSlots& slots, bool scatter,
                        cudaStream_t stream) {
  if (N * k == 0 || slots.count == 0) return cudaSuccess;
  if (slots.count > kMaxSlots) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((N * k + kRowsPerBlock - 1) / kRowsPerBlock), static_cast<unsigned>(slots.count));
  rows_kernel<<<grid, kRowsThreads, 0, stream>>>(indices, N, k, slots, scatter);
  return cudaGetLastError();
}

}  // namespace topk
}  // namespace rtdetr_kernels
