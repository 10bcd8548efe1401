// tiedlora/llm/train.h: supervised fine-tuning of a CausalLM with adapters — the Tied-LoRA paper's recipe.
//
//   data      JSONL prompt/completion pairs; the chat template applied for instruct models; loss on the
//             completion tokens only; right-padded batches (a causal model never attends to the padding
//             that follows a sequence, so no attention mask is needed).
//   recipe    AdamW, linear warmup then cosine decay, gradient accumulation (the loss is averaged over
//             every completion token of the accumulated batch, so accumulation equals a larger batch),
//             clipping by global norm, early stopping on validation loss with a patience (the best
//             adapter is restored at the end).
//   state     checkpoints (adapter tensors, AdamW moments, the early-stopping state, the RNG) written
//             atomically; resuming from one continues exactly: on the CPU the same losses, bit for bit,
//             as an uninterrupted run; on a GPU as close as its nondeterministic kernels allow (CUDA
//             generator states are saved; docs/finetuning.md lists what stays nondeterministic).
//   eval      greedy decoding and exact match (SQuAD normalisation).
//
// Data order needs no saved state: the example at position k of the training stream is permutation
// number k / N (drawn from the seed and that number) at k mod N, so step s always sees the same examples.
// See docs/finetuning.md.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "tiedlora/formats/merge_checkpoint.h"
#include "tiedlora/llm/causal_lm.h"
#include "tiedlora/llm/distributed.h"
#include "tiedlora/llm/tokenizer.h"

namespace tiedlora::train {

// ---- data -------------------------------------------------------------------------------------------------

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

/// How examples become token ids.
struct PromptFormat {
  /// ChatML (SmolLM2, Qwen): the prompt as a user message, the completion as the assistant's reply ended by
  /// <|im_end|>. Otherwise plain text: prompt then completion then the end-of-sequence token.
  bool chat = false;
  std::optional<std::string> default_system_prompt;
  /// Token that ends a completion (ChatML: <|im_end|>; plain: the tokenizer's eos).
  int64_t end_token = -1;
};

/// The format a model's tokenizer and chat template call for: ChatML when `chat_template` is ChatML (and
/// `use_chat` is not false), else plain. Throws ConfigError when the end token is missing.
PromptFormat prompt_format_for(const Tokenizer& tokenizer, const std::string& chat_template, std::optional<bool> use_chat);

struct TokenizedExample {
  std::vector<int64_t> prompt;      ///< everything the model is given (template included)
  std::vector<int64_t> completion;  ///< the target tokens, ending with the end token
};

/// The prompt text (template applied, ready for generation) of `example`.
std::string prompt_text(const Example& example, const PromptFormat& format);
/// Its token ids, as training and generation see them (a plain prompt gets what the tokenizer adds, a BOS).
std::vector<int64_t> prompt_ids(const Tokenizer& tokenizer, const Example& example, const PromptFormat& format);
TokenizedExample tokenize(const Tokenizer& tokenizer, const Example& example, const PromptFormat& format);

/// A batch: input_ids (rows, T) and labels (rows, T) with -100 where no loss is taken (prompt, padding).
/// labels[t] is the token that follows input_ids[t] in the same example. Padded (make_batch): one example per
/// row, right-padded. Packed (make_packed_batch): examples end to end in few rows, `layout` says where each
/// begins, and the model computes each as if alone.
struct Batch {
  at::Tensor input_ids;
  at::Tensor labels;
  int64_t tokens = 0;         ///< real (unpadded) input tokens
  int64_t target_tokens = 0;  ///< labels that count
  models::PackedLayout layout;  ///< empty: padded rows
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

// ---- recipe -------------------------------------------------------------------------------------------------

/// The learning rate of optimizer step `step` (0-based) of `total`: linear warmup from peak/warmup over
/// `warmup` steps, then cosine decay towards peak * min_ratio, which step == total would reach (the last
/// step taken, total - 1, stays just above it).
double cosine_with_warmup(int64_t step, int64_t total, int64_t warmup, double peak, double min_ratio = 0.0);

struct TrainOptions {
  int64_t max_steps = 100;       ///< optimizer steps
  int64_t batch_size = 8;        ///< examples per micro-batch
  int64_t grad_accum = 1;        ///< micro-batches per optimizer step
  int64_t max_length = 512;      ///< tokens per example after truncation
  double lr = 1e-3;
  int64_t warmup_steps = 0;
  double min_lr_ratio = 0.0;
  double weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double max_grad_norm = 1.0;    ///< <= 0: no clipping
  int64_t eval_every = 0;        ///< validation loss every N steps (0: never)
  int64_t patience = 0;          ///< stop after this many evaluations without improvement (0: never stop early)
  double min_delta = 0.0;        ///< an improvement must lower the validation loss by more than this
  int64_t checkpoint_every = 0;  ///< 0: only on stop requests and at the end
  int64_t keep_checkpoints = 2;  ///< newest checkpoints kept
  int64_t stop_at_step = 0;      ///< checkpoint and stop after this step, as Ctrl-C would (0: off)
  uint64_t seed = 0;
  std::string output_dir;        ///< checkpoints/ and metrics.jsonl go here; empty: none written
  bool autocast_bf16 = false;    ///< CUDA only: bf16 autocast for the forward pass
  /// Packing (make_packed_batch): each micro-batch's examples laid end to end instead of padded; the same
  /// examples in every step, so a packed run follows the padded run step for step. nullopt: on where it is
  /// exact, i.e. unless adapter dropout draws masks (whose draws depend on the layout).
  std::optional<bool> packing;
  int64_t pack_length = 0;       ///< most tokens per packed row (0: one row per micro-batch)
  /// Length-grouped batches (for padded runs): the examples of each run of 50 micro-batches of an epoch's
  /// shuffle are sorted by length, so each micro-batch holds examples of similar length (less padding).
  bool group_by_length = false;
  /// Activation checkpointing per decoder block (CausalLM::set_activation_checkpointing): the same
  /// gradients, less memory, about one more forward pass of time.
  bool checkpoint_activations = false;
  /// Data parallelism (tiedlora/llm/distributed.h; null: this process alone). batch_size stays the global
  /// micro-batch: every rank draws the same stream and takes its contiguous share of each micro-batch (so
  /// batch_size must be at least the world size); the loss is divided by the global count of target tokens;
  /// the trainable gradients, the loss and the stop requests travel in one flat all-reduce per optimizer step;
  /// the initial adapter and a resumed state come from rank 0; validation is sharded and summed. Rank 0 alone
  /// writes output_dir. The N-process run follows the 1-process run step for step (up to float rounding);
  /// a checkpoint resumes with any world size. Not part of the trajectory (not compared on resume).
  std::shared_ptr<distributed::ProcessGroup> process_group;
  /// Anything else a resumed run must share, as text (the example puts the model, the adapter's method,
  /// rank, alpha, dropout and targets, and the prompt format here); compared on resume like the options.
  std::string resume_key;

  /// Throws tiedlora::ConfigError naming the first option out of range. The Trainer calls it; programs
  /// call it before they create an output folder, so a typo leaves nothing behind.
  void validate() const;
};

/// The order of the training stream in epoch `epoch` (the Trainer's data order: example number k of the
/// stream is epoch_order(k / N)[k mod N]): a shuffle drawn from options.seed and the epoch; with
/// group_by_length, sorted longest first within runs of 50 * batch_size.
std::vector<int64_t> epoch_order(const std::vector<TokenizedExample>& train, const TrainOptions& options, int64_t epoch);

/// One optimizer step's numbers (the JSONL metrics line, less timing).
struct StepRecord {
  int64_t step = 0;
  double loss = 0, lr = 0, grad_norm = 0;
  int64_t tokens = 0, target_tokens = 0;
  double seconds = 0;
};

struct TrainResult {
  int64_t steps_done = 0;
  bool stopped_early = false;   ///< patience ran out
  bool interrupted = false;     ///< a stop was requested (stop_requested, stop_at_step); a checkpoint was written
  int64_t best_step = 0;        ///< the step whose adapter is restored (0: no validation)
  double best_validation_loss = 0;
  int64_t tokens = 0;
  double train_seconds = 0;     ///< time spent in training steps (this process)
  std::string last_checkpoint;
};

/// Called after each step and each validation (for progress bars); may be empty.
struct TrainCallbacks {
  /// Called as optimizer step `step` (1-based) begins, before its batches are built.
  std::function<void(int64_t step)> on_step_begin;
  std::function<void(const StepRecord&)> on_step;
  std::function<void(int64_t step, double validation_loss, bool improved)> on_validation;
  /// Asked once per optimizer step (after it; with a process group, before its all-reduce, and every rank
  /// stops when one asked to): true checkpoints and returns (TrainResult::interrupted). The library
  /// installs no signal handler; a program that wants Ctrl-C to stop training sets a flag in its own handler
  /// and returns it here (tools/finetune does).
  std::function<bool()> stop_requested;
};

/// Trains the trainable parameters of `model` (tiedlora::trainable_parameters) on `train`.
class Trainer {
 public:
  /// Checks every example up front (a completion that does not fit max_length, an empty prompt): a
  /// ConfigError names the set and the example's number (its line among the non-blank lines of the JSONL).
  Trainer(models::CausalLM& model, std::vector<TokenizedExample> train, std::vector<TokenizedExample> validation,
          TrainOptions options, int64_t pad_id);
  ~Trainer();

  /// Restores a checkpoint folder written by this class (with a process group: rank 0 reads it and sends
  /// the state to the others, which need not see the folder) (the same trainable parameters, options that fix
  /// the data order and schedule, resume_key and data must match: refused with ConfigError naming the
  /// difference). Checkpoints newer than the one restored belong to the abandoned run and are removed.
  void resume_from(const std::string& checkpoint);
  /// Newest checkpoint under `output_dir`/checkpoints, or "" when none.
  static std::string latest_checkpoint(const std::string& output_dir);

  TrainResult run(const TrainCallbacks& callbacks = {});
  /// The options in force (TrainOptions::packing resolved).
  const TrainOptions& options() const;
  /// Mean loss per completion token over the validation set (no grad, eval mode; sharded over the process
  /// group, so every rank calls it).
  double validation_loss();

 private:
  struct State;
  std::unique_ptr<State> s_;
};

/// Summed cross-entropy over the completion tokens of `batch` (fp32; padded or packed); the output head is
/// applied to those positions only.
at::Tensor completion_loss_sum(models::CausalLM& model, const Batch& batch);

// ---- output ---------------------------------------------------------------------------------------------

/// Creates `dir` for a run. A folder that already holds a run (metrics.jsonl or checkpoints/) is refused
/// with ConfigError (hint: resume or overwrite) unless `resume` (kept as it is) or `overwrite` (the earlier
/// run's files are removed).
void prepare_output_dir(const std::string& dir, bool resume, bool overwrite);

/// merge-weights (tiedlora/formats/merge_checkpoint.h) of the adapter saved from `model` into its base `model_path`, written to
/// `out` (replaced if it exists). merge-weights reads Hugging Face checkpoints, so a GGUF base is first
/// written as one (models::save_pretrained, in fp32, into a temporary folder beside `out` that is removed
/// afterwards). `model` must not be merged in memory. `stop_requested` (may be empty) is the merge's
/// (MergeOptions::stop_requested): true abandons it with tiedlora::Cancelled, nothing left behind.
MergeReport merge_trained(const models::CausalLM& model, const std::string& model_path, const std::string& adapter_dir,
                          const std::string& out, const std::function<bool()>& stop_requested = {});

/// Writes `text` to `path` atomically (a temporary file beside it, renamed into place), for run outputs such
/// as summaries and predictions: a crash never leaves half a file.
void write_text_file(const std::string& path, const std::string& text);

// ---- evaluation -------------------------------------------------------------------------------------------

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
/// left-padded batches of `batch_size` (models::generate_greedy_batch), and compares normalize_answer() of
/// the text with the expected completion's. With a `group` of several processes each rank decodes its
/// contiguous share and every rank gets all predictions, in order (on_progress counts this rank's share).
ExactMatch exact_match(models::CausalLM& model, const Tokenizer& tokenizer, const std::vector<Example>& examples,
                       const PromptFormat& format, int64_t max_new_tokens, int64_t batch_size,
                       const std::function<void(size_t done, size_t total)>& on_progress = {},
                       distributed::ProcessGroup* group = nullptr);

}  // namespace tiedlora::train
