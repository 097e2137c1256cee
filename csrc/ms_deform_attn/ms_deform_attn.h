// Multi-scale deformable attention: the sampling math shared by the CPU and CUDA kernels.
//
// Semantics (research/ms_deform_attn.md §1.2-1.3): x = loc_x * W - 0.5, y = loc_y * H - 0.5; a point
// is skipped unless -1 < x < W and -1 < y < H (NaN fails); corners outside the level read as 0.
// RT-DETRv2's discrete method is expressed as the same "base cell" with weights (1, 0, 0, 0), so the
// forward, the value/weight gradients and the deterministic reduction all share one code path.
//
// No torch headers here: this file is included by .cu files that must stay light to compile.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define MSDA_HD __host__ __device__ __forceinline__
#else
#define MSDA_HD inline
#endif

namespace rtdetr_kernels {
namespace msda {

constexpr int kMaxLevels = 16;
enum Method : int { kBilinear = 0, kDiscretePerAxis = 1, kDiscreteOfficial = 2 };

// Level metadata, passed by value to kernels: nothing on the device to read out of bounds.
struct Levels {
  int num_levels;
  int64_t height[kMaxLevels];
  int64_t width[kMaxLevels];
  int64_t start[kMaxLevels];        // first token of the level in value's S axis
  int64_t point_start[kMaxLevels];  // first point of the level in the flattened point axis
  int64_t num_points[kMaxLevels];
  int64_t padded_start[kMaxLevels];  // first cell of the level in the (H+1)x(W+1) padded cell grid
};

struct Problem {
  int64_t N, S, M, D, Lq, P;  // P = total points over levels
  int method;
  Levels levels;
};

// Where one sampling point lands: the base cell (y0, x0) and the four corner weights.
template <typename T>
struct Sample {
  bool valid;
  int64_t y0, x0;
  T ly, lx, hy, hx;  // corner weights are hy*hx, hy*lx, ly*hx, ly*lx

  MSDA_HD T w00() const { return hy * hx; }
  MSDA_HD T w01() const { return hy * lx; }
  MSDA_HD T w10() const { return ly * hx; }
  MSDA_HD T w11() const { return ly * lx; }
};

template <typename T>
MSDA_HD T msda_floor(T v);
template <>
MSDA_HD float msda_floor<float>(float v) {
#if defined(__CUDA_ARCH__)
  return floorf(v);
#else
  return __builtin_floorf(v);
#endif
}
template <>
MSDA_HD double msda_floor<double>(double v) {
#if defined(__CUDA_ARCH__)
  return ::floor(v);
#else
  return __builtin_floor(v);
#endif
}

// Products that must round like the reference's separate torch ops (no FMA contraction, which GCC
// does by default for C++ when the target has FMA, as the AVX2 build of the CPU kernels does):
// loc * W is rounded before the -0.5, which decides the bilinear cell near integer knots.
// On the host an empty asm statement makes the rounded product opaque, so it cannot be fused.
template <typename T>
MSDA_HD T mul_rn_host(T a, T b) {
  T r = a * b;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(r));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(r));
#else
  volatile T opaque = r;
  r = opaque;
#endif
  return r;
}

MSDA_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return mul_rn_host(a, b);
#endif
}
MSDA_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return mul_rn_host(a, b);
#endif
}

template <typename T>
MSDA_HD bool msda_isfinite(T v) {
  return v == v && v - v == T(0);  // false for NaN and +-inf, without <cmath>
}

template <typename T>
MSDA_HD Sample<T> bilinear_sample(T loc_x, T loc_y, int64_t H, int64_t W) {
  Sample<T> s;
  const T x = mul_rn(loc_x, static_cast<T>(W)) - T(0.5);
  const T y = mul_rn(loc_y, static_cast<T>(H)) - T(0.5);
  s.valid = (y > T(-1)) && (x > T(-1)) && (y < static_cast<T>(H)) && (x < static_cast<T>(W));
  if (!s.valid) {
    s.y0 = s.x0 = 0;
    s.ly = s.lx = s.hy = s.hx = T(0);
    return s;
  }
  const T fx = msda_floor(x), fy = msda_floor(y);
  s.x0 = static_cast<int64_t>(fx);
  s.y0 = static_cast<int64_t>(fy);
  s.lx = x - fx;
  s.ly = y - fy;
  s.hx = T(1) - s.lx;
  s.hy = T(1) - s.ly;
  return s;
}

// RT-DETRv2 discrete sampling: ix = int64(loc_x * W + 0.5) (truncation), clamped. 'official' clamps
// x to H - 1 as upstream does; an x past W - 1 (upstream raises there) samples nothing.
template <typename T>
MSDA_HD Sample<T> discrete_sample(T loc_x, T loc_y, int64_t H, int64_t W, int method) {
  Sample<T> s;
  s.ly = s.lx = T(0);
  s.hy = s.hx = T(1);
  s.valid = msda_isfinite(loc_x) && msda_isfinite(loc_y);
  if (!s.valid) {
    s.y0 = s.x0 = 0;
    s.hy = s.hx = T(0);
    return s;
  }
  const int64_t x_max = method == kDiscreteOfficial ? H - 1 : W - 1;
  const T big_x = static_cast<T>((H > W ? H : W) + 1), big_y = static_cast<T>(H + 1);
  T fx = mul_rn(loc_x, static_cast<T>(W)) + T(0.5);
  T fy = mul_rn(loc_y, static_cast<T>(H)) + T(0.5);
  fx = fx < T(-1) ? T(-1) : (fx > big_x ? big_x : fx);  // keep the int conversion defined
  fy = fy < T(-1) ? T(-1) : (fy > big_y ? big_y : fy);
  int64_t ix = static_cast<int64_t>(fx), iy = static_cast<int64_t>(fy);
  ix = ix < 0 ? 0 : (ix > x_max ? x_max : ix);
  iy = iy < 0 ? 0 : (iy > H - 1 ? H - 1 : iy);
  if (ix > W - 1) {
    s.valid = false;
    s.hy = s.hx = T(0);
    ix = 0;
  }
  s.x0 = ix;
  s.y0 = iy;
  return s;
}

template <typename T>
MSDA_HD Sample<T> sample_point(T loc_x, T loc_y, int64_t H, int64_t W, int method) {
  return method == kBilinear ? bilinear_sample(loc_x, loc_y, H, W) : discrete_sample(loc_x, loc_y, H, W, method);
}

MSDA_HD bool corner_inside(int64_t y, int64_t x, int64_t H, int64_t W) {
  return y >= 0 && y < H && x >= 0 && x < W;
}

// The level a flattened point index belongs to (levels are few: a linear scan).
MSDA_HD int level_of_point(const Levels& lv, int64_t p) {
  int l = 0;
  while (l + 1 < lv.num_levels && p >= lv.point_start[l + 1]) ++l;
  return l;
}

// Padded cell id of a base cell (y0, x0) in [-1, H-1] x [-1, W-1] within its (n, m) slice.
MSDA_HD int64_t padded_cell(const Levels& lv, int l, int64_t y0, int64_t x0) {
  return lv.padded_start[l] + (y0 + 1) * (lv.width[l] + 1) + (x0 + 1);
}

}  // namespace msda
}  // namespace rtdetr_kernels
