// lora_dispatch.cpp: the one file where tensors meet the adapted layer's cuBLASLt passes
// (kernels/lora_gemm.cu) and the merge kernel (kernels/lora_merge.cu). It checks devices, dtypes, shapes and
// strides, fills the kernels' parameter structs and launches on the current CUDA stream; the cuBLASLt
// workspace comes from PyTorch's caching allocator, so it is stream-ordered and safe under graph capture.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/dispatch.h"
#include "cuda/dispatch_common.h"
#include "lora_gemm.cuh"
#include "lora_merge.cuh"

namespace tiedlora::cuda {
namespace {

// A matrix argument: checked, then handed to the kernels as pointer + leading dimension.
struct Matrix {
  void* data = nullptr;
  long long ld = 0;
};

Matrix matrix(const char* fn, const char* name, const at::Tensor& t, int64_t rows, int64_t cols, at::ScalarType dtype,
              const at::Device& device) {
  TORCH_CHECK(t.defined() && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, fn, ": ", name, " must be (", rows,
              ", ", cols, "), got ", t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.device() == device, fn, ": ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.scalar_type() == dtype, fn, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  const int64_t ld = row_stride_of(t);
  TORCH_CHECK(ld >= 0, fn, ": ", name, " must have unit column stride and a row stride >= its row length, got strides ",
              t.strides(), " (call .contiguous())");
  return {t.data_ptr(), static_cast<long long>(ld)};
}

Matrix optional_matrix(const char* fn, const char* name, const at::Tensor& t, int64_t rows, int64_t cols,
                       at::ScalarType dtype, const at::Device& device) {
  return t.defined() ? matrix(fn, name, t, rows, cols, dtype, device) : Matrix{};
}

void check_floating_dtype(const char* fn, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, fn,
              ": the CUDA kernels take fp32, bf16 or fp16 activations, got ", dtype);
}

at::Tensor workspace_for(const at::Device& device) {
  return at::empty({static_cast<int64_t>(kernels::lt_workspace_bytes())},
                   at::TensorOptions().dtype(at::kByte).device(device));
}

}  // namespace

void lora_forward_out(const at::Tensor& y, const at::Tensor& h, const at::Tensor& x, const at::Tensor& adapter_x,
                      const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& lora_a,
                      const at::Tensor& b_eff) {
  constexpr const char* fn = "cuda::lora_forward_out";
  TORCH_CHECK(x.defined() && x.dim() == 2 && x.is_cuda(), fn, ": x must be a 2-D CUDA tensor");
  TORCH_CHECK(weight.defined() && weight.dim() == 2, fn, ": weight must be 2-D (d_out, d_in)");
  TORCH_CHECK(lora_a.defined() && lora_a.dim() == 2, fn, ": lora_a must be 2-D (r, d_in)");
  const int64_t m = x.size(0), d_in = x.size(1), d_out = weight.size(0), r = lora_a.size(0);
  TORCH_CHECK(d_in > 0 && d_out > 0 && r > 0, fn, ": d_in, d_out and r must be positive");
  const at::ScalarType dtype = x.scalar_type();
  check_floating_dtype(fn, dtype);
  const at::Device device = x.device();

  kernels::LoraForwardParams p;
  p.dtype = kernel_dtype(dtype);
  p.m = m;
  p.d_in = d_in;
  p.d_out = d_out;
  p.rank = r;
  const Matrix mx = matrix(fn, "x", x, m, d_in, dtype, device);
  const Matrix mxa = optional_matrix(fn, "adapter_x", adapter_x, m, d_in, dtype, device);
  const Matrix mw = matrix(fn, "weight", weight, d_out, d_in, dtype, device);
  const Matrix ma = matrix(fn, "lora_a", lora_a, r, d_in, dtype, device);
  const Matrix mb = matrix(fn, "b_eff", b_eff, d_out, r, dtype, device);
  const Matrix my = matrix(fn, "y", y, m, d_out, dtype, device);
  const Matrix mh = matrix(fn, "h", h, m, r, dtype, device);
  if (bias.defined()) {
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == d_out && bias.is_contiguous() && bias.device() == device &&
                    bias.scalar_type() == dtype,
                fn, ": bias must be a contiguous (d_out = ", d_out, ") ", dtype, " tensor on ", device);
    p.bias = bias.data_ptr();
  }
  p.x = mx.data;
  p.ld_x = mx.ld;
  p.adapter_x = mxa.data;
  p.ld_adapter_x = mxa.ld;
  p.weight = mw.data;
  p.ld_weight = mw.ld;
  p.lora_a = ma.data;
  p.ld_lora_a = ma.ld;
  p.b_eff = mb.data;
  p.ld_b_eff = mb.ld;
  p.y = my.data;
  p.ld_y = my.ld;
  p.h = mh.data;
  p.ld_h = mh.ld;

  c10::cuda::CUDAGuard guard(device);
  const at::Tensor workspace = workspace_for(device);
  p.workspace = workspace.data_ptr();
  p.workspace_bytes = kernels::lt_workspace_bytes();
  check_kernel_status(kernels::lora_forward(p, at::cuda::getCurrentCUDAStream()), fn);
}

void lora_backward_out(const at::Tensor& grad_x, const at::Tensor& grad_adapter_x, const at::Tensor& grad_lora_a,
                       const at::Tensor& grad_b_eff, const at::Tensor& grad_y, const at::Tensor& x,
                       const at::Tensor& adapter_x, const at::Tensor& weight, const at::Tensor& lora_a,
                       const at::Tensor& b_eff, const at::Tensor& h) {
  constexpr const char* fn = "cuda::lora_backward_out";
  TORCH_CHECK(grad_y.defined() && grad_y.dim() == 2 && grad_y.is_cuda(), fn, ": grad_y must be a 2-D CUDA tensor");
  TORCH_CHECK(weight.defined() && weight.dim() == 2, fn, ": weight must be 2-D (d_out, d_in)");
  TORCH_CHECK(lora_a.defined() && lora_a.dim() == 2, fn, ": lora_a must be 2-D (r, d_in)");
  TORCH_CHECK(!grad_adapter_x.defined() || adapter_x.defined(), fn, ": grad_adapter_x needs adapter_x");
  const int64_t m = grad_y.size(0), d_out = weight.size(0), d_in = weight.size(1), r = lora_a.size(0);
  TORCH_CHECK(d_in > 0 && d_out > 0 && r > 0, fn, ": d_in, d_out and r must be positive");
  const at::ScalarType dtype = grad_y.scalar_type();
  check_floating_dtype(fn, dtype);
  const at::Device device = grad_y.device();

  kernels::LoraBackwardParams p;
  p.dtype = kernel_dtype(dtype);
  p.m = m;
  p.d_in = d_in;
  p.d_out = d_out;
  p.rank = r;
  const Matrix mdy = matrix(fn, "grad_y", grad_y, m, d_out, dtype, device);
  const Matrix mx = optional_matrix(fn, "x", x, m, d_in, dtype, device);
  const Matrix mxa = optional_matrix(fn, "adapter_x", adapter_x, m, d_in, dtype, device);
  const Matrix mw = matrix(fn, "weight", weight, d_out, d_in, dtype, device);
  const Matrix ma = matrix(fn, "lora_a", lora_a, r, d_in, dtype, device);
  const Matrix mb = matrix(fn, "b_eff", b_eff, d_out, r, dtype, device);
  const Matrix mh = matrix(fn, "h", h, m, r, dtype, device);
  const Matrix mdx = optional_matrix(fn, "grad_x", grad_x, m, d_in, dtype, device);
  const Matrix mdxa = optional_matrix(fn, "grad_adapter_x", grad_adapter_x, m, d_in, dtype, device);
  const Matrix mda = optional_matrix(fn, "grad_lora_a", grad_lora_a, r, d_in, at::kFloat, device);
  const Matrix mdb = optional_matrix(fn, "grad_b_eff", grad_b_eff, d_out, r, at::kFloat, device);
  TORCH_CHECK(!grad_lora_a.defined() || adapter_x.defined() || x.defined(), fn, ": grad_lora_a needs x or adapter_x");
  p.grad_y = mdy.data;
  p.ld_grad_y = mdy.ld;
  p.x = mx.data;
  p.ld_x = mx.ld;
  p.adapter_x = mxa.data;
  p.ld_adapter_x = mxa.ld;
  p.weight = mw.data;
  p.ld_weight = mw.ld;
  p.lora_a = ma.data;
  p.ld_lora_a = ma.ld;
  p.b_eff = mb.data;
  p.ld_b_eff = mb.ld;
  p.h = mh.data;
  p.ld_h = mh.ld;
  p.grad_x = mdx.data;
  p.ld_grad_x = mdx.ld;
  p.grad_adapter_x = mdxa.data;
  p.ld_grad_adapter_x = mdxa.ld;
  p.grad_lora_a = static_cast<float*>(mda.data);
  p.ld_grad_lora_a = mda.ld;
  p.grad_b_eff = static_cast<float*>(mdb.data);
  p.ld_grad_b_eff = mdb.ld;

  c10::cuda::CUDAGuard guard(device);
  at::Tensor grad_h;  // dH = dY B_eff, the scratch shared by dX, d x_a and dA
  if (grad_x.defined() || grad_adapter_x.defined() || grad_lora_a.defined()) {
    grad_h = at::empty({m, r}, grad_y.options());
    p.grad_h = grad_h.data_ptr();
    p.ld_grad_h = r;
  }
  const at::Tensor workspace = workspace_for(device);
  p.workspace = workspace.data_ptr();
  p.workspace_bytes = kernels::lt_workspace_bytes();
  check_kernel_status(kernels::lora_backward(p, at::cuda::getCurrentCUDAStream()), fn);
}

at::Tensor merge_weight_out(const at::Tensor& out, const at::Tensor& weight, const at::Tensor& lora_a,
                            const at::Tensor& b_eff) {
  constexpr const char* fn = "cuda::merge_weight_out";
  TORCH_CHECK(weight.defined() && weight.dim() == 2 && weight.is_cuda(), fn, ": weight must be a 2-D CUDA tensor");
  TORCH_CHECK(lora_a.defined() && lora_a.dim() == 2, fn, ": lora_a must be 2-D (r, d_in)");
  const int64_t d_out = weight.size(0), d_in = weight.size(1), r = lora_a.size(0);
  TORCH_CHECK(r > 0, fn, ": the rank must be positive");
  const at::ScalarType dtype = weight.scalar_type();
  check_floating_dtype(fn, dtype);
  const at::Device device = weight.device();
  const Matrix mw = matrix(fn, "weight", weight, d_out, d_in, dtype, device);
  const Matrix mo = matrix(fn, "out", out, d_out, d_in, dtype, device);
  const Matrix ma = matrix(fn, "lora_a", lora_a, r, d_in, at::kFloat, device);
  const Matrix mb = matrix(fn, "b_eff", b_eff, d_out, r, at::kFloat, device);
  const bool in_place = out.data_ptr() == weight.data_ptr();
  TORCH_CHECK(!in_place || mo.ld == mw.ld, fn, ": an in-place merge needs out and weight to be the same view");
  TORCH_CHECK(in_place || !out.is_alias_of(weight), fn, ": out overlaps weight without being it");

  c10::cuda::CUDAGuard guard(device);
  at::Tensor flag = at::zeros({}, at::TensorOptions().dtype(at::kInt).device(device));
  kernels::LoraMergeParams p;
  p.dtype = kernel_dtype(dtype);
  p.d_out = d_out;
  p.d_in = d_in;
  p.rank = r;
  p.weight = mw.data;
  p.ld_weight = mw.ld;
  p.out = mo.data;
  p.ld_out = mo.ld;
  p.lora_a = static_cast<const float*>(ma.data);
  p.ld_lora_a = ma.ld;
  p.b_eff = static_cast<const float*>(mb.data);
  p.ld_b_eff = mb.ld;
  p.nonfinite_flag = flag.data_ptr<int>();
  check_kernel_status(kernels::launch_lora_merge(p, at::cuda::getCurrentCUDAStream()), fn);
  return flag;
}

}  // namespace tiedlora::cuda
