// The CPU path of AIFI attention as one compiled op: rtdetr_kernels_C::aifi_attention_cpu_forward, the
// same ATen calls as kernels/attention/cpu.py's forward_torch (GEMMs for q and k on x + pos and for v on
// x, PyTorch's fused SDPA for the core, the output projection; fp32 math for fp16/bf16, fp64 for fp64),
// so the two give bitwise the same output.
//
// Why C++ at all: at RT-DETR's sizes on a CPU the whole op is a few milliseconds, and the Python between
// those dozen ATen calls is not the few microseconds a warm micro-benchmark shows. Right after the GEMMs
// and SDPA have swept the caches, each Python-level tensor call costs several times that (measured on
// a 2-core host: 150 us for the argument checks alone that take 10-25 us back to back), and that was
// the gap between the op and nn.MultiheadAttention at batch 1. Here the calls go from C++ to the
// dispatcher directly.
//
// The kernel is registered for CompositeImplicitAutograd: autograd records through the ATen calls
// exactly as it does for the Python composition (the cpu backend's eager path, Implementation.autograd),
// so the gradients are PyTorch's own. The Python op (kernels/attention/op.py) validates every argument
// with readable messages first; the checks here only keep a direct torch.ops call from being
// misread (ATen itself rejects mismatched shapes).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace rtdetr_kernels {
namespace attention {
namespace {

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

at::Tensor aifi_attention_cpu_forward(const at::Tensor& x, const std::optional<at::Tensor>& pos,
                                      const at::Tensor& in_proj_weight, const std::optional<at::Tensor>& in_proj_bias,
                                      const at::Tensor& out_proj_weight, const std::optional<at::Tensor>& out_proj_bias,
                                      int64_t num_heads, const std::optional<at::Tensor>& attn_mask) {
  constexpr const char* op = "aifi_attention_cpu_forward";
  TORCH_CHECK(x.dim() == 3, op, ": x must be [N, L, E], got ", x.sizes());
  const int64_t N = x.size(0), L = x.size(1), E = x.size(2);
  TORCH_CHECK(num_heads > 0 && E > 0 && E % num_heads == 0, op, ": E = ", E, " must be a positive multiple of num_heads = ",
              num_heads);
  TORCH_CHECK(in_proj_weight.dim() == 2 && in_proj_weight.size(0) == 3 * E && in_proj_weight.size(1) == E, op,
              ": in_proj_weight must be [3E, E] = [", 3 * E, ", ", E, "], got ", in_proj_weight.sizes());
  const int64_t H = num_heads, D = E / num_heads;
  const at::ScalarType dt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // .to() only where the dtype differs: each call is a dispatch even when it returns its input
  auto as = [dt](const at::Tensor& t) { return t.scalar_type() == dt ? t : t.to(dt); };

  const at::Tensor x_c = as(x);
  const at::Tensor qk_in = present(pos) ? x_c + as(*pos) : x_c;
  // Three GEMMs, q and k on x + pos and v on x, over the pieces of a split (its backward is one cat of
  // their gradients; a narrow's is a zero fill of the whole [3E, E] and a copy each). Not one GEMM for q
  // and k: SDPA's CPU kernel reads q and k rows of stride E (a [N, L, E] GEMM output) faster than rows of
  // stride 2E (views into [N, L, 2E]), and their gradients need no stacking: measured at N = 1, L = 400
  // on 2 cores, 2% faster forward and 1% forward+backward.
  const std::vector<at::Tensor> w = as(in_proj_weight).split_with_sizes({E, E, E});
  std::optional<at::Tensor> b_q, b_k, b_v;
  if (present(in_proj_bias)) {
    const std::vector<at::Tensor> b = as(*in_proj_bias).split_with_sizes({E, E, E});
    b_q = b[0];
    b_k = b[1];
    b_v = b[2];
  }
  // each [N, L, E] viewed as [N, H, L, D] (strided; SDPA takes the views as they are)
  auto heads = [&](const at::Tensor& t) { return t.view({N, L, H, D}).transpose(1, 2); };
  const at::Tensor q = heads(at::linear(qk_in, w[0], b_q));
  const at::Tensor k = heads(at::linear(qk_in, w[1], b_k));
  const at::Tensor v = heads(at::linear(x_c, w[2], b_v));
  std::optional<at::Tensor> mask;
  if (present(attn_mask)) {
    at::Tensor m = attn_mask->detach();  // no gradient flows to a floating mask (the op's contract)
    if (m.dim() == 3) m = m.reshape({N, H, L, L});  // a view where its strides allow
    // SDPA's boolean masks mark the allowed pairs; ours (nn.MultiheadAttention's) the blocked ones
    mask = m.scalar_type() == at::kBool ? m.logical_not() : as(m);
  }
  // a fully blocked query row gives 0, as the reference
  const at::Tensor attended = at::scaled_dot_product_attention(q, k, v, mask);
  std::optional<at::Tensor> out_b;
  if (present(out_proj_bias)) out_b = as(*out_proj_bias);
  const at::Tensor out = at::linear(attended.transpose(1, 2).reshape({N, L, E}), as(out_proj_weight), out_b);
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

}  // namespace
}  // namespace attention
}  // namespace rtdetr_kernels

TORCH_LIBRARY_IMPL(rtdetr_kernels_C, CompositeImplicitAutograd, m) {
  m.impl("aifi_attention_cpu_forward", &rtdetr_kernels::attention::aifi_attention_cpu_forward);
}
