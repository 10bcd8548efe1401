// kernels/effective_b.cuh: B_eff = s diag(v) B diag(u), the per-step rebuild of a tied adapter's
// effective B (d_out x r), computed in fp32 and rounded once to the output dtype (fp32 for the gradient
// formulas, the activation dtype for the cuBLASLt matmuls, which take both operands in one dtype).
// No torch headers: plain pointers, a parameter struct and a stream.
#pragma once

#include <cuda_runtime.h>

#include "kernel_types.cuh"

namespace tiedlora::kernels {

struct EffectiveBParams {
  const void* b = nullptr;  // (d_out, r), row-major, dtype `dtype`
  const void* u = nullptr;  // (r) or null (= 1), dtype `dtype`
  const void* v = nullptr;  // (d_out) or null (= 1), dtype `dtype`
  void* out = nullptr;      // (d_out, r), row-major, dtype `out_dtype`
  long long d_out = 0;
  long long rank = 0;
  float scale = 1.f;
  DType dtype = DType::f32;
  DType out_dtype = DType::f32;
};

/// Launches on `stream`; returns the launch status.
cudaError_t launch_effective_b(const EffectiveBParams& params, cudaStream_t stream);

}  // namespace tiedlora::kernels
