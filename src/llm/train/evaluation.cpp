// evaluation.cpp: exact-match evaluation by greedy decoding, batched and sharded over a process group
// (tiedlora/llm/evaluation.h).
#include "tiedlora/llm/evaluation.h"

#include <algorithm>
#include <cctype>
#include <sstream>

#include <nlohmann/json.hpp>

namespace tiedlora::llm::train {

std::string normalize_answer(const std::string& text) {
  std::string lower;
  for (unsigned char c : text) {
    if (std::ispunct(c)) continue;
    lower += static_cast<char>(std::tolower(c));
  }
  std::istringstream words(lower);
  std::string word, out;
  while (words >> word) {
    if (word == "a" || word == "an" || word == "the") continue;
    if (!out.empty()) out += ' ';
    out += word;
  }
  return out;
}

ExactMatch exact_match(llm::models::CausalLM& model, const Tokenizer& tokenizer, const std::vector<Example>& examples,
                       const PromptFormat& format, int64_t max_new_tokens, int64_t batch_size,
                       const std::function<void(size_t, size_t)>& on_progress, distributed::ProcessGroup* group) {
  if (group && group->world_size() > 1) {
    // Each rank decodes its share; the predictions come back as JSON lines, in rank (hence example) order.
    const auto [begin, end] =
        distributed::shard_range(static_cast<int64_t>(examples.size()), group->rank(), group->world_size());
    const std::vector<Example> share(examples.begin() + begin, examples.begin() + end);
    const ExactMatch mine = exact_match(model, tokenizer, share, format, max_new_tokens, batch_size, on_progress);
    std::string lines;
    for (const auto& p : mine.predictions) {
      lines += nlohmann::json{{"task", p.task},
                              {"prompt", p.prompt},
                              {"expected", p.expected},
                              {"generated", p.generated},
                              {"correct", p.correct}}
                   .dump() +
               "\n";
    }
    ExactMatch result;
    for (const std::string& text : distributed::all_gather_text(*group, lines, "the exact-match predictions")) {
      std::istringstream in(text);
      std::string line;
      while (std::getline(in, line)) {
        const auto j = nlohmann::json::parse(line);
        Prediction p{j.at("task"), j.at("prompt"), j.at("expected"), j.at("generated"), j.at("correct")};
        result.correct += p.correct;
        result.predictions.push_back(std::move(p));
      }
    }
    return result;
  }
  ExactMatch result;
  llm::models::GenerateOptions options;
  options.max_new_tokens = max_new_tokens;
  options.stop_token_ids = {format.end_token};
  if (auto eos = tokenizer.eos_id(); eos && *eos != format.end_token) options.stop_token_ids.push_back(*eos);
  for (size_t first = 0; first < examples.size(); first += static_cast<size_t>(std::max<int64_t>(1, batch_size))) {
    const size_t last = std::min(examples.size(), first + static_cast<size_t>(std::max<int64_t>(1, batch_size)));
    std::vector<std::vector<int64_t>> prompts;
    for (size_t i = first; i < last; ++i) prompts.push_back(prompt_ids(tokenizer, examples[i], format));
    const auto generated = llm::models::generate_greedy_batch(model, prompts, options);
    for (size_t i = first; i < last; ++i) {
      const Example& e = examples[i];
      const auto& tokens = generated[i - first];
      Prediction p;
      p.task = e.task;
      p.prompt = e.prompt;
      p.expected = e.completion;
      // Valid UTF-8 (a character cut by max_new_tokens becomes U+FFFD, as in transformers), so that the text
      // can be written as JSON; the tokens themselves are as generated.
      p.generated = valid_utf8(tokenizer.decode({tokens.begin(), tokens.end()}, /*skip_special_tokens=*/true));
      p.correct = normalize_answer(p.generated) == normalize_answer(p.expected);
      result.correct += p.correct;
      result.predictions.push_back(std::move(p));
    }
    if (on_progress) on_progress(last, examples.size());
  }
  return result;
}

}  // namespace tiedlora::llm::train
