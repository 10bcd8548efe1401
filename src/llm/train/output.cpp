// output.cpp: the output folder of a training run and the merge of its trained adapter into the base
// (tiedlora/llm/trainer.h, "output").
#include "tiedlora/core/error.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/llm/trainer.h"
#include "util/files.h"

namespace tiedlora::llm::train {

void prepare_output_dir(const std::string& dir, bool resume, bool overwrite) {
  const std::string metrics = util::join_path(dir, "metrics.jsonl"), checkpoints = util::join_path(dir, "checkpoints");
  const bool used = util::path_exists(metrics) || util::path_exists(checkpoints);
  if (used && !resume) {
    if (!overwrite) throw ConfigError(dir + ": holds an earlier run (hint: resume it, or overwrite to start over)");
    for (const std::string name :
         {"metrics.jsonl", "checkpoints", "adapter", "merged", "loss.png", "summary.json", "eval_before.json",
          "predictions_before.jsonl", "predictions_after.jsonl", "profile.md"}) {
      util::remove_tree(util::join_path(dir, name));
    }
  }
  util::make_directories(dir);
}

MergeReport merge_trained(const llm::models::CausalLM& model, const std::string& model_path,
                          const std::string& adapter_dir, const std::string& out,
                          const std::function<bool()>& stop_requested) {
  MergeOptions merge;
  merge.stop_requested = stop_requested;
  merge.base = model_path;
  merge.adapter = adapter_dir;
  merge.out = out;
  merge.force = true;
  for (const auto& [name, layer] : adapted_layers(model)) {
    if (layer->merged())
      throw ConfigError("merge_trained: layer '" + name + "' is merged in memory (hint: unmerge it first)");
  }
  if (!llm::models::is_gguf_path(model_path)) return merge_checkpoint(merge);
  util::StagedDirectory staged(out + ".base");  // removed on return: the HF copy of the GGUF base is scratch
  merge.base = util::join_path(staged.path(), "model");
  llm::models::save_pretrained(model, merge.base);
  if (stop_requested && stop_requested())
    throw Cancelled("merge of " + out + " stopped before it began; nothing was written");
  return merge_checkpoint(merge);
}

}  // namespace tiedlora::llm::train
