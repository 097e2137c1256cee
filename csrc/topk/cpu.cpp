// Top-K query selection on the CPU: the forward of rtdetr_kernels_C::topk_select_forward (the backward
// stays PyTorch's scatters, kernels/topk/cpu.py). The order is kernels/topk/reference.py's: descending,
// -0.0 == +0.0, +inf highest, NaN lowest of all, equal scores by lower candidate index.
//
// One pass per image (at::parallel_for over N) streams the candidates (tokens, or (token, class) pairs
// with flat index t * C + c) in ascending index order, each as one packed unsigned integer (rank key
// high, complemented index low) whose order is the ranking. A candidate is kept only when it is above a
// threshold, a lower bound of the k-th best so far (an equal key loses to the earlier index, so the
// test is strict): after the first few hundred tokens nearly every candidate is rejected by one
// compare. Kept ones go to a buffer of 2k that is cut back to its k best (nth_element) when full,
// raising the threshold; the k survivors are sorted at the end. O(T C + E + k log k) for E entries
// (about k ln(T / k) on random scores; k = T: O(T log T), the sort).
//
// A token's class max is one pass over its row with four independent vector accumulators and a NaN
// mask (GCC/Clang vector extensions, 16 bytes: SSE2 on any x86-64, so no run-time ISA dispatch); its
// class (the first NaN, else the first class at the max, as torch.argmax) is looked up only for the k
// chosen tokens. The pairs form skips a row whose max is not above the threshold's value, and tests the
// values of the other rows against that value. Gathered rows are memcpy'd (bits as they are).
//
// Rank keys, equal for equal values as rank_key's: float32 and bfloat16 (widened exactly) compare as
// float, their key the float's IEEE bits made monotone (+ 0.0f folds -0.0) in 32 bits; float64 the
// same in 64 bits; float16 compares in the integer domain (sign-magnitude bits to two's complement, so
// -0.0 == +0.0, no F16C needed), which is its key. NaN gets the lowest key.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

namespace rtdetr_kernels {
namespace topk {
namespace {

// Vectors of 16 bytes (GCC/Clang vector extensions; SSE2 registers on x86-64, NEON on aarch64; plain
// loops elsewhere). Wider generic vectors than the target has get split badly, so the row max runs
// four of these side by side instead.
#if defined(__GNUC__)
#define RTDETR_TOPK_VECTORS 1
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x4 __attribute__((vector_size(16)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef double f64x2 __attribute__((vector_size(16)));
typedef int64_t i64x2 __attribute__((vector_size(16)));
typedef uint16_t u16x4 __attribute__((vector_size(8)));
#endif

// A rank key and candidate index packed into one unsigned integer whose order is the ranking: the
// key (biased to unsigned) in the high half, the bitwise complement of the index in the low half, so
// of two equal keys the lower index is the larger. 64 bits for the 32-bit keys of float32 and
// narrower, a pair of words for float64's 64-bit keys.
struct Packed128 {
  uint64_t hi, lo;
  bool operator>(const Packed128& o) const { return hi > o.hi || (hi == o.hi && lo > o.lo); }
  bool operator<(const Packed128& o) const { return o > *this; }
};

inline uint64_t pack(int32_t key, int64_t index) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(key) ^ 0x80000000u) << 32) |
         (0xffffffffull - static_cast<uint64_t>(index));
}
inline Packed128 pack(int64_t key, int64_t index) {
  return {static_cast<uint64_t>(key) ^ (uint64_t(1) << 63), ~static_cast<uint64_t>(index)};
}
inline int32_t unpack_key(uint64_t p, int32_t) { return static_cast<int32_t>(static_cast<uint32_t>(p >> 32) ^ 0x80000000u); }
inline int64_t unpack_key(const Packed128& p, int64_t) { return static_cast<int64_t>(p.hi ^ (uint64_t(1) << 63)); }
inline int64_t unpack_index(uint64_t p) { return static_cast<int64_t>(0xffffffffull - (p & 0xffffffffull)); }
inline int64_t unpack_index(const Packed128& p) { return static_cast<int64_t>(~p.lo); }

// Keys of non-NaN values: IEEE bits as a signed integer order positive values; flipping the magnitude
// bits of negatives makes the whole line monotone; + 0.0 turns -0.0 into +0.0 first.
inline int32_t float_key(float v) {
  const int32_t bits = std::bit_cast<int32_t>(v + 0.0f);
  return bits < 0 ? bits ^ std::numeric_limits<int32_t>::max() : bits;
}
inline int64_t double_key(double v) {
  const int64_t bits = std::bit_cast<int64_t>(v + 0.0);
  return bits < 0 ? bits ^ std::numeric_limits<int64_t>::max() : bits;
}
// ... and back (the flip is its own inverse): the value of a (non-NaN) key
inline float float_of_key(int32_t key) {
  return std::bit_cast<float>(key < 0 ? key ^ std::numeric_limits<int32_t>::max() : key);
}
inline double double_of_key(int64_t key) {
  return std::bit_cast<double>(key < 0 ? key ^ std::numeric_limits<int64_t>::max() : key);
}

// Per dtype: Raw is the stored element (16-bit types as their bits), Value what the row max compares
// (`v > acc` never picks a NaN), Key the rank key (NaN the lowest), Packed the packed (key, index).
// lanes() loads 16 bytes' worth of Values and their NaN mask.
struct Float32 {
  using Raw = float;
  using Value = float;
  using Key = int32_t;
  using Packed = uint64_t;
  static Value value(Raw x) { return x; }
  static bool is_nan(Raw x) { return x != x; }
  static Value lowest() { return -std::numeric_limits<float>::infinity(); }
  static Key key(Value v) { return float_key(v); }
  static Value value_of_key(Key k) { return float_of_key(k); }
#ifdef RTDETR_TOPK_VECTORS
  using Vec = f32x4;
  using Mask = i32x4;
  static constexpr int64_t kLanes = 4;
  static void lanes(const Raw* p, Vec& v, Mask& nan) {
    std::memcpy(&v, p, sizeof v);
    nan = v != v;
  }
#endif
};

struct Float64 {
  using Raw = double;
  using Value = double;
  using Key = int64_t;
  using Packed = Packed128;
  static Value value(Raw x) { return x; }
  static bool is_nan(Raw x) { return x != x; }
  static Value lowest() { return -std::numeric_limits<double>::infinity(); }
  static Key key(Value v) { return double_key(v); }
  static Value value_of_key(Key k) { return double_of_key(k); }
#ifdef RTDETR_TOPK_VECTORS
  using Vec = f64x2;
  using Mask = i64x2;
  static constexpr int64_t kLanes = 2;
  static void lanes(const Raw* p, Vec& v, Mask& nan) {
    std::memcpy(&v, p, sizeof v);
    nan = v != v;
  }
#endif
};

struct BFloat16 {  // widened to float (exact): the bits shifted into the high half
  using Raw = uint16_t;
  using Value = float;
  using Key = int32_t;
  using Packed = uint64_t;
  static Value value(Raw x) { return std::bit_cast<float>(static_cast<uint32_t>(x) << 16); }
  static bool is_nan(Raw x) { return (x & 0x7fff) > 0x7f80; }
  static Value lowest() { return -std::numeric_limits<float>::infinity(); }
  static Key key(Value v) { return float_key(v); }
  static Value value_of_key(Key k) { return float_of_key(k); }
#ifdef RTDETR_TOPK_VECTORS
  using Vec = f32x4;
  using Mask = i32x4;
  static constexpr int64_t kLanes = 4;
  static void lanes(const Raw* p, Vec& v, Mask& nan) {
    u16x4 bits;
    std::memcpy(&bits, p, sizeof bits);
    const u32x4 wide = __builtin_convertvector(bits, u32x4) << 16;
    std::memcpy(&v, &wide, sizeof v);
    nan = v != v;
  }
#endif
};

// float16 in the integer domain (no F16C needed): magnitude bits m, the value m or -m (monotone,
// -0 == +0), so the key is the value itself; NaN (m above the infinity's 0x7c00) is the lowest int32,
// below -inf's -0x7c00.
struct Float16 {
  using Raw = uint16_t;
  using Value = int32_t;
  using Key = int32_t;
  using Packed = uint64_t;
  static Value value(Raw x) {
    const int32_t m = x & 0x7fff;
    const int32_t sign = -static_cast<int32_t>(x >> 15);  // 0 or -1
    return m > 0x7c00 ? lowest() : (m ^ sign) - sign;
  }
  static bool is_nan(Raw x) { return (x & 0x7fff) > 0x7c00; }
  static Value lowest() { return std::numeric_limits<int32_t>::min(); }
  static Key key(Value v) { return v; }
  static Value value_of_key(Key k) { return k; }
#ifdef RTDETR_TOPK_VECTORS
  using Vec = i32x4;
  using Mask = i32x4;
  static constexpr int64_t kLanes = 4;
  static void lanes(const Raw* p, Vec& v, Mask& nan) {
    u16x4 bits;
    std::memcpy(&bits, p, sizeof bits);
    const i32x4 x = __builtin_convertvector(bits, i32x4);
    const i32x4 m = x & 0x7fff;
    const i32x4 sign = -(x >> 15);
    nan = m > 0x7c00;
    v = nan ? i32x4{} + lowest() : (m ^ sign) - sign;
  }
#endif
};

template <class D>
inline typename D::Key nan_key() {
  return std::numeric_limits<typename D::Key>::min();
}

template <class D>
inline typename D::Key raw_key(typename D::Raw x) {
  return D::is_nan(x) ? nan_key<D>() : D::key(D::value(x));
}

template <class D>
struct RowMax {
  typename D::Value max;  // the max of the row's non-NaN values (D::lowest() when there are none)
  bool nan;               // the row has a NaN
  typename D::Key key() const { return nan ? nan_key<D>() : D::key(max); }  // the class max's key
};

// The max of a row and whether it has a NaN: four vector accumulators (independent chains), then one,
// then a scalar tail.
template <class D>
inline RowMax<D> row_max(const typename D::Raw* row, int64_t C) {
  using Value = typename D::Value;
  Value best = D::lowest();
  bool nan = false;
  int64_t c = 0;
#ifdef RTDETR_TOPK_VECTORS
  constexpr int64_t L = D::kLanes, A = 4;
  if (C >= L) {
    using Vec = typename D::Vec;
    using Mask = typename D::Mask;
    Vec acc[A], v;
    Mask nans[A], m;
    for (int64_t a = 0; a < A; ++a) acc[a] = Vec{} + D::lowest(), nans[a] = Mask{};
    for (; c + A * L <= C; c += A * L) {
      for (int64_t a = 0; a < A; ++a) {
        D::lanes(row + c + a * L, v, m);
        acc[a] = v > acc[a] ? v : acc[a];
        nans[a] |= m;
      }
    }
    for (; c + L <= C; c += L) {
      D::lanes(row + c, v, m);
      acc[0] = v > acc[0] ? v : acc[0];
      nans[0] |= m;
    }
    for (int64_t a = 1; a < A; ++a) {
      acc[0] = acc[a] > acc[0] ? acc[a] : acc[0];
      nans[0] |= nans[a];
    }
    for (int64_t l = 0; l < L; ++l) {
      best = acc[0][l] > best ? acc[0][l] : best;
      nan = nan || nans[0][l] != 0;
    }
  }
#endif
  for (; c < C; ++c) {
    const Value v = D::value(row[c]);
    best = v > best ? v : best;
    nan = nan || D::is_nan(row[c]);
  }
  return {best, nan};
}

// torch.argmax's class: the first NaN if the row has one, else the first class at the max.
template <class D>
inline int64_t row_argmax(const typename D::Raw* row, int64_t C) {
  const RowMax<D> m = row_max<D>(row, C);
  if (m.nan) {
    for (int64_t c = 0; c < C; ++c) {
      if (D::is_nan(row[c])) return c;
    }
  }
  for (int64_t c = 0; c < C; ++c) {
    if (D::value(row[c]) == m.max) return c;  // never true for a NaN
  }
  return 0;  // not reached
}

// The k largest packed (key, index) offered, offered in ascending index. Entries above a threshold (a
// lower bound of the k-th largest so far: the smallest of the first k, then the k-th largest at each
// compaction) are appended to a buffer of 2k; a full buffer is cut back to its k largest (nth_element,
// O(k)), which raises the threshold. O(1) amortized per entry, against a heap's O(log k).
template <class P>
class Best {
 public:
  explicit Best(int64_t k) : k_(static_cast<size_t>(k)), cap_(2 * k_ + 64) { buffer_.reserve(cap_); }
  void clear() {
    buffer_.clear();
    bounded_ = false;
  }
  bool bounded() const { return bounded_; }  // a threshold is set
  const P& threshold() const { return threshold_; }  // when bounded
  // Whether a candidate (its index above every one offered so far) can still be among the k largest.
  bool admits(const P& p) const { return !bounded_ || p > threshold_; }
  void offer(const P& p) {  // call only where admits(p)
    buffer_.push_back(p);
    if (!bounded_ && buffer_.size() == k_) {
      threshold_ = *std::min_element(buffer_.begin(), buffer_.end());
      bounded_ = true;
    } else if (buffer_.size() == cap_) {
      cut();
    }
  }
  // The k largest, largest first.
  const std::vector<P>& sorted() {
    if (buffer_.size() > k_) cut();
    std::sort(buffer_.begin(), buffer_.end(), std::greater<P>());
    return buffer_;
  }

 private:
  void cut() {  // keep the k largest; the k-th is the new threshold
    std::nth_element(buffer_.begin(), buffer_.begin() + (k_ - 1), buffer_.end(), std::greater<P>());
    buffer_.resize(k_);
    threshold_ = buffer_[k_ - 1];
    bounded_ = true;
  }

  size_t k_, cap_;
  std::vector<P> buffer_;
  P threshold_{};
  bool bounded_ = false;
};

// One gathered tensor as rows: base pointers and byte strides.
struct RowCopy {
  const char* src;
  char* dst;
  int64_t src_n, src_t;  // bytes between images, tokens of the source
  int64_t row_bytes;     // also the destination's token stride (its rows are contiguous)
};

template <class D>
void select_image(const typename D::Raw* logits, int64_t T, int64_t C, bool pairs, Best<typename D::Packed>& best) {
  using Raw = typename D::Raw;
  for (int64_t t = 0; t < T; ++t) {
    const Raw* row = logits + t * C;
    if (!pairs) {
      const auto p = pack(row_max<D>(row, C).key(), t);
      if (best.admits(p)) best.offer(p);
      continue;
    }
    if (best.bounded()) {
      const auto key = unpack_key(best.threshold(), typename D::Key{});
      if (key != nan_key<D>()) {
        // A class can enter only if its value is above the threshold's (its index is above the
        // threshold's): a NaN never is. Skip the row unless its max is; else test the values, the
        // threshold rising as the buffer is cut.
        typename D::Value threshold = D::value_of_key(key);
        if (!(row_max<D>(row, C).max > threshold)) continue;
        for (int64_t c = 0; c < C; ++c) {
          const typename D::Value v = D::value(row[c]);
          if (!(v > threshold)) continue;
          best.offer(pack(D::key(v), t * C + c));
          threshold = D::value_of_key(unpack_key(best.threshold(), typename D::Key{}));
        }
        continue;
      }
    }
    for (int64_t c = 0; c < C; ++c) {  // no threshold yet, or a NaN one
      const auto p = pack(raw_key<D>(row[c]), t * C + c);
      if (best.admits(p)) best.offer(p);
    }
  }
}

template <class D>
void forward_typed(const at::Tensor& logits, int64_t k, bool pairs, at::Tensor& scores, at::Tensor& indices,
                   at::Tensor& classes, const std::vector<RowCopy>& copies) {
  using Raw = typename D::Raw;
  const int64_t N = logits.size(0), T = logits.size(1), C = logits.size(2);
  const Raw* base = static_cast<const Raw*>(logits.data_ptr());
  Raw* scores_out = static_cast<Raw*>(scores.data_ptr());
  int64_t* indices_out = indices.data_ptr<int64_t>();
  int64_t* classes_out = classes.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Best<typename D::Packed> best(k);
    for (int64_t n = begin; n < end; ++n) {
      best.clear();
      const Raw* image = base + n * T * C;
      select_image<D>(image, T, C, pairs, best);
      const auto& chosen = best.sorted();
      int64_t* tokens = indices_out + n * k;
      for (int64_t i = 0; i < k; ++i) {
        const int64_t index = unpack_index(chosen[i]);
        const int64_t token = pairs ? index / C : index;
        const int64_t cls = pairs ? index - token * C : (C == 1 ? 0 : row_argmax<D>(image + token * C, C));
        scores_out[n * k + i] = image[token * C + cls];  // the stored bits, NaN payload and all
        tokens[i] = token;
        classes_out[n * k + i] = cls;
      }
      for (const RowCopy& r : copies) {
        const char* src = r.src + n * r.src_n;
        char* dst = r.dst + n * k * r.row_bytes;
        for (int64_t i = 0; i < k; ++i) std::memcpy(dst + i * r.row_bytes, src + tokens[i] * r.src_t, r.row_bytes);
      }
    }
  });
}

// t [N, T, *] as a [N, T, row] view whose rows are contiguous (a copy when the trailing dims are not)
at::Tensor as_rows(const at::Tensor& t) {
  const int64_t N = t.size(0), T = t.size(1);
  int64_t row = 1;
  bool rows_contiguous = true;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) != 1 && t.stride(d) != row) rows_contiguous = false;
    row *= t.size(d);
  }
  const at::Tensor v = rows_contiguous ? t : t.contiguous();
  return v.as_strided({N, T, row}, {v.stride(0), v.stride(1), 1});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> forward_cpu(const at::Tensor& logits_in, int64_t k,
                                                                                    at::TensorList gather, bool pairs) {
  TORCH_CHECK(logits_in.device().is_cpu(), "topk_select (cpu backend): logits must be a CPU tensor, got ",
              logits_in.device());
  TORCH_CHECK(logits_in.dim() == 3, "topk_select: logits must be [N, T, C], got ", logits_in.sizes());
  const at::ScalarType dtype = logits_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "topk_select (cpu backend): logits must be float16, bfloat16, float32 or float64, got ", dtype);
  const int64_t N = logits_in.size(0), T = logits_in.size(1), C = logits_in.size(2);
  TORCH_CHECK(C >= 1, "topk_select: logits need at least one class, got ", logits_in.sizes());
  const int64_t candidates = pairs ? T * C : T;
  TORCH_CHECK(candidates <= (int64_t(1) << 32), "topk_select (cpu backend): at most 2^32 candidates per image, got ",
              candidates);
  TORCH_CHECK(k >= 1 && k <= candidates, "topk_select: k must be in [1, ", candidates, "] (", pairs ? "T x C" : "T",
              " candidates of logits ", logits_in.sizes(), "), got ", k);
  for (size_t i = 0; i < gather.size(); ++i) {
    const at::Tensor& t = gather[i];
    TORCH_CHECK(t.device() == logits_in.device(), "topk_select: gather[", i, "] must be on ", logits_in.device(),
                ", got ", t.device());
    TORCH_CHECK(t.dim() >= 2 && t.size(0) == N && t.size(1) == T, "topk_select: gather[", i,
                "] must be [N, T, *] with N = ", N, ", T = ", T, ", got ", t.sizes());
  }
  const auto long_opts = logits_in.options().dtype(at::kLong);
  at::Tensor scores = at::empty({N, k}, logits_in.options());
  at::Tensor indices = at::empty({N, k}, long_opts);
  at::Tensor classes = at::empty({N, k}, long_opts);
  std::vector<at::Tensor> gathered;
  gathered.reserve(gather.size());
  for (const at::Tensor& t : gather) {
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    shape[1] = k;
    gathered.push_back(at::empty(shape, t.options()));
  }
  if (N == 0) return {scores, indices, classes, gathered};

  const at::Tensor logits = logits_in.contiguous();
  std::vector<at::Tensor> sources;  // keeps the row views (and any contiguous copies) alive
  std::vector<RowCopy> copies;
  for (size_t i = 0; i < gather.size(); ++i) {
    if (gathered[i].numel() == 0) continue;
    const at::Tensor rows = as_rows(gather[i]);
    const int64_t es = rows.element_size();
    sources.push_back(rows);
    copies.push_back({static_cast<const char*>(rows.data_ptr()), static_cast<char*>(gathered[i].data_ptr()),
                      rows.stride(0) * es, rows.stride(1) * es, rows.size(2) * es});
  }
  switch (dtype) {
    case at::kFloat: forward_typed<Float32>(logits, k, pairs, scores, indices, classes, copies); break;
    case at::kDouble: forward_typed<Float64>(logits, k, pairs, scores, indices, classes, copies); break;
    case at::kBFloat16: forward_typed<BFloat16>(logits, k, pairs, scores, indices, classes, copies); break;
    case at::kHalf: forward_typed<Float16>(logits, k, pairs, scores, indices, classes, copies); break;
    default: break;  // checked above
  }
  return {scores, indices, classes, gathered};
}

}  // namespace
}  // namespace topk
}  // namespace rtdetr_kernels

TORCH_LIBRARY_IMPL(rtdetr_kernels_C, CPU, m) {
  m.impl("topk_select_forward", &rtdetr_kernels::topk::forward_cpu);
}
