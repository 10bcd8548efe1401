// bench_model_forward.cpp: CPU forward throughput of a model loaded by tiedlora (GGUF or Hugging Face
// folder): `bench_model_forward <model> <tokens> <repetitions>` runs a no-grad forward over one sequence
// of <tokens> fixed token ids <repetitions> times after one warm-up and prints JSON with the median time
// and tokens/s. bench/bench_smollm2_forward.py runs it beside transformers on the same ids.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "model_discovery.h"
#include "tiedlora/llm/causal_lm.h"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: bench_model_forward <model.gguf|folder|smollm2> [tokens=128] [repetitions=5] [threads=2]\n");
    return 2;
  }
  std::string path = argv[1];
  if (path == "smollm2") path = tiedlora::tools::find_smollm2_gguf();
  const int64_t tokens = argc > 2 ? std::stoll(argv[2]) : 128;
  const int repetitions = argc > 3 ? std::stoi(argv[3]) : 5;
  at::set_num_threads(argc > 4 ? std::stoi(argv[4]) : 2);
  try {
    auto model = tiedlora::llm::models::load_any(path);
    model->eval();
    at::NoGradGuard no_grad;
    // The same ids bench_smollm2_forward.py gives transformers: (7 * i + 3) mod vocab.
    const auto ids = (at::arange(tokens, at::kLong) * 7 + 3).remainder(model->info().vocab_size).unsqueeze(0);
    model->forward(ids);
    std::vector<double> seconds;
    for (int r = 0; r < repetitions; ++r) {
      const auto start = std::chrono::steady_clock::now();
      const auto logits = model->forward(ids);
      (void)logits.sum().item<float>();
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    std::sort(seconds.begin(), seconds.end());
    const double median = seconds[seconds.size() / 2];
    std::printf("{\"median_seconds\": %.6f, \"tokens\": %lld, \"tokens_per_second\": %.1f, \"threads\": %d}\n", median,
                static_cast<long long>(tokens), tokens / median, at::get_num_threads());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_model_forward: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
