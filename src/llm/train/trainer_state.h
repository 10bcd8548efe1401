// trainer_state.h (private): the Trainer's state, shared by the run loop (trainer.cpp) and the checkpoints
// that save, restore and share it (checkpoint.cpp).
#pragma once

#include <cstdint>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <nlohmann/json.hpp>
#include <torch/optim/adamw.h>

#include "tiedlora/core/error.h"
#include "tiedlora/llm/trainer.h"
#include "util/files.h"

namespace tiedlora::llm::train {

using nlohmann::json;

// One flat tensor of `tensors` (all of one dtype and device) and back: a collective per step, not per tensor.
at::Tensor flatten(const std::vector<at::Tensor>& tensors);
void unflatten(const at::Tensor& flat, const std::vector<at::Tensor>& tensors);

/// "step-00000012": a checkpoint's folder name, which sorts by step.
std::string checkpoint_name(int64_t step);

struct Trainer::State {
  llm::models::CausalLM& model;
  std::vector<TokenizedExample> train, validation;
  TrainOptions options;
  int64_t pad_id;
  std::shared_ptr<distributed::ProcessGroup> group;        // never null: a world of 1 without options.process_group
  std::vector<std::pair<std::string, at::Tensor>> params;  // trainable, each tensor once
  std::unique_ptr<torch::optim::AdamW> optimizer;
  int64_t step = 0;  // optimizer steps done
  int64_t best_step = 0, bad_evaluations = 0;
  bool stopped_early = false;  // patience ran out: a resumed run must not train on
  double best_validation_loss = 0;
  std::vector<at::Tensor> best;  // the best adapter's values (undefined until a validation)
  int64_t tokens = 0;
  double train_seconds = 0;
  // Adapter dropout's generators: the Trainer's own (seeded from options.seed, saved in checkpoints), so a
  // run never writes the global generators and its masks do not depend on what else drew from them.
  at::Generator cpu_dropout;
  at::Generator device_dropout;  // the trainable tensors' CUDA device's; undefined on the CPU
  std::vector<at::Generator> dropout_generators() const {
    return device_dropout.defined() ? std::vector<at::Generator>{cpu_dropout, device_dropout}
                                    : std::vector<at::Generator>{cpu_dropout};
  }
  // The permutation of the current epoch of the training stream.
  int64_t cached_epoch = -1;
  std::vector<int64_t> permutation;

  State(llm::models::CausalLM& m, std::vector<TokenizedExample> t, std::vector<TokenizedExample> v, TrainOptions o,
        int64_t pad)
      : model(m),
        train(std::move(t)),
        validation(std::move(v)),
        options(std::move(o)),
        pad_id(pad),
        group(options.process_group ? options.process_group : distributed::single_process()),
        cpu_dropout(at::detail::createCPUGenerator(options.seed)) {}

  int world() const { return group->world_size(); }
  // Rank 0's values of `tensors` on every rank.
  void share(const std::vector<at::Tensor>& tensors, const std::string& what) {
    if (world() == 1 || tensors.empty()) return;
    at::Tensor flat = flatten(tensors);
    group->broadcast(flat, 0, what);
    unflatten(flat, tensors);
  }
  void share_state();

  const TokenizedExample& stream_example(int64_t position) {
    const int64_t n = static_cast<int64_t>(train.size());
    const int64_t epoch = position / n;
    if (epoch != cached_epoch) {
      permutation = epoch_order(train, options, epoch);
      cached_epoch = epoch;
    }
    return train[permutation[position % n]];
  }

  Batch make_micro_batch(const std::vector<const TokenizedExample*>& items) const {
    return *options.packing ? make_packed_batch(items, pad_id, options.max_length, options.pack_length)
                            : make_batch(items, pad_id, options.max_length);
  }

  std::string metrics_path() const {
    return options.output_dir.empty() ? "" : util::join_path(options.output_dir, "metrics.jsonl");
  }
  void append_metrics(const json& line) const {
    const std::string path = metrics_path();
    if (path.empty() || !group->is_main()) return;
    std::ofstream out(path, std::ios::app);
    out << line.dump() << "\n";
    if (!out) throw Error(path + ": cannot be written");
  }
  std::string checkpoint_dir() const { return util::join_path(options.output_dir, "checkpoints"); }
  std::string checkpoint_folder() const { return util::join_path(checkpoint_dir(), checkpoint_name(step)); }
  /// Writes the checkpoint of this step (rank 0; every rank returns its folder).
  std::string write_checkpoint();
  /// Sums the step's gradients, loss sum and stop request over the ranks (see run()).
  void all_reduce_step(std::vector<at::Tensor>& tensors, double& loss_sum, bool& stop_requested, int64_t step_number);
  void load_checkpoint(const std::string& folder);
};

}  // namespace tiedlora::llm::train
