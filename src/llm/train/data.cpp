// data.cpp: JSONL prompt/completion data, prompt formats, padded batches, and exact-match evaluation by
// greedy decoding (tiedlora/llm/train.h).
#include <algorithm>
#include <cctype>
#include <fstream>
#include <sstream>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "tiedlora/core/error.h"
#include "tiedlora/llm/train.h"
#include "util/files.h"

namespace tiedlora::train {

using nlohmann::json;

std::vector<Example> read_jsonl(const std::string& path) {
  if (!util::is_regular_file(path)) throw FormatError(path + ": no such file (hint: give a JSONL file of {\"prompt\", \"completion\"} lines)");
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
    if (example.completion.empty()) throw FormatError(path + ":" + std::to_string(number) + ": \"completion\" is empty");
    out.push_back(std::move(example));
  }
  if (in.bad()) throw FormatError(path + ": read error after line " + std::to_string(number));
  if (out.empty()) throw FormatError(path + ": holds no examples");
  return out;
}

PromptFormat prompt_format_for(const Tokenizer& tokenizer, const std::string& chat_template, std::optional<bool> use_chat) {
  PromptFormat format;
  const ChatTemplateInfo info = inspect_chat_template(chat_template);
  if (use_chat.value_or(info.is_chatml) && !info.is_chatml) {
    throw ConfigError("the model's chat template is " + std::string(chat_template.empty() ? "missing" : "not ChatML") +
                      " (hint: train on plain text without the chat option)");
  }
  format.chat = use_chat.value_or(info.is_chatml);
  if (format.chat) {
    format.default_system_prompt = info.default_system_prompt;
    const auto end = tokenizer.token_to_id("<|im_end|>");
    if (!end) throw ConfigError("ChatML needs the <|im_end|> token, which the tokenizer lacks");
    format.end_token = *end;
  } else {
    const auto eos = tokenizer.eos_id();
    if (!eos) throw ConfigError("the tokenizer has no end-of-sequence token to end completions with");
    format.end_token = *eos;
  }
  return format;
}

std::string prompt_text(const Example& example, const PromptFormat& format) {
  if (!format.chat) return example.prompt;
  std::vector<ChatMessage> messages;
  if (!example.system.empty()) messages.push_back({"system", example.system});
  messages.push_back({"user", example.prompt});
  return apply_chatml_template(messages, /*add_generation_prompt=*/true, format.default_system_prompt);
}

std::vector<int64_t> prompt_ids(const Tokenizer& tokenizer, const Example& example, const PromptFormat& format) {
  // Special tokens of the template are in the text; a plain prompt gets what the tokenizer adds (a BOS).
  const auto ids = tokenizer.encode(prompt_text(example, format), /*add_special_tokens=*/!format.chat);
  return {ids.begin(), ids.end()};
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

ExactMatch exact_match(models::CausalLM& model, const Tokenizer& tokenizer, const std::vector<Example>& examples,
                       const PromptFormat& format, int64_t max_new_tokens, int64_t batch_size,
                       const std::function<void(size_t, size_t)>& on_progress, distributed::ProcessGroup* group) {
  if (group && group->world_size() > 1) {
    // Each rank decodes its share; the predictions come back as JSON lines, in rank (hence example) order.
    const auto [begin, end] = distributed::shard_range(static_cast<int64_t>(examples.size()), group->rank(), group->world_size());
    const std::vector<Example> share(examples.begin() + begin, examples.begin() + end);
    const ExactMatch mine = exact_match(model, tokenizer, share, format, max_new_tokens, batch_size, on_progress);
    std::string lines;
    for (const auto& p : mine.predictions) {
      lines += nlohmann::json{{"task", p.task}, {"prompt", p.prompt}, {"expected", p.expected}, {"generated", p.generated},
                              {"correct", p.correct}}.dump() + "\n";
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
  models::GenerateOptions options;
  options.max_new_tokens = max_new_tokens;
  options.stop_token_ids = {format.end_token};
  if (auto eos = tokenizer.eos_id(); eos && *eos != format.end_token) options.stop_token_ids.push_back(*eos);
  for (size_t first = 0; first < examples.size(); first += static_cast<size_t>(std::max<int64_t>(1, batch_size))) {
    const size_t last = std::min(examples.size(), first + static_cast<size_t>(std::max<int64_t>(1, batch_size)));
    std::vector<std::vector<int64_t>> prompts;
    for (size_t i = first; i < last; ++i) prompts.push_back(prompt_ids(tokenizer, examples[i], format));
    const auto generated = models::generate_greedy_batch(model, prompts, options);
    for (size_t i = first; i < last; ++i) {
      const Example& e = examples[i];
      const auto& tokens = generated[i - first];
      Prediction p;
      p.task = e.task;
      p.prompt = e.prompt;
      p.expected = e.completion;
      p.generated = tokenizer.decode({tokens.begin(), tokens.end()}, /*skip_special_tokens=*/true);
      p.correct = normalize_answer(p.generated) == normalize_answer(p.expected);
      result.correct += p.correct;
      result.predictions.push_back(std::move(p));
    }
    if (on_progress) on_progress(last, examples.size());
  }
  return result;
}

}  // namespace tiedlora::train
