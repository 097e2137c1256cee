// Host-side glue shared by the CPU and CUDA entry points: argument checks and problem setup.
// The Python wrapper validates user input with readable messages; these checks guard the
// compiled ops against direct torch.ops calls, so a bad call errors instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include "ms_deform_attn/ms_deform_attn.h"

namespace rtdetr_kernels {
namespace msda {

inline Problem make_problem(const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
                            at::IntArrayRef shapes, at::IntArrayRef points, int64_t method) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be [N, S, M, D], got ", value.sizes());
  TORCH_CHECK(loc.dim() == 5 && loc.size(4) == 2, "ms_deform_attn: sampling_locations must be [N, Lq, M, P, 2], got ", loc.sizes());
  TORCH_CHECK(attn.dim() == 4, "ms_deform_attn: attention_weights must be [N, Lq, M, P], got ", attn.sizes());
  TORCH_CHECK(method >= kBilinear && method <= kDiscreteOfficial, "ms_deform_attn: unknown method code ", method);
  const int64_t L = static_cast<int64_t>(points.size());
  TORCH_CHECK(L >= 1 && L <= kMaxLevels, "ms_deform_attn: between 1 and ", kMaxLevels, " levels are supported, got ", L);
  TORCH_CHECK(static_cast<int64_t>(shapes.size()) == 2 * L, "ms_deform_attn: spatial_shapes must hold 2 ints per level");
  Problem p;
  p.N = value.size(0);
  p.S = value.size(1);
  p.M = value.size(2);
  p.D = value.size(3);
  p.Lq = loc.size(1);
  p.P = loc.size(3);
  p.method = static_cast<int>(method);
  p.levels.num_levels = static_cast<int>(L);
  int64_t start = 0, point_start = 0, padded = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    TORCH_CHECK(H > 0 && W > 0, "ms_deform_attn: spatial_shapes[", l, "] must be positive, got (", H, ", ", W, ")");
    TORCH_CHECK(points[l] > 0, "ms_deform_attn: points_per_level[", l, "] must be positive");
    p.levels.height[l] = H;
    p.levels.width[l] = W;
    p.levels.start[l] = start;
    p.levels.point_start[l] = point_start;
    p.levels.num_points[l] = points[l];
    p.levels.padded_start[l] = padded;
    start += H * W;
    point_start += points[l];
    padded += (H + 1) * (W + 1);
  }
  TORCH_CHECK(start == p.S, "ms_deform_attn: spatial_shapes cover ", start, " tokens but value has S = ", p.S);
  TORCH_CHECK(point_start == p.P, "ms_deform_attn: points_per_level sum to ", point_start, " but sampling_locations has ", p.P);
  TORCH_CHECK(loc.size(0) == p.N && loc.size(2) == p.M, "ms_deform_attn: sampling_locations ", loc.sizes(), " does not match value ", value.sizes());
  TORCH_CHECK(attn.size(0) == p.N && attn.size(1) == p.Lq && attn.size(2) == p.M && attn.size(3) == p.P,
              "ms_deform_attn: attention_weights ", attn.sizes(), " does not match sampling_locations ", loc.sizes());
  TORCH_CHECK(value.is_floating_point() && loc.is_floating_point() && attn.is_floating_point(),
              "ms_deform_attn: value, sampling_locations and attention_weights must be floating tensors");
  TORCH_CHECK(loc.device() == value.device() && attn.device() == value.device(), "ms_deform_attn: all tensors must be on one device");
  return p;
}

inline int64_t padded_cells(const Problem& p) {
  const int L = p.levels.num_levels;
  return p.levels.padded_start[L - 1] + (p.levels.height[L - 1] + 1) * (p.levels.width[L - 1] + 1);
}

// Locations and weights are read in the math type (float, or double for float64 value): a copy
// only when they come in another precision (never a downcast of fp32 locations under AMP).
inline at::ScalarType coord_type(const at::Tensor& value) {
  return value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::Tensor as_coord(const at::Tensor& t, at::ScalarType coord) {
  return t.scalar_type() == coord ? t.contiguous() : t.to(coord).contiguous();
}

// A backward result as the op returns it: the gradient in the dtype of the input it belongs to, or
// an empty tensor when that gradient was not asked for.
inline at::Tensor finish_grad(const at::Tensor& grad, const at::Tensor& like, bool needed) {
  return needed ? grad.to(like.scalar_type()) : like.new_empty({0});
}

}  // namespace msda
}  // namespace rtdetr_kernels
