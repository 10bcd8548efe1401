// precision.h (private to core): the dtype rules of the precision contract (tiedlora/core/functional.h) and
// the test of whether a call takes tiedlora's CUDA kernels, shared by lora_linear.cpp and merge.cpp.
#pragma once

#include <ATen/ATen.h>

#include "tiedlora/core/forward_context.h"
#include "tiedlora/core/functional.h"

namespace tiedlora::functional::detail {

// fp32 for every storage dtype but double, which stays double so that gradcheck runs in fp64.
inline at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
inline at::Tensor as(const at::Tensor& t, at::ScalarType type) { return t.scalar_type() == type ? t : t.to(type); }

// The fp32 (fp64 for double factors) dtype in which an update is applied.
inline at::ScalarType update_compute_type(const LowRankUpdate& update) {
  return compute_type(update.lora_b.scalar_type());
}

// B_eff = s diag(v) B diag(u) in `type`; always a new tensor.
inline at::Tensor effective_b_as(const at::Tensor& b, const at::Tensor& u, const at::Tensor& v, double scale,
                                 at::ScalarType type) {
  at::Tensor out = as(b, type) * scale;  // a new tensor, so the in-place products below are safe
  if (u.defined()) out.mul_(as(u, type).unsqueeze(0));
  if (v.defined()) out.mul_(as(v, type).unsqueeze(1));
  return out;
}

inline bool kernel_dtype_ok(const at::Tensor& t) {
  if (!t.defined()) return true;
  const auto type = t.scalar_type();
  return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
}

// Whether this call takes the CUDA kernels: switched on, built with CUDA, CUDA tensors, and dtypes the
// kernels take (activations and W in one of fp32/bf16/fp16; the small factors are converted per call).
inline bool use_cuda_kernels(const at::Tensor& x, const at::Tensor& adapter_x, const at::Tensor& weight,
                             const at::Tensor& bias, const LowRankUpdate& update) {
  if (!TIEDLORA_WITH_CUDA || current_backend() != Backend::cuda_kernels || !x.is_cuda()) return false;
  const auto type = x.scalar_type();
  if (!kernel_dtype_ok(x) || weight.scalar_type() != type) return false;
  if (adapter_x.defined() && adapter_x.scalar_type() != type) return false;
  return kernel_dtype_ok(bias) && kernel_dtype_ok(update.lora_a) && kernel_dtype_ok(update.lora_b) &&
         kernel_dtype_ok(update.u) && kernel_dtype_ok(update.v);
}

// `t` (2-D) itself when the kernels can read it in place (unit column stride, row stride >= row length),
// else a contiguous copy.
inline at::Tensor row_strided(const at::Tensor& t) {
  const bool unit_columns = t.size(1) <= 1 || t.stride(1) == 1;
  const bool rows_apart = t.size(0) <= 1 || t.stride(0) >= t.size(1);
  return unit_columns && rows_apart ? t : t.contiguous();
}

}  // namespace tiedlora::functional::detail
