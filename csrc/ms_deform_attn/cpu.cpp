// Multi-scale deformable attention on the CPU: forward and one fused backward.
//
// The loop nests live in cpu_kernels.h, compiled here twice: for x86-64 CPUs with AVX2, FMA and F16C
// (chosen at run time when the CPU has them) and for the baseline instruction set. The environment
// variable RTDETR_KERNELS_CPU_ISA=baseline forces the baseline build (tests run both).
// Backward: deterministic for any thread count (no atomics; see cpu_kernels.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ms_deform_attn/host.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define RTDETR_CPU_AVX2 1
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif
#ifdef RTDETR_CPU_AVX2
#include <immintrin.h>
#endif

namespace rtdetr_kernels {
namespace msda {

namespace isa_baseline {
#include "ms_deform_attn/cpu_kernels.h"
}  // namespace isa_baseline

#ifdef RTDETR_CPU_AVX2
namespace isa_avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define RTDETR_CPU_F16C 1
#include "ms_deform_attn/cpu_kernels.h"
#undef RTDETR_CPU_F16C
#pragma GCC pop_options
}  // namespace isa_avx2
#endif

// Whether the AVX2 build of the kernels runs (the CPU has AVX2, FMA and F16C, and the environment
// does not force the baseline).
bool use_avx2() {
  const char* forced = std::getenv("RTDETR_KERNELS_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return false;
#ifdef RTDETR_CPU_AVX2
  static const bool has_avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return has_avx2;
#else
  return false;
#endif
}

const char* cpu_isa() { return use_avx2() ? "avx2" : "baseline"; }

namespace {

// A large fresh buffer (grad_value is as big as value: 69 MB at batch 8 and 640 px) comes from mmap,
// and first touching it page by page can cost as much as the kernel itself. Ask for transparent huge
// pages on its 2 MB-aligned interior before it is touched (a hint: a no-op where THP is off, or when
// the memory was already touched, or off Linux).
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.numel() * t.element_size();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first && last - first >= 2 * kHuge) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

template <typename scalar_t, typename acc_t>
void forward_cpu(const scalar_t* value, const acc_t* loc, const acc_t* attn, scalar_t* out, const Problem& p) {
  const int64_t heads = p.N * p.Lq * p.M;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, p.P * p.D));
  const bool avx2 = use_avx2();
  at::parallel_for(0, heads, grain, [&](int64_t begin, int64_t end) {
#ifdef RTDETR_CPU_AVX2
    if (avx2) return isa_avx2::forward<scalar_t, acc_t>(begin, end, value, loc, attn, out, p);
#endif
    (void)avx2;
    isa_baseline::forward<scalar_t, acc_t>(begin, end, value, loc, attn, out, p);
  });
}

template <typename scalar_t, typename acc_t>
void backward_cpu(const scalar_t* grad_out, const scalar_t* value, const acc_t* loc, const acc_t* attn,
                  scalar_t* grad_value, acc_t* grad_loc, acc_t* grad_attn, const Problem& p) {
  const bool avx2 = use_avx2();
  at::parallel_for(0, p.N * p.M, 1, [&](int64_t begin, int64_t end) {
#ifdef RTDETR_CPU_AVX2
    if (avx2) return isa_avx2::backward<scalar_t, acc_t>(begin, end, grad_out, value, loc, attn, grad_value, grad_loc, grad_attn, p);
#endif
    (void)avx2;
    isa_baseline::backward<scalar_t, acc_t>(begin, end, grad_out, value, loc, attn, grad_value, grad_loc, grad_attn, p);
  });
}

at::Tensor ms_deform_attn_forward(const at::Tensor& value_in, const at::Tensor& loc_in, const at::Tensor& attn_in,
                                  at::IntArrayRef shapes, at::IntArrayRef points, int64_t method) {
  const Problem p = make_problem(value_in, loc_in, attn_in, shapes, points, method);
  const at::Tensor value = value_in.contiguous();
  const at::ScalarType coord = coord_type(value);
  const at::Tensor loc = as_coord(loc_in, coord), attn = as_coord(attn_in, coord);
  at::Tensor out = at::empty({p.N, p.Lq, p.M, p.D}, value.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_cpu<scalar_t, acc_t>(value.data_ptr<scalar_t>(), loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(),
                                 out.data_ptr<scalar_t>(), p);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& grad_out_in, const at::Tensor& value_in, const at::Tensor& loc_in, const at::Tensor& attn_in,
    at::IntArrayRef shapes, at::IntArrayRef points, int64_t method, bool need_value, bool need_loc, bool need_attn,
    bool /*deterministic: the CPU backward always is*/) {
  const Problem p = make_problem(value_in, loc_in, attn_in, shapes, points, method);
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({p.N, p.Lq, p.M, p.D}),
              "ms_deform_attn_backward: grad_output must be [N, Lq, M, D], got ", grad_out_in.sizes());
  const at::Tensor value = value_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(value.scalar_type()).contiguous();
  const at::ScalarType coord = coord_type(value);
  const at::Tensor loc = as_coord(loc_in, coord), attn = as_coord(attn_in, coord);
  const auto acc_opts = value.options().dtype(coord);
  // grad_value is accumulated in the math type, slice by slice, and written in value's dtype (see
  // cpu_kernels.h); the location and weight gradients are in the math type and cast at the end.
  at::Tensor grad_value = need_value ? at::empty(value.sizes(), value.options()) : at::Tensor();  // zeroed per slice
  if (need_value) advise_huge_pages(grad_value);
  at::Tensor grad_loc = need_loc ? at::zeros(loc.sizes(), acc_opts) : at::Tensor();
  at::Tensor grad_attn = need_attn ? at::zeros(attn.sizes(), acc_opts) : at::Tensor();
  if (p.N * p.Lq * p.M * p.D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      backward_cpu<scalar_t, acc_t>(grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), loc.data_ptr<acc_t>(),
                                    attn.data_ptr<acc_t>(), need_value ? grad_value.data_ptr<scalar_t>() : nullptr,
                                    need_loc ? grad_loc.data_ptr<acc_t>() : nullptr,
                                    need_attn ? grad_attn.data_ptr<acc_t>() : nullptr, p);
    });
  } else if (need_value) {
    grad_value.zero_();  // no query samples anything: the kernel (which zeroes per slice) did not run
  }
  return {finish_grad(grad_value, value_in, need_value), finish_grad(grad_loc, loc_in, need_loc),
          finish_grad(grad_attn, attn_in, need_attn)};
}

}  // namespace
}  // namespace msda
}  // namespace rtdetr_kernels

TORCH_LIBRARY_IMPL(rtdetr_kernels_C, CPU, m) {
  m.impl("ms_deform_attn_forward", &rtdetr_kernels::msda::ms_deform_attn_forward);
  m.impl("ms_deform_attn_backward", &rtdetr_kernels::msda::ms_deform_attn_backward);
}
