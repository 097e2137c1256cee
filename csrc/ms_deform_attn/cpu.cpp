// Multi-scale deformable attention on the CPU: forward and one fused backward.
//
// Forward: at::parallel_for over (n, q, m) heads; each head accumulates its D channels in the math
// type over all points. Backward: parallel over (n, m) slices, each owning its slice of grad_value and
// walking the queries in order, so the result is deterministic for any thread count and needs no
// atomics; the location and weight grads of a point are reduced over channels in the same pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "ms_deform_attn/host.h"

namespace rtdetr_kernels {
namespace msda {
namespace {

// acc[c] += alpha * x[c]; the restrict qualifiers let the compiler vectorise the loop.
template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* __restrict__ acc, const scalar_t* __restrict__ x, acc_t alpha, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) acc[c] += alpha * static_cast<acc_t>(x[c]);
}

template <typename scalar_t, typename acc_t>
void forward_cpu(const scalar_t* value, const acc_t* loc, const acc_t* attn, scalar_t* out, const Problem& p) {
  const int64_t heads = p.N * p.Lq * p.M;
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, p.P * p.D));
  // Walk the heads in (n, m, q) order: consecutive iterations read the same (n, m) slice of value
  // (S x D entries, about 1 MB at RT-DETR sizes), which then stays in cache.
  at::parallel_for(0, heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(p.D);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t q = index % p.Lq;
      const int64_t m = (index / p.Lq) % p.M;
      const int64_t n = index / (p.Lq * p.M);
      const int64_t head = (n * p.Lq + q) * p.M + m;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      const acc_t* head_loc = loc + head * p.P * 2;
      const acc_t* head_attn = attn + head * p.P;
      for (int l = 0; l < p.levels.num_levels; ++l) {
        const int64_t H = p.levels.height[l], W = p.levels.width[l];
        const scalar_t* level_value = value + ((n * p.S + p.levels.start[l]) * p.M + m) * p.D;
        for (int64_t pt = p.levels.point_start[l]; pt < p.levels.point_start[l] + p.levels.num_points[l]; ++pt) {
          const Sample<acc_t> s = sample_point(head_loc[2 * pt], head_loc[2 * pt + 1], H, W, p.method);
          if (!s.valid) continue;
          const acc_t a = head_attn[pt];
          const acc_t w[4] = {s.w00(), s.w01(), s.w10(), s.w11()};
          for (int corner = 0; corner < 4; ++corner) {
            const int64_t y = s.y0 + (corner >> 1), x = s.x0 + (corner & 1);
            if (w[corner] == acc_t(0) || !corner_inside(y, x, H, W)) continue;
            const acc_t aw = a * w[corner];
            axpy(acc.data(), level_value + (y * W + x) * p.M * p.D, aw, p.D);
          }
        }
      }
      scalar_t* o = out + head * p.D;
      for (int64_t c = 0; c < p.D; ++c) o[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_cpu(const scalar_t* grad_out, const scalar_t* value, const acc_t* loc, const acc_t* attn,
                  acc_t* grad_value, acc_t* grad_loc, acc_t* grad_attn, const Problem& p) {
  const bool bilinear = p.method == kBilinear;
  const bool point_grads = grad_attn != nullptr || grad_loc != nullptr;
  at::parallel_for(0, p.N * p.M, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> corner_value(4 * p.D);
    for (int64_t slice = begin; slice < end; ++slice) {
      const int64_t n = slice / p.M, m = slice % p.M;
      // Two passes over the slice: location/weight grads (reading value), then grad_value (writing
      // it), so that each pass keeps one ~1 MB slice of the [N, S, M, D] layout hot, not two.
      for (int pass = 0; pass < 2; ++pass) {
      const bool points_pass = pass == 0;
      if (points_pass ? !point_grads : grad_value == nullptr) continue;
      if (!points_pass) {  // each task zeroes its own slice of grad_value, just before it is used
        for (int64_t row = n * p.S * p.M + m; row < (n + 1) * p.S * p.M; row += p.M)
          std::fill(grad_value + row * p.D, grad_value + (row + 1) * p.D, acc_t(0));
      }
      for (int64_t q = 0; q < p.Lq; ++q) {
        const int64_t head = (n * p.Lq + q) * p.M + m;
        const scalar_t* g = grad_out + head * p.D;
        for (int l = 0; l < p.levels.num_levels; ++l) {
          const int64_t H = p.levels.height[l], W = p.levels.width[l];
          const int64_t level_row = (n * p.S + p.levels.start[l]) * p.M + m;  // row of (y, x) = level_row + (y*W+x)*M
          for (int64_t pt = p.levels.point_start[l]; pt < p.levels.point_start[l] + p.levels.num_points[l]; ++pt) {
            const int64_t point = head * p.P + pt;
            const Sample<acc_t> s = sample_point(loc[2 * point], loc[2 * point + 1], H, W, p.method);
            if (!s.valid) continue;  // grads of a skipped point stay 0
            const acc_t a = attn[point];
            const acc_t w[4] = {s.w00(), s.w01(), s.w10(), s.w11()};
            bool inside[4];
            for (int corner = 0; corner < 4; ++corner) {
              const int64_t y = s.y0 + (corner >> 1), x = s.x0 + (corner & 1);
              inside[corner] = corner_inside(y, x, H, W);
              if (!points_pass) continue;  // grad_value needs no corner values
              acc_t* cv = corner_value.data() + corner * p.D;
              if (inside[corner]) {
                const scalar_t* v = value + (level_row + (y * W + x) * p.M) * p.D;
                for (int64_t c = 0; c < p.D; ++c) cv[c] = static_cast<acc_t>(v[c]);
              } else {
                std::fill(cv, cv + p.D, acc_t(0));
              }
            }
            const acc_t* v00 = corner_value.data();
            const acc_t* v01 = v00 + p.D;
            const acc_t* v10 = v01 + p.D;
            const acc_t* v11 = v10 + p.D;
            if (points_pass) {
              acc_t dot_s = 0, dot_x = 0, dot_y = 0;
#pragma omp simd reduction(+ : dot_s, dot_x, dot_y)
              for (int64_t c = 0; c < p.D; ++c) {
                const acc_t gc = static_cast<acc_t>(g[c]);
                dot_s += gc * (w[0] * v00[c] + w[1] * v01[c] + w[2] * v10[c] + w[3] * v11[c]);
                dot_x += gc * (s.hy * (v01[c] - v00[c]) + s.ly * (v11[c] - v10[c]));
                dot_y += gc * (s.hx * (v10[c] - v00[c]) + s.lx * (v11[c] - v01[c]));
              }
              if (grad_attn != nullptr) grad_attn[point] = dot_s;
              if (grad_loc != nullptr && bilinear) {
                grad_loc[2 * point] = static_cast<acc_t>(W) * a * dot_x;
                grad_loc[2 * point + 1] = static_cast<acc_t>(H) * a * dot_y;
              }
            }
            if (!points_pass) {
              for (int corner = 0; corner < 4; ++corner) {
                if (!inside[corner] || w[corner] == acc_t(0)) continue;
                const int64_t y = s.y0 + (corner >> 1), x = s.x0 + (corner & 1);
                axpy(grad_value + (level_row + (y * W + x) * p.M) * p.D, g, a * w[corner], p.D);
              }
            }
          }
        }
      }
      }
    }
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
  // Gradients are accumulated in the math type and cast once at the end.
  at::Tensor grad_value = need_value ? at::empty(value.sizes(), acc_opts) : at::Tensor();  // zeroed per slice
  at::Tensor grad_loc = need_loc ? at::zeros(loc.sizes(), acc_opts) : at::Tensor();
  at::Tensor grad_attn = need_attn ? at::zeros(attn.sizes(), acc_opts) : at::Tensor();
  if (p.N * p.Lq * p.M * p.D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      backward_cpu<scalar_t, acc_t>(grad_out.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), loc.data_ptr<acc_t>(),
                                    attn.data_ptr<acc_t>(), need_value ? grad_value.data_ptr<acc_t>() : nullptr,
                                    need_loc ? grad_loc.data_ptr<acc_t>() : nullptr,
                                    need_attn ? grad_attn.data_ptr<acc_t>() : nullptr, p);
    });
  } else if (need_value) {
    grad_value.zero_();  // no query samples anything: the kernel (which zeroes per slice) did not run
  }
  auto finish = [](const at::Tensor& grad, const at::Tensor& like, bool needed) {
    return needed ? grad.to(like.scalar_type()) : like.new_empty({0});
  };
  return {finish(grad_value, value_in, need_value), finish(grad_loc, loc_in, need_loc), finish(grad_attn, attn_in, need_attn)};
}

}  // namespace
}  // namespace msda
}  // namespace rtdetr_kernels

TORCH_LIBRARY_IMPL(rtdetr_kernels_C, CPU, m) {
  m.impl("ms_deform_attn_forward", &rtdetr_kernels::msda::ms_deform_attn_forward);
  m.impl("ms_deform_attn_backward", &rtdetr_kernels::msda::ms_deform_attn_backward);
}
