// bench_multi_adapter.cpp: serving N adapters on one frozen model (docs/adapters.md), CPU.
//
//   bench_multi_adapter [model=smollm2] [adapters=4] [prompts=16] [new_tokens=16] [repetitions=3] [threads=2]
//
// N LoRA adapters (rank 8, all-linear, random values) are injected into one model, and M prompts of
// 12 to 40 random token ids are given to them round-robin. Three ways to generate all M continuations
// (greedy, KV cache) are timed, median of the repetitions:
//   - one mixed run: every prompt in one batch, each row through its own adapter (RowAdaptersScope);
//   - N separate runs: one batch per adapter, that adapter active (what serving without mixed batches does);
//   - N separate merged runs: per adapter, merge it, generate its batch, unmerge (merge cost included);
//   - and, as a ceiling, all M prompts in one batch through a single adapter (nothing to route).
// Routing's cost is also given paired: the mixed run over the ceiling run of the same repetition, median and range.
// It also checks that the mixed run produced the separate runs' tokens, and measures the bytes one adapter
// takes on disk (adapter_model.safetensors, fp32) for LoRA and the Tied-LoRA presets at rank 8, all-linear.
// Prints Markdown tables (docs/benchmarks.md).
#include <stdlib.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "model_discovery.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/formats/adapter.h"
#include "tiedlora/formats/files.h"
#include "tiedlora/llm/causal_lm.h"

namespace {

using Clock = std::chrono::steady_clock;
using Prompts = std::vector<std::vector<int64_t>>;

double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::string path = argc > 1 ? argv[1] : "smollm2";
  const int adapters = argc > 2 ? std::stoi(argv[2]) : 4;
  const int prompt_count = argc > 3 ? std::stoi(argv[3]) : 16;
  const int64_t new_tokens = argc > 4 ? std::stoll(argv[4]) : 16;
  const int repetitions = argc > 5 ? std::stoi(argv[5]) : 3;
  at::set_num_threads(argc > 6 ? std::stoi(argv[6]) : 2);
  try {
    if (path == "smollm2") path = tiedlora::tools::find_smollm2_gguf();
    auto model = tiedlora::llm::models::load_any(path);
    model->eval();
    std::vector<std::string> names;
    for (int n = 0; n < adapters; ++n) {
      names.push_back("a" + std::to_string(n));
      tiedlora::inject_adapters(*model, tiedlora::InjectOptions()
                                            .targets({"all-linear"})
                                            .lora(tiedlora::LoraOptions(8).seed(100 + n))
                                            .adapter_name(names.back()));
    }
    {
      at::NoGradGuard no_grad;
      at::Generator g = at::detail::createCPUGenerator(7);
      for (auto& p : model->parameters()) {
        if (p.requires_grad()) p.normal_(0.0, 0.02, g);  // B non-zero: every adapter changes its rows
      }
    }
    at::Generator g = at::detail::createCPUGenerator(3);
    Prompts prompts;
    std::vector<std::string> prompt_adapter;
    int64_t prompt_tokens = 0;
    for (int i = 0; i < prompt_count; ++i) {
      const int64_t length = at::randint(12, 41, {1}, g, at::kLong).item<int64_t>();
      const at::Tensor ids = at::randint(100, model->info().vocab_size, {length}, g, at::kLong);
      prompts.emplace_back(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + length);
      prompt_adapter.push_back(names[static_cast<size_t>(i % adapters)]);
      prompt_tokens += length;
    }
    tiedlora::llm::models::GenerateOptions options;
    options.max_new_tokens = new_tokens;
    options.stop_token_ids = {-1};  // every prompt generates new_tokens: the same work in every mode

    std::vector<std::vector<int64_t>> mixed_out(prompts.size()), separate_out(prompts.size());
    auto run_mixed = [&] {
      tiedlora::llm::models::GenerateOptions o = options;
      o.prompt_adapters = prompt_adapter;
      mixed_out = tiedlora::llm::models::generate_greedy_batch(*model, prompts, o);
    };
    auto run_separate = [&](bool merged) {
      for (const auto& name : names) {
        Prompts mine;
        std::vector<size_t> where;
        for (size_t i = 0; i < prompts.size(); ++i) {
          if (prompt_adapter[i] == name) {
            mine.push_back(prompts[i]);
            where.push_back(i);
          }
        }
        tiedlora::set_active_adapters(*model, {name});
        if (merged) tiedlora::merge_adapters_(*model);
        const auto out = tiedlora::llm::models::generate_greedy_batch(*model, mine, options);
        if (merged) tiedlora::unmerge_adapters_(*model);
        for (size_t k = 0; k < where.size(); ++k) separate_out[where[k]] = out[k];
      }
    };
    // The ceiling: the same batch through a single adapter, nothing to route.
    auto run_one_adapter = [&] {
      tiedlora::set_active_adapters(*model, {names.front()});
      (void)tiedlora::llm::models::generate_greedy_batch(*model, prompts, options);
    };
    struct Mode {
      const char* name;
      std::function<void()> run;
      std::vector<double> times;
    };
    std::vector<Mode> modes = {
        {"N separate runs (one adapter active each)", [&] { run_separate(false); }, {}},
        {"N separate runs, adapter merged (merge + unmerge included)", [&] { run_separate(true); }, {}},
        {"one mixed run (each row its adapter)", run_mixed, {}},
        {"ceiling: the same batch, one adapter for all rows (nothing routed)", run_one_adapter, {}}};
    for (auto& mode : modes) mode.run();  // warm-up
    for (int r = 0; r < repetitions; ++r) {
      for (auto& mode : modes) {
        const auto start = Clock::now();
        mode.run();
        mode.times.push_back(seconds_since(start));
      }
    }
    run_separate(false);
    run_mixed();
    int identical = 0;
    for (size_t i = 0; i < prompts.size(); ++i) identical += mixed_out[i] == separate_out[i];

    const double generated = static_cast<double>(prompt_count) * static_cast<double>(new_tokens);
    const double baseline = median(modes[0].times);
    std::printf(
        "\n%d LoRA adapters (r = 8, all-linear) x %d prompts (%lld prompt tokens, 12-40 each), %lld new tokens "
        "each, greedy with KV cache, %d threads, median of %d runs; identical tokens, mixed vs separate: %d of %d "
        "prompts\n\n",
        adapters, prompt_count, static_cast<long long>(prompt_tokens), static_cast<long long>(new_tokens),
        at::get_num_threads(), repetitions, identical, prompt_count);
    std::printf("| mode | seconds | generated tokens/s | speed vs separate runs |\n|---|---|---|---|\n");
    for (const auto& mode : modes) {
      const double t = median(mode.times);
      std::printf("| %s | %.2f | %.1f | %.2fx |\n", mode.name, t, generated / t, baseline / t);
    }
    // Routing's cost, paired: the mixed run over the ceiling of the same repetition (they run one after the
    // other), so that a VM that slows down for a while moves both sides of each ratio.
    std::vector<double> routing;
    for (int r = 0; r < repetitions; ++r) routing.push_back(modes[2].times[r] / modes[3].times[r]);
    std::printf("\nmixed run / ceiling, paired by repetition: median %.3f, range %.3f-%.3f over %d repetitions\n",
                median(routing), *std::min_element(routing.begin(), routing.end()),
                *std::max_element(routing.begin(), routing.end()), repetitions);

    // Bytes per adapter on disk, SmolLM2 all-linear, rank 8, fp32 factors.
    std::printf(
        "\n| method (rank 8, all-linear) | stored parameters | adapter_model.safetensors bytes | vs LoRA |\n"
        "|---|---|---|---|\n");
    char scratch_template[] = "/tmp/tiedlora_bench_multi_adapter.XXXXXX";
    if (!::mkdtemp(scratch_template)) throw std::runtime_error("cannot create a folder in /tmp");
    const std::string scratch = scratch_template;
    double lora_bytes = 0;
    for (const char* method : {"lora", "tied-ab", "tied-abuv", "tied-uv"}) {
      auto fresh = tiedlora::llm::models::load_any(path);
      const auto report = tiedlora::inject_adapters(
          *fresh,
          tiedlora::InjectOptions().targets({"all-linear"}).method(method).lora(tiedlora::LoraOptions(8).seed(1)));
      const std::string folder = tiedlora::formats::join_path(scratch, method);
      tiedlora::save_adapter(*fresh, folder);
      const auto adapter = tiedlora::Adapter::read(folder);
      int64_t stored = 0;
      for (const auto& [name, t] : adapter.tensors()) stored += t.numel();
      std::FILE* f = std::fopen(tiedlora::formats::join_path(folder, "adapter_model.safetensors").c_str(), "rb");
      std::fseek(f, 0, SEEK_END);
      const double bytes = static_cast<double>(std::ftell(f));
      std::fclose(f);
      if (lora_bytes == 0) lora_bytes = bytes;
      const char* label = std::string(method) == "tied-ab"     ? "tied-ab (TL5)"
                          : std::string(method) == "tied-abuv" ? "tied-abuv (TL6)"
                                                               : method;
      std::printf("| %s | %lld | %.0f | %.2f %% |\n", label, static_cast<long long>(stored), bytes,
                  100.0 * bytes / lora_bytes);
      (void)report;
    }
    tiedlora::formats::remove_tree(scratch);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_multi_adapter: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
