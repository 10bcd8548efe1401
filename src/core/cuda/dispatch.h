// cuda/dispatch.h: the host entry points of tiedlora's CUDA kernels, one function per kernel family.
// Each *_dispatch.cpp checks devices, dtypes and shapes, fills the plain parameter struct of kernels/ and
// launches on the current stream. Without CUDA, dispatch_stub.cpp implements these by throwing.
#pragma once

#include <ATen/core/Tensor.h>

namespace tiedlora::cuda {

/// True when tiedlora was built with CUDA and a device is present.
bool available();

/// B_eff = s diag(v) B diag(u) on the GPU (u, v may be undefined = 1), computed in fp32 and rounded once to
/// `out_type` (fp32, bf16 or fp16). The CUDA path of functional::effective_b; B, u, v in fp32, bf16 or fp16.
at::Tensor effective_b(const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& v, double scale,
                       at::ScalarType out_type = at::kFloat);

// ---- the adapted linear layer on cuBLASLt (kernels/lora_gemm.cu) ------------------------------------------
// Matrices are 2-D CUDA tensors on one device whose rows may be strided (stride(1) == 1, stride(0) >= the
// row's length): a column slice of a wider buffer needs no copy. The activations, W, A, B_eff and the bias
// share one dtype (fp32, bf16 or fp16). Outputs are written, never read (their old contents do not matter).

/// Forward pass into preallocated outputs: `y` (M, d_out) = x W^T + bias + h B_eff^T and `h` (M, r) =
/// x_a A^T, x_a = `adapter_x` when defined, else `x`. `bias` is (d_out) or undefined.
void lora_forward_out(const at::Tensor& y, const at::Tensor& h, const at::Tensor& x, const at::Tensor& adapter_x,
                      const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& lora_a,
                      const at::Tensor& b_eff);

/// Backward pass into the outputs that are defined (undefined ones are skipped): `grad_x` (M, d_in) = dY W
/// (+ dH A when `adapter_x` is undefined), `grad_adapter_x` (M, d_in) = dH A, `grad_lora_a` (r, d_in, fp32)
/// = dH^T x_a, `grad_b_eff` (d_out, r, fp32) = dY^T h, with dH = dY B_eff. `h` is the forward pass's.
void lora_backward_out(const at::Tensor& grad_x, const at::Tensor& grad_adapter_x, const at::Tensor& grad_lora_a,
                       const at::Tensor& grad_b_eff, const at::Tensor& grad_y, const at::Tensor& x,
                       const at::Tensor& adapter_x, const at::Tensor& weight, const at::Tensor& lora_a,
                       const at::Tensor& b_eff, const at::Tensor& h);

// ---- merging (kernels/lora_merge.cu) ------------------------------------------------------------------------

/// `out` = W + B_eff A computed in fp32 and rounded once to W's dtype; `out` may be `weight` itself (in
/// place) or another (d_out, d_in) tensor of W's dtype and device. `lora_a` (r, d_in) and `b_eff` (d_out, r)
/// are fp32. Returns a device int32 scalar, 1 when an output is NaN or Inf (reading it synchronizes).
at::Tensor merge_weight_out(const at::Tensor& out, const at::Tensor& weight, const at::Tensor& lora_a,
                            const at::Tensor& b_eff);

}  // namespace tiedlora::cuda
