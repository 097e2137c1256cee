// Host-side checks of the attention core's compiled ops. The Python op (kernels/attention/op.py)
// validates user input with readable messages; these guard direct torch.ops calls, so that a bad call
// errors instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include "attention/cuda_launch.h"

namespace rtdetr_kernels {
namespace attention {

inline void check_qkv(const char* op, const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.defined() && t.dim() == 4, op, ": ", name, " must be [N, L, H, D], got ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ", t.device());
}

inline DType dtype_of(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, op, ": q, k, v must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

// The problem of q [N, L, H, D]; the mask checked and converted to what the kernels read (uint8 for
// bool, float32 for a floating mask; contiguous). `mask_out` keeps that tensor alive.
inline Problem make_problem(const char* op, const at::Tensor& q, const c10::optional<at::Tensor>& attn_mask,
                            double scale, at::Tensor& mask_out) {
  Problem p;
  p.N = q.size(0);
  p.L = q.size(1);
  p.H = q.size(2);
  p.D = q.size(3);
  p.scale = static_cast<float>(scale);
  TORCH_CHECK(p.D >= 1 && p.D <= kMaxHeadDim, op, ": head dims 1 to ", kMaxHeadDim, " are supported, got ", p.D);
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK(m.device() == q.device(), op, ": attn_mask must be on q's device ", q.device(), ", got ", m.device());
    const bool shared = m.dim() == 2 && m.size(0) == p.L && m.size(1) == p.L;
    const bool per_head = m.dim() == 3 && m.size(0) == p.N * p.H && m.size(1) == p.L && m.size(2) == p.L;
    TORCH_CHECK(shared || per_head, op, ": attn_mask must be [L, L] or [N * H, L, L] with N, L, H = ", p.N, ", ", p.L,
                ", ", p.H, ", got ", m.sizes());
    if (m.scalar_type() == at::kBool) {
      mask_out = m.contiguous();
      p.mask_kind = MaskKind::kBool;
    } else {
      TORCH_CHECK(at::isFloatingType(m.scalar_type()), op, ": attn_mask must be bool or floating, got ", m.scalar_type());
      mask_out = m.to(at::kFloat).contiguous();
      p.mask_kind = MaskKind::kFloat;
    }
    p.mask = mask_out.data_ptr();
    p.mask_bh_stride = per_head ? p.L * p.L : 0;
  }
  return p;
}

// Whether the tensor-core kernels may read `t` with 16-byte loads: aligned base, every stride of a
// dim longer than 1 a multiple of 16 bytes, last dim contiguous.
inline bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  const int64_t per16 = 16 / t.element_size();
  for (int64_t d = 0; d < 3; ++d)
    if (t.size(d) > 1 && t.stride(d) % per16 != 0) return false;
  return t.size(3) == 1 || t.stride(3) == 1;
}

// `t` as the kernels read it: last dim contiguous, and 16-byte aligned rows on the tensor-core path
// (a copy only when the view does not qualify).
inline at::Tensor readable(const at::Tensor& t, bool tensor_cores) {
  const bool last_ok = t.size(3) == 1 || t.stride(3) == 1;
  if (last_ok && (!tensor_cores || aligned16(t))) return t;
  at::Tensor c = t.contiguous();
  if (tensor_cores && !aligned16(c)) c = t.clone(at::MemoryFormat::Contiguous);  // an offset view stays misaligned
  return c;
}

inline View view_of(const at::Tensor& t) {
  View v;
  v.ptr = const_cast<void*>(t.data_ptr());
  v.sn = t.stride(0);
  v.sl = t.stride(1);
  v.sh = t.stride(2);
  return v;
}

}  // namespace attention
}  // namespace rtdetr_kernels
