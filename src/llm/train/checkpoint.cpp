// checkpoint.cpp: the Trainer's checkpoints: written atomically by rank 0 (adapter, AdamW moments, best
// adapter, RNG states, counters and the options that fix the trajectory), the newest few kept; restored only
// when the run's options and data match; shared from rank 0 to the other ranks.
#include <algorithm>
#include <cstdio>
#include <fstream>

#include <ATen/ATen.h>

#include "llm/train/trainer_state.h"
#include "tiedlora/core/error.h"
#include "tiedlora/formats/safetensors.h"
#include "util/text.h"

namespace tiedlora::llm::train {
namespace {

constexpr const char* kStateFormat = "tiedlora-trainer-1";

// The options that fix the sequence of data, learning rates and updates: a resumed run must share them.
json trajectory_options(const TrainOptions& o) {
  return {{"max_steps", o.max_steps},
          {"batch_size", o.batch_size},
          {"grad_accum", o.grad_accum},
          {"max_length", o.max_length},
          {"lr", o.lr},
          {"warmup_steps", o.warmup_steps},
          {"min_lr_ratio", o.min_lr_ratio},
          {"weight_decay", o.weight_decay},
          {"beta1", o.beta1},
          {"beta2", o.beta2},
          {"eps", o.eps},
          {"max_grad_norm", o.max_grad_norm},
          {"eval_every", o.eval_every},
          {"patience", o.patience},
          {"min_delta", o.min_delta},
          {"seed", o.seed},
          {"autocast_bf16", o.autocast_bf16},
          {"packing", o.packing.value_or(false)},
          {"pack_length", o.packing.value_or(false) ? o.pack_length : 0},
          {"group_by_length", o.group_by_length},
          {"resume_key", o.resume_key}};
}

// What a checkpoint written before an option existed ran with: such checkpoints resume when this run
// does the same (padded batches, as every run did before packing).
json legacy_value(const std::string& key) {
  if (key == "packing" || key == "group_by_length") return false;
  if (key == "pack_length") return 0;
  return nullptr;
}

// FNV-1a over the token ids of a data set: a resumed run must train on the same data, not only as much.
uint64_t data_fingerprint(const std::vector<TokenizedExample>& examples) {
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&](int64_t v) {
    for (int i = 0; i < 8; ++i) {
      h ^= static_cast<uint64_t>(v >> (8 * i)) & 0xFF;
      h *= 1099511628211ULL;
    }
  };
  for (const auto& e : examples) {
    mix(static_cast<int64_t>(e.prompt.size()));
    for (int64_t id : e.prompt) mix(id);
    mix(static_cast<int64_t>(e.completion.size()));
    for (int64_t id : e.completion) mix(id);
  }
  return h;
}

// The finished checkpoints in `dir` (not the temporary folders of one being written), oldest first: the
// names sort by step.
std::vector<std::string> checkpoint_names(const std::string& dir) {
  std::vector<std::string> names;
  if (!util::is_directory(dir)) return names;
  for (const auto& name : util::list_directory(dir)) {
    if (name.rfind("step-", 0) == 0 && name.find(".tmp") == std::string::npos) names.push_back(name);
  }
  return names;
}

}  // namespace

std::string checkpoint_name(int64_t step) {
  char name[32];
  std::snprintf(name, sizeof name, "step-%08lld", static_cast<long long>(step));
  return name;
}

std::string Trainer::latest_checkpoint(const std::string& output_dir) {
  const std::string dir = util::join_path(output_dir, "checkpoints");
  const auto names = checkpoint_names(dir);
  return names.empty() ? "" : util::join_path(dir, names.back());
}

std::string Trainer::State::write_checkpoint() {
  const std::string folder = checkpoint_folder();
  if (!group->is_main()) return folder;
  util::make_directories(checkpoint_dir());
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  const auto& state = optimizer->state();
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& [name, p] = params[i];
    tensors.emplace_back("param." + name, p.detach().cpu());
    auto it = state.find(p.unsafeGetTensorImpl());
    if (it != state.end()) {
      const auto& adam = static_cast<const torch::optim::AdamWParamState&>(*it->second);
      tensors.emplace_back("exp_avg." + name, adam.exp_avg().cpu());
      tensors.emplace_back("exp_avg_sq." + name, adam.exp_avg_sq().cpu());
    }
    if (!best.empty()) tensors.emplace_back("best." + name, best[i].cpu());
  }
  // Adapter dropout's generators (the Trainer's own): the CPU's, and on a GPU that device's too.
  tensors.emplace_back("rng.cpu", cpu_dropout.get_state());
  if (device_dropout.defined()) {
    tensors.emplace_back("rng.cuda." + std::to_string(device_dropout.device().index()), device_dropout.get_state());
  }
  json meta = {{"format", kStateFormat},
               {"step", step},
               {"best_step", best_step},
               {"best_validation_loss", best_validation_loss},
               {"bad_evaluations", bad_evaluations},
               {"stopped_early", stopped_early},
               {"data_fingerprint",
                std::to_string(data_fingerprint(train)) + "-" + std::to_string(data_fingerprint(validation))},
               {"tokens", tokens},
               {"train_seconds", train_seconds},
               {"train_examples", train.size()},
               {"validation_examples", validation.size()},
               {"options", trajectory_options(options)}};
  {
    util::StagedDirectory staged(folder);
    formats::save_safetensors(util::join_path(staged.path(), "state.safetensors"), tensors);
    const std::string text = meta.dump(2) + "\n";
    util::write_file_atomically(util::join_path(staged.path(), "trainer_state.json"),
                                [&](const util::ByteWriter& write) { write(text.data(), text.size()); });
    staged.publish(/*overwrite=*/true);
  }
  // Keep the newest few.
  const std::vector<std::string> existing = checkpoint_names(checkpoint_dir());
  const int64_t keep = std::max<int64_t>(1, options.keep_checkpoints);
  for (int64_t i = 0; i + keep < static_cast<int64_t>(existing.size()); ++i) {
    if (util::join_path(checkpoint_dir(), existing[i]) != folder)
      util::remove_tree_quietly(util::join_path(checkpoint_dir(), existing[i]));
  }
  return folder;
}

void Trainer::State::load_checkpoint(const std::string& folder) {
  const std::string meta_path = util::join_path(folder, "trainer_state.json");
  const std::string tensors_path = util::join_path(folder, "state.safetensors");
  if (!util::is_regular_file(meta_path) || !util::is_regular_file(tensors_path)) {
    throw FormatError(folder + ": not a checkpoint (trainer_state.json and state.safetensors expected)");
  }
  const json meta = util::parse_json_strict(util::read_text_file(meta_path), meta_path);
  if (!meta.is_object() || meta.value("format", "") != kStateFormat) {
    throw FormatError(meta_path + ": not a tiedlora trainer state (format '" + std::string(kStateFormat) +
                      "' expected)");
  }
  int64_t saved_step = 0, saved_best_step = 0, saved_bad = 0, saved_tokens = 0;
  double saved_best_loss = 0, saved_seconds = 0;
  bool saved_stopped_early = false;
  std::string saved_fingerprint;
  json saved;
  try {
    saved = meta.at("options");
    saved_step = meta.at("step").get<int64_t>();
    saved_best_step = meta.at("best_step").get<int64_t>();
    saved_best_loss = meta.at("best_validation_loss").get<double>();
    saved_bad = meta.at("bad_evaluations").get<int64_t>();
    saved_tokens = meta.at("tokens").get<int64_t>();
    saved_seconds = meta.at("train_seconds").get<double>();
    saved_stopped_early = meta.at("stopped_early").get<bool>();
    saved_fingerprint = meta.at("data_fingerprint").get<std::string>();
  } catch (const json::exception& e) {
    throw FormatError(meta_path + ": missing or mistyped field (" + std::string(e.what()) + ")");
  }
  const json expected = trajectory_options(options);
  for (const auto& [key, value] : expected.items()) {
    const json was = saved.contains(key) ? saved.at(key) : legacy_value(key);
    if (was != value) {
      const std::string hint = key == "packing" ? (was == false ? "resume with --no-packing" : "resume with --packing")
                                                : "resume with the original options";
      throw ConfigError(folder + ": the checkpoint was made with " + key + " = " +
                        (was.is_null() ? "(unset)" : was.dump()) + ", this run has " + value.dump() +
                        " (hint: " + hint + "; a different setting would not continue exactly)");
    }
  }
  const std::string fingerprint =
      std::to_string(data_fingerprint(train)) + "-" + std::to_string(data_fingerprint(validation));
  if (saved_fingerprint != fingerprint) {
    throw ConfigError(folder +
                      ": the checkpoint was made with other training or validation data (hint: resume with "
                      "the original files, tokenizer and prompt format)");
  }
  const auto file = formats::SafetensorsFile::open(tensors_path);
  // Check every tensor before changing anything.
  if (!file.contains("rng.cpu")) throw FormatError(tensors_path + ": missing 'rng.cpu'");
  for (const auto& [name, p] : params) {
    for (const std::string prefix : {"param.", "exp_avg.", "exp_avg_sq."}) {
      const std::string key = prefix + name;
      if (!file.contains(key))
        throw FormatError(tensors_path + ": missing '" + key + "' (hint: was the adapter configured the same way?)");
      if (file.tensor(key).sizes() != p.sizes()) {
        throw FormatError(tensors_path + ": '" + key +
                          "' has another shape than the parameter (hint: same --rank and --method?)");
      }
    }
  }
  at::NoGradGuard no_grad;
  auto& state = optimizer->state();
  best.clear();
  for (const auto& [name, p] : params) {
    p.copy_(file.tensor("param." + name));
    auto adam = std::make_unique<torch::optim::AdamWParamState>();
    adam->step(saved_step);
    adam->exp_avg(file.tensor("exp_avg." + name).to(p.device()).clone());
    adam->exp_avg_sq(file.tensor("exp_avg_sq." + name).to(p.device()).clone());
    state[p.unsafeGetTensorImpl()] = std::move(adam);
    if (file.contains("best." + name)) best.push_back(file.tensor("best." + name).to(p.device()).clone());
  }
  if (!best.empty() && best.size() != params.size())
    throw FormatError(tensors_path + ": the best adapter is incomplete");
  cpu_dropout.set_state(file.tensor("rng.cpu").clone());
  if (device_dropout.defined()) {
    // Absent when written on a machine without this GPU: the generator then stays as seeded.
    const std::string name = "rng.cuda." + std::to_string(device_dropout.device().index());
    if (file.contains(name)) device_dropout.set_state(file.tensor(name).clone());
  }
  step = saved_step;
  best_step = saved_best_step;
  best_validation_loss = saved_best_loss;
  bad_evaluations = saved_bad;
  tokens = saved_tokens;
  train_seconds = saved_seconds;
  stopped_early = saved_stopped_early;
  // Newer checkpoints belong to the run being abandoned.
  for (const auto& name : checkpoint_names(checkpoint_dir())) {
    if (name > checkpoint_name(step)) util::remove_tree(util::join_path(checkpoint_dir(), name));
  }
  // The metrics file continues from the checkpoint: later lines belonged to the interrupted run.
  const std::string path = metrics_path();
  if (!path.empty() && util::is_regular_file(path)) {
    std::ifstream in(path);
    std::string line, kept;
    while (std::getline(in, line)) {
      json j = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!j.is_object() || !j.contains("step") || !j.at("step").is_number_integer()) continue;  // a torn line
      if (j.at("step").get<int64_t>() > step) break;
      kept += line + "\n";
    }
    util::write_file_atomically(path, [&](const util::ByteWriter& write) { write(kept.data(), kept.size()); });
  }
}

void Trainer::resume_from(const std::string& checkpoint) {
  if (s_->group->is_main()) s_->load_checkpoint(checkpoint);
  s_->share_state();
}

// Rank 0 has read a checkpoint; the others take its counters, adapter, AdamW moments and best adapter.
void Trainer::State::share_state() {
  if (world() == 1) return;
  at::Tensor counters = at::tensor({static_cast<double>(step), static_cast<double>(best_step), best_validation_loss,
                                    static_cast<double>(bad_evaluations), static_cast<double>(tokens), train_seconds,
                                    stopped_early ? 1.0 : 0.0, best.empty() ? 0.0 : 1.0},
                                   at::kDouble);
  group->broadcast(counters, 0, "the checkpoint's counters");
  const auto c = counters.accessor<double, 1>();
  step = static_cast<int64_t>(c[0]);
  best_step = static_cast<int64_t>(c[1]);
  best_validation_loss = c[2];
  bad_evaluations = static_cast<int64_t>(c[3]);
  tokens = static_cast<int64_t>(c[4]);
  train_seconds = c[5];
  stopped_early = c[6] != 0;
  const bool has_best = c[7] != 0;
  std::vector<at::Tensor> tensors;
  auto& state = optimizer->state();
  if (!group->is_main()) best.clear();
  for (const auto& [name, p] : params) {
    tensors.push_back(p);
    if (step > 0) {
      auto& slot = state[p.unsafeGetTensorImpl()];
      if (!slot) {
        auto adam = std::make_unique<torch::optim::AdamWParamState>();
        adam->exp_avg(at::zeros_like(p, at::MemoryFormat::Contiguous));
        adam->exp_avg_sq(at::zeros_like(p, at::MemoryFormat::Contiguous));
        slot = std::move(adam);
      }
      auto& adam = static_cast<torch::optim::AdamWParamState&>(*slot);
      adam.step(step);
      tensors.push_back(adam.exp_avg());
      tensors.push_back(adam.exp_avg_sq());
    }
    if (has_best && !group->is_main()) best.push_back(at::zeros_like(p, at::MemoryFormat::Contiguous));
  }
  for (const auto& b : best) tensors.push_back(b);
  share(tensors, "the checkpoint's adapter and optimizer state");
}

}  // namespace tiedlora::llm::train
