// test_cuda.cpp: the CUDA kernels against ATen on the GPU. Skipped, visibly, where tiedlora was built
// without CUDA or no device is present.
#include <torch/torch.h>

#include "cuda/dispatch.h"
#include "test_support.h"
#include "tiedlora/functional.h"

namespace {

#define SKIP_WITHOUT_GPU()                                                                   \
  do {                                                                                       \
    if (!TIEDLORA_WITH_CUDA) GTEST_SKIP() << "tiedlora was built without CUDA";              \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";      \
  } while (0)

TEST(CudaEffectiveB, MatchesAtenForEveryDtypeAndOptionalScaling) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(0);
  for (auto dtype : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
    for (int64_t r : {1, 8, 24}) {
      auto b = torch::randn({37, r}, torch::TensorOptions(dtype).device(torch::kCUDA));
      auto u = torch::randn({r}, b.options());
      auto v = torch::randn({37}, b.options());
      for (bool use_u : {false, true}) {
        for (bool use_v : {false, true}) {
          const auto uu = use_u ? u : torch::Tensor(), vv = use_v ? v : torch::Tensor();
          const auto ours = tiedlora::cuda::effective_b(b, uu, vv, 0.5);
          const auto expected = tiedlora::functional::effective_b(b.cpu(), use_u ? u.cpu() : torch::Tensor(),
                                                                  use_v ? v.cpu() : torch::Tensor(), 0.5);
          EXPECT_TRUE(tiedlora::testing::all_close(ours.cpu(), expected, 1e-6, 1e-6, "effective_b"));
        }
      }
    }
  }
}

TEST(CudaLoraLinear, AtenPathOnTheGpuMatchesTheCpu) {
  SKIP_WITHOUT_GPU();
  torch::manual_seed(1);
  auto x = torch::randn({33, 64});
  auto w = torch::randn({48, 64});
  auto a = torch::randn({8, 64}), b = torch::randn({48, 8}), u = torch::randn({8}), v = torch::randn({48});
  const auto cpu = tiedlora::functional::lora_linear(x, w, {}, a, b, u, v, 0.5);
  const auto gpu = tiedlora::functional::lora_linear(x.cuda(), w.cuda(), {}, a.cuda(), b.cuda(), u.cuda(), v.cuda(), 0.5);
  EXPECT_TRUE(tiedlora::testing::all_close(gpu.cpu(), cpu, 1e-4, 1e-4, "lora_linear on the GPU"));
}

TEST(CudaDispatch, ReportsWhetherKernelsAreAvailable) {
  if (!TIEDLORA_WITH_CUDA) {
    EXPECT_FALSE(tiedlora::cuda::available());
    EXPECT_THROW(tiedlora::cuda::effective_b(torch::randn({2, 2}), {}, {}, 1.0), std::exception);
  } else {
    EXPECT_EQ(tiedlora::cuda::available(), torch::cuda::is_available());
  }
}

}  // namespace
