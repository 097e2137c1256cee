// The torch-facing side of the top-K CUDA kernels: checks, device guard, current stream, allocation,
// the row slots of the gathers and scatters. Compiled by the host compiler; the kernels are in cuda.cu.
// No host synchronisation anywhere (CUDA-graph capturable): every size is known from the shapes.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "topk/cuda_launch.h"

namespace rtdetr_kernels {
namespace topk {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, "topk_select (cuda backend): logits must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

void check(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "topk_select CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// t [N, T, *] as rows: a [N, T, row] view whose rows are contiguous (a copy when the trailing dims are not)
at::Tensor as_rows(const at::Tensor& t) {
  const int64_t N = t.size(0), T = t.size(1);
  int64_t row = 1;
  bool rows_contiguous = true;  // the trailing dims laid out as one contiguous row
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) != 1 && t.stride(d) != row) rows_contiguous = false;
    row *= t.size(d);
  }
  const at::Tensor v = rows_contiguous ? t : t.contiguous();
  return v.as_strided({N, T, row}, {v.stride(0), v.stride(1), 1});
}

RowSlot make_slot(const at::Tensor& big, const at::Tensor& small, bool scatter) {
  // big [N, T, row] rows, small [N, k, row] contiguous; strides in bytes
  const int64_t es = big.element_size();
  RowSlot s;
  const char* big_ptr = static_cast<const char*>(big.data_ptr());
  const char* small_ptr = static_cast<const char*>(small.data_ptr());
  s.src = scatter ? small_ptr : big_ptr;
  s.dst = const_cast<char*>(scatter ? big_ptr : small_ptr);
  s.big_n = big.stride(0) * es;
  s.big_t = big.stride(1) * es;
  s.small_n = small.size(1) * big.size(2) * es;
  s.small_t = big.size(2) * es;
  s.row_bytes = big.size(2) * es;
  const auto aligned = [](int64_t v) { return v % 4 == 0; };
  s.word = aligned(reinterpret_cast<uintptr_t>(big_ptr)) && aligned(reinterpret_cast<uintptr_t>(small_ptr)) &&
                   aligned(s.big_n) && aligned(s.big_t) && aligned(s.row_bytes)
               ? 4
               : 1;
  return s;
}

void move_rows(const at::Tensor& indices, const std::vector<std::pair<at::Tensor, at::Tensor>>& pairs, bool scatter,
               cudaStream_t stream) {
  const int64_t N = indices.size(0), k = indices.size(1);
  for (size_t start = 0; start < pairs.size(); start += kMaxSlots) {
    RowSlots slots{};
    slots.count = 0;
    for (size_t i = start; i < pairs.size() && slots.count < kMaxSlots; ++i)
      slots.slot[slots.count++] = make_slot(pairs[i].first, pairs[i].second, scatter);
    check(launch_rows(indices.data_ptr<int64_t>(), N, k, slots, scatter, stream));
  }
}

std::vector<int64_t> gathered_shape(const at::Tensor& t, int64_t k) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape[1] = k;
  return shape;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> forward_cuda(const at::Tensor& logits, int64_t k,
                                                                                     at::TensorList gather, bool pairs) {
  TORCH_CHECK(logits.is_cuda(), "topk_select (cuda backend): logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3, "topk_select: logits must be [N, T, C], got ", logits.sizes());
  const DType dtype = dtype_of(logits);
  const int64_t N = logits.size(0), T = logits.size(1), C = logits.size(2);
  const int64_t candidates = pairs ? T * C : T;
  TORCH_CHECK(C >= 1, "topk_select: logits need at least one class, got ", logits.sizes());
  TORCH_CHECK(k >= 1 && k <= candidates, "topk_select: k must be in [1, ", candidates, "], got ", k);
  TORCH_CHECK(candidates < (int64_t(1) << 31), "topk_select (cuda backend): at most 2^31 - 1 candidates per image, got ",
              candidates);
  for (size_t i = 0; i < gather.size(); ++i) {
    const at::Tensor& t = gather[i];
    TORCH_CHECK(t.device() == logits.device(), "topk_select: gather[", i, "] must be on ", logits.device(), ", got ",
                t.device());
    TORCH_CHECK(t.dim() >= 2 && t.size(0) == N && t.size(1) == T, "topk_select: gather[", i,
                "] must be [N, T, *] with N = ", N, ", T = ", T, ", got ", t.sizes());
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto long_opts = logits.options().dtype(at::kLong);
  at::Tensor scores = at::empty({N, k}, logits.options());
  at::Tensor indices = at::empty({N, k}, long_opts);
  at::Tensor classes = at::empty({N, k}, long_opts);
  std::vector<at::Tensor> gathered;
  for (const at::Tensor& t : gather) gathered.push_back(at::empty(gathered_shape(t, k), t.options()));
  if (N == 0) return {scores, indices, classes, gathered};

  const at::Tensor view = pairs ? logits.reshape({N, T * C, 1}) : logits;
  const int64_t CC = pairs ? 1 : C, pair_c = pairs ? C : 1;
  const auto int_opts = logits.options().dtype(at::kInt);
  at::Tensor keys = at::empty({N, candidates}, int_opts);
  at::Tensor cand_classes = at::empty({N, candidates}, int_opts);
  at::Tensor hist = at::zeros({N, kRadixBins}, int_opts);
  check(launch_keys(view.data_ptr(), dtype, view.stride(0), view.stride(1), view.stride(2), N, candidates, CC, pair_c,
                    keys.data_ptr<int32_t>(), cand_classes.data_ptr<int32_t>(), hist.data_ptr<int32_t>(), stream));
  const bool sort = k <= kMaxSortK;
  at::Tensor work = sort ? at::Tensor() : at::empty({N, k}, long_opts);
  const int elem_bytes = static_cast<int>(logits.element_size());
  check(launch_select(keys.data_ptr<int32_t>(), cand_classes.data_ptr<int32_t>(), hist.data_ptr<int32_t>(),
                      logits.data_ptr(), elem_bytes, logits.stride(0), logits.stride(1), logits.stride(2), N, candidates,
                      k, pair_c, sort, sort ? nullptr : work.data_ptr<int64_t>(), scores.data_ptr(),
                      indices.data_ptr<int64_t>(), classes.data_ptr<int64_t>(), stream));
  if (!sort) {
    const at::Tensor ordered = std::get<0>(work.sort(/*dim=*/1, /*descending=*/true));
    check(launch_emit(ordered.data_ptr<int64_t>(), cand_classes.data_ptr<int32_t>(), logits.data_ptr(), elem_bytes,
                      logits.stride(0), logits.stride(1), logits.stride(2), N, candidates, k, pair_c, scores.data_ptr(),
                      indices.data_ptr<int64_t>(), classes.data_ptr<int64_t>(), stream));
  }
  std::vector<std::pair<at::Tensor, at::Tensor>> moves;
  for (size_t i = 0; i < gather.size(); ++i) {
    if (gathered[i].numel() == 0) continue;
    const at::Tensor big = as_rows(gather[i]);
    moves.emplace_back(big, gathered[i].view({N, k, big.size(2)}));
  }
  move_rows(indices, moves, /*scatter=*/false, stream);
  return {scores, indices, classes, gathered};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> backward_cuda(const at::Tensor& grad_scores, const at::Tensor& indices,
                                                              const at::Tensor& classes, at::TensorList grad_gathered,
                                                              int64_t num_tokens, int64_t num_classes, bool pairs,
                                                              bool need_logits, c10::List<bool> need_gather,
                                                              bool deterministic) {
  (void)deterministic;  // every path below is deterministic
  TORCH_CHECK(indices.is_cuda() && indices.dim() == 2 && indices.scalar_type() == at::kLong,
              "topk_select_backward: indices must be a [N, k] int64 CUDA tensor");
  TORCH_CHECK(classes.sizes() == indices.sizes(), "topk_select_backward: classes must match indices");
  TORCH_CHECK(need_gather.size() == grad_gathered.size(), "topk_select_backward: need_gather has ", need_gather.size(),
              " entries for ", grad_gathered.size(), " gradients");
  const int64_t N = indices.size(0), k = indices.size(1), T = num_tokens, C = num_classes;
  const c10::cuda::CUDAGuard guard(indices.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor grad_logits;
  if (need_logits) {
    TORCH_CHECK(grad_scores.sizes() == indices.sizes(), "topk_select_backward: grad_scores must be [N, k]");
    const at::Tensor flat = indices * C + classes;  // distinct within a row
    grad_logits = at::zeros({N, T * C}, grad_scores.options()).scatter_(1, flat, grad_scores).view({N, T, C});
  } else {
    grad_logits = grad_scores.new_empty({0});
  }
  std::vector<at::Tensor> grads;
  std::vector<std::pair<at::Tensor, at::Tensor>> moves;
  for (size_t i = 0; i < grad_gathered.size(); ++i) {
    const at::Tensor& g = grad_gathered[i];
    if (!need_gather.get(i)) {
      grads.push_back(g.new_empty({0}));
      continue;
    }
    TORCH_CHECK(g.dim() >= 2 && g.size(0) == N && g.size(1) == k, "topk_select_backward: grad_gathered[", i,
                "] must be [N, k, *], got ", g.sizes());
    std::vector<int64_t> shape(g.sizes().begin(), g.sizes().end());
    shape[1] = T;
    at::Tensor out = at::zeros(shape, g.options());
    grads.push_back(out);
    if (N * k == 0 || out.numel() == 0) continue;
    if (pairs) {  // a token chosen for several classes: its gradients add up (index_put_'s sorted path)
      const at::Tensor rows = at::arange(N, indices.options()).unsqueeze(1).expand({N, k});
      out.index_put_({rows, indices}, g, /*accumulate=*/true);
      continue;
    }
    const at::Tensor small = g.contiguous();
    const at::Tensor big = out.view({N, T, -1});
    moves.emplace_back(big, small.view({N, k, big.size(2)}));
  }
  move_rows(indices, moves, /*scatter=*/true, stream);
  return {grad_logits, grads};
}

}  // namespace
}  // namespace topk
}  // namespace rtdetr_kernels

TORCH_LIBRARY_IMPL(rtdetr_kernels_C, CUDA, m) {
  m.impl("topk_select_forward", &rtdetr_kernels::topk::forward_cuda);
  m.impl("topk_select_backward", &rtdetr_kernels::topk::backward_cuda);
}
