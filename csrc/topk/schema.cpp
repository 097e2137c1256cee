// Schemas of top-K selection's compiled ops (kernels: cuda_ops.cpp for CUDA, forward and backward;
// cpu.cpp for the CPU, the forward only: the CPU backward is PyTorch's scatters, kernels/topk/cpu.py).
// The Python op (kernels/topk/op.py) calls them from its cuda backend record, and kernels/topk/cpu.py
// calls the CPU forward when the extension is built, with the arguments of its two custom ops.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(rtdetr_kernels_C, m) {
  m.def("topk_select_forward(Tensor logits, int k, Tensor[] gather, bool pairs) -> (Tensor, Tensor, Tensor, Tensor[])");
  m.def(
      "topk_select_backward(Tensor grad_scores, Tensor indices, Tensor classes, Tensor[] grad_gathered, "
      "int num_tokens, int num_classes, bool pairs, bool need_logits, bool[] need_gather, bool deterministic) "
      "-> (Tensor, Tensor[])");
}
