// Multi-scale deformable attention CUDA kernels (forward, fused backward, deterministic grad_value).
//
// Thread mapping: a group of TPH lanes (a power of two <= 32) serves one (n, q, m) head; each lane
// owns VEC consecutive channels, read with one 16-byte load where alignment allows; several heads
// share a block, so a batch-1 decoder call still spreads over the GPU. Coordinates, bilinear
// weights and accumulation are in the math type (float, double for float64). When D/VEC > 32 the
// group walks the channels in rounds. Lanes of a group follow the same control flow, so group-masked
// shuffles reduce the location/weight gradients over channels without shared memory or barriers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ms_deform_attn/cuda_launch.h"

namespace rtdetr_kernels {
namespace msda {
namespace {

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(float v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T>
__device__ __forceinline__ T from_acc(double v) { return v; }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

template <typename T, typename acc_t, int VEC>
__device__ __forceinline__ void load_vec(const T* ptr, acc_t (&out)[VEC]) {
  const Vec<T, VEC> data = *reinterpret_cast<const Vec<T, VEC>*>(ptr);
#pragma unroll
  for (int k = 0; k < VEC; ++k) out[k] = to_acc(data.v[k]);
}

template <typename T, typename acc_t, int VEC>
__device__ __forceinline__ void store_vec(T* ptr, const acc_t (&in)[VEC]) {
  Vec<T, VEC> data;
#pragma unroll
  for (int k = 0; k < VEC; ++k) data.v[k] = from_acc<T>(in[k]);
  *reinterpret_cast<Vec<T, VEC>*>(ptr) = data;
}

struct Group {
  int64_t head;   // (n, q, m) flattened, may be past the end for padding groups
  int lane;       // lane within the group
  int tph;        // lanes per head
  unsigned mask;  // the group's lanes within the warp
};

__device__ __forceinline__ Group make_group(int tph_log2) {
  Group g;
  g.tph = 1 << tph_log2;
  g.lane = threadIdx.x & (g.tph - 1);
  g.head = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> tph_log2) + (threadIdx.x >> tph_log2);
  const unsigned group_bits = g.tph == 32 ? 0xffffffffu : ((1u << g.tph) - 1u);
  g.mask = g.tph == 32 ? group_bits : group_bits << ((threadIdx.x & 31) & ~(g.tph - 1));
  return g;
}

template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t v, const Group& g) {
  for (int offset = g.tph >> 1; offset > 0; offset >>= 1) v += __shfl_xor_sync(g.mask, v, offset, g.tph);
  return v;
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

template <typename T, typename acc_t, int VEC>
__global__ void forward_kernel(const T* __restrict__ value,      // [N, S, M, D]
                               const acc_t* __restrict__ loc,    // [N, Lq, M, P, 2]
                               const acc_t* __restrict__ attn,   // [N, Lq, M, P]
                               T* __restrict__ out,              // [N, Lq, M, D]
                               const Problem p, int tph_log2) {
  const Group g = make_group(tph_log2);
  const int64_t heads = p.N * p.Lq * p.M;
  if (g.head >= heads) return;  // no cross-lane traffic in the forward
  const int64_t m = g.head % p.M;
  const int64_t n = g.head / (p.M * p.Lq);
  const int64_t chunks = p.D / VEC;
  const acc_t* head_loc = loc + g.head * p.P * 2;
  const acc_t* head_attn = attn + g.head * p.P;
  for (int64_t chunk = g.lane; chunk < chunks; chunk += g.tph) {
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
    for (int l = 0; l < p.levels.num_levels; ++l) {
      const int64_t H = p.levels.height[l], W = p.levels.width[l];
      const T* level_value = value + ((n * p.S + p.levels.start[l]) * p.M + m) * p.D + chunk * VEC;
      const int64_t p_end = p.levels.point_start[l] + p.levels.num_points[l];
      for (int64_t pt = p.levels.point_start[l]; pt < p_end; ++pt) {
        const Sample<acc_t> s = sample_point(head_loc[2 * pt], head_loc[2 * pt + 1], H, W, p.method);
        if (!s.valid) continue;
        const acc_t a = head_attn[pt];
        const acc_t w[4] = {s.w00(), s.w01(), s.w10(), s.w11()};
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          const int64_t y = s.y0 + (corner >> 1), x = s.x0 + (corner & 1);
          if (w[corner] == acc_t(0) || !corner_inside(y, x, H, W)) continue;
          acc_t v[VEC];
          load_vec<T, acc_t, VEC>(level_value + (y * W + x) * p.M * p.D, v);
          const acc_t aw = a * w[corner];
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += aw * v[k];
        }
      }
    }
    store_vec<T, acc_t, VEC>(out + g.head * p.D + chunk * VEC, acc);
  }
}

// ------------------------------------------------------------------------------------------------
// Fused backward: grad_attn, grad_loc per point (group reductions), grad_value by atomics (optional)
// ------------------------------------------------------------------------------------------------

template <typename T, typename acc_t, int VEC>
__global__ void backward_kernel(const T* __restrict__ grad_out,    // [N, Lq, M, D]
                                const T* __restrict__ value,       // [N, S, M, D]
                                const acc_t* __restrict__ loc,     // [N, Lq, M, P, 2]
                                const acc_t* __restrict__ attn,    // [N, Lq, M, P]
                                acc_t* __restrict__ grad_value,    // [N, S, M, D] or null
                                acc_t* __restrict__ grad_loc,      // [N, Lq, M, P, 2] or null
                                acc_t* __restrict__ grad_attn,     // [N, Lq, M, P] or null
                                const Problem p, int tph_log2) {
  const Group g = make_group(tph_log2);
  const int64_t heads = p.N * p.Lq * p.M;
  if (g.head >= heads) return;  // whole groups only: tph divides the block, heads align to groups
  const int64_t m = g.head % p.M;
  const int64_t n = g.head / (p.M * p.Lq);
  const int64_t chunks = p.D / VEC;
  const int64_t rounds = (chunks + g.tph - 1) / g.tph;
  const bool bilinear = p.method == kBilinear;
  const bool point_grads = grad_loc != nullptr || grad_attn != nullptr;
  const acc_t* head_loc = loc + g.head * p.P * 2;
  const acc_t* head_attn = attn + g.head * p.P;
  for (int64_t round = 0; round < rounds; ++round) {
    const int64_t chunk = round * g.tph + g.lane;
    const bool active = chunk < chunks;  // inactive lanes contribute zeros to the reductions
    acc_t go[VEC];
    if (active) {
      load_vec<T, acc_t, VEC>(grad_out + g.head * p.D + chunk * VEC, go);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) go[k] = acc_t(0);
    }
    for (int l = 0; l < p.levels.num_levels; ++l) {
      const int64_t H = p.levels.height[l], W = p.levels.width[l];
      const int64_t level_offset = ((n * p.S + p.levels.start[l]) * p.M + m) * p.D + chunk * VEC;
      const int64_t p_end = p.levels.point_start[l] + p.levels.num_points[l];
      for (int64_t pt = p.levels.point_start[l]; pt < p_end; ++pt) {
        const Sample<acc_t> s = sample_point(head_loc[2 * pt], head_loc[2 * pt + 1], H, W, p.method);
        if (!s.valid) {  // the same for every lane of the group; a skipped point's grads are 0
          if (g.lane == 0 && round == 0) {
            const int64_t point = g.head * p.P + pt;
            if (grad_attn != nullptr) grad_attn[point] = acc_t(0);
            if (grad_loc != nullptr) grad_loc[2 * point] = grad_loc[2 * point + 1] = acc_t(0);
          }
          continue;
        }
        const acc_t a = head_attn[pt];
        const acc_t w[4] = {s.w00(), s.w01(), s.w10(), s.w11()};
        acc_t v[4][VEC];
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          const int64_t y = s.y0 + (corner >> 1), x = s.x0 + (corner & 1);
          if (active && corner_inside(y, x, H, W) && (bilinear || corner == 0)) {
            load_vec<T, acc_t, VEC>(value + level_offset + (y * W + x) * p.M * p.D, v[corner]);
            if (grad_value != nullptr && w[corner] != acc_t(0)) {
              acc_t* gv = grad_value + level_offset + (y * W + x) * p.M * p.D;
              const acc_t aw = a * w[corner];
#pragma unroll
              for (int k = 0; k < VEC; ++k) atomicAdd(gv + k, aw * go[k]);
            }
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) v[corner][k] = acc_t(0);
          }
        }
        if (!point_grads) continue;
        acc_t dot_s = 0, dot_x = 0, dot_y = 0;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          dot_s += go[k] * (w[0] * v[0][k] + w[1] * v[1][k] + w[2] * v[2][k] + w[3] * v[3][k]);
          dot_x += go[k] * (s.hy * (v[1][k] - v[0][k]) + s.ly * (v[3][k] - v[2][k]));
          dot_y += go[k] * (s.hx * (v[2][k] - v[0][k]) + s.lx * (v[3][k] - v[1][k]));
        }
        dot_s = group_sum(dot_s, g);
        if (bilinear) {
          dot_x = group_sum(dot_x, g);
          dot_y = group_sum(dot_y, g);
        }
        if (g.lane == 0) {
          const int64_t point = g.head * p.P + pt;
          // Later rounds add to what the same lane wrote in earlier rounds: ordered, no race.
          if (grad_attn != nullptr) grad_attn[point] = round == 0 ? dot_s : grad_attn[point] + dot_s;
          if (grad_loc != nullptr && bilinear) {
            const acc_t gx = static_cast<acc_t>(W) * a * dot_x, gy = static_cast<acc_t>(H) * a * dot_y;
            grad_loc[2 * point] = round == 0 ? gx : grad_loc[2 * point] + gx;
            grad_loc[2 * point + 1] = round == 0 ? gy : grad_loc[2 * point + 1] + gy;
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Deterministic grad_value: keys, (sort on the host side), gather
// ------------------------------------------------------------------------------------------------

template <typename acc_t>
__global__ void point_keys_kernel(const acc_t* __restrict__ loc,  // [N, Lq, M, P, 2]
                                  int64_t* __restrict__ keys,     // [N * Lq * M * P]
                                  const Problem p, int64_t padded_cells) {
  const int64_t point = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = p.N * p.Lq * p.M * p.P;
  if (point >= total) return;
  const int64_t pt = point % p.P;
  const int64_t head = point / p.P;
  const int64_t m = head % p.M;
  const int64_t n = head / (p.M * p.Lq);
  const int l = level_of_point(p.levels, pt);
  const Sample<acc_t> s = sample_point(loc[2 * point], loc[2 * point + 1], p.levels.height[l], p.levels.width[l], p.method);
  keys[point] = s.valid ? (n * p.M + m) * padded_cells + padded_cell(p.levels, l, s.y0, s.x0) : p.N * p.M * padded_cells;
}

template <typename T, typename acc_t, int VEC>
__global__ void grad_value_gather_kernel(const T* __restrict__ grad_out,            // [N, Lq, M, D]
                                         const acc_t* __restrict__ loc,             // [N, Lq, M, P, 2]
                                         const acc_t* __restrict__ attn,            // [N, Lq, M, P]
                                         const int64_t* __restrict__ sorted_points,  // [N * Lq * M * P]
                                         const int64_t* __restrict__ offsets,       // [N * M * padded_cells + 1]
                                         T* __restrict__ grad_value,                // [N, S, M, D]
                                         const Problem p, int64_t padded_cells, int tph_log2) {
  const Group g = make_group(tph_log2);
  const int64_t cell = g.head;  // (n, s, m) flattened in value's layout
  if (cell >= p.N * p.S * p.M) return;
  const int64_t m = cell % p.M;
  const int64_t s_tok = (cell / p.M) % p.S;
  const int64_t n = cell / (p.M * p.S);
  int l = 0;
  while (l + 1 < p.levels.num_levels && s_tok >= p.levels.start[l + 1]) ++l;
  const int64_t H = p.levels.height[l], W = p.levels.width[l];
  const int64_t y = (s_tok - p.levels.start[l]) / W, x = (s_tok - p.levels.start[l]) % W;
  const int64_t slice_base = (n * p.M + m) * padded_cells;
  const int64_t chunks = p.D / VEC;
  for (int64_t chunk = g.lane; chunk < chunks; chunk += g.tph) {
    acc_t acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) acc[k] = acc_t(0);
    // This cell is corner (dy, dx) of the base cell (y - dy, x - dx); fixed order = fixed sums.
#pragma unroll
    for (int corner = 3; corner >= 0; --corner) {
      const int dy = corner >> 1, dx = corner & 1;
      const int64_t key = slice_base + padded_cell(p.levels, l, y - dy, x - dx);
      const int64_t begin = offsets[key], end = offsets[key + 1];
      for (int64_t i = begin; i < end; ++i) {
        const int64_t point = sorted_points[i];
        const int64_t head = point / p.P;
        const Sample<acc_t> s = sample_point(loc[2 * point], loc[2 * point + 1], H, W, p.method);
        const acc_t w = corner == 0 ? s.w00() : corner == 1 ? s.w01() : corner == 2 ? s.w10() : s.w11();
        const acc_t aw = attn[point] * w;
        acc_t go[VEC];
        load_vec<T, acc_t, VEC>(grad_out + head * p.D + chunk * VEC, go);
#pragma unroll
        for (int k = 0; k < VEC; ++k) acc[k] += aw * go[k];
      }
    }
    store_vec<T, acc_t, VEC>(grad_value + cell * p.D + chunk * VEC, acc);
  }
}

// ------------------------------------------------------------------------------------------------
// Launch configuration
// ------------------------------------------------------------------------------------------------

int max_vec(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16: return 8;
    case DType::kFloat64: return 2;
    default: return 4;
  }
}

int element_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
    default: return 4;
  }
}

// Widest VEC dividing D for which every pointer the kernel vector-loads is aligned.
int pick_vec(DType dtype, int64_t D, std::initializer_list<const void*> ptrs) {
  for (int vec = max_vec(dtype); vec > 1; vec >>= 1) {
    if (D % vec != 0) continue;
    bool aligned = true;
    for (const void* ptr : ptrs)
      if (ptr != nullptr && reinterpret_cast<uintptr_t>(ptr) % (vec * element_size(dtype)) != 0) aligned = false;
    if (aligned) return vec;
  }
  return 1;
}

struct Launch {
  int tph_log2;
  int block;
  int64_t grid;
};

// Lanes per head: enough to cover the chunks in one round, at most a warp. Block size: the largest
// of 256/128/64 that still gives about two blocks per SM-worth of work on small (batch-1) calls.
Launch plan(int64_t groups, int64_t chunks) {
  Launch launch;
  launch.tph_log2 = 0;
  while ((1 << launch.tph_log2) < chunks && launch.tph_log2 < 5) ++launch.tph_log2;
  const int64_t threads = groups << launch.tph_log2;
  launch.block = threads >= 256 * 264 ? 256 : threads >= 128 * 264 ? 128 : 64;
  if (launch.block < (1 << launch.tph_log2)) launch.block = 1 << launch.tph_log2;
  const int64_t groups_per_block = launch.block >> launch.tph_log2;
  launch.grid = (groups + groups_per_block - 1) / groups_per_block;
  return launch;
}

template <typename F>
cudaError_t dispatch(DType dtype, int vec, F&& f) {
  // f.template operator()<T, acc_t, VEC>() for the runtime (dtype, vec)
#define MSDA_CASE_VEC(T, ACC, V) \
  if (vec == V) return f.template operator()<T, ACC, V>();
  switch (dtype) {
    case DType::kFloat32:
      MSDA_CASE_VEC(float, float, 4) MSDA_CASE_VEC(float, float, 2) MSDA_CASE_VEC(float, float, 1) break;
    case DType::kFloat16:
      MSDA_CASE_VEC(__half, float, 8) MSDA_CASE_VEC(__half, float, 4) MSDA_CASE_VEC(__half, float, 2)
      MSDA_CASE_VEC(__half, float, 1) break;
    case DType::kBFloat16:
      MSDA_CASE_VEC(__nv_bfloat16, float, 8) MSDA_CASE_VEC(__nv_bfloat16, float, 4)
      MSDA_CASE_VEC(__nv_bfloat16, float, 2) MSDA_CASE_VEC(__nv_bfloat16, float, 1) break;
    case DType::kFloat64:
      MSDA_CASE_VEC(double, double, 2) MSDA_CASE_VEC(double, double, 1) break;
  }
#undef MSDA_CASE_VEC
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_forward(const Problem& p, DType dtype, const void* value, const void* loc, const void* attn,
                           void* out, cudaStream_t stream) {
  const int64_t heads = p.N * p.Lq * p.M;
  if (heads == 0 || p.D == 0) return cudaSuccess;
  const int vec = pick_vec(dtype, p.D, {value, out});
  const Launch launch = plan(heads, p.D / vec);
  return dispatch(dtype, vec, [&]<typename T, typename acc_t, int VEC>() {
    forward_kernel<T, acc_t, VEC><<<launch.grid, launch.block, 0, stream>>>(
        static_cast<const T*>(value), static_cast<const acc_t*>(loc), static_cast<const acc_t*>(attn),
        static_cast<T*>(out), p, launch.tph_log2);
    return cudaGetLastError();
  });
}

cudaError_t launch_backward(const Problem& p, DType dtype, const void* grad_out, const void* value, const void* loc,
                            const void* attn, void* grad_value_acc, void* grad_loc, void* grad_attn, cudaStream_t stream) {
  const int64_t heads = p.N * p.Lq * p.M;
  if (heads == 0 || p.D == 0) return cudaSuccess;
  if (grad_value_acc == nullptr && grad_loc == nullptr && grad_attn == nullptr) return cudaSuccess;
  // grad_value_acc is in the math type: it constrains VEC only through its own element size, which
  // is at least value's, so value/grad_out alignment for VEC elements implies it.
  const int vec = pick_vec(dtype, p.D, {value, grad_out});
  const Launch launch = plan(heads, p.D / vec);
  return dispatch(dtype, vec, [&]<typename T, typename acc_t, int VEC>() {
    backward_kernel<T, acc_t, VEC><<<launch.grid, launch.block, 0, stream>>>(
        static_cast<const T*>(grad_out), static_cast<const T*>(value), static_cast<const acc_t*>(loc),
        static_cast<const acc_t*>(attn), static_cast<acc_t*>(grad_value_acc), static_cast<acc_t*>(grad_loc),
        static_cast<acc_t*>(grad_attn), p, launch.tph_log2);
    return cudaGetLastError();
  });
}

cudaError_t launch_point_keys(const Problem& p, DType dtype, const void* loc, int64_t padded_cells, int64_t* keys,
                              cudaStream_t stream) {
  const int64_t total = p.N * p.Lq * p.M * p.P;
  if (total == 0) return cudaSuccess;
  const int block = 256;
  const int64_t grid = (total + block - 1) / block;
  if (dtype == DType::kFloat64) {
    point_keys_kernel<double><<<grid, block, 0, stream>>>(static_cast<const double*>(loc), keys, p, padded_cells);
  } else {
    point_keys_kernel<float><<<grid, block, 0, stream>>>(static_cast<const float*>(loc), keys, p, padded_cells);
  }
  return cudaGetLastError();
}

cudaError_t launch_grad_value_gather(const Problem& p, DType dtype, const void* grad_out, const void* loc,
                                     const void* attn, const int64_t* sorted_points, const int64_t* segment_offsets,
                                     int64_t padded_cells, void* grad_value, cudaStream_t stream) {
  const int64_t cells = p.N * p.S * p.M;
  if (cells == 0 || p.D == 0) return cudaSuccess;
  const int vec = pick_vec(dtype, p.D, {grad_out, grad_value});
  const Launch launch = plan(cells, p.D / vec);
  return dispatch(dtype, vec, [&]<typename T, typename acc_t, int VEC>() {
    grad_value_gather_kernel<T, acc_t, VEC><<<launch.grid, launch.block, 0, stream>>>(
        static_cast<const T*>(grad_out), static_cast<const acc_t*>(loc), static_cast<const acc_t*>(attn),
        sorted_points, segment_offsets, static_cast<T*>(grad_value), p, padded_cells, launch.tph_log2);
    return cudaGetLastError();
  });
}

}  // namespace msda
}  // namespace rtdetr_kernels
