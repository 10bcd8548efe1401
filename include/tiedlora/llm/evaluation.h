// tiedlora/llm/evaluation.h: exact-match evaluation by greedy decoding (SQuAD's answer normalisation),
// batched and, with a process group, sharded over the ranks. Part of tiedlora/llm/train.h.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "tiedlora/llm/causal_lm.h"
#include "tiedlora/llm/data.h"
#include "tiedlora/llm/distributed.h"
#include "tiedlora/llm/tokenizer.h"

namespace tiedlora::llm::train {

/// SQuAD's answer normalisation: lower case, punctuation and the articles a/an/the removed, whitespace
/// collapsed.
std::string normalize_answer(const std::string& text);

struct Prediction {
  std::string task, prompt, expected, generated;
  bool correct = false;
};

struct ExactMatch {
  std::vector<Prediction> predictions;
  int64_t correct = 0;
  double accuracy() const { return predictions.empty() ? 0.0 : static_cast<double>(correct) / predictions.size(); }
};

/// Greedy-decodes every example's prompt (up to max_new_tokens, stopping at the format's end token), in
/// left-padded batches of `batch_size` (llm::models::generate_greedy_batch), and compares normalize_answer() of
/// the text with the expected completion's. With a `group` of several processes each rank decodes its
/// contiguous share and every rank gets all predictions, in order (on_progress counts this rank's share).
ExactMatch exact_match(llm::models::CausalLM& model, const Tokenizer& tokenizer, const std::vector<Example>& examples,
                       const PromptFormat& format, int64_t max_new_tokens, int64_t batch_size,
                       const std::function<void(size_t done, size_t total)>& on_progress = {},
                       distributed::ProcessGroup* group = nullptr);

}  // namespace tiedlora::llm::train
