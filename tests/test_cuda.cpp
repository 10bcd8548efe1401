// test_cuda.cpp: the CUDA kernels against float64 references on the GPU, with FlashAttention's rule: in each
// precision the kernel's error may be at most twice that of PyTorch's own implementation in that precision
// (eager ATen ops, PEFT style). Fresh random inputs per case, outputs poisoned with NaN before each run, odd
// shapes (M = 1, 17, 4097; r = 1, 8, 24, 64), every gradient. Skipped, visibly, where tiedlora was built
// without CUDA or no device is present; the switch and CPU-path checks at the end run everywhere.
#include <thread>

#include <ATen/autocast_mode.h>
#include <torch/torch.h>
#if TIEDLORA_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "core/cuda/dispatch.h"
#include "test_support.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/functional.h"
#include "tiedlora/core/modules.h"
#include "tiedlora/formats/adapter.h"
#include "tiedlora/formats/merge_checkpoint.h"
#include "tiedlora/formats/safetensors.h"
#include "util/files.h"

namespace {

#define SKIP_WITHOUT_GPU()                                                              \
  do {                                                                                  \
    if (!TIEDLORA_WITH_CUDA) GTEST_SKIP() << "tiedlora was built without CUDA";         \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine"; \
  } while (0)

namespace functional = tiedlora::functional;

// Turns tiedlora's CUDA kernels on (or off) for one scope, on this thread.
struct KernelSwitch {
  explicit KernelSwitch(bool on) : guard(on ? functional::Backend::cuda_kernels : functional::Backend::aten) {}
  functional::BackendGuard guard;
};

const double kNaN = std::numeric_limits<double>::quiet_NaN();

torch::TensorOptions on_gpu(torch::ScalarType dtype) { return torch::TensorOptions(dtype).device(torch::kCUDA); }

torch::Tensor poisoned(at::IntArrayRef sizes, torch::ScalarType dtype) {
  return torch::full(sizes, kNaN, on_gpu(dtype));
}

// Fills PyTorch's caching allocator with NaN blocks of these sizes and frees them, so that the next
// allocations of those sizes (the outputs a function allocates itself) start out poisoned.
void poison_allocator(const std::vector<std::vector<int64_t>>& shapes, torch::ScalarType dtype) {
  std::vector<torch::Tensor> blocks;
  for (const auto& shape : shapes) {
    blocks.push_back(poisoned(shape, dtype));
    blocks.push_back(poisoned(shape, torch::kFloat));
  }
  torch::cuda::synchronize();
}

// max |out - ref| / max |ref| in float64; infinite when out holds NaN (an unwritten or poisoned element).
double relative_error(const torch::Tensor& out, const torch::Tensor& ref) {
  const torch::Tensor o = out.to(torch::kDouble), r = ref.to(torch::kDouble);
  if (!torch::isfinite(o).all().item<bool>()) return std::numeric_limits<double>::infinity();
  const double scale = std::max(r.abs().max().item<double>(), 1e-30);
  return (o - r).abs().max().item<double>() / scale;
}

double unit_roundoff(torch::ScalarType dtype) {
  return dtype == torch::kFloat      ? std::ldexp(1.0, -24)
         : dtype == torch::kBFloat16 ? std::ldexp(1.0, -8)
                                     : std::ldexp(1.0, -11);
}

// Slack added to the rule. bf16/fp16: a thousandth of the unit roundoff, for cases where PyTorch's error
// happens to be zero. fp32: four units of roundoff (of the largest output): there both errors are pure
// accumulation-order noise of two cuBLAS algorithms (split-K or not over M = 4097), which can differ by more
// than 2x without either being wrong.
double rule_slack(torch::ScalarType dtype) {
  return dtype == torch::kFloat ? 4 * unit_roundoff(dtype) : 1e-3 * unit_roundoff(dtype);
}

// FlashAttention's rule (see rule_slack).
::testing::AssertionResult within_twice_torch(const torch::Tensor& ours, const torch::Tensor& torch_same_precision,
                                              const torch::Tensor& reference, torch::ScalarType dtype,
                                              const std::string& what) {
  const double ours_error = relative_error(ours, reference);
  const double torch_error = relative_error(torch_same_precision, reference);
  const double bound = 2 * torch_error + rule_slack(dtype);
  if (ours_error <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": error " << ours_error << " against float64, PyTorch's "
                                       << torch_error << " (bound " << bound << ")";
}

std::string case_name(torch::ScalarType dtype, int64_t m, int64_t r, bool bias, const char* extra = "") {
  return std::string(c10::toString(dtype)) + " M=" + std::to_string(m) + " r=" + std::to_string(r) +
         (bias ? " bias" : " no-bias") + extra;
}

const torch::ScalarType kDtypes[] = {torch::kFloat, torch::kBFloat16, torch::kHalf};
const int64_t kRowCounts[] = {1, 17, 4097};
const int64_t kRanks[] = {1, 8, 24, 64};

// ---- effective_b ---------------------------------------------------------------------------------------

TEST(CudaEffectiveB, MatchesAtenForEveryDtypeAndOptionalScaling) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(0);
  for (auto dtype : kDtypes) {
    for (int64_t r : {1, 8, 24}) {
      auto b = torch::randn({37, r}, on_gpu(dtype));
      auto u = torch::randn({r}, b.options());
      auto v = torch::randn({37}, b.options());
      for (bool use_u : {false, true}) {
        for (bool use_v : {false, true}) {
          const auto uu = use_u ? u : torch::Tensor(), vv = use_v ? v : torch::Tensor();
          const auto expected = functional::effective_b(
              {{}, b.cpu(), use_u ? u.cpu() : torch::Tensor(), use_v ? v.cpu() : torch::Tensor(), 0.5});
          EXPECT_TRUE(tiedlora::testing::all_close(tiedlora::cuda::effective_b(b, uu, vv, 0.5).cpu(), expected, 1e-6,
                                                   1e-6, "effective_b"));
          for (auto out_type : kDtypes) {  // rounded once from the fp32 value
            const auto ours = tiedlora::cuda::effective_b(b, uu, vv, 0.5, out_type);
            EXPECT_EQ(ours.scalar_type(), out_type);
            EXPECT_TRUE(torch::equal(ours.cpu(), expected.to(out_type))) << "effective_b to " << out_type;
          }
        }
      }
    }
  }
}

// ---- the cuBLASLt passes, called directly with poisoned outputs ------------------------------------------

struct LayerInputs {
  torch::Tensor x, w, bias, a, b_eff;  // in the tested dtype; x possibly a row-strided view
};

// x (m, d_in) is a column slice of a wider buffer when `row_stride_pad` > 0, starting `column_offset`
// elements in (an offset that is not a multiple of 8 leaves the rows under 16-byte alignment).
LayerInputs layer_inputs(torch::ScalarType dtype, int64_t m, int64_t d_in, int64_t d_out, int64_t r, bool bias,
                         int64_t row_stride_pad = 0, int64_t column_offset = 0) {
  LayerInputs in;
  const auto opts = on_gpu(dtype);
  in.x = row_stride_pad > 0 ? torch::randn({m, d_in + row_stride_pad}, opts).narrow(1, column_offset, d_in)
                            : torch::randn({m, d_in}, opts);
  in.w = torch::randn({d_out, d_in}, opts) / std::sqrt(static_cast<double>(d_in));
  if (bias) in.bias = torch::randn({d_out}, opts);
  in.a = torch::randn({r, d_in}, opts) / std::sqrt(static_cast<double>(d_in));
  in.b_eff = torch::randn({d_out, r}, opts) / std::sqrt(static_cast<double>(r));
  return in;
}

torch::Tensor f64(const torch::Tensor& t) { return t.defined() ? t.to(torch::kDouble) : t; }

void check_forward_and_backward(torch::ScalarType dtype, int64_t m, int64_t d_in, int64_t d_out, int64_t r, bool bias,
                                int64_t row_stride_pad, int64_t column_offset, const std::string& name) {
  SCOPED_TRACE(name);
  const LayerInputs in = layer_inputs(dtype, m, d_in, d_out, r, bias, row_stride_pad, column_offset);
  if (row_stride_pad > 0) ASSERT_EQ(in.x.stride(0), d_in + row_stride_pad);

  // Forward into poisoned outputs.
  torch::Tensor y = poisoned({m, d_out}, dtype), h = poisoned({m, r}, dtype);
  tiedlora::cuda::lora_forward_out(y, h, in.x, {}, in.w, in.bias, in.a, in.b_eff);
  const torch::Tensor h64 = f64(in.x).mm(f64(in.a).t());
  torch::Tensor y64 = f64(in.x).mm(f64(in.w).t()) + h64.mm(f64(in.b_eff).t());
  if (bias) y64 = y64 + f64(in.bias);
  const torch::Tensor h_pt = in.x.mm(in.a.t());
  const torch::Tensor y_pt = (bias ? torch::addmm(in.bias, in.x, in.w.t()) : in.x.mm(in.w.t())) + h_pt.mm(in.b_eff.t());
  EXPECT_TRUE(within_twice_torch(h, h_pt, h64, dtype, "h = x A^T"));
  EXPECT_TRUE(within_twice_torch(y, y_pt, y64, dtype, "y"));

  // Backward into poisoned outputs.
  const torch::Tensor dy = torch::randn({m, d_out}, on_gpu(dtype));
  torch::Tensor dx = poisoned({m, d_in}, dtype), da = poisoned({r, d_in}, torch::kFloat),
                db_eff = poisoned({d_out, r}, torch::kFloat);
  tiedlora::cuda::lora_backward_out(dx, {}, da, db_eff, dy, in.x, {}, in.w, in.a, in.b_eff, h);
  const torch::Tensor dh64 = f64(dy).mm(f64(in.b_eff));
  const torch::Tensor dx64 = f64(dy).mm(f64(in.w)) + dh64.mm(f64(in.a));
  const torch::Tensor da64 = dh64.t().mm(f64(in.x));
  const torch::Tensor db_eff64 = f64(dy).t().mm(h64);
  const torch::Tensor dh_pt = dy.mm(in.b_eff);
  EXPECT_TRUE(within_twice_torch(dx, dy.mm(in.w) + dh_pt.mm(in.a), dx64, dtype, "dX"));
  EXPECT_TRUE(within_twice_torch(da, dh_pt.t().mm(in.x), da64, dtype, "dA"));
  EXPECT_TRUE(within_twice_torch(db_eff, dy.t().mm(h_pt), db_eff64, dtype, "dB_eff"));
}

TEST(CudaLoraGemm, ForwardAndBackwardWithinTwiceTorchErrorOnOddShapes) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(2);
  for (auto dtype : kDtypes) {
    for (int64_t m : kRowCounts) {
      for (int64_t r : kRanks) {
        for (bool bias : {false, true}) {
          check_forward_and_backward(dtype, m, 136, 72, r, bias, 0, 0, case_name(dtype, m, r, bias));
        }
      }
    }
  }
}

TEST(CudaLoraGemm, OddFeatureSizesAndRowStridedInputs) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(3);
  for (auto dtype : kDtypes) {
    for (int64_t m : {1, 17, 4097}) {
      check_forward_and_backward(dtype, m, 77, 45, 24, true, 0, 0, case_name(dtype, m, 24, true, " d_in=77 d_out=45"));
      check_forward_and_backward(dtype, m, 136, 72, 8, true, 24, 8, case_name(dtype, m, 8, true, " row stride 160"));
      check_forward_and_backward(dtype, m, 136, 72, 8, false, 13, 3,
                                 case_name(dtype, m, 8, false, " row stride 149, unaligned rows"));
    }
  }
}

TEST(CudaLoraGemm, AdapterInputGetsItsOwnGradient) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(4);
  for (auto dtype : kDtypes) {
    const int64_t m = 17, d_in = 136, d_out = 72, r = 8;
    const LayerInputs in = layer_inputs(dtype, m, d_in, d_out, r, true);
    const torch::Tensor xa = torch::randn({m, d_in}, on_gpu(dtype));
    torch::Tensor y = poisoned({m, d_out}, dtype), h = poisoned({m, r}, dtype);
    tiedlora::cuda::lora_forward_out(y, h, in.x, xa, in.w, in.bias, in.a, in.b_eff);
    const torch::Tensor h64 = f64(xa).mm(f64(in.a).t());
    const torch::Tensor y64 = f64(in.x).mm(f64(in.w).t()) + f64(in.bias) + h64.mm(f64(in.b_eff).t());
    const torch::Tensor h_pt = xa.mm(in.a.t());
    EXPECT_TRUE(within_twice_torch(y, torch::addmm(in.bias, in.x, in.w.t()) + h_pt.mm(in.b_eff.t()), y64, dtype, "y"));

    const torch::Tensor dy = torch::randn({m, d_out}, on_gpu(dtype));
    torch::Tensor dx = poisoned({m, d_in}, dtype), dxa = poisoned({m, d_in}, dtype),
                  da = poisoned({r, d_in}, torch::kFloat);
    tiedlora::cuda::lora_backward_out(dx, dxa, da, {}, dy, in.x, xa, in.w, in.a, in.b_eff, h);
    const torch::Tensor dh64 = f64(dy).mm(f64(in.b_eff)), dh_pt = dy.mm(in.b_eff);
    EXPECT_TRUE(within_twice_torch(dx, dy.mm(in.w), f64(dy).mm(f64(in.w)), dtype, "dX (frozen branch only)"));
    EXPECT_TRUE(within_twice_torch(dxa, dh_pt.mm(in.a), dh64.mm(f64(in.a)), dtype, "d adapter_x"));
    EXPECT_TRUE(within_twice_torch(da, dh_pt.t().mm(xa), dh64.t().mm(f64(xa)), dtype, "dA from adapter_x"));
  }
}

TEST(CudaLoraGemm, RejectsBadArgumentsNamingThem) {
  SKIP_WITHOUT_GPU();
  const LayerInputs in = layer_inputs(torch::kBFloat16, 4, 16, 8, 2, false);
  torch::Tensor y = poisoned({4, 8}, torch::kBFloat16), h = poisoned({4, 2}, torch::kBFloat16);
  auto message_of = [](auto&& call) {
    try {
      call();
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(message_of([&] {
              tiedlora::cuda::lora_forward_out(y, h, in.x, {}, in.w, {}, in.a.narrow(1, 0, 8), in.b_eff);
            }).find("lora_a must be (2, 16)"),
            std::string::npos);
  EXPECT_NE(message_of([&] {
              tiedlora::cuda::lora_forward_out(y, h, in.x, {}, in.w.to(torch::kFloat), {}, in.a, in.b_eff);
            }).find("weight must be"),
            std::string::npos);
  const torch::Tensor column_major = torch::randn({16, 4}, on_gpu(torch::kBFloat16)).t();
  EXPECT_NE(message_of([&] {
              tiedlora::cuda::lora_forward_out(y, h, column_major, {}, in.w, {}, in.a, in.b_eff);
            }).find("unit column stride"),
            std::string::npos);
}

// ---- lora_linear through the kernels: every gradient -----------------------------------------------------

struct AutogradCase {
  torch::Tensor y, dx, da, db, du, dv;
};

// PyTorch's own layer (eager ATen ops, PEFT style) in the inputs' dtype; float64 when they are float64.
AutogradCase eager_layer(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& bias,
                         const torch::Tensor& a, const torch::Tensor& b, const torch::Tensor& u, const torch::Tensor& v,
                         double scale, const torch::Tensor& dy) {
  torch::Tensor h = x.matmul(a.t());
  if (u.defined()) h = h * u;
  torch::Tensor low = h.matmul(b.t());
  if (v.defined()) low = low * v;
  const torch::Tensor y = torch::nn::functional::linear(x, w, bias) + low * scale;
  y.backward(dy);
  return {y.detach(), x.grad(), a.grad(), b.grad(), u.defined() ? u.grad() : u, v.defined() ? v.grad() : v};
}

torch::Tensor leaf(const torch::Tensor& t, torch::ScalarType dtype) {
  return t.defined() ? t.detach().to(dtype).requires_grad_(true) : t;
}
torch::Tensor frozen(const torch::Tensor& t, torch::ScalarType dtype) { return t.defined() ? t.detach().to(dtype) : t; }

TEST(CudaLoraLinearKernels, EveryGradientWithinTwiceTorchError) {
  SKIP_WITHOUT_GPU();
  KernelSwitch kernels_on(true);
  torch::manual_seed(5);
  const int64_t d_in = 136, d_out = 72;
  const double scale = 0.75;
  for (auto dtype : kDtypes) {
    for (int64_t m : kRowCounts) {
      for (int64_t r : kRanks) {
        for (bool bias : {false, true}) {
          const bool tied = !bias;  // Tied-LoRA (u, v) without bias, plain LoRA with bias: both paths covered
          const std::string name = case_name(dtype, m, r, bias, tied ? " tied" : " lora");
          SCOPED_TRACE(name);
          // Fresh float64 master values, rounded to the tested dtype for both implementations.
          const auto f64_opts = on_gpu(torch::kDouble);
          const torch::Tensor x0 = torch::randn({m, d_in}, f64_opts).to(dtype).to(torch::kDouble);
          const torch::Tensor w0 =
              (torch::randn({d_out, d_in}, f64_opts) / std::sqrt(double(d_in))).to(dtype).to(torch::kDouble);
          const torch::Tensor bias0 =
              bias ? torch::randn({d_out}, f64_opts).to(dtype).to(torch::kDouble) : torch::Tensor();
          const torch::Tensor a0 =
              (torch::randn({r, d_in}, f64_opts) / std::sqrt(double(d_in))).to(dtype).to(torch::kDouble);
          const torch::Tensor b0 =
              (torch::randn({d_out, r}, f64_opts) / std::sqrt(double(r))).to(dtype).to(torch::kDouble);
          const torch::Tensor u0 =
              tied ? (1 + 0.5 * torch::randn({r}, f64_opts)).to(dtype).to(torch::kDouble) : torch::Tensor();
          const torch::Tensor v0 =
              tied ? (1 + 0.5 * torch::randn({d_out}, f64_opts)).to(dtype).to(torch::kDouble) : torch::Tensor();
          const torch::Tensor dy0 = torch::randn({m, d_out}, f64_opts).to(dtype).to(torch::kDouble);

          const AutogradCase ref =
              eager_layer(leaf(x0, torch::kDouble), w0, bias0, leaf(a0, torch::kDouble), leaf(b0, torch::kDouble),
                          leaf(u0, torch::kDouble), leaf(v0, torch::kDouble), scale, dy0);
          const AutogradCase pt = eager_layer(leaf(x0, dtype), frozen(w0, dtype), frozen(bias0, dtype), leaf(a0, dtype),
                                              leaf(b0, dtype), leaf(u0, dtype), leaf(v0, dtype), scale, dy0.to(dtype));

          const torch::Tensor x = leaf(x0, dtype), a = leaf(a0, dtype), b = leaf(b0, dtype), u = leaf(u0, dtype),
                              v = leaf(v0, dtype);
          poison_allocator({{m, d_out}, {m, r}, {m, d_in}, {r, d_in}, {d_out, r}}, dtype);
          const torch::Tensor y =
              functional::lora_linear(x, frozen(w0, dtype), frozen(bias0, dtype), {a, b, u, v, scale});
          poison_allocator({{m, d_out}, {m, r}, {m, d_in}, {r, d_in}, {d_out, r}}, dtype);
          y.backward(dy0.to(dtype));

          EXPECT_TRUE(within_twice_torch(y, pt.y, ref.y, dtype, "y"));
          EXPECT_TRUE(within_twice_torch(x.grad(), pt.dx, ref.dx, dtype, "dX"));
          EXPECT_TRUE(within_twice_torch(a.grad(), pt.da, ref.da, dtype, "dA"));
          EXPECT_TRUE(within_twice_torch(b.grad(), pt.db, ref.db, dtype, "dB"));
          if (tied) {
            EXPECT_TRUE(within_twice_torch(u.grad(), pt.du, ref.du, dtype, "du"));
            EXPECT_TRUE(within_twice_torch(v.grad(), pt.dv, ref.dv, dtype, "dv"));
          }
        }
      }
    }
  }
}

TEST(CudaLoraLinearKernels, ThreeDimensionalAndRowStridedInputsAndDropoutInput) {
  SKIP_WITHOUT_GPU();
  KernelSwitch kernels_on(true);
  torch::manual_seed(6);
  for (auto dtype : kDtypes) {
    const auto opts = on_gpu(dtype);
    const torch::Tensor w = torch::randn({48, 64}, opts) / 8, a = torch::randn({8, 64}, opts) / 8;
    const torch::Tensor b = torch::randn({48, 8}, opts), u = torch::randn({8}, opts), v = torch::randn({48}, opts);
    // (2, 9, 64) and a row-strided (17, 64) view: the kernels path against the ATen path in float64.
    for (const torch::Tensor& x : {torch::randn({2, 9, 64}, opts), torch::randn({17, 80}, opts).narrow(1, 8, 64)}) {
      const torch::Tensor xa = torch::randn(x.sizes(), opts);
      const torch::Tensor ours = functional::lora_linear(x, w, {}, {a, b, u, v, 0.5}, xa);
      const torch::Tensor ref =
          functional::lora_linear(f64(x), f64(w), {}, {f64(a), f64(b), f64(u), f64(v), 0.5}, f64(xa));
      EXPECT_EQ(ours.sizes(), ref.sizes());
      const double tolerance = dtype == torch::kFloat ? 1e-5 : 8 * unit_roundoff(dtype);
      EXPECT_LT(relative_error(ours, ref), tolerance) << c10::toString(dtype) << " input " << x.sizes();
    }
  }
}

TEST(CudaLoraLinearKernels, EmptyBatchGivesZeroFactorGradients) {
  SKIP_WITHOUT_GPU();
  KernelSwitch kernels_on(true);
  const auto opts = on_gpu(torch::kBFloat16);
  const torch::Tensor x = torch::randn({0, 64}, opts).requires_grad_(true), w = torch::randn({48, 64}, opts);
  const torch::Tensor a = torch::randn({8, 64}, opts).requires_grad_(true),
                      b = torch::randn({48, 8}, opts).requires_grad_(true);
  const torch::Tensor y = functional::lora_linear(x, w, {}, {a, b, {}, {}, 0.5});
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{0, 48}));
  y.sum().backward();
  EXPECT_EQ(a.grad().count_nonzero().item<int64_t>(), 0);
  EXPECT_EQ(b.grad().count_nonzero().item<int64_t>(), 0);
}

// ---- merge ------------------------------------------------------------------------------------------------

TEST(CudaMerge, InPlaceAndOutOfPlaceWithinTwiceTorchError) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(7);
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{45, 77}, {64, 128}, {100, 300}, {1024, 4096}};
  for (auto dtype : kDtypes) {
    for (const auto& [d_out, d_in] : shapes) {
      for (int64_t r : kRanks) {
        for (bool in_place : {false, true}) {
          SCOPED_TRACE(std::string(c10::toString(dtype)) + " " + std::to_string(d_out) + "x" + std::to_string(d_in) +
                       " r=" + std::to_string(r) + (in_place ? " in place" : " out of place"));
          const torch::Tensor w = torch::randn({d_out, d_in}, on_gpu(dtype));
          const torch::Tensor a = torch::randn({r, d_in}, on_gpu(torch::kFloat)) / std::sqrt(double(d_in));
          const torch::Tensor b_eff = torch::randn({d_out, r}, on_gpu(torch::kFloat)) * 0.1;
          const torch::Tensor ref = torch::addmm(f64(w), f64(b_eff), f64(a));
          const torch::Tensor pt = torch::addmm(w.to(torch::kFloat), b_eff, a).to(dtype);  // fp32, rounded once
          torch::Tensor out = in_place ? w.clone() : poisoned({d_out, d_in}, dtype);
          const torch::Tensor flag = tiedlora::cuda::merge_weight_out(out, in_place ? out : w, a, b_eff);
          EXPECT_EQ(flag.item<int>(), 0);
          EXPECT_TRUE(within_twice_torch(out, pt, ref, dtype, "merged W"));
        }
      }
    }
  }
}

TEST(CudaMerge, RowStridedWeightAndNonFiniteFlag) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(8);
  for (auto dtype : kDtypes) {
    const torch::Tensor wide = torch::randn({33, 200}, on_gpu(dtype));
    const torch::Tensor w = wide.narrow(1, 8, 150);  // row stride 200
    const torch::Tensor a = torch::randn({24, 150}, on_gpu(torch::kFloat)),
                        b_eff = torch::randn({33, 24}, on_gpu(torch::kFloat));
    torch::Tensor out = poisoned({33, 150}, dtype);
    EXPECT_EQ(tiedlora::cuda::merge_weight_out(out, w, a, b_eff).item<int>(), 0);
    EXPECT_TRUE(within_twice_torch(out, torch::addmm(w.to(torch::kFloat), b_eff, a).to(dtype),
                                   torch::addmm(f64(w), f64(b_eff), f64(a)), dtype, "merged row-strided W"));
    // In place on the view: the columns outside it stay as they were.
    const torch::Tensor outside = wide.narrow(1, 0, 8).clone();
    EXPECT_EQ(tiedlora::cuda::merge_weight_out(w, w, a, b_eff).item<int>(), 0);
    EXPECT_TRUE(torch::equal(wide.narrow(1, 0, 8), outside));

    torch::Tensor bad_a = a.clone();
    bad_a[3][77] = std::numeric_limits<float>::infinity();
    EXPECT_EQ(tiedlora::cuda::merge_weight_out(out, w, bad_a, b_eff).item<int>(), 1) << c10::toString(dtype);
  }
  // fp16 overflow in the rounding: finite in fp32, Inf once stored.
  const torch::Tensor w16 = torch::full({4, 8}, 65000.0, on_gpu(torch::kHalf));
  const torch::Tensor a = torch::ones({1, 8}, on_gpu(torch::kFloat)),
                      b_eff = torch::full({4, 1}, 1000.0, on_gpu(torch::kFloat));
  torch::Tensor out16 = poisoned({4, 8}, torch::kHalf);
  EXPECT_EQ(tiedlora::cuda::merge_weight_out(out16, w16, a, b_eff).item<int>(), 1);
}

TEST(CudaMerge, MergedWeightTakesTheKernelAndRefusesNonFinite) {
  SKIP_WITHOUT_GPU();
  KernelSwitch kernels_on(true);
  torch::manual_seed(9);
  const torch::Tensor w = torch::randn({40, 24}, on_gpu(torch::kBFloat16));
  const torch::Tensor a = torch::randn({4, 24}, on_gpu(torch::kFloat)),
                      b = torch::randn({40, 4}, on_gpu(torch::kFloat));
  const torch::Tensor u = torch::randn({4}, on_gpu(torch::kFloat)), v = torch::randn({40}, on_gpu(torch::kFloat));
  const torch::Tensor ours = functional::merged_weight(w, {a, b, u, v, 0.5});
  const torch::Tensor cpu = functional::merged_weight(w.cpu(), {a.cpu(), b.cpu(), u.cpu(), v.cpu(), 0.5});
  EXPECT_TRUE(tiedlora::testing::all_close(ours.cpu(), cpu, 1e-2, 1e-2, "merged_weight on the GPU"));
  torch::Tensor bad_b = b.clone();
  bad_b[0][0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(functional::merged_weight(w, {a, bad_b, u, v, 0.5}), tiedlora::Error);
}

// ---- the default path and the switch ----------------------------------------------------------------------

TEST(CudaLoraLinear, AtenPathOnTheGpuMatchesTheCpu) {
  SKIP_WITHOUT_GPU();
  KernelSwitch kernels_off(false);
  torch::manual_seed(1);
  auto x = torch::randn({33, 64});
  auto w = torch::randn({48, 64});
  auto a = torch::randn({8, 64}), b = torch::randn({48, 8}), u = torch::randn({8}), v = torch::randn({48});
  const auto cpu = functional::lora_linear(x, w, {}, {a, b, u, v, 0.5});
  const auto gpu = functional::lora_linear(x.cuda(), w.cuda(), {}, {a.cuda(), b.cuda(), u.cuda(), v.cuda(), 0.5});
  EXPECT_TRUE(tiedlora::testing::all_close(gpu.cpu(), cpu, 1e-4, 1e-4, "lora_linear on the GPU"));
}

// Mixed-adapter batches (docs/adapters.md) on the GPU: lora_linear's routed calls (gathered rows, a slice)
// give the CPU's output and gradients, with the kernel switch on or off (routed rows are ATen ops either
// way), in fp32 and bf16, rows of two adapters and rows of none.
TEST(CudaLoraLinear, RoutedRowsOnTheGpuMatchTheCpu) {
  SKIP_WITHOUT_GPU();
  for (const bool kernels : {false, true}) {
    KernelSwitch kernel_switch(kernels);
    for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
      torch::manual_seed(2);
      auto x = torch::randn({6, 5, 64}).to(dtype);
      auto w = torch::randn({48, 64}).to(dtype), bias = torch::randn({48}).to(dtype);
      auto a1 = torch::randn({8, 64}, torch::requires_grad()), b1 = torch::randn({48, 8}, torch::requires_grad());
      auto a2 = torch::randn({4, 64}, torch::requires_grad()), b2 = torch::randn({48, 4}, torch::requires_grad());
      auto v2 = torch::randn({48}, torch::requires_grad());
      const auto rows1 = torch::tensor({0, 3, 4}, torch::kLong),
                 rows2 = torch::tensor({1}, torch::kLong);  // 2, 5: none
      auto run = [&](torch::Device device) {
        auto xd = x.to(device).detach().requires_grad_(true);
        std::vector<torch::Tensor> leaves;
        for (const auto& t : {a1, b1, a2, b2, v2}) leaves.push_back(t.detach().to(device).requires_grad_(true));
        const std::vector<functional::AdapterCall> calls{
            {{leaves[0], leaves[1], {}, {}, 0.5}, functional::AdapterRows::indices(rows1.to(device)), {}},
            {{leaves[2], leaves[3], {}, leaves[4], 2.0}, functional::AdapterRows::range(1, 2), {}}};
        const auto y = functional::lora_linear(xd, w.to(device), bias.to(device), calls);
        y.to(torch::kFloat).square().sum().backward();
        std::vector<torch::Tensor> out{y.to(torch::kFloat).cpu(), xd.grad().to(torch::kFloat).cpu()};
        for (const auto& t : leaves) out.push_back(t.grad().cpu());
        return out;
      };
      const auto cpu = run(torch::kCPU), gpu = run(torch::kCUDA);
      const double tol = dtype == torch::kFloat ? 1e-4 : 2e-2;
      const char* names[] = {"y", "dx", "dA1", "dB1", "dA2", "dB2", "dv2"};
      for (size_t i = 0; i < cpu.size(); ++i) {
        EXPECT_TRUE(tiedlora::testing::all_close(gpu[i], cpu[i], tol, tol * cpu[i].abs().max().item<double>(),
                                                 std::string(names[i]) + (kernels ? " (kernels on)" : "")));
      }
    }
  }
}

// Without gradients, two plain-LoRA calls on adjacent halves of the rows run as one batched GEMM pair (bmm),
// with their factors stacked by lora_linear or given: the GPU gives the CPU's output, fp32 and bf16.
TEST(CudaLoraLinear, BatchedRoutedRowsWithoutGradientsOnTheGpuMatchTheCpu) {
  SKIP_WITHOUT_GPU();
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    torch::manual_seed(3);
    const auto x = torch::randn({6, 5, 64}).to(dtype);
    const auto w = torch::randn({48, 64}).to(dtype), bias = torch::randn({48}).to(dtype);
    const std::vector<torch::Tensor> factors{torch::randn({8, 64}), torch::randn({48, 8}), torch::randn({8, 64}),
                                             torch::randn({48, 8})};
    auto run = [&](torch::Device device, bool stacked_given) {
      torch::NoGradGuard no_grad;
      std::vector<torch::Tensor> f;
      for (const auto& t : factors) f.push_back(t.to(device));
      const std::vector<functional::AdapterCall> calls{
          {{f[0], f[1], {}, {}, 0.5}, functional::AdapterRows::range(0, 3), {}},
          {{f[2], f[3], {}, {}, 0.5}, functional::AdapterRows::range(3, 6), {}}};
      const functional::StackedFactors stacked = functional::StackedFactors::of(calls, torch::kFloat);
      EXPECT_TRUE(stacked.defined());
      return functional::lora_linear(x.to(device), w.to(device), bias.to(device), calls,
                                     stacked_given ? &stacked : nullptr)
          .to(torch::kFloat)
          .cpu();
    };
    const auto cpu = run(torch::kCPU, false);
    const double tol = dtype == torch::kFloat ? 1e-4 : 2e-2;
    for (const bool stacked_given : {false, true}) {
      EXPECT_TRUE(tiedlora::testing::all_close(run(torch::kCUDA, stacked_given), cpu, tol,
                                               tol * cpu.abs().max().item<double>(),
                                               stacked_given ? "y, stacked given" : "y"));
    }
  }
}

TEST(CudaKernelSwitch, TheChoiceIsPerThreadAndScoped) {
  EXPECT_EQ(functional::current_backend(), functional::Backend::aten);
  {
    functional::BackendGuard kernels(functional::Backend::cuda_kernels);
    EXPECT_EQ(functional::current_backend(), functional::Backend::cuda_kernels);
    functional::Backend seen_elsewhere = functional::Backend::cuda_kernels;
    std::thread other([&] { seen_elsewhere = functional::current_backend(); });
    other.join();
    EXPECT_EQ(seen_elsewhere, functional::Backend::aten) << "another thread saw this thread's choice";
    {
      functional::BackendGuard aten(functional::Backend::aten);
      EXPECT_EQ(functional::current_backend(), functional::Backend::aten);
    }
    EXPECT_EQ(functional::current_backend(), functional::Backend::cuda_kernels);
  }
  EXPECT_EQ(functional::current_backend(), functional::Backend::aten);
}

TEST(CudaKernelSwitch, DoubleAndMixedDtypesKeepTheAtenPathBitForBit) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(10);
  for (const auto& [x_type, w_type] :
       {std::pair{torch::kDouble, torch::kDouble}, std::pair{torch::kFloat, torch::kBFloat16}}) {
    auto x = torch::randn({5, 16}, torch::kCUDA).to(x_type).requires_grad_(true);
    auto w = torch::randn({12, 16}, torch::kCUDA).to(w_type);
    auto a = torch::randn({4, 16}, torch::kCUDA).requires_grad_(true),
         b = torch::randn({12, 4}, torch::kCUDA).requires_grad_(true);
    const auto dy = torch::randn({5, 12}, torch::kCUDA).to(x_type);
    auto run = [&](bool on) {
      KernelSwitch kernels(on);
      for (auto* t : {&x, &a, &b}) t->mutable_grad() = torch::Tensor();
      const auto y = functional::lora_linear(x, w, {}, {a, b, {}, {}, 0.5});
      y.backward(dy);
      return std::vector<torch::Tensor>{y.detach(), x.grad(), a.grad(), b.grad()};
    };
    const auto off = run(false), on = run(true);
    for (size_t i = 0; i < off.size(); ++i) EXPECT_TRUE(torch::equal(off[i], on[i])) << "output " << i;
  }
}

TEST(CudaDispatch, ReportsWhetherKernelsAreAvailable) {
  if (!TIEDLORA_WITH_CUDA) {
    EXPECT_FALSE(tiedlora::cuda::available());
    EXPECT_THROW(tiedlora::cuda::effective_b(torch::randn({2, 2}), {}, {}, 1.0), std::exception);
    EXPECT_THROW(tiedlora::cuda::merge_weight_out(torch::randn({2, 2}), torch::randn({2, 2}), torch::randn({1, 2}),
                                                  torch::randn({2, 1})),
                 std::exception);
  } else {
    EXPECT_EQ(tiedlora::cuda::available(), torch::cuda::is_available());
    // CPU tensors are refused by name, not launched.
    EXPECT_THROW(tiedlora::cuda::merge_weight_out(torch::randn({2, 2}), torch::randn({2, 2}), torch::randn({1, 2}),
                                                  torch::randn({2, 1})),
                 c10::Error);
  }
}

// ---- precision contract on the GPU -----------------------------------------------------------------------

// CUDA autocast for one scope.
struct CudaAutocastScope : tiedlora::testing::ScopedAutocast {
  explicit CudaAutocastScope(torch::ScalarType dtype) : ScopedAutocast(at::kCUDA, dtype) {}
};

TEST(CudaAutocast, LoraLinearReturnsWhatTorchLinearReturnsOnBothBackends) {
  SKIP_WITHOUT_GPU();
  for (const bool kernels : {false, true}) {
    for (const auto dtype : {torch::kBFloat16, torch::kHalf}) {
      torch::manual_seed(31);
      torch::nn::Linear plain(torch::nn::LinearOptions(96, 80));
      plain->to(torch::kCUDA);
      tiedlora::LoraLinear layer(torch::nn::Linear(torch::nn::LinearOptions(96, 80)), tiedlora::LoraOptions(8));
      layer->to(torch::kCUDA);
      {
        torch::NoGradGuard no_grad;
        layer->weight.copy_(plain->weight);
        layer->bias.copy_(plain->bias);
      }
      const auto x = torch::randn({7, 96}, torch::kCUDA).requires_grad_(true);
      KernelSwitch choice(kernels);
      CudaAutocastScope autocast(dtype);
      const auto expected = plain(x);
      const auto y = layer(x);  // a fresh adapter: dW = 0
      ASSERT_EQ(y.scalar_type(), dtype);
      if (kernels) {  // cuBLASLt's GEMM may round differently from the cuBLAS call behind torch::nn::Linear
        EXPECT_TRUE(tiedlora::testing::all_close(y.to(torch::kFloat), expected.to(torch::kFloat), 1e-2, 1e-2,
                                                 "kernels under autocast"));
      } else {
        EXPECT_TRUE(torch::equal(y, expected)) << dtype << ": the ATen path differs from torch::nn::Linear";
      }
      y.to(torch::kFloat).sum().backward();
      EXPECT_EQ(x.grad().scalar_type(), torch::kFloat);
      EXPECT_TRUE(torch::isfinite(x.grad()).all().item<bool>());
      EXPECT_TRUE(layer->lora_A().grad().defined() && layer->lora_A().grad().scalar_type() == torch::kFloat);
    }
  }
}

TEST(CudaMerge, MergeWeightsOnTheGpuEqualsTheCpuMerge) {
  SKIP_WITHOUT_GPU();
  // A bf16 and an fp32 checkpoint (one Conv1D-style transposed adapter too), merged on both devices: the GPU
  // takes the merge kernel (same dtype in and out), the CPU merge is the reference, within one rounding.
  const std::string dir = "cuda_merge_check";
  tiedlora::util::remove_tree(dir);
  tiedlora::util::make_directories(dir);
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (const bool transposed : {false, true}) {
      torch::manual_seed(33);
      const std::string tag = std::string(transposed ? "t_" : "") + (dtype == torch::kFloat ? "f32" : "bf16");
      const std::string base = dir + "/base_" + tag, adapter = dir + "/adapter_" + tag;
      tiedlora::util::make_directories(base);
      const auto w = (transposed ? torch::randn({96, 80}) : torch::randn({80, 96})).to(dtype);
      const std::vector<std::pair<std::string, torch::Tensor>> weights = {{"model.layers.0.proj.weight", w}};
      tiedlora::formats::save_safetensors(base + "/model.safetensors", weights, {{"format", "pt"}});
      tiedlora::AdapterConfig config;
      config.rank = 8;
      config.alpha = 16;
      config.fan_in_fan_out = transposed;
      config.target_modules = {"proj"};
      tiedlora::write_adapter_folder(adapter, config,
                                     {{"base_model.model.model.layers.0.proj.lora_A.weight", torch::randn({8, 96})},
                                      {"base_model.model.model.layers.0.proj.lora_B.weight", torch::randn({80, 8})}});
      torch::Tensor merged[2];
      for (const bool gpu : {false, true}) {
        tiedlora::MergeOptions options;
        options.base = base;
        options.adapter = adapter;
        options.out = dir + "/merged_" + tag + (gpu ? "_gpu" : "_cpu");
        options.device = gpu ? "cuda" : "cpu";
        tiedlora::merge_checkpoint(options);
        merged[gpu] =
            tiedlora::formats::load_safetensors(options.out + "/model.safetensors").at("model.layers.0.proj.weight");
      }
      ASSERT_EQ(merged[1].scalar_type(), dtype);
      const double ulp = dtype == torch::kFloat ? std::ldexp(1.0, -23) : std::ldexp(1.0, -7);
      const double scale = merged[0].to(torch::kFloat).abs().max().item<double>();
      EXPECT_TRUE(tiedlora::testing::all_close(merged[1].to(torch::kFloat), merged[0].to(torch::kFloat), 2 * ulp,
                                               2 * ulp * scale, "merge-weights --device cuda vs cpu, " + tag));
    }
  }
  tiedlora::util::remove_tree(dir);
}

#if TIEDLORA_WITH_CUDA
TEST(CudaPrecision, ABf16WeightIsNeverCopiedIntoFp32) {
  SKIP_WITHOUT_GPU();
  for (const bool kernels : {false, true}) {
    torch::manual_seed(32);
    const int64_t d = 8192;  // W: 128 MiB in bf16; an fp32 copy would be 256 MiB
    tiedlora::LoraLinear layer(torch::nn::Linear(torch::nn::LinearOptions(d, d)), tiedlora::LoraOptions(16));
    layer->to(torch::kCUDA, torch::kBFloat16);
    {
      torch::NoGradGuard no_grad;
      layer->lora_A().set_data(layer->lora_A().to(torch::kFloat));
      layer->lora_B().set_data(torch::randn({d, 16}, torch::kCUDA) * 0.1);
    }
    const auto x = torch::randn({8, d}, torch::kCUDA).to(torch::kBFloat16).requires_grad_(true);
    KernelSwitch choice(kernels);
    layer(x).sum().backward();  // warm-up: cuBLAS handles and workspaces
    torch::cuda::synchronize();
    c10::cuda::CUDACachingAllocator::resetPeakStats(0);
    const auto before = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].current;
    layer(x).sum().backward();
    torch::cuda::synchronize();
    const auto peak = c10::cuda::CUDACachingAllocator::getDeviceStats(0).allocated_bytes[0].peak - before;
    const int64_t fp32_weight = d * d * 4;
    // Activations are a few hundred KiB; the cuBLASLt path also takes a 32 MiB workspace per call.
    EXPECT_LT(peak, fp32_weight / 4) << (kernels ? "kernels" : "ATen") << ": a weight-sized allocation happened";
    std::cout << "[bf16 8192x8192 on the GPU, " << (kernels ? "kernels" : "ATen")
              << "] peak allocated in forward+backward: " << peak << " bytes (an fp32 copy of W: " << fp32_weight
              << ")\n";
  }
}
#endif

}  // namespace
