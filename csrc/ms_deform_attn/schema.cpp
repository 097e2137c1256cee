// Schemas of MSDA's compiled ops (kernels: cpu.cpp for CPU, cuda_ops.cpp for CUDA). The Python op
// (kernels/ms_deform_attn/op.py) calls them from its cpu and cuda backend records.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(rtdetr_kernels_C, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor sampling_locations, Tensor attention_weights, "
      "int[] spatial_shapes, int[] points_per_level, int method) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor sampling_locations, "
      "Tensor attention_weights, int[] spatial_shapes, int[] points_per_level, int method, "
      "bool need_value, bool need_locations, bool need_weights, bool deterministic) -> (Tensor, Tensor, Tensor)");
}
