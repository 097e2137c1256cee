// Schemas of the attention core's compiled ops (kernels: cuda_ops.cpp, CUDA only). The Python cuda
// backend of aifi_attention (kernels/attention/cuda.py) does the projections with torch GEMMs and calls
// these for the attention between them. And the whole op's CPU forward (cpu.cpp, composed of ATen calls,
// CompositeImplicitAutograd), which the cpu backend (kernels/attention/cpu.py) calls when it is built.
//
// q, k, v, grad_out, out: [N, L, H, D] views whose last dim is contiguous (any other strides: q and k
// are views into one [N, L, 2, H, D] projection). attn_mask: None, bool (True = blocked) or floating
// (added to the scores), [L, L] or [N * H, L, L] (head fastest). lse: [N, H, L] float32, the base-2
// logsumexp of each query's scaled, masked scores (+inf for a query that sees no key; its output is 0).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(rtdetr_kernels_C, m) {
  m.def(
      "aifi_attention_cpu_forward(Tensor x, Tensor? pos, Tensor in_proj_weight, Tensor? in_proj_bias, "
      "Tensor out_proj_weight, Tensor? out_proj_bias, int num_heads, Tensor? attn_mask) -> Tensor");
  m.def("aifi_attention_core_forward(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale) -> (Tensor, Tensor)");
  // -> (grad_qk [N, L, 2, H, D]: grad_q at [:, :, 0] and grad_k at [:, :, 1], grad_v [N, L, H, D])
  m.def(
      "aifi_attention_core_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? attn_mask, float scale) -> (Tensor, Tensor)");
}
