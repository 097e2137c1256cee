// The torch-facing side of the attention-core CUDA kernels: checks, device guard, current stream,
// allocation. Compiled by the host compiler; the kernels are in cuda.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention/cuda_launch.h"
#include "attention/host.h"

namespace rtdetr_kernels {
namespace attention {
namespace {

constexpr const char* kForward = "aifi_attention_core_forward";
constexpr const char* kBackward = "aifi_attention_core_backward";

void check_cuda(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, " (cuda backend): ", name, " must be a CUDA tensor, got ", t.device());
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": the CUDA kernels cannot serve this problem (", cudaGetErrorString(err), ")");
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool uses_tensor_cores(const at::Tensor& q) {
  return q.scalar_type() != at::kFloat && tensor_core_head_dim(q.size(3));
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                const c10::optional<at::Tensor>& attn_mask, double scale) {
  check_cuda(kForward, q_in, "q");
  check_qkv(kForward, q_in, "q", q_in);
  check_qkv(kForward, k_in, "k", q_in);
  check_qkv(kForward, v_in, "v", q_in);
  const DType dtype = dtype_of(kForward, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor mask;
  const Problem p = make_problem(kForward, q_in, attn_mask, scale, mask);
  at::Tensor out = at::empty(q_in.sizes(), q_in.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({p.N, p.H, p.L}, q_in.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const bool tc = uses_tensor_cores(q_in);
  const at::Tensor q = readable(q_in, tc), k = readable(k_in, tc), v = readable(v_in, tc);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(kForward, launch_forward(p, dtype, view_of(q), view_of(k), view_of(v), view_of(out),
                                        lse.data_ptr<float>(), stream));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                                                 const at::Tensor& k_in, const at::Tensor& v_in,
                                                 const at::Tensor& out_in, const at::Tensor& lse_in,
                                                 const c10::optional<at::Tensor>& attn_mask, double scale) {
  check_cuda(kBackward, q_in, "q");
  check_qkv(kBackward, q_in, "q", q_in);
  check_qkv(kBackward, k_in, "k", q_in);
  check_qkv(kBackward, v_in, "v", q_in);
  check_qkv(kBackward, out_in, "out", q_in);
  check_qkv(kBackward, grad_out_in, "grad_out", q_in);
  const DType dtype = dtype_of(kBackward, q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor mask;
  const Problem p = make_problem(kBackward, q_in, attn_mask, scale, mask);
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.device() == q_in.device() &&
                  lse_in.sizes() == at::IntArrayRef({p.N, p.H, p.L}),
              kBackward, ": lse must be a float32 [N, H, L] = [", p.N, ", ", p.H, ", ", p.L, "] tensor on q's device, got ",
              lse_in.scalar_type(), " ", lse_in.sizes());
  const auto options = q_in.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor grad_qk = at::empty({p.N, p.L, 2, p.H, p.D}, options);
  at::Tensor grad_v = at::empty(q_in.sizes(), options);
  if (grad_v.numel() == 0) return {grad_qk, grad_v};
  const bool tc = uses_tensor_cores(q_in);
  const at::Tensor q = readable(q_in, tc), k = readable(k_in, tc), v = readable(v_in, tc);
  const at::Tensor out = readable(out_in, tc), grad_out = readable(grad_out_in, tc);
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor delta = at::empty({p.N, p.H, p.L}, lse.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(kBackward, launch_backward(p, dtype, view_of(grad_out), view_of(q), view_of(k), view_of(v), view_of(out),
                                          lse.data_ptr<float>(), delta.data_ptr<float>(), view_of(grad_qk.select(2, 0)),
                                          view_of(grad_qk.select(2, 1)), view_of(grad_v), stream));
  return {grad_qk, grad_v};
}

}  // namespace
}  // namespace attention
}  // namespace rtdetr_kernels

TORCH_LIBRARY_IMPL(rtdetr_kernels_C, CUDA, m) {
  m.impl("aifi_attention_core_forward", &rtdetr_kernels::attention::forward_cuda);
  m.impl("aifi_attention_core_backward", &rtdetr_kernels::attention::backward_cuda);
}
