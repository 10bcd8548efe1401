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
// Precision contract (docs/design.md, "Numerics"), on every path (CPU and CUDA ATen, the CUDA kernels; the
// merges, which run once, compute W + dW in fp32 and round once):
//   - the frozen W stays in its storage dtype (fp32, bf16, fp16) and is never converted per call: the
//     base matmul runs in W's dtype with fp32 accumulation inside the GEMM (activations in another dtype
//     are converted to it, not W);
//   - the adapter factors keep their own dtype (fp32 by default, as PEFT keeps them); on the ATen path the
//     low-rank branch h = x_a A^T, B_eff and their products run in fp32 (fp64 for double activations); the
//     CUDA kernels take one operand dtype per GEMM, so there h and B_eff are rounded to the activation dtype
//     (fp32 accumulation inside each GEMM; see Backend below);
//   - bf16 activations with an fp16 weight (or the reverse) are refused outside autocast;
//   - y and dX are returned in the activation dtype; fp32 layers round once, bf16/fp16 layers round the
//     GEMM's x W^T once and the sum with the update once more (at most one extra rounding of y);
//     dA, dB, du, dv are computed in fp32 and rounded once to their parameters' dtypes;
//   - under autocast (CPU or CUDA, bf16 or fp16) the layer returns what torch::nn::Linear returns under
//     the same autocast: input, W and bias go to the autocast dtype through autocast's own cast (a copy
//     only of what is stored in another dtype; store the model in that dtype to avoid it), the function
//     itself runs with autocast off, in forward and backward.
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

/// Which implementation runs lora_linear() and merged_weight() on CUDA tensors. `aten`: ATen ops (the
/// default). `cuda_kernels`: tiedlora's own kernels (the cuBLASLt passes of kernels/lora_gemm.cu, the merge
/// kernel of kernels/lora_merge.cu), experimental until the GPU checks listed in docs/cuda.md have passed.
/// The kernels take fp32, bf16 and fp16 layers whose input and weight share a dtype; everything else (CPU
/// tensors, double, mixed dtypes, a build without CUDA) keeps the ATen path. On the kernel path h = x A^T
/// and B_eff are rounded to the activation dtype between the matmuls (fp32 accumulation inside each).
enum class Backend { aten, cuda_kernels };

/// Chooses the backend for the calling thread while it lives (the previous choice comes back after), so
/// one thread can use the kernels while another stays on ATen. The choice is made at forward time and
/// recorded in the autograd graph: backward takes the path its forward took, on whatever thread it runs.
class BackendGuard {
 public:
  explicit BackendGuard(Backend backend);
  ~BackendGuard();
  BackendGuard(const BackendGuard&) = delete;
  BackendGuard& operator=(const BackendGuard&) = delete;

 private:
  Backend previous_;
};

/// The calling thread's backend.
Backend current_backend();

/// The number of NaN and Inf entries of `t` (0 for non-floating tensors): the adapter loader refuses
/// tensors that have any, `tiedlora inspect` reports them.
int64_t count_non_finite(const at::Tensor& t);

/// B_eff = s diag(v) B diag(u) in the compute dtype (fp32, or fp64 for double B), no autograd.
at::Tensor effective_b(const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& v, double scale);

/// W + B_eff A computed in fp32 (fp64 for double W) and rounded once to W's dtype; a new tensor.
/// Throws tiedlora::Error naming `what` when the result holds NaN or Inf.
at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         const at::Tensor& u, const at::Tensor& v, double scale, const char* what = "weight");

}  // namespace tiedlora::functional
