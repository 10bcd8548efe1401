// tiedlora/llm/data.h: fine-tuning data: JSONL prompt/completion pairs, their token ids under a prompt
// format (tiedlora/llm/chat.h), and batches with the loss on the completion tokens only, padded (one example
// per row) or packed (examples end to end, each computed as if alone). Part of tiedlora/llm/train.h.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "tiedlora/llm/causal_lm.h"
#include "tiedlora/llm/chat.h"
#include "tiedlora/llm/tokenizer.h"

namespace tiedlora::llm::train {

// The prompt format is the chat layer's (tiedlora/llm/chat.h): generation encodes prompts the same way.
using tiedlora::prompt_format_for;
using tiedlora::PromptFormat;

/// One prompt/completion pair, as read from JSONL: {"prompt": ..., "completion": ...}, an optional
/// "system" message and an optional "task" label (accuracy is also reported per task); other keys are
/// ignored.
struct Example {
  std::string prompt;
  std::string completion;
  std::string system;  ///< empty: the chat template's default system prompt, if any
  std::string task;    ///< optional grouping label for per-task accuracy
};

/// Reads a JSONL file; throws tiedlora::FormatError naming the file and line for malformed JSON, a
/// missing or non-string "prompt"/"completion", an empty file.
std::vector<Example> read_jsonl(const std::string& path);

struct TokenizedExample {
  std::vector<int64_t> prompt;      ///< everything the model is given (template included)
  std::vector<int64_t> completion;  ///< the target tokens, ending with the end token
};

/// The prompt text of `example` (its prompt and system message; tiedlora::prompt_text).
std::string prompt_text(const Example& example, const PromptFormat& format);
/// Its token ids (tiedlora::prompt_ids).
std::vector<int64_t> prompt_ids(const Tokenizer& tokenizer, const Example& example, const PromptFormat& format);
TokenizedExample tokenize(const Tokenizer& tokenizer, const Example& example, const PromptFormat& format);

/// A batch: input_ids (rows, T) and labels (rows, T) with -100 where no loss is taken (prompt, padding).
/// labels[t] is the token that follows input_ids[t] in the same example. Padded (make_batch): one example per
/// row, right-padded. Packed (make_packed_batch): examples end to end in few rows, `layout` says where each
/// begins, and the model computes each as if alone.
struct Batch {
  at::Tensor input_ids;
  at::Tensor labels;
  int64_t tokens = 0;                ///< real (unpadded) input tokens
  int64_t target_tokens = 0;         ///< labels that count
  llm::models::PackedLayout layout;  ///< empty: padded rows
  bool packed() const { return !layout.segment_lengths.empty(); }
};

/// Right-pads `examples` to the longest (at most max_length tokens: the prompt is cut from the left when
/// an example is longer; a completion that alone exceeds max_length is refused with ConfigError).
Batch make_batch(const std::vector<const TokenizedExample*>& examples, int64_t pad_id, int64_t max_length);

/// The same examples, truncated as make_batch does, laid end to end: one row when `row_limit` is 0, else
/// as few rows of at most `row_limit` tokens as first-fit by decreasing length finds (an example longer than
/// the limit gets a row of its own); shorter rows end in padding (outside every segment). Its loss and
/// gradients are those of make_batch's batch, up to float rounding.
Batch make_packed_batch(const std::vector<const TokenizedExample*>& examples, int64_t pad_id, int64_t max_length,
                        int64_t row_limit = 0);

/// Input tokens of `example` in a batch (after make_batch's truncation to max_length): its cost.
int64_t batch_length(const TokenizedExample& example, int64_t max_length);

}  // namespace tiedlora::llm::train
