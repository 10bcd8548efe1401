// tiedlora/functional.h: the stateless math of adapted linear layers. Every adapted layer of every model
// goes through lora_linear(): it is the one choke point, and the CUDA path replaces its inside.
//
//   y = x W^T + bias + (x_a A^T) B_eff^T,   B_eff = s diag(v) B diag(u)
//
// with x_a = x, or the dropped-out input when adapter dropout is on. A missing (undefined) u or v means 1.
// Plain LoRA is the case without u and v. Gradients follow method.md: dH = dY B_eff, dB_eff = dY^T h,
// dA = dH^T x_a (autograd sums it over every layer that shares A), dX = dY W + dH A, and
// dB = s v_i u_j dB_eff, du = s sum_i v_i B_ij dB_eff_ij, dv = s sum_j B_ij u_j dB_eff_ij.
// W never gets a gradient: it must be frozen (requires_grad false).
//
// Numerics: the computation runs in fp32 (fp64 for double inputs) whatever the storage dtypes, and each
// output is rounded once to its dtype: y and dX to x's dtype, dA, dB, du, dv to their parameters' dtypes.
#pragma once

#include <ATen/core/Tensor.h>

namespace tiedlora::functional {

/// The adapted linear layer. `input`: (..., d_in); `weight`: (d_out, d_in), frozen; `bias`: (d_out) or
/// undefined; `lora_a`: (r, d_in); `lora_b`: (d_out, r); `u`: (r) or undefined; `v`: (d_out) or undefined;
/// `adapter_input`: the input of the low-rank branch when it differs from `input` (dropout), else undefined.
/// Returns (..., d_out) in input's dtype. Checks shapes, dtypes and devices, naming the argument.
at::Tensor lora_linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u,
                       const at::Tensor& v, double scale, const at::Tensor& adapter_input = {});

/// Experimental: run CUDA tensors through tiedlora's own CUDA kernels (the cuBLASLt passes of
/// kernels/lora_gemm.cu in lora_linear, the merge kernel of kernels/lora_merge.cu in merged_weight) instead
/// of the ATen ops. Off by default until the GPU checks listed in docs/cuda.md have passed; the environment
/// variable TIEDLORA_CUDA_KERNELS=1 switches it on from the start. Applies to fp32, bf16 and fp16 layers
/// whose input and weight share a dtype; everything else (CPU tensors, double, mixed dtypes, a build without
/// CUDA) keeps the ATen path. On the kernel path the adapter branch's h = x A^T and B_eff are rounded to
/// the activation dtype between the matmuls (fp32 accumulation inside each), as PEFT does.
void set_cuda_kernels_enabled(bool enabled);
bool cuda_kernels_enabled();

/// B_eff = s diag(v) B diag(u) in the compute dtype (fp32, or fp64 for double B), no autograd.
at::Tensor effective_b(const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& v, double scale);

/// W + B_eff A computed in fp32 (fp64 for double W) and rounded once to W's dtype; a new tensor.
/// Throws tiedlora::Error naming `what` when the result holds NaN or Inf.
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         const at::Tensor& u, const at::Tensor& v, double scale, const char* what = "weight");

}  // namespace tiedlora::functional
