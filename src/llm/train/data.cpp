// data.cpp: JSONL prompt/completion data, tokenized examples, and padded or packed batches
// (tiedlora/llm/data.h).
#include "tiedlora/llm/data.h"

#include <algorithm>
#include <cctype>
#include <fstream>
#include <sstream>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "tiedlora/core/error.h"
#include "util/files.h"

namespace tiedlora::llm::train {

using nlohmann::json;

std::vector<Example> read_jsonl(const std::string& path) {
  if (!util::is_regular_file(path))
    throw FormatError(path + ": no such file (hint: give a JSONL file of {\"prompt\", \"completion\"} lines)");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path + ": cannot be read");
  std::vector<Example> out;
  std::string line;
  int64_t number = 0;
  auto string_field = [&](const json& j, const char* key, bool required) -> std::string {
    if (!j.contains(key)) {
      if (required) throw FormatError(path + ":" + std::to_string(number) + ": missing \"" + key + "\"");
      return "";
    }
    if (!j.at(key).is_string()) {
      throw FormatError(path + ":" + std::to_string(number) + ": \"" + key + "\" must be a string");
    }
    return j.at(key).get<std::string>();
  };
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      throw FormatError(path + ":" + std::to_string(number) + ": not valid JSON (" + e.what() + ")");
    }
    if (!j.is_object()) throw FormatError(path + ":" + std::to_string(number) + ": each line must be a JSON object");
    Example example;
    example.prompt = string_field(j, "prompt", true);
    example.completion = string_field(j, "completion", true);
    example.system = string_field(j, "system", false);
    example.task = string_field(j, "task", false);
    if (example.completion.empty())
      throw FormatError(path + ":" + std::to_string(number) + ": \"completion\" is empty");
    out.push_back(std::move(example));
  }
  if (in.bad()) throw FormatError(path + ": read error after line " + std::to_string(number));
  if (out.empty()) throw FormatError(path + ": holds no examples");
  return out;
}

std::string prompt_text(const Example& example, const PromptFormat& format) {
  return tiedlora::prompt_text(example.prompt, example.system, format);
}

std::vector<int64_t> prompt_ids(const Tokenizer& tokenizer, const Example& example, const PromptFormat& format) {
  return tiedlora::prompt_ids(tokenizer, example.prompt, example.system, format);
}

TokenizedExample tokenize(const Tokenizer& tokenizer, const Example& example, const PromptFormat& format) {
  TokenizedExample out;
  out.prompt = prompt_ids(tokenizer, example, format);
  out.completion = tokenizer.encode(example.completion, /*add_special_tokens=*/false);
  out.completion.push_back(format.end_token);
  return out;
}

namespace {

// The examples as they enter a batch: the whole completion and the end of the prompt (the question sits
// there) within max_length tokens.
struct TruncatedSequence {
  std::vector<int64_t> tokens;
  int64_t prompt_length = 0;
};

std::vector<TruncatedSequence> truncated(const std::vector<const TokenizedExample*>& examples, int64_t max_length) {
  TORCH_CHECK(!examples.empty(), "make_batch: no examples");
  TORCH_CHECK(max_length >= 2, "make_batch: max_length must be at least 2, got ", max_length);
  std::vector<TruncatedSequence> out;
  for (const TokenizedExample* e : examples) {
    const int64_t completion = static_cast<int64_t>(e->completion.size());
    if (completion + 1 > max_length) {
      throw ConfigError("an example's completion has " + std::to_string(completion) + " tokens, more than max_length " +
                        std::to_string(max_length) + " allows (hint: raise --max-length)");
    }
    const int64_t keep_prompt = std::min<int64_t>(static_cast<int64_t>(e->prompt.size()), max_length - completion);
    TORCH_CHECK(keep_prompt > 0, "make_batch: an example has an empty prompt");
    TruncatedSequence seq;
    seq.tokens.assign(e->prompt.end() - keep_prompt, e->prompt.end());
    seq.tokens.insert(seq.tokens.end(), e->completion.begin(), e->completion.end());
    seq.prompt_length = keep_prompt;
    if (seq.tokens.size() < 2) {
      throw ConfigError("an example has " + std::to_string(seq.tokens.size()) +
                        " token(s); a prompt and a completion of at least one token each are needed");
    }
    out.push_back(std::move(seq));
  }
  return out;
}

// Writes `seq` at column `offset` of row `row`: len - 1 inputs, position j predicting token j + 1, only
// completion tokens (index >= prompt length) as targets.
void place(const TruncatedSequence& seq, int64_t row, int64_t offset, Batch& batch) {
  auto ids = batch.input_ids.accessor<int64_t, 2>();
  auto labels = batch.labels.accessor<int64_t, 2>();
  const int64_t len = static_cast<int64_t>(seq.tokens.size());
  for (int64_t j = 0; j + 1 < len; ++j) {
    ids[row][offset + j] = seq.tokens[j];
    if (j + 1 >= seq.prompt_length) labels[row][offset + j] = seq.tokens[j + 1];
  }
  batch.tokens += len - 1;
  batch.target_tokens += len - seq.prompt_length;
}

}  // namespace

int64_t batch_length(const TokenizedExample& example, int64_t max_length) {
  return std::min<int64_t>(static_cast<int64_t>(example.prompt.size() + example.completion.size()), max_length) - 1;
}

Batch make_batch(const std::vector<const TokenizedExample*>& examples, int64_t pad_id, int64_t max_length) {
  const auto sequences = truncated(examples, max_length);
  int64_t longest = 0;
  for (const auto& seq : sequences) longest = std::max<int64_t>(longest, static_cast<int64_t>(seq.tokens.size()));
  const int64_t n = static_cast<int64_t>(sequences.size());
  Batch batch;
  batch.input_ids = at::full({n, longest - 1}, pad_id, at::kLong);
  batch.labels = at::full({n, longest - 1}, -100, at::kLong);
  for (int64_t i = 0; i < n; ++i) place(sequences[i], i, 0, batch);
  return batch;
}

Batch make_packed_batch(const std::vector<const TokenizedExample*>& examples, int64_t pad_id, int64_t max_length,
                        int64_t row_limit) {
  TORCH_CHECK(row_limit >= 0, "make_packed_batch: row_limit must not be negative, got ", row_limit);
  const auto sequences = truncated(examples, max_length);
  auto inputs = [&](size_t i) { return static_cast<int64_t>(sequences[i].tokens.size()) - 1; };
  // First fit by decreasing length (ties in batch order, so the layout depends on the examples alone).
  std::vector<size_t> order(sequences.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return inputs(a) > inputs(b); });
  std::vector<std::vector<size_t>> rows;
  std::vector<int64_t> used;
  for (size_t i : order) {
    size_t r = 0;
    while (r < rows.size() && row_limit > 0 && used[r] + inputs(i) > row_limit) ++r;
    if (r == rows.size()) {
      rows.emplace_back();
      used.push_back(0);
    }
    rows[r].push_back(i);
    used[r] += inputs(i);
  }
  const int64_t width = *std::max_element(used.begin(), used.end());
  Batch batch;
  batch.input_ids = at::full({static_cast<int64_t>(rows.size()), width}, pad_id, at::kLong);
  batch.labels = at::full({static_cast<int64_t>(rows.size()), width}, -100, at::kLong);
  for (size_t r = 0; r < rows.size(); ++r) {
    std::vector<int64_t> lengths;
    int64_t offset = 0;
    for (size_t i : rows[r]) {
      place(sequences[i], static_cast<int64_t>(r), offset, batch);
      lengths.push_back(inputs(i));
      offset += inputs(i);
    }
    batch.layout.segment_lengths.push_back(std::move(lengths));
  }
  return batch;
}

}  // namespace tiedlora::llm::train
