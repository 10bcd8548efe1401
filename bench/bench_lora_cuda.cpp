// bench_lora_cuda.cpp: the CUDA kernel lab (llm.c dev/cuda spirit). One program, one table per run: the
// time of an adapted linear layer against the frozen linear alone, forward and forward+backward, at GPT-2
// and Llama-7B widths, M in {4096, 16384} tokens, r in {8, 16, 64}, bf16; then the merge kernel's bandwidth
// against the device's measured copy bandwidth. Variants, at the same shape and inputs:
//   frozen   at::linear (cuBLAS); forward+backward is the forward plus the input gradient (W is frozen)
//   peft     PEFT's eager composition in ATen ops: x W^T + b + s (x A^T) B^T, autograd through each op
//   aten     tiedlora::functional::lora_linear on its default path (ATen ops, upcast to fp32)
//   lt       tiedlora::functional::lora_linear on tiedlora's cuBLASLt path (kernels/lora_gemm.cu)
// Times are medians of CUDA-event intervals after warm-up; x and dY rotate among several buffers when one
// would fit in L2. Ratios are to the frozen linear (forward: its forward; forward+backward: its forward +
// input gradient). "check" is max |lt - peft| / max |peft| of the forward output, a sanity check, not the
// accuracy test (tests/test_cuda.cpp is). Adapters are bf16 for every variant.
//
// Build: part of the CUDA build (bench/CMakeLists.txt, TIEDLORA_WITH_CUDA). Run on a GPU machine:
//   build/bench/bench_lora_cuda [--quick] [--no-aten] [--reps N] [--shapes gpt2|llama|all]
// Without a GPU it says so and exits with status 2.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <string>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>
#include <torch/torch.h>

#include "core/cuda/dispatch.h"
#include "tiedlora/core/functional.h"

namespace {

#define CUDA_OK(call)                                                                                              \
  do {                                                                                                             \
    const cudaError_t status_ = (call);                                                                            \
    if (status_ != cudaSuccess) throw std::runtime_error(std::string(#call) + ": " + cudaGetErrorString(status_)); \
  } while (0)

struct Options {
  bool quick = false;
  bool with_aten = true;
  int reps = 0;  // 0: adaptive (about a quarter of a second per measurement, 5 to 50 repetitions)
  std::string shapes = "all";
};

struct Shape {
  const char* name;
  int64_t in, out;
  bool bias;  // GPT-2's Conv1D layers carry a bias, Llama's projections do not
};
const Shape kShapes[] = {
    {"gpt2 c_attn", 768, 2304, true},     {"gpt2 attn.c_proj", 768, 768, true}, {"gpt2 c_fc", 768, 3072, true},
    {"gpt2 mlp.c_proj", 3072, 768, true}, {"llama q/k/v/o", 4096, 4096, false}, {"llama gate/up", 4096, 11008, false},
    {"llama down", 11008, 4096, false},
};

// Median time in milliseconds of `fn` on the current stream, after warm-up. `fn` gets the repetition index
// (to rotate input buffers).
double median_ms(const std::function<void(int)>& fn, const Options& options) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaEvent_t start, stop;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  for (int i = 0; i < 3; ++i) fn(i);  // warm-up: handles, algorithm choice, allocator
  CUDA_OK(cudaStreamSynchronize(stream));
  int reps = options.reps;
  if (reps <= 0) {
    CUDA_OK(cudaEventRecord(start, stream));
    for (int i = 0; i < 3; ++i) fn(i);
    CUDA_OK(cudaEventRecord(stop, stream));
    CUDA_OK(cudaEventSynchronize(stop));
    float ms = 0;
    CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
    reps = std::clamp(static_cast<int>(std::ceil(250.0 / std::max(ms / 3, 1e-3f))), 5, 50);
  }
  std::vector<cudaEvent_t> marks(reps + 1);
  for (auto& e : marks) CUDA_OK(cudaEventCreate(&e));
  CUDA_OK(cudaEventRecord(marks[0], stream));
  for (int i = 0; i < reps; ++i) {
    fn(i);
    CUDA_OK(cudaEventRecord(marks[i + 1], stream));
  }
  CUDA_OK(cudaEventSynchronize(marks[reps]));
  std::vector<float> times(reps);
  for (int i = 0; i < reps; ++i) CUDA_OK(cudaEventElapsedTime(&times[i], marks[i], marks[i + 1]));
  for (auto& e : marks) CUDA_OK(cudaEventDestroy(e));
  CUDA_OK(cudaEventDestroy(start));
  CUDA_OK(cudaEventDestroy(stop));
  std::nth_element(times.begin(), times.begin() + reps / 2, times.end());
  return times[reps / 2];
}

// Several input buffers when one fits in the L2 cache, so that repetitions do not time the cache.
std::vector<torch::Tensor> rotating(at::IntArrayRef sizes, const torch::TensorOptions& options, int64_t l2_bytes) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(options.dtype().itemsize());
  const int64_t count = std::clamp<int64_t>(3 * l2_bytes / std::max<int64_t>(bytes, 1) + 1, 1, 8);
  std::vector<torch::Tensor> out;
  for (int64_t i = 0; i < count; ++i) out.push_back(torch::randn(sizes, options));
  return out;
}

struct LayerTimes {
  double forward = 0, forward_backward = 0;
};

void print_rule(int width) { std::printf("%s\n", std::string(width, '-').c_str()); }

void bench_layers(const Options& options, int64_t l2_bytes) {
  const auto bf16 = torch::TensorOptions(torch::kBFloat16).device(torch::kCUDA);
  const std::vector<int64_t> token_counts =
      options.quick ? std::vector<int64_t>{4096} : std::vector<int64_t>{4096, 16384};
  const std::vector<int64_t> ranks = options.quick ? std::vector<int64_t>{16} : std::vector<int64_t>{8, 16, 64};
  const double scale = 2.0;

  std::printf("\n## Adapted linear layer, bf16 (times in ms; ratios to the frozen linear)\n\n");
  std::printf(
      "| layer | d_in->d_out | M | r | frozen fwd | peft | aten | lt | frozen f+b | peft | aten | lt | check |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Shape& shape : kShapes) {
    const bool is_gpt2 = std::strncmp(shape.name, "gpt2", 4) == 0;
    if ((options.shapes == "gpt2" && !is_gpt2) || (options.shapes == "llama" && is_gpt2)) continue;
    for (int64_t m : token_counts) {
      torch::manual_seed(0);
      const auto xs = rotating({m, shape.in}, bf16, l2_bytes);
      const auto dys = rotating({m, shape.out}, bf16, l2_bytes);
      const torch::Tensor w = torch::randn({shape.out, shape.in}, bf16) / std::sqrt(double(shape.in));
      const torch::Tensor bias = shape.bias ? torch::randn({shape.out}, bf16) : torch::Tensor();
      std::vector<torch::Tensor> xs_grad;
      for (const auto& x : xs) xs_grad.push_back(x.detach().requires_grad_(true));
      auto x_at = [&](int i) { return xs[i % xs.size()]; };
      auto xg_at = [&](int i) {
        auto& x = xs_grad[i % xs_grad.size()];
        x.mutable_grad() = torch::Tensor();
        return x;
      };
      auto dy_at = [&](int i) { return dys[i % dys.size()]; };

      LayerTimes frozen;
      {
        torch::NoGradGuard no_grad;
        frozen.forward = median_ms([&](int i) { at::linear(x_at(i), w, bias); }, options);
      }
      frozen.forward_backward = median_ms([&](int i) { at::linear(xg_at(i), w, bias).backward(dy_at(i)); }, options);

      for (int64_t r : ranks) {
        const torch::Tensor a = (torch::randn({r, shape.in}, bf16) / std::sqrt(double(shape.in))).requires_grad_(true);
        const torch::Tensor b = (torch::randn({shape.out, r}, bf16) * 0.01).requires_grad_(true);
        auto peft = [&](const torch::Tensor& x) {
          return at::linear(x, w, bias) + at::linear(at::linear(x, a), b) * scale;
        };
        auto ours = [&](const torch::Tensor& x) {
          return tiedlora::functional::lora_linear(x, w, bias, {a, b, {}, {}, scale});
        };
        auto time_variant = [&](const std::function<torch::Tensor(const torch::Tensor&)>& layer) {
          LayerTimes t;
          {
            torch::NoGradGuard no_grad;
            t.forward = median_ms([&](int i) { layer(x_at(i)); }, options);
          }
          t.forward_backward = median_ms(
              [&](int i) {
                a.mutable_grad() = torch::Tensor();
                b.mutable_grad() = torch::Tensor();
                layer(xg_at(i)).backward(dy_at(i));
              },
              options);
          return t;
        };
        const LayerTimes peft_t = time_variant(peft);
        LayerTimes aten_t{std::nan(""), std::nan("")};
        if (options.with_aten) aten_t = time_variant(ours);  // the default backend: ATen
        LayerTimes lt_t{};
        double check = 0;
        {
          tiedlora::functional::BackendGuard kernels(tiedlora::functional::Backend::cuda_kernels);
          lt_t = time_variant(ours);
          torch::NoGradGuard no_grad;
          const torch::Tensor ref = peft(xs[0]).to(torch::kFloat), got = ours(xs[0]).to(torch::kFloat);
          check = ((got - ref).abs().max() / ref.abs().max()).item<double>();
        }
        std::printf(
            "| %s | %lld->%lld | %lld | %lld | %.3f | %.2fx | %.2fx | %.2fx | %.3f | %.2fx | %.2fx | %.2fx | %.1e |\n",
            shape.name, static_cast<long long>(shape.in), static_cast<long long>(shape.out), static_cast<long long>(m),
            static_cast<long long>(r), frozen.forward, peft_t.forward / frozen.forward, aten_t.forward / frozen.forward,
            lt_t.forward / frozen.forward, frozen.forward_backward, peft_t.forward_backward / frozen.forward_backward,
            aten_t.forward_backward / frozen.forward_backward, lt_t.forward_backward / frozen.forward_backward, check);
        std::fflush(stdout);
      }
    }
  }
}

// Device-to-device copy bandwidth, counting bytes read plus bytes written (METHOD.md).
double copy_gb_per_s(const Options& options) {
  const int64_t bytes = int64_t{1} << 30;
  const torch::Tensor src = torch::randn({bytes / 4}, torch::TensorOptions(torch::kFloat).device(torch::kCUDA));
  torch::Tensor dst = torch::empty_like(src);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const double ms = median_ms(
      [&](int) { CUDA_OK(cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), bytes, cudaMemcpyDeviceToDevice, stream)); },
      options);
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

void bench_merge(const Options& options) {
  const double copy = copy_gb_per_s(options);
  std::printf("\n## Merge W' = W + B_eff A (bf16 W, fp32 factors), out of place\n\n");
  std::printf("device-to-device copy: %.0f GB/s (bytes read + written)\n\n", copy);
  std::printf(
      "| layer | d_out x d_in | r | ms | GB/s | of copy | FMA-bound floor ms |\n|---|---|---|---|---|---|---|\n");
  const auto bf16 = torch::TensorOptions(torch::kBFloat16).device(torch::kCUDA);
  const auto fp32 = torch::TensorOptions(torch::kFloat).device(torch::kCUDA);
  cudaDeviceProp props{};
  int device = 0;
  CUDA_OK(cudaGetDevice(&device));
  CUDA_OK(cudaGetDeviceProperties(&props, device));
  int clock_khz = 0;
  CUDA_OK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
  const double fma_per_s = double(props.multiProcessorCount) * 128 * clock_khz * 1e3;  // fp32 FMA/s, sm_80/sm_90
  for (const Shape& shape : kShapes) {
    const bool is_gpt2 = std::strncmp(shape.name, "gpt2", 4) == 0;
    if ((options.shapes == "gpt2" && !is_gpt2) || (options.shapes == "llama" && is_gpt2)) continue;
    torch::manual_seed(1);
    const torch::Tensor w = torch::randn({shape.out, shape.in}, bf16);
    torch::Tensor out = torch::empty_like(w);
    for (int64_t r : options.quick ? std::vector<int64_t>{16} : std::vector<int64_t>{8, 16, 64}) {
      const torch::Tensor a = torch::randn({r, shape.in}, fp32) * 0.01,
                          b_eff = torch::randn({shape.out, r}, fp32) * 0.01;
      const double ms = median_ms([&](int) { tiedlora::cuda::merge_weight_out(out, w, a, b_eff); }, options);
      const double bytes = 2.0 * 2.0 * double(shape.out) * double(shape.in);
      const double gbs = bytes / (ms * 1e-3) / 1e9;
      const double fma_floor_ms = double(shape.out) * shape.in * r / fma_per_s * 1e3;
      std::printf("| %s | %lldx%lld | %lld | %.4f | %.0f | %.0f %% | %.4f |\n", shape.name,
                  static_cast<long long>(shape.out), static_cast<long long>(shape.in), static_cast<long long>(r), ms,
                  gbs, 100.0 * gbs / copy, fma_floor_ms);
      std::fflush(stdout);
    }
  }
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") {
      o.quick = true;
    } else if (arg == "--no-aten") {
      o.with_aten = false;
    } else if (arg == "--reps" && i + 1 < argc) {
      o.reps = std::atoi(argv[++i]);
    } else if (arg == "--shapes" && i + 1 < argc) {
      o.shapes = argv[++i];
    } else {
      throw std::runtime_error("unknown argument " + arg +
                               " (usage: bench_lora_cuda [--quick] [--no-aten] [--reps N] [--shapes gpt2|llama|all])");
    }
  }
  if (o.shapes != "gpt2" && o.shapes != "llama" && o.shapes != "all")
    throw std::runtime_error("--shapes gpt2|llama|all");
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options options = parse(argc, argv);
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0 || !torch::cuda::is_available()) {
      std::fprintf(stderr, "bench_lora_cuda: no CUDA device on this machine; run it on a GPU machine (docs/cuda.md)\n");
      return 2;
    }
    if (!TIEDLORA_WITH_CUDA || !tiedlora::cuda::available()) {
      std::fprintf(stderr, "bench_lora_cuda: tiedlora was built without its CUDA kernels\n");
      return 2;
    }
    cudaDeviceProp props{};
    CUDA_OK(cudaGetDeviceProperties(&props, 0));
    char date[64];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S UTC", std::gmtime(&now));
    std::printf("# bench_lora_cuda\n\ndevice: %s (sm_%d%d, %d SMs, %.0f MB L2), %s, LibTorch %d.%d.%d, reps %s\n",
                props.name, props.major, props.minor, props.multiProcessorCount, props.l2CacheSize / 1e6, date,
                TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR, TORCH_VERSION_PATCH,
                options.reps > 0 ? std::to_string(options.reps).c_str() : "adaptive (5-50)");
    bench_layers(options, props.l2CacheSize);
    bench_merge(options);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_lora_cuda: error: %s\n", e.what());
    return 1;
  }
}
