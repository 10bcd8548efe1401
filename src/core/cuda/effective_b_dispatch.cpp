// effective_b_dispatch.cpp: the one file where tensors meet the effective_b kernel (kernels/effective_b.cu).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "core/cuda/dispatch.h"
#include "core/cuda/dispatch_common.h"
#include "effective_b.cuh"

namespace tiedlora::cuda {

at::Tensor effective_b(const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& v, double scale,
                       at::ScalarType out_type) {
  TORCH_CHECK(lora_b.is_cuda() && lora_b.dim() == 2, "cuda::effective_b: lora_b must be a 2-D CUDA tensor");
  const int64_t out = lora_b.size(0), r = lora_b.size(1);
  TORCH_CHECK(!u.defined() || (u.device() == lora_b.device() && u.numel() == r),
              "cuda::effective_b: u must be (r = ", r, ") on lora_b's device ", lora_b.device());
  TORCH_CHECK(!v.defined() || (v.device() == lora_b.device() && v.numel() == out),
              "cuda::effective_b: v must be (d_out = ", out, ") on lora_b's device ", lora_b.device());
  // The kernel reads B, u and v in one dtype and multiplies in fp32. When they differ (a bf16 B with fp32 u
  // and v), all three go to fp32, which is exact: rounding u and v to B's dtype first would not be.
  const bool same = (!u.defined() || u.scalar_type() == lora_b.scalar_type()) &&
                    (!v.defined() || v.scalar_type() == lora_b.scalar_type());
  const at::ScalarType in_type = same ? lora_b.scalar_type() : at::kFloat;
  const at::Tensor b = lora_b.to(in_type).contiguous();
  const at::Tensor uu = u.defined() ? u.to(in_type).contiguous() : at::Tensor();
  const at::Tensor vv = v.defined() ? v.to(in_type).contiguous() : at::Tensor();
  c10::cuda::CUDAGuard guard(b.device());
  at::Tensor result = at::empty({out, r}, b.options().dtype(out_type));
  kernels::EffectiveBParams params;
  params.b = b.data_ptr();
  params.u = uu.defined() ? uu.data_ptr() : nullptr;
  params.v = vv.defined() ? vv.data_ptr() : nullptr;
  params.out = result.data_ptr();
  params.d_out = out;
  params.rank = r;
  params.scale = static_cast<float>(scale);
  params.dtype = kernel_dtype(b.scalar_type());
  params.out_dtype = kernel_dtype(out_type);
  const cudaError_t status = kernels::launch_effective_b(params, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "cuda::effective_b: kernel launch failed: ", cudaGetErrorString(status));
  return result;
}

}  // namespace tiedlora::cuda
