// kernels/effective_b.cu: B_eff = s diag(v) B diag(u) in fp32, one thread per element, rounded once to the
// output dtype.
// Built by nvcc for sm_80 and sm_90 (cmake/TiedloraCuda.cmake); called from src/core/cuda/effective_b_dispatch.cpp.
#include "effective_b.cuh"
#include "element_convert.cuh"

namespace tiedlora::kernels {
namespace {

template <typename T, typename Out>
__global__ void effective_b_kernel(const T* __restrict__ b, const T* __restrict__ u, const T* __restrict__ v,
                                   Out* __restrict__ out, long long d_out, long long rank, float scale) {
  const long long n = d_out * rank;
  for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < n;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long i = idx / rank, j = idx - i * rank;
    float value = scale * to_float(b[idx]);
    if (u) value *= to_float(u[j]);
    if (v) value *= to_float(v[i]);
    out[idx] = from_float<Out>(value);
  }
}

template <typename T, typename Out>
cudaError_t launch_typed(const EffectiveBParams& p, cudaStream_t stream) {
  const long long n = p.d_out * p.rank;
  if (n == 0) return cudaSuccess;
  constexpr int threads = 256;
  const long long wanted = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 65535 ? wanted : 65535);
  effective_b_kernel<T, Out><<<blocks, threads, 0, stream>>>(static_cast<const T*>(p.b), static_cast<const T*>(p.u),
                                                             static_cast<const T*>(p.v), static_cast<Out*>(p.out),
                                                             p.d_out, p.rank, p.scale);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_input(const EffectiveBParams& p, cudaStream_t stream) {
  switch (p.out_dtype) {
    case DType::f32: return launch_typed<T, float>(p, stream);
    case DType::bf16: return launch_typed<T, __nv_bfloat16>(p, stream);
    case DType::f16: return launch_typed<T, __half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_effective_b(const EffectiveBParams& params, cudaStream_t stream) {
  switch (params.dtype) {
    case DType::f32: return launch_for_input<float>(params, stream);
    case DType::bf16: return launch_for_input<__nv_bfloat16>(params, stream);
    case DType::f16: return launch_for_input<__half>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace tiedlora::kernels
