// kernels/lora_gemm.cuh: the cuBLASLt path of the adapted linear layer, the reference and fallback of the
// fused kernels (docs/cuda.md, "cuBLASLt reference path"):
//
//   forward   h = x_a A^T;  y = x W^T + bias;  y += h B_eff^T (beta = 1, same output)
//   backward  dH = dY B_eff;  dB_eff = dY^T h;  dX = dY W;  dX += dH A (beta = 1);  dA = dH^T x_a
//
// Every matrix is row-major with a leading dimension (elements between row starts, >= its columns), so
// row-strided views need no copy. One dtype (fp32, bf16 or fp16) for the activations and the operands; the
// matmuls accumulate in fp32 (CUBLAS_COMPUTE_32F, never TF32) and round once per output. dA and dB_eff are
// written in fp32 (docs/method.md: accumulate adapter gradients in fp32). dB, du, dv follow from dB_eff on the
// host (functional.cpp). No torch headers; launchers return a Status and never throw.
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

#include "kernel_types.cuh"

namespace tiedlora::kernels {

/// D = alpha op(A) op(B) + beta C (+ bias on every row), row-major, D written over C. op(A) is m x k
/// (A stored k x m when transpose_a), op(B) is k x n (B stored n x k when transpose_b). A and B in
/// `input_dtype`; C and the bias in `output_dtype`, which is `input_dtype` or fp32.
struct MatmulParams {
  DType input_dtype = DType::f32;
  DType output_dtype = DType::f32;
  long long m = 0, n = 0, k = 0;
  const void* a = nullptr;
  long long lda = 0;
  bool transpose_a = false;
  const void* b = nullptr;
  long long ldb = 0;
  bool transpose_b = false;
  void* c = nullptr;
  long long ldc = 0;
  float alpha = 1.f;
  float beta = 0.f;
  const void* bias = nullptr;  // (n), contiguous, or null
  void* workspace = nullptr;   // null: the cached workspace of the current device and `stream`
  size_t workspace_bytes = 0;
};

/// One cuBLASLt matmul on `stream`. The handle (one per device) and the algorithm chosen by cuBLASLt's
/// heuristics (one per problem shape, dtype, alignment and workspace size) are cached.
Status matmul(const MatmulParams& params, cudaStream_t stream);

/// Bytes of cuBLASLt workspace the launchers ask for (what a caller should pass, or what the cache holds).
size_t lt_workspace_bytes();

struct LoraForwardParams {
  DType dtype = DType::f32;  // of every tensor below
  long long m = 0, d_in = 0, d_out = 0, rank = 0;
  const void* x = nullptr;  // (m, d_in)
  long long ld_x = 0;
  const void* adapter_x = nullptr;  // (m, d_in), the low-rank branch's input (dropout), or null for x
  long long ld_adapter_x = 0;
  const void* weight = nullptr;  // (d_out, d_in)
  long long ld_weight = 0;
  const void* bias = nullptr;    // (d_out), contiguous, or null
  const void* lora_a = nullptr;  // (r, d_in)
  long long ld_lora_a = 0;
  const void* b_eff = nullptr;  // (d_out, r), s diag(v) B diag(u)
  long long ld_b_eff = 0;
  void* y = nullptr;  // (m, d_out), written
  long long ld_y = 0;
  void* h = nullptr;  // (m, r), written: x_a A^T, kept for the backward pass
  long long ld_h = 0;
  void* workspace = nullptr;  // as in MatmulParams
  size_t workspace_bytes = 0;
};

/// The forward pass: three matmuls on `stream`, y written by the second and accumulated by the third.
Status lora_forward(const LoraForwardParams& params, cudaStream_t stream);

struct LoraBackwardParams {
  DType dtype = DType::f32;  // of every tensor below but the two fp32 gradients
  long long m = 0, d_in = 0, d_out = 0, rank = 0;
  const void* grad_y = nullptr;  // (m, d_out)
  long long ld_grad_y = 0;
  const void* x = nullptr;  // (m, d_in), read for dA when adapter_x is null
  long long ld_x = 0;
  const void* adapter_x = nullptr;  // (m, d_in) or null (then x is the low-rank branch's input)
  long long ld_adapter_x = 0;
  const void* weight = nullptr;  // (d_out, d_in)
  long long ld_weight = 0;
  const void* lora_a = nullptr;  // (r, d_in)
  long long ld_lora_a = 0;
  const void* b_eff = nullptr;  // (d_out, r)
  long long ld_b_eff = 0;
  const void* h = nullptr;  // (m, r), from the forward pass
  long long ld_h = 0;
  void* grad_h = nullptr;  // (m, r) scratch: dH = dY B_eff, needed for dX, d adapter_x and dA
  long long ld_grad_h = 0;
  void* grad_x = nullptr;  // (m, d_in) or null: dY W, plus dH A when adapter_x is null
  long long ld_grad_x = 0;
  void* grad_adapter_x = nullptr;  // (m, d_in) or null: dH A (only with adapter_x)
  long long ld_grad_adapter_x = 0;
  float* grad_lora_a = nullptr;  // (r, d_in) fp32 or null: dH^T x_a
  long long ld_grad_lora_a = 0;
  float* grad_b_eff = nullptr;  // (d_out, r) fp32 or null: dY^T h
  long long ld_grad_b_eff = 0;
  void* workspace = nullptr;  // as in MatmulParams
  size_t workspace_bytes = 0;
};

/// The backward pass: up to six matmuls on `stream`, only those whose outputs are asked for.
Status lora_backward(const LoraBackwardParams& params, cudaStream_t stream);

}  // namespace tiedlora::kernels
