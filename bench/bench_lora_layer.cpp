// bench_lora_layer.cpp: CPU time of one adapted linear layer against the frozen layer alone, forward and
// forward+backward, at GPT-2 and Llama widths. Variants, all at the same shape:
//   frozen      at::linear with a frozen W (backward: the input gradient only)
//   peft_eager  PEFT's composition in ATen ops: x W^T + b + s (x A^T) B^T, autograd through each op
//   lora        tiedlora::LoraLinear (plain LoRA) through functional::lora_linear
//   tied_abuv   tiedlora::LoraLinear on shared factors with u and v (the paper's TL6)
//   two_active  both adapters above on one layer, both active (one call of the choke point; target: the
//               frozen layer plus at most the two adapters' own costs)
//   mixed_rows  two plain LoRA adapters on one layer, each serving half of the rows (a mixed-adapter batch;
//               target: at most 5 % over `lora` serving every row, the same batch through one adapter)
// Run: build/bench/bench_lora_layer --benchmark_format=json > bench.json; python bench/report.py bench.json
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "tiedlora/core/modules.h"

namespace {

struct Shape {
  const char* name;
  int64_t in, out;
};
constexpr Shape kShapes[] = {
    {"gpt2_c_attn_768x2304", 768, 2304}, {"gpt2_attn_c_proj_768x768", 768, 768},
    {"gpt2_c_fc_768x3072", 768, 3072},   {"gpt2_mlp_c_proj_3072x768", 3072, 768},
    {"llama_4096x4096", 4096, 4096},     {"llama_up_4096x11008", 4096, 11008},
};
constexpr int64_t kTokens = 256;
constexpr int64_t kRank = 16;

enum Variant { kFrozen, kPeftEager, kLora, kTied, kTwoActive, kMixedRows };
const char* kVariantNames[] = {"frozen", "peft_eager", "lora", "tied_abuv", "two_active", "mixed_rows"};

void run(benchmark::State& state, const Shape& shape, Variant variant, bool backward) {
  torch::manual_seed(0);
  at::set_num_threads(2);
  torch::nn::Linear base(torch::nn::LinearOptions(shape.in, shape.out));
  base->weight.requires_grad_(false);
  base->bias.requires_grad_(false);
  auto x = torch::randn({kTokens, shape.in}).requires_grad_(backward);
  auto dy = torch::randn({kTokens, shape.out});
  auto a = (torch::randn({kRank, shape.in}) * 0.02).requires_grad_(true);
  auto b = (torch::randn({shape.out, kRank}) * 0.02).requires_grad_(true);
  tiedlora::LoraLinear lora(nullptr);
  tiedlora::TiedLoraFactors factors(shape.in, shape.out, tiedlora::AdapterMethod::parse("tied-abuv"),
                                    tiedlora::LoraOptions(kRank));
  if (variant == kLora) {
    lora = tiedlora::LoraLinear(base, tiedlora::LoraOptions(kRank));
  } else if (variant == kTied) {
    lora = tiedlora::LoraLinear(base, factors);
  } else if (variant == kTwoActive) {
    lora = tiedlora::LoraLinear(base, tiedlora::LoraOptions(kRank));
    lora->attach_tied(factors, "tied");
    lora->set_active_adapters({"default", "tied"});
  } else if (variant == kMixedRows) {
    lora = tiedlora::LoraLinear(base, tiedlora::LoraOptions(kRank));
    lora->attach_lora(tiedlora::LoraOptions(kRank), "second");
  }
  // The mixed batch: the first half of the rows through one LoRA adapter, the second half through the other.
  std::vector<std::string> halves(kTokens, "default");
  std::fill(halves.begin() + kTokens / 2, halves.end(), "second");
  const auto routing = variant == kMixedRows ? std::make_shared<const tiedlora::RowAdapters>(halves) : nullptr;
  const tiedlora::RowAdaptersScope scope(routing);
  const double scale = 2.0;
  auto forward = [&]() -> torch::Tensor {
    switch (variant) {
      case kFrozen: return at::linear(x, base->weight, base->bias);
      case kPeftEager: return at::linear(x, base->weight, base->bias) + at::linear(at::linear(x, a), b) * scale;
      default: return lora->forward(x);
    }
  };
  for (auto _ : state) {
    if (backward) {
      auto y = forward();
      y.backward(dy);
      x.mutable_grad().reset();
      a.mutable_grad().reset();
      b.mutable_grad().reset();
      benchmark::DoNotOptimize(y.data_ptr());
    } else {
      torch::NoGradGuard no_grad;
      auto y = forward();
      benchmark::DoNotOptimize(y.data_ptr());
    }
  }
  const double flops = 2.0 * kTokens * shape.in * shape.out * (backward ? 2 : 1);
  state.counters["frozen_GFLOP/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

int register_all() {
  for (const auto& shape : kShapes) {
    for (bool backward : {false, true}) {
      for (int v = kFrozen; v <= kMixedRows; ++v) {
        const std::string name = std::string(shape.name) + (backward ? "/fwd_bwd/" : "/fwd/") + kVariantNames[v];
        benchmark::RegisterBenchmark(
            name.c_str(),
            [shape, v, backward](benchmark::State& s) { run(s, shape, static_cast<Variant>(v), backward); })
            ->Unit(benchmark::kMillisecond)
            ->MinTime(0.5);
      }
    }
  }
  return 0;
}
const int registered = register_all();

}  // namespace

BENCHMARK_MAIN();
