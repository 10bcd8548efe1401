// tiedlora/llm/trainer.h: the Trainer: supervised fine-tuning of a CausalLM's adapters with the Tied-LoRA
// paper's recipe (AdamW, warmup then cosine decay, gradient accumulation, clipping, early stopping),
// checkpoints that resume exactly, data parallelism over a process group, and the run's output folder and
// merge. Part of tiedlora/llm/train.h (which says what each part promises); docs/finetuning.md.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "tiedlora/formats/merge_checkpoint.h"
#include "tiedlora/llm/causal_lm.h"
#include "tiedlora/llm/data.h"
#include "tiedlora/llm/distributed.h"

namespace tiedlora::llm::train {

/// The learning rate of optimizer step `step` (0-based) of `total`: linear warmup from peak/warmup over
/// `warmup` steps, then cosine decay towards peak * min_ratio, which step == total would reach (the last
/// step taken, total - 1, stays just above it).
double cosine_with_warmup(int64_t step, int64_t total, int64_t warmup, double peak, double min_ratio = 0.0);

struct TrainOptions {
  int64_t max_steps = 100;   ///< optimizer steps
  int64_t batch_size = 8;    ///< examples per micro-batch
  int64_t grad_accum = 1;    ///< micro-batches per optimizer step
  int64_t max_length = 512;  ///< tokens per example after truncation
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
  std::string output_dir;      ///< checkpoints/ and metrics.jsonl go here; empty: none written
  bool autocast_bf16 = false;  ///< CUDA only: bf16 autocast for the forward pass
  /// Packing (make_packed_batch): each micro-batch's examples laid end to end instead of padded; the same
  /// examples in every step, so a packed run follows the padded run step for step. nullopt: on where it is
  /// exact, i.e. unless adapter dropout draws masks (whose draws depend on the layout).
  std::optional<bool> packing;
  int64_t pack_length = 0;  ///< most tokens per packed row (0: one row per micro-batch)
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
std::vector<int64_t> epoch_order(const std::vector<TokenizedExample>& train, const TrainOptions& options,
                                 int64_t epoch);

/// One optimizer step's numbers (the JSONL metrics line, less timing).
struct StepRecord {
  int64_t step = 0;
  double loss = 0, lr = 0, grad_norm = 0;
  int64_t tokens = 0, target_tokens = 0;
  double seconds = 0;
};

struct TrainResult {
  int64_t steps_done = 0;
  bool stopped_early = false;  ///< patience ran out
  bool interrupted = false;    ///< a stop was requested (stop_requested, stop_at_step); a checkpoint was written
  int64_t best_step = 0;       ///< the step whose adapter is restored (0: no validation)
  double best_validation_loss = 0;
  int64_t tokens = 0;
  double train_seconds = 0;  ///< time spent in training steps (this process)
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
  Trainer(llm::models::CausalLM& model, std::vector<TokenizedExample> train, std::vector<TokenizedExample> validation,
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
at::Tensor completion_loss_sum(llm::models::CausalLM& model, const Batch& batch);

// ---- output ---------------------------------------------------------------------------------------------

/// The file a run leaves in its output folder first (kRunMarker): what says that tiedlora wrote the run's
/// outputs there (metrics.jsonl, checkpoints/, adapter/, merged/, loss.png, summary.json, eval_before.json,
/// predictions_before.jsonl, predictions_after.jsonl, profile.md), so that overwrite removes those and only
/// those.
inline constexpr const char* kRunMarker = "tiedlora_run.json";

/// Creates `dir` for a run, before anything is written, and leaves kRunMarker in it. Refused with ConfigError,
/// touching nothing:
///   - when one of the run's outputs in `dir` (above) is, contains or lies inside one of `inputs` (label,
///     path: the model, the data files): the run, or overwrite, would destroy that input;
///   - when `dir` holds an earlier run (kRunMarker) and neither `resume` (kept as it is) nor `overwrite` (the
///     earlier run's outputs removed, nothing else) is set;
///   - when `dir` holds one of the run's output names without kRunMarker and `resume` is not set (not written
///     by a run of tiedlora, or by one before the marker existed: overwrite removes nothing there).
void prepare_output_dir(const std::string& dir, bool resume, bool overwrite,
                        const std::vector<std::pair<std::string, std::string>>& inputs = {});

/// merge-weights (tiedlora/formats/merge_checkpoint.h) of the adapter saved from `model` into its base `model_path`,
/// written to `out` (replaced if it exists). merge-weights reads Hugging Face checkpoints, so a GGUF base is first
/// written as one (llm::models::save_pretrained, in fp32, into a temporary folder beside `out` that is removed
/// afterwards). `model` must not be merged in memory. `stop_requested` (may be empty) is the merge's
/// (MergeOptions::stop_requested): true abandons it with tiedlora::Cancelled, nothing left behind.
MergeReport merge_trained(const llm::models::CausalLM& model, const std::string& model_path,
                          const std::string& adapter_dir, const std::string& out,
                          const std::function<bool()>& stop_requested = {});

}  // namespace tiedlora::llm::train
