// generate.cpp: greedy decoding with a KV cache, one prompt or a left-padded batch of them, each prompt
// with its own adapter when asked (tiedlora/llm/causal_lm.h).
#include <algorithm>
#include <cstdint>
#include <map>
#include <numeric>
#include <string>

#include <ATen/ATen.h>

#include "llm/models/decoder.h"
#include "tiedlora/core/error.h"

namespace tiedlora::llm::models {
namespace {

// Whether each adapter's prompts are consecutive (then every layer reads each adapter's rows as a slice).
bool grouped_by_adapter(const std::vector<std::string>& adapter_of_prompt) {
  std::map<std::string, std::pair<size_t, size_t>> seen;  // first index, count so far
  for (size_t i = 0; i < adapter_of_prompt.size(); ++i) {
    auto& [first, count] = seen.emplace(adapter_of_prompt[i], std::make_pair(i, size_t{0})).first->second;
    if (i - first != count++) return false;
  }
  return true;
}

}  // namespace

std::vector<std::vector<int64_t>> generate_greedy_batch(CausalLM& model,
                                                        const std::vector<std::vector<int64_t>>& prompts,
                                                        const GenerateOptions& options) {
  if (prompts.empty()) return {};
  // A mixed-adapter batch is ordered by adapter once, here, so that each adapter serves a contiguous slice
  // of the rows in every layer (no gather and scatter per layer); the answers return in the caller's order.
  const auto& adapters = options.prompt_adapters;
  const bool all_non_empty = std::none_of(prompts.begin(), prompts.end(), [](const auto& p) { return p.empty(); });
  if (adapters.size() == prompts.size() && all_non_empty && !grouped_by_adapter(adapters)) {
    std::vector<size_t> order(prompts.size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return adapters[a] < adapters[b]; });
    std::vector<std::vector<int64_t>> grouped;
    GenerateOptions grouped_options = options;
    grouped_options.prompt_adapters.clear();
    for (size_t i : order) {
      grouped.push_back(prompts[i]);
      grouped_options.prompt_adapters.push_back(adapters[i]);
    }
    std::vector<std::vector<int64_t>> answers = generate_greedy_batch(model, grouped, grouped_options);
    std::vector<std::vector<int64_t>> out(prompts.size());
    for (size_t k = 0; k < order.size(); ++k) out[order[k]] = std::move(answers[k]);
    return out;
  }
  const std::vector<int64_t> stops =
      options.stop_token_ids.empty() ? model.info().eos_token_ids : options.stop_token_ids;
  at::NoGradGuard no_grad;
  const EvalModeGuard eval_mode(model);
  const auto device = model.parameters().front().device();
  const int64_t n = static_cast<int64_t>(prompts.size());
  size_t longest = 0, shortest = SIZE_MAX;
  for (const auto& p : prompts) {
    TORCH_CHECK(!p.empty(), "generate_greedy_batch: prompt ", &p - prompts.data(), " is empty");
    longest = std::max(longest, p.size());
    shortest = std::min(shortest, p.size());
  }
  // Left padding (with token 0, never attended) puts every prompt's last token in the last column.
  at::Tensor ids = at::zeros({n, static_cast<int64_t>(longest)}, at::kLong);
  at::Tensor mask = at::zeros({n, static_cast<int64_t>(longest)}, at::kBool);
  for (int64_t i = 0; i < n; ++i) {
    const auto& p = prompts[i];
    const int64_t offset = static_cast<int64_t>(longest - p.size());
    ids[i].narrow(0, offset, static_cast<int64_t>(p.size())).copy_(at::tensor(p, at::kLong));
    mask[i].narrow(0, offset, static_cast<int64_t>(p.size())).fill_(true);
  }
  // Each prompt's adapter for every forward of the decoding, prefill and steps alike (the batch keeps its
  // rows until the end, so the routing never changes).
  // Without prompt adapters, the active adapters for every row, whatever routing the caller has in force.
  if (!options.prompt_adapters.empty() && static_cast<int64_t>(options.prompt_adapters.size()) != n) {
    throw ConfigError("generate_greedy_batch: " + std::to_string(options.prompt_adapters.size()) +
                      " prompt adapters for " + std::to_string(n) + " prompts");
  }
  const RowAdaptersScope routing(options.prompt_adapters.empty() ? nullptr
                                                                 : route_rows(model, options.prompt_adapters));
  KVCache cache;
  const bool padded = shortest < longest;  // without padding, no mask: each row runs exactly as alone
  if (padded) cache.attention_mask = mask.to(device);
  at::Tensor input = ids.to(device);
  std::vector<std::vector<int64_t>> out(n);
  std::vector<bool> done(n, false);
  int64_t remaining = n;
  const int64_t limit = model.info().max_positions;
  for (int64_t step = 0; step < options.max_new_tokens && remaining > 0; ++step) {
    if (limit > 0 && cache.length() + input.size(1) > limit) break;
    const at::Tensor logits = model.forward(input, &cache);
    const at::Tensor next = logits.select(1, logits.size(1) - 1).argmax(-1).cpu();
    const auto next_ids = next.accessor<int64_t, 1>();
    for (int64_t i = 0; i < n; ++i) {
      if (done[i]) continue;
      out[i].push_back(next_ids[i]);
      if (std::find(stops.begin(), stops.end(), next_ids[i]) != stops.end()) {
        done[i] = true;
        --remaining;
      }
    }
    input = next.unsqueeze(1).to(device);
    if (padded)
      cache.attention_mask = at::cat({cache.attention_mask, at::ones({n, 1}, cache.attention_mask.options())}, 1);
  }
  return out;
}

std::vector<int64_t> generate_greedy(CausalLM& model, const std::vector<int64_t>& prompt,
                                     const GenerateOptions& options) {
  TORCH_CHECK(!prompt.empty(), "generate_greedy: the prompt is empty");
  return generate_greedy_batch(model, {prompt}, options).front();
}

}  // namespace tiedlora::llm::models
