// The torch-facing side of the MSDA CUDA kernels: checks, device guard, current stream, allocation,
// and the deterministic backward's sort. Compiled by the host compiler; the kernels are in cuda.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ms_deform_attn/cuda_launch.h"
#include "ms_deform_attn/host.h"

namespace rtdetr_kernels {
namespace msda {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "ms_deform_attn: value must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "ms_deform_attn (cuda backend): ", name, " must be a CUDA tensor, got ", t.device());
}

void check(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "ms_deform_attn CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor forward_cuda(const at::Tensor& value_in, const at::Tensor& loc_in, const at::Tensor& attn_in,
                        at::IntArrayRef shapes, at::IntArrayRef points, int64_t method) {
  check_cuda(value_in, "value");
  check_cuda(loc_in, "sampling_locations");
  check_cuda(attn_in, "attention_weights");
  const Problem p = make_problem(value_in, loc_in, attn_in, shapes, points, method);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const at::Tensor value = value_in.contiguous();
  const at::ScalarType coord = coord_type(value);
  const at::Tensor loc = as_coord(loc_in, coord), attn = as_coord(attn_in, coord);
  at::Tensor out = at::empty({p.N, p.Lq, p.M, p.D}, value.options());
  if (out.numel() == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check(launch_forward(p, dtype_of(value), value.data_ptr(), loc.data_ptr(), attn.data_ptr(), out.data_ptr(), stream));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& value_in, const at::Tensor& loc_in, const at::Tensor& attn_in,
    at::IntArrayRef shapes, at::IntArrayRef points, int64_t method, bool need_value, bool need_loc, bool need_attn,
    bool deterministic) {
  check_cuda(grad_out_in, "grad_output");
  check_cuda(value_in, "value");
  check_cuda(loc_in, "sampling_locations");
  check_cuda(attn_in, "attention_weights");
  const Problem p = make_problem(value_in, loc_in, attn_in, shapes, points, method);
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({p.N, p.Lq, p.M, p.D}),
              "ms_deform_attn_backward: grad_output must be [N, Lq, M, D], got ", grad_out_in.sizes());
  const c10::cuda::CUDAGuard guard(value_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor value = value_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(value.scalar_type()).contiguous();
  const at::ScalarType coord = coord_type(value);
  const at::Tensor loc = as_coord(loc_in, coord), attn = as_coord(attn_in, coord);
  const DType dtype = dtype_of(value);
  const auto acc_opts = value.options().dtype(coord);
  const bool empty = p.N * p.Lq * p.M * p.D == 0;

  // Location and weight grads are written once per point by the group that owns the point.
  at::Tensor grad_loc = need_loc ? (p.method == kBilinear ? at::empty(loc.sizes(), acc_opts) : at::zeros(loc.sizes(), acc_opts))
                                 : at::Tensor();
  at::Tensor grad_attn = need_attn ? at::empty(attn.sizes(), acc_opts) : at::Tensor();
  if (empty) {
    if (need_loc) grad_loc.zero_();
    if (need_attn) grad_attn.zero_();
  }
  at::Tensor grad_value;
  if (need_value && (deterministic || empty)) {
    grad_value = empty ? at::zeros(value.sizes(), value.options()) : at::empty(value.sizes(), value.options());
    if (!empty) {
      const int64_t cells = padded_cells(p);
      at::Tensor keys = at::empty({p.N * p.Lq * p.M * p.P}, value.options().dtype(at::kLong));
      check(launch_point_keys(p, dtype, loc.data_ptr(), cells, keys.data_ptr<int64_t>(), stream));
      auto [sorted_keys, order] = keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
      const at::Tensor boundaries = at::arange(p.N * p.M * cells + 1, keys.options());
      const at::Tensor offsets = at::searchsorted(sorted_keys, boundaries);
      check(launch_grad_value_gather(p, dtype, grad_out.data_ptr(), loc.data_ptr(), attn.data_ptr(),
                                     order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), cells,
                                     grad_value.data_ptr(), stream));
    }
    if (!empty && (need_loc || need_attn)) {
      check(launch_backward(p, dtype, grad_out.data_ptr(), value.data_ptr(), loc.data_ptr(), attn.data_ptr(), nullptr,
                            need_loc ? grad_loc.data_ptr() : nullptr, need_attn ? grad_attn.data_ptr() : nullptr, stream));
    }
  } else {
    // fast path: grad_value by fp32 (fp64) atomics into the math type, cast once at the end
    at::Tensor grad_value_acc = need_value ? at::zeros(value.sizes(), acc_opts) : at::Tensor();
    if (!empty) {
      check(launch_backward(p, dtype, grad_out.data_ptr(), value.data_ptr(), loc.data_ptr(), attn.data_ptr(),
                            need_value ? grad_value_acc.data_ptr() : nullptr, need_loc ? grad_loc.data_ptr() : nullptr,
                            need_attn ? grad_attn.data_ptr() : nullptr, stream));
    }
    if (need_value) grad_value = grad_value_acc.to(value.scalar_type());
  }
  return {finish_grad(grad_value, value_in, need_value), finish_grad(grad_loc, loc_in, need_loc),
          finish_grad(grad_attn, attn_in, need_attn)};
}

}  // namespace
}  // namespace msda
}  // namespace rtdetr_kernels

TORCH_LIBRARY_IMPL(rtdetr_kernels_C, CUDA, m) {
  m.impl("ms_deform_attn_forward", &rtdetr_kernels::msda::forward_cuda);
  m.impl("ms_deform_attn_backward", &rtdetr_kernels::msda::backward_cuda);
}
