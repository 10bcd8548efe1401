// lora_dispatch.cpp: the one file where tensors meet the adapted layer's cuBLASLt passes
// (kernels/lora_gemm.cu) and the merge kernel (kernels/lora_merge.cu). It checks devices, dtypes, shapes and
// strides, fills the kernels' parameter structs and launches on the current CUDA stream; the cuBLASLt
// workspace comes from PyTorch's caching allocator, so it is stream-ordered and safe under graph capture.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "core/cuda/dispatch.h"
#include "core/cuda/dispatch_common.h"
#include "lora_gemm.cuh"
#include "lora_merge.cuh"

namespace tiedlora::cuda {

bool available() { return at::cuda::is_available(); }

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

namespace {

// The sizes, dtype and device the forward and backward passes share, checked once: `rows` is x (forward) or
// grad_y (backward), whose dtype and device every other operand must have.
struct Problem {
  int64_t m, d_in, d_out, r;
  at::ScalarType dtype;
  at::Device device;
};

Problem problem_of(const char* fn, const char* rows_name, const at::Tensor& rows, const at::Tensor& weight,
                   const at::Tensor& lora_a) {
  TORCH_CHECK(rows.defined() && rows.dim() == 2 && rows.is_cuda(), fn, ": ", rows_name, " must be a 2-D CUDA tensor");
  TORCH_CHECK(weight.defined() && weight.dim() == 2, fn, ": weight must be 2-D (d_out, d_in)");
  TORCH_CHECK(lora_a.defined() && lora_a.dim() == 2, fn, ": lora_a must be 2-D (r, d_in)");
  const Problem problem{rows.size(0),   weight.size(1),     weight.size(0),
                        lora_a.size(0), rows.scalar_type(), rows.device()};
  TORCH_CHECK(problem.d_in > 0 && problem.d_out > 0 && problem.r > 0, fn, ": d_in, d_out and r must be positive");
  check_floating_dtype(fn, problem.dtype);
  return problem;
}

// The sizes into a pass's parameter struct.
template <typename Params>
void set_sizes(Params& p, const Problem& problem) {
  p.dtype = kernel_dtype(problem.dtype);
  p.m = problem.m;
  p.d_in = problem.d_in;
  p.d_out = problem.d_out;
  p.rank = problem.r;
}

// Runs a cuBLASLt pass on the current stream of the problem's device with its workspace.
template <typename Params>
void run_pass(Params& p, const Problem& problem, const char* fn, kernels::Status (*pass)(const Params&, cudaStream_t)) {
  const at::Tensor workspace = workspace_for(problem.device);
  p.workspace = workspace.data_ptr();
  p.workspace_bytes = kernels::lt_workspace_bytes();
  check_kernel_status(pass(p, at::cuda::getCurrentCUDAStream()), fn);
}

}  // namespace

void lora_forward_out(const at::Tensor& y, const at::Tensor& h, const at::Tensor& x, const at::Tensor& adapter_x,
                      const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& lora_a,
                      const at::Tensor& b_eff) {
  constexpr const char* fn = "cuda::lora_forward_out";
  const Problem problem = problem_of(fn, "x", x, weight, lora_a);
  const auto [m, d_in, d_out, r, dtype, device] = problem;
  kernels::LoraForwardParams p;
  set_sizes(p, problem);
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
  run_pass(p, problem, fn, kernels::lora_forward);
}

void lora_backward_out(const at::Tensor& grad_x, const at::Tensor& grad_adapter_x, const at::Tensor& grad_lora_a,
                       const at::Tensor& grad_b_eff, const at::Tensor& grad_y, const at::Tensor& x,
                       const at::Tensor& adapter_x, const at::Tensor& weight, const at::Tensor& lora_a,
                       const at::Tensor& b_eff, const at::Tensor& h) {
  constexpr const char* fn = "cuda::lora_backward_out";
  const Problem problem = problem_of(fn, "grad_y", grad_y, weight, lora_a);
  const auto [m, d_in, d_out, r, dtype, device] = problem;
  TORCH_CHECK(!grad_adapter_x.defined() || adapter_x.defined(), fn, ": grad_adapter_x needs adapter_x");
  kernels::LoraBackwardParams p;
  set_sizes(p, problem);
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
  run_pass(p, problem, fn, kernels::lora_backward);
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
