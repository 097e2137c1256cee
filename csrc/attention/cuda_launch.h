// Launchers of the attention-core CUDA kernels (csrc/attention/cuda.cu): plain pointers, strides and
// sizes, no torch types, so that cuda.cu compiles without the torch headers. cuda_ops.cpp is the
// torch-facing side (checks, allocation, device guard, stream).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace rtdetr_kernels {
namespace attention {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class MaskKind : int { kNone = 0, kBool = 1, kFloat = 2 };

// A [N, L, H, D] tensor whose last dim is contiguous: element (n, l, h, d) is at
// ptr + n * sn + l * sl + h * sh + d (strides in elements).
struct View {
  void* ptr = nullptr;
  int64_t sn = 0, sl = 0, sh = 0;
};

struct Problem {
  int64_t N = 0, L = 0, H = 0, D = 0;  // batch, tokens, heads, head dim
  float scale = 1.f;                    // softmax scale (1 / sqrt(D) for the op)
  MaskKind mask_kind = MaskKind::kNone;
  const void* mask = nullptr;   // uint8 (bool, True = blocked) or float32 (additive), [*, L, L] contiguous
  int64_t mask_bh_stride = 0;   // 0 for an [L, L] mask, L * L for [N * H, L, L] (head fastest)
};

// True when the fp16/bf16 tensor-core path serves this head dim (the others run the SIMT path).
bool tensor_core_head_dim(int64_t D);
// The largest head dim the kernels serve.
constexpr int64_t kMaxHeadDim = 256;

// out [N, L, H, D] (dtype), lse [N * H, L] float32 (base-2 logsumexp of the scaled, masked scores;
// +inf for a query that sees no key). q, k, v, out: for the tensor-core path, 16-byte aligned rows.
cudaError_t launch_forward(const Problem& p, DType dtype, View q, View k, View v, View out, float* lse,
                           cudaStream_t stream);

// delta [N * H, L] float32 = rowsum(grad_out * out); then dk, dv (one kernel over key tiles, looping
// over the query tiles) and dq (one kernel over query tiles): each gradient element is written by
// one thread, no atomics (deterministic). dq, dk, dv in the input dtype.
cudaError_t launch_backward(const Problem& p, DType dtype, View grad_out, View q, View k, View v, View out,
                            const float* lse, float* delta, View dq, View dk, View dv, cudaStream_t stream);

}  // namespace attention
}  // namespace rtdetr_kernels
