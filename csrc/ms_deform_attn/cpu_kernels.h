// Multi-scale deformable attention CPU kernels: the loop nests, compiled once per instruction set.
//
// cpu.cpp includes this file (deliberately without an include guard) inside one namespace per
// instruction set, once under `#pragma GCC target("avx2,fma")` and once for the baseline, and picks
// one at run time; the sampling math comes from ms_deform_attn.h, shared with the CUDA kernels.
//
// Each point is handled with straight-line channel loops over its four corners: a corner outside the
// level reads a row of zeros and one with bilinear weight 0 is skipped (the backward sends it to a
// scratch row), so the loops have no branches and vectorise; D = 32 and 64 unroll completely.
// Work is split by (n, m) slices of value. The forward runs over (n, m, q) heads; the backward over
// slices, each task owning its slice of grad_value (accumulated in a contiguous buffer and written out
// once), so it is deterministic for any thread count without atomics. The measurements behind these
// choices (and the variants that were slower) are in docs/cpu-msda-kernels.md.

// Rows of one (n, m) slice of a [N, S, M, D] tensor: row r is at base + r * M * D.
template <typename T>
struct SliceRows {
  T* base;
  int64_t stride;
  T* row(int64_t r) const { return base + r * stride; }
};

template <typename scalar_t>
SliceRows<const scalar_t> value_rows(const scalar_t* value, int64_t n, int64_t m, const Problem& p, int64_t D) {
  return {value + (n * p.S * p.M + m) * D, p.M * D};
}

// Rows of value and grad_out in the math type: float32/float64 rows are used in place; float16 and
// bfloat16 rows are converted once into a small buffer (8 channels per instruction in the AVX2
// build: F16C for float16, a 16-bit shift for bfloat16), so that the channel loops read plain floats.
#if defined(RTDETR_CPU_F16C)
inline void convert_row(const c10::Half* src, float* dst, int64_t D) {
  int64_t c = 0;
  for (; c + 8 <= D; c += 8)
    _mm256_storeu_ps(dst + c, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c))));
  for (; c < D; ++c) dst[c] = _cvtsh_ss(src[c].x);
}
inline void convert_row(const c10::BFloat16* src, float* dst, int64_t D) {  // bfloat16 = float's top 16 bits
  int64_t c = 0;
  for (; c + 8 <= D; c += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + c)));
    _mm256_storeu_ps(dst + c, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
  }
  for (; c < D; ++c) dst[c] = static_cast<float>(src[c]);
}
#endif
template <typename scalar_t, typename acc_t>
inline void convert_row(const scalar_t* src, acc_t* dst, int64_t D) {
  for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<acc_t>(src[c]);
}

// In the AVX2 build, float16/bfloat16 rows of RT-DETR's head sizes (D a multiple of 8, known at
// compile time) are not staged through RowReader's buffer: the four corners are widened 8 channels at
// a time straight into the multiply-adds (load8), which halves the forward's memory traffic per
// point next to float32 value instead of adding a store and a reload per corner.
#if defined(RTDETR_CPU_F16C)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
// ... and the float32 result is narrowed 8 channels at a time, rounding to nearest even like
// c10's scalar conversions (which are bit manipulations per element, without F16C)
inline void store8(c10::Half* p, __m256 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline void store8(c10::BFloat16* p, __m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <typename scalar_t, typename acc_t, int kD>
constexpr bool kWidenInline = std::is_same_v<acc_t, float> && !std::is_same_v<scalar_t, float> && kD > 0 && kD % 8 == 0;
// the backward's four dot products use dot_corners for float32 rows too (four independent vector
// accumulators beat the compiler's reduction; docs/cpu-msda-kernels.md)
template <typename scalar_t, typename acc_t, int kD>
constexpr bool kDotIntrinsics = std::is_same_v<acc_t, float> && kD > 0 && kD % 8 == 0;

// acc += w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3 over kD channels, rows widened on the fly
template <int kD, typename scalar_t>
inline void accumulate_corners(float* acc, const scalar_t* v0, const scalar_t* v1, const scalar_t* v2,
                               const scalar_t* v3, float w0, float w1, float w2, float w3) {
  const __m256 b0 = _mm256_set1_ps(w0), b1 = _mm256_set1_ps(w1), b2 = _mm256_set1_ps(w2), b3 = _mm256_set1_ps(w3);
  for (int c = 0; c < kD; c += 8) {
    __m256 sum = _mm256_mul_ps(b0, load8(v0 + c));
    sum = _mm256_fmadd_ps(b1, load8(v1 + c), sum);
    sum = _mm256_fmadd_ps(b2, load8(v2 + c), sum);
    sum = _mm256_fmadd_ps(b3, load8(v3 + c), sum);
    _mm256_storeu_ps(acc + c, _mm256_add_ps(_mm256_loadu_ps(acc + c), sum));
  }
}

inline float horizontal_sum(__m256 v) {
  const __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pairs = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 0x55)));
}

// d_k = <g, v_k> for the four corners over kD channels, rows widened on the fly
template <int kD, typename scalar_t>
inline void dot_corners(const float* g, const scalar_t* v0, const scalar_t* v1, const scalar_t* v2, const scalar_t* v3,
                        float& d0, float& d1, float& d2, float& d3) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  for (int c = 0; c < kD; c += 8) {
    const __m256 gc = _mm256_loadu_ps(g + c);
    s0 = _mm256_fmadd_ps(gc, load8(v0 + c), s0);
    s1 = _mm256_fmadd_ps(gc, load8(v1 + c), s1);
    s2 = _mm256_fmadd_ps(gc, load8(v2 + c), s2);
    s3 = _mm256_fmadd_ps(gc, load8(v3 + c), s3);
  }
  d0 = horizontal_sum(s0);
  d1 = horizontal_sum(s1);
  d2 = horizontal_sum(s2);
  d3 = horizontal_sum(s3);
}
#else
template <typename scalar_t, typename acc_t, int kD>
constexpr bool kWidenInline = false;
template <typename scalar_t, typename acc_t, int kD>
constexpr bool kDotIntrinsics = false;
#endif

template <typename scalar_t, typename acc_t>
struct RowReader {
  std::vector<acc_t> buffer;
  int64_t D;
  explicit RowReader(int64_t d) : buffer(std::is_same_v<scalar_t, acc_t> ? 0 : 5 * d), D(d) {}
  // the row as acc_t; `slot` (0-4) picks the buffer, so up to five converted rows can be live at once
  const acc_t* operator()(const scalar_t* row, int slot) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      (void)slot;
      return row;
    } else {
      acc_t* dst = buffer.data() + slot * D;
      convert_row(row, dst, D);
      return dst;
    }
  }
};

// Moves a row of the slice's buffer (math type) into grad_value (value's dtype) and zeroes it for
// the next slice. grad_value is written once and not read again here, so in the AVX2 build full
// rows go out with non-temporal stores (no read-for-ownership of lines that are about to be
// overwritten whole); float16/bfloat16 are narrowed 8 channels at a time.
template <typename scalar_t, typename acc_t>
inline void flush_row(acc_t* __restrict__ src, scalar_t* __restrict__ dst, int64_t D) {
#if defined(RTDETR_CPU_F16C)
  if constexpr (std::is_same_v<acc_t, float>) {
    constexpr uintptr_t align = std::is_same_v<scalar_t, float> ? 32 : 16;
    if (D % 8 == 0 && reinterpret_cast<uintptr_t>(dst) % align == 0) {
      const __m256 zero = _mm256_setzero_ps();
      for (int64_t c = 0; c < D; c += 8) {
        const __m256 x = _mm256_loadu_ps(src + c);
        if constexpr (std::is_same_v<scalar_t, float>) {
          _mm256_stream_ps(dst + c, x);
        } else {
          alignas(16) scalar_t narrow[8];
          store8(narrow, x);
          _mm_stream_si128(reinterpret_cast<__m128i*>(dst + c), _mm_load_si128(reinterpret_cast<const __m128i*>(narrow)));
        }
        _mm256_storeu_ps(src + c, zero);
      }
      return;
    }
  }
#endif
  for (int64_t c = 0; c < D; ++c) {
    dst[c] = static_cast<scalar_t>(src[c]);
    src[c] = acc_t(0);
  }
}

template <typename acc_t>
struct Corners {
  int64_t row[4];  // row of the corner within its (n, m) slice, or -1 when outside the level
  acc_t weight[4];  // bilinear weight, 0 when outside
};

// The four corners of a valid sample: rows within the slice and their bilinear weights.
template <typename acc_t>
inline Corners<acc_t> corners_of(const Sample<acc_t>& s, int64_t H, int64_t W, int64_t level_start) {
  Corners<acc_t> c;
  const acc_t w[4] = {s.w00(), s.w01(), s.w10(), s.w11()};
  for (int k = 0; k < 4; ++k) {
    const int64_t y = s.y0 + (k >> 1), x = s.x0 + (k & 1);
    const bool inside = corner_inside(y, x, H, W);
    c.row[k] = inside ? level_start + y * W + x : -1;
    c.weight[k] = inside ? w[k] : acc_t(0);
  }
  return c;
}

template <typename scalar_t, typename acc_t, int kD>
void forward_range(int64_t begin, int64_t end, const scalar_t* __restrict__ value, const acc_t* __restrict__ loc,
                   const acc_t* __restrict__ attn, scalar_t* __restrict__ out, const Problem& p) {
  const int64_t D = kD > 0 ? kD : p.D;
  const std::vector<acc_t> zeros(D, acc_t(0));
  const std::vector<scalar_t> zeros_raw(kWidenInline<scalar_t, acc_t, kD> ? D : 0, scalar_t(0.0f));
  RowReader<scalar_t, acc_t> read(kWidenInline<scalar_t, acc_t, kD> ? 0 : D);
  std::vector<acc_t> acc_store(kD > 0 ? 0 : D);
  acc_t acc_fixed[kD > 0 ? kD : 1];
  acc_t* __restrict__ acc = kD > 0 ? acc_fixed : acc_store.data();
  int64_t index = begin;
  while (index < end) {
    // the heads of this range in one (n, m) slice: [index, slice_end)
    const int64_t slice = index / p.Lq, n = slice / p.M, m = slice % p.M;
    const int64_t slice_end = std::min(end, (slice + 1) * p.Lq);
    const SliceRows<const scalar_t> rows = value_rows(value, n, m, p, D);
    for (; index < slice_end; ++index) {
      const int64_t q = index % p.Lq;
      const int64_t head = (n * p.Lq + q) * p.M + m;
      for (int64_t c = 0; c < D; ++c) acc[c] = acc_t(0);
      const acc_t* head_loc = loc + head * p.P * 2;
      const acc_t* head_attn = attn + head * p.P;
      for (int l = 0; l < p.levels.num_levels; ++l) {
        const int64_t H = p.levels.height[l], W = p.levels.width[l];
        const int64_t first = p.levels.point_start[l], last = first + p.levels.num_points[l];
        for (int64_t pt = first; pt < last; ++pt) {
          const Sample<acc_t> s = sample_point(head_loc[2 * pt], head_loc[2 * pt + 1], H, W, p.method);
          if (!s.valid) continue;
          const Corners<acc_t> k = corners_of(s, H, W, p.levels.start[l]);
          const acc_t a = head_attn[pt];
          const acc_t w0 = a * k.weight[0], w1 = a * k.weight[1], w2 = a * k.weight[2], w3 = a * k.weight[3];
          // a corner with weight 0 is not read, as in the reference (0 * inf would be NaN)
#if defined(RTDETR_CPU_F16C)
          if constexpr (kWidenInline<scalar_t, acc_t, kD>) {
            const scalar_t* z = zeros_raw.data();
            accumulate_corners<kD>(acc, k.weight[0] != acc_t(0) ? rows.row(k.row[0]) : z,
                                   k.weight[1] != acc_t(0) ? rows.row(k.row[1]) : z,
                                   k.weight[2] != acc_t(0) ? rows.row(k.row[2]) : z,
                                   k.weight[3] != acc_t(0) ? rows.row(k.row[3]) : z, w0, w1, w2, w3);
            continue;
          }
#endif
          const acc_t* __restrict__ v0 = k.weight[0] != acc_t(0) ? read(rows.row(k.row[0]), 0) : zeros.data();
          const acc_t* __restrict__ v1 = k.weight[1] != acc_t(0) ? read(rows.row(k.row[1]), 1) : zeros.data();
          const acc_t* __restrict__ v2 = k.weight[2] != acc_t(0) ? read(rows.row(k.row[2]), 2) : zeros.data();
          const acc_t* __restrict__ v3 = k.weight[3] != acc_t(0) ? read(rows.row(k.row[3]), 3) : zeros.data();
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) acc[c] += w0 * v0[c] + w1 * v1[c] + w2 * v2[c] + w3 * v3[c];
        }
      }
      scalar_t* __restrict__ o = out + head * D;
#if defined(RTDETR_CPU_F16C)
      if constexpr (kWidenInline<scalar_t, acc_t, kD>) {
        for (int c = 0; c < kD; c += 8) store8(o + c, _mm256_loadu_ps(acc + c));
        continue;
      }
#endif
      for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  }
}

template <typename scalar_t, typename acc_t, int kD>
void backward_range(int64_t begin, int64_t end, const scalar_t* __restrict__ grad_out,
                    const scalar_t* __restrict__ value, const acc_t* __restrict__ loc, const acc_t* __restrict__ attn,
                    scalar_t* grad_value, acc_t* __restrict__ grad_loc, acc_t* __restrict__ grad_attn, const Problem& p) {
  const int64_t D = kD > 0 ? kD : p.D;
  const bool bilinear = p.method == kBilinear;
  const bool do_points = grad_attn != nullptr || (grad_loc != nullptr && bilinear);
  const bool do_value = grad_value != nullptr;
  const std::vector<acc_t> zeros(D, acc_t(0));
  const std::vector<scalar_t> zeros_raw(kDotIntrinsics<scalar_t, acc_t, kD> ? D : 0, scalar_t(0.0f));
  RowReader<scalar_t, acc_t> read(D);
  std::vector<acc_t> scratch(4 * D);  // where the grad_value rows of unread corners go
  // grad_value is accumulated slice by slice in a contiguous [S, D] buffer in the math type (1 MB at
  // 640 px: it stays in cache, where the slice's rows in grad_value lie M * D apart), then written out
  // row by row in value's dtype: no full-size float32 copy for float16/bfloat16, and no cast pass
  std::vector<acc_t> slice_acc(do_value ? p.S * D : 0);
  for (int64_t slice = begin; slice < end; ++slice) {
    const int64_t n = slice / p.M, m = slice % p.M;
    // one pass over the slice's points: the weight and location grads (reading value) and grad_value
    // (accumulating into the slice's buffer)
    const SliceRows<const scalar_t> rows = value_rows(value, n, m, p, D);
    SliceRows<acc_t> grad_rows{nullptr, 0};
    if (do_value) grad_rows = {slice_acc.data(), D};  // all zeros: new, or flushed by the previous slice
    for (int64_t q = 0; q < p.Lq; ++q) {
      const int64_t head = (n * p.Lq + q) * p.M + m;
      const acc_t* __restrict__ g = read(grad_out + head * D, 4);
      for (int l = 0; l < p.levels.num_levels; ++l) {
        const int64_t H = p.levels.height[l], W = p.levels.width[l];
        const int64_t first = p.levels.point_start[l], last = first + p.levels.num_points[l];
        for (int64_t pt = first; pt < last; ++pt) {
          const int64_t point = head * p.P + pt;
          const Sample<acc_t> s = sample_point(loc[2 * point], loc[2 * point + 1], H, W, p.method);
          if (!s.valid) continue;  // grads of a skipped point stay 0
          const Corners<acc_t> k = corners_of(s, H, W, p.levels.start[l]);
          const acc_t a = attn[point];
          if (do_points) {
            // <grad_out, corner k> for the four corners; every corner inside the level is read, weight 0
            // or not: on a bilinear knot the location grad still depends on the neighbour (zeros outside)
            acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#if defined(RTDETR_CPU_F16C)
            if constexpr (kDotIntrinsics<scalar_t, acc_t, kD>) {
              const scalar_t* z = zeros_raw.data();
              dot_corners<kD>(g, k.row[0] >= 0 ? rows.row(k.row[0]) : z, k.row[1] >= 0 ? rows.row(k.row[1]) : z,
                              k.row[2] >= 0 ? rows.row(k.row[2]) : z, k.row[3] >= 0 ? rows.row(k.row[3]) : z,
                              d0, d1, d2, d3);
            } else
#endif
            {
              const acc_t* __restrict__ v0 = k.row[0] >= 0 ? read(rows.row(k.row[0]), 0) : zeros.data();
              const acc_t* __restrict__ v1 = k.row[1] >= 0 ? read(rows.row(k.row[1]), 1) : zeros.data();
              const acc_t* __restrict__ v2 = k.row[2] >= 0 ? read(rows.row(k.row[2]), 2) : zeros.data();
              const acc_t* __restrict__ v3 = k.row[3] >= 0 ? read(rows.row(k.row[3]), 3) : zeros.data();
#pragma omp simd reduction(+ : d0, d1, d2, d3)
              for (int64_t c = 0; c < D; ++c) {
                d0 += g[c] * v0[c];
                d1 += g[c] * v1[c];
                d2 += g[c] * v2[c];
                d3 += g[c] * v3[c];
              }
            }
            if (grad_attn != nullptr)
              grad_attn[point] = k.weight[0] * d0 + k.weight[1] * d1 + k.weight[2] * d2 + k.weight[3] * d3;
            if (grad_loc != nullptr && bilinear) {
              // d(sample)/dx = hy * (v01 - v00) + ly * (v11 - v10), likewise for y; x = loc_x * W - 0.5
              grad_loc[2 * point] = static_cast<acc_t>(W) * a * (s.hy * (d1 - d0) + s.ly * (d3 - d2));
              grad_loc[2 * point + 1] = static_cast<acc_t>(H) * a * (s.hx * (d2 - d0) + s.lx * (d3 - d1));
            }
          }
          if (do_value) {
            acc_t* __restrict__ r0 = k.weight[0] != acc_t(0) ? grad_rows.row(k.row[0]) : scratch.data();
            acc_t* __restrict__ r1 = k.weight[1] != acc_t(0) ? grad_rows.row(k.row[1]) : scratch.data() + D;
            acc_t* __restrict__ r2 = k.weight[2] != acc_t(0) ? grad_rows.row(k.row[2]) : scratch.data() + 2 * D;
            acc_t* __restrict__ r3 = k.weight[3] != acc_t(0) ? grad_rows.row(k.row[3]) : scratch.data() + 3 * D;
            const acc_t w0 = a * k.weight[0], w1 = a * k.weight[1], w2 = a * k.weight[2], w3 = a * k.weight[3];
#pragma omp simd
            for (int64_t c = 0; c < D; ++c) {
              r0[c] += w0 * g[c];
              r1[c] += w1 * g[c];
              r2[c] += w2 * g[c];
              r3[c] += w3 * g[c];
            }
          }
        }
      }
    }
    if (do_value) {  // the task's own slice of grad_value, written whole
      const SliceRows<scalar_t> out_rows{grad_value + (n * p.S * p.M + m) * D, p.M * D};
      for (int64_t r = 0; r < p.S; ++r) flush_row(grad_rows.row(r), out_rows.row(r), D);
    }
  }
#if defined(RTDETR_CPU_F16C)
  _mm_sfence();  // the non-temporal stores are visible before the task reports done
#endif
}

// Runs `fn.template operator()<kD>()` with kD = D for RT-DETR's head sizes, 0 (generic) otherwise.
template <typename Fn>
void with_head_dim(int64_t D, Fn&& fn) {
  if (D == 32) {
    fn(std::integral_constant<int, 32>());
  } else if (D == 64) {
    fn(std::integral_constant<int, 64>());
  } else {
    fn(std::integral_constant<int, 0>());
  }
}

template <typename scalar_t, typename acc_t>
void forward(int64_t begin, int64_t end, const scalar_t* value, const acc_t* loc, const acc_t* attn, scalar_t* out,
             const Problem& p) {
  with_head_dim(p.D, [&](auto kd) { forward_range<scalar_t, acc_t, decltype(kd)::value>(begin, end, value, loc, attn, out, p); });
}

template <typename scalar_t, typename acc_t>
void backward(int64_t begin, int64_t end, const scalar_t* grad_out, const scalar_t* value, const acc_t* loc,
              const acc_t* attn, scalar_t* grad_value, acc_t* grad_loc, acc_t* grad_attn, const Problem& p) {
  with_head_dim(p.D, [&](auto kd) {
    backward_range<scalar_t, acc_t, decltype(kd)::value>(begin, end, grad_out, value, loc, attn, grad_value, grad_loc,
                                                         grad_attn, p);
  });
}
