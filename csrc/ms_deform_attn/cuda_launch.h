// Launchers of the MSDA CUDA kernels: plain pointers and sizes, no torch types, so that cuda.cu
// compiles without the torch headers. cuda_ops.cpp is the torch-facing side.
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#include "ms_deform_attn/ms_deform_attn.h"

namespace rtdetr_kernels {
namespace msda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// value: [N,S,M,D] in `dtype`; loc [N,Lq,M,P,2] and attn [N,Lq,M,P] in the math type (float, or
// double when dtype is kFloat64); out [N,Lq,M,D] in `dtype`.
cudaError_t launch_forward(const Problem& p, DType dtype, const void* value, const void* loc, const void* attn,
                           void* out, cudaStream_t stream);

// Fused backward. grad_value_acc (math type, zeroed, may be null) receives atomics; grad_loc and
// grad_attn (math type, may be null) are written per point without atomics.
cudaError_t launch_backward(const Problem& p, DType dtype, const void* grad_out, const void* value, const void* loc,
                            const void* attn, void* grad_value_acc, void* grad_loc, void* grad_attn, cudaStream_t stream);

// Deterministic grad_value, step 1: the padded base cell of every point (N*M*padded_cells for a
// skipped point), so that a stable sort groups the points by the cells they touch.
cudaError_t launch_point_keys(const Problem& p, DType dtype, const void* loc, int64_t padded_cells, int64_t* keys,
                              cudaStream_t stream);

// Step 2 (after the sort): every value cell gathers the contributions of the points whose base cell
// is one of its 4 neighbours, in sorted order, accumulating in the math type. No atomics.
cudaError_t launch_grad_value_gather(const Problem& p, DType dtype, const void* grad_out, const void* loc,
                                     const void* attn, const int64_t* sorted_points, const int64_t* segment_offsets,
                                     int64_t padded_cells, void* grad_value, cudaStream_t stream);

}  // namespace msda
}  // namespace rtdetr_kernels
