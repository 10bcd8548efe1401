// cuda/dispatch.h: the host entry points of tiedlora's CUDA kernels, one function per kernel family.
// Each *_dispatch.cpp checks devices, dtypes and shapes, fills the plain parameter struct of kernels/ and
// launches on the current stream. Without CUDA, dispatch_stub.cpp implements these by throwing.
#pragma once

#include <ATen/core/Tensor.h>

namespace tiedlora::cuda {

/// True when tiedlora was built with CUDA and a device is present.
bool available();

/// B_eff = s diag(v) B diag(u) in fp32 on the GPU (u, v may be undefined = 1). The CUDA path of
/// functional::effective_b; B, u, v in fp32, bf16 or fp16, contiguous.
at::Tensor effective_b(const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& v, double scale);

}  // namespace tiedlora::cuda
