// cuda/dispatch_common.h: helpers shared by the *_dispatch.cpp files of a CUDA build (never by the stub):
// torch dtypes to the kernels' DType, kernel Status to exceptions, and the shape of a row-strided matrix.
#pragma once

#include <algorithm>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "kernel_types.cuh"

namespace tiedlora::cuda {

inline kernels::DType kernel_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return kernels::DType::f32;
    case at::kBFloat16: return kernels::DType::bf16;
    case at::kHalf: return kernels::DType::f16;
    default: TORCH_CHECK(false, "tiedlora CUDA kernels take fp32, bf16 or fp16 tensors, got ", type);
  }
}

/// Throws c10::Error naming `what` and the failed step when a kernel launcher reports a failure.
inline void check_kernel_status(const kernels::Status& status, const char* what) {
  if (status.ok()) return;
  char buffer[512];
  TORCH_CHECK(false, what, ": ", kernels::describe(status, buffer, sizeof(buffer)));
}

/// Elements between row starts of a 2-D tensor the kernels can read in place (unit column stride), or -1.
/// A single row has no meaningful row stride, so its row length is used.
inline int64_t row_stride_of(const at::Tensor& t) {
  if (t.dim() != 2) return -1;
  if (t.size(0) <= 1) return t.size(1) > 1 && t.stride(1) != 1 ? -1 : std::max<int64_t>(t.size(1), 1);
  if (t.size(1) > 1 && t.stride(1) != 1) return -1;
  return t.stride(0) >= t.size(1) ? t.stride(0) : -1;
}

}  // namespace tiedlora::cuda
