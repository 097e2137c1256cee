// Launchers of the top-K selection CUDA kernels: plain pointers and sizes, no torch types, so that
// cuda.cu compiles without the torch headers. cuda_ops.cpp is the torch-facing side.
//
// The order is kernels/topk/reference.py's: scores descending, NaN lowest, -0.0 == +0.0, equal scores
// by lower candidate index. A score is read as float (exact for every served dtype) and mapped to an
// order-preserving key (IEEE bits with the magnitude bits of negatives flipped; NaN lowest).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

namespace rtdetr_kernels {
namespace topk {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kRadixBins = 256;       // 8-bit digits, 4 passes over a 32-bit key
constexpr int64_t kMaxSortK = 4096;   // k up to this is sorted in shared memory (bitonic)
constexpr int64_t kSmemKeys = 14336;  // images with up to this many candidates keep their keys in shared memory
constexpr int kMaxSlots = 8;          // tensors moved by one launch of the row kernel

// Kernel 1: keys [N, T] int32 and classes [N, T] int32 (the first max class, plus t % pair_c) of
// logits [N, T, C] (element strides s_n, s_t, s_c), and the histogram of the keys' top 8 bits,
// hist [N, 256] int32 (zeroed by the caller), from many blocks per image.
cudaError_t launch_keys(const void* logits, DType dtype, int64_t s_n, int64_t s_t, int64_t s_c, int64_t N, int64_t T,
                        int64_t C, int64_t pair_c, int32_t* keys, int32_t* classes, int32_t* hist, cudaStream_t stream);

// Kernel 2, one block per image: the radix select of the k-th key (pass 0 from hist, three more
// passes in shared memory), the candidates above it and the lowest-indexed ones equal to it as
// packed words key << 32 | (2^32 - 1 - index); with sort (k <= kMaxSortK) a bitonic sort in
// shared memory and the outputs: score words (copied from logits, `elem_bytes` 2 or 4), token
// indices (index / pair_c) and classes, [N, k] each. Without sort the k words go to work [N, k]
// int64 (unordered), for a sort and launch_emit.
cudaError_t launch_select(const int32_t* keys, const int32_t* classes, const int32_t* hist, const void* logits,
                          int elem_bytes, int64_t s_n, int64_t s_t, int64_t s_c, int64_t N, int64_t T, int64_t k,
                          int64_t pair_c, bool sort, int64_t* work, void* scores, int64_t* indices, int64_t* out_classes,
                          cudaStream_t stream);

// The finish of k > kMaxSortK: work [N, k] sorted descending, unpacked into the outputs.
cudaError_t launch_emit(const int64_t* work, const int32_t* classes, const void* logits, int elem_bytes, int64_t s_n,
                        int64_t s_t, int64_t s_c, int64_t N, int64_t T, int64_t k, int64_t pair_c, void* scores,
                        int64_t* indices, int64_t* out_classes, cudaStream_t stream);

// One tensor of the row kernel: rows of `row_bytes` contiguous bytes. The "big" side is [N, T, row]
// (byte strides big_n, big_t), the "small" side [N, k, row] (byte strides small_n, small_t).
// word: 4 (every address, stride and row_bytes is a multiple of 4) or 1.
struct RowSlot {
  const char* src;
  char* dst;
  int64_t big_n, big_t, small_n, small_t, row_bytes;
  int32_t word;
};

struct RowSlots {
  RowSlot slot[kMaxSlots];
  int32_t count;
};

// Gather (small[n, j] = big[n, indices[n, j]]) or scatter (big[n, indices[n, j]] = small[n, j]) of
// every slot's rows, indices [N, k] int64 distinct within an image (so the scatter is deterministic).
cudaError_t launch_rows(const int64_t* indices, int64_t N, int64_t k, const RowSlots& slots, bool scatter,
                        cudaStream_t stream);

}  // namespace topk
}  // namespace rtdetr_kernels
