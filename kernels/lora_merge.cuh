// kernels/lora_merge.cuh: W' = W + B_eff A for merging an adapter into its base weight. The product and the
// sum are computed in fp32 and rounded once to W's dtype (bf16 holds 8 significant bits, so a delta computed
// or added in bf16 would lose most of its digits; docs/cuda.md). W is read once and W' written once; in place
// (out == weight) or out of place. Any output that is NaN or Inf raises a flag in device memory, so the
// caller can refuse the merge (it keeps the original W for that: an in-place merge has already written).
// No torch headers; the launcher returns a Status and never throws.
#pragma once

#include <cuda_runtime.h>

#include "kernel_types.cuh"

namespace tiedlora::kernels {

struct LoraMergeParams {
  DType dtype = DType::f32;  // of weight and out
  long long d_out = 0, d_in = 0, rank = 0;
  const void* weight = nullptr;  // (d_out, d_in), row-major
  long long ld_weight = 0;
  void* out = nullptr;  // (d_out, d_in); may be `weight` itself (then with the same leading dimension)
  long long ld_out = 0;
  const float* lora_a = nullptr;  // (r, d_in), fp32
  long long ld_lora_a = 0;
  const float* b_eff = nullptr;  // (d_out, r), fp32: s diag(v) B diag(u)
  long long ld_b_eff = 0;
  int* nonfinite_flag = nullptr;  // device int the caller zeroes; set to 1 when an output is NaN or Inf
};

/// Launches the merge on `stream`.
Status launch_lora_merge(const LoraMergeParams& params, cudaStream_t stream);

}  // namespace tiedlora::kernels
