// kernels/kernel_types.cuh: the plain types every tiedlora kernel family shares: the element types the
// kernels take and the status a host launcher returns. No torch headers; nothing here throws (the dispatch
// files in src/core/cuda/ turn a failed status into an exception).
#pragma once

#include <cuda_runtime.h>

namespace tiedlora::kernels {

enum class DType { f32, bf16, f16 };

/// Bytes of one element of `dtype`.
constexpr int dtype_bytes(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

enum class StatusCode {
  ok,
  invalid_argument,  // a size, stride, pointer or alignment the launcher refuses (a bug in the caller)
  cuda_error,        // a CUDA runtime call failed; `detail` holds the cudaError_t
  cublas_error,      // a cuBLASLt call failed; `detail` holds the cublasStatus_t
  no_algorithm,      // cuBLASLt's heuristics offered no algorithm for this problem
};

/// What a host launcher returns: a code, the library's own error number, and where it happened (a string
/// literal naming the step, e.g. "forward: h = x A^T").
struct Status {
  StatusCode code = StatusCode::ok;
  int detail = 0;
  const char* where = "";

  bool ok() const { return code == StatusCode::ok; }
};

inline Status invalid_argument(const char* where) { return {StatusCode::invalid_argument, 0, where}; }
inline Status cuda_status(cudaError_t error, const char* where) {
  return error == cudaSuccess ? Status{} : Status{StatusCode::cuda_error, static_cast<int>(error), where};
}

/// A readable one-line description of a status (code, library error name, step), for error messages.
/// Writes into `buffer` and returns it.
const char* describe(const Status& status, char* buffer, int buffer_size);

}  // namespace tiedlora::kernels
