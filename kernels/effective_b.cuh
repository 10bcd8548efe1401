// kernels/effective_b.cuh: B_eff = s diag(v) B diag(u), the per-step rebuild of a tied adapter's
// effective B (d_out x r) in fp32. No torch headers: plain pointers, a parameter struct and a stream.
#pragma once

#include <cuda_runtime.h>

namespace tiedlora::kernels {

enum class DType { f32, bf16, f16 };

struct EffectiveBParams {
  const void* b = nullptr;  // (d_out, r), row-major, dtype `dtype`
  const void* u = nullptr;  // (r) or null (= 1)
  const void* v = nullptr;  // (d_out) or null (= 1)
  float* out = nullptr;     // (d_out, r), fp32
  long long d_out = 0;
  long long rank = 0;
  float scale = 1.f;
  DType dtype = DType::f32;
};

/// Launches on `stream`; returns the launch status.
cudaError_t launch_effective_b(const EffectiveBParams& params, cudaStream_t stream);

}  // namespace tiedlora::kernels
