// output.cpp: the output folder of a training run and the merge of its trained adapter into the base
// (tiedlora/llm/trainer.h, "output").
#include "tiedlora/core/error.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/formats/files.h"
#include "tiedlora/llm/trainer.h"
#include "util/files.h"

namespace tiedlora::llm::train {

namespace {

// What a run writes in its output folder (tiedlora_finetune, the examples), kRunMarker aside.
constexpr const char* kRunOutputs[] = {"metrics.jsonl",
                                       "checkpoints",
                                       "adapter",
                                       "merged",
                                       "loss.png",
                                       "summary.json",
                                       "eval_before.json",
                                       "predictions_before.jsonl",
                                       "predictions_after.jsonl",
                                       "profile.md"};

}  // namespace

void prepare_output_dir(const std::string& dir, bool resume, bool overwrite,
                        const std::vector<std::pair<std::string, std::string>>& inputs) {
  // Every check comes before the first change: a refused run leaves the folder as it was.
  util::check_output_apart_from_inputs("the run's output", util::join_path(dir, kRunMarker), inputs);
  for (const char* name : kRunOutputs)
    util::check_output_apart_from_inputs("the run's output", util::join_path(dir, name), inputs);
  const bool marked = util::path_exists(util::join_path(dir, kRunMarker));
  std::string found;
  for (const char* name : kRunOutputs) {
    if (util::path_exists(util::join_path(dir, name))) found += (found.empty() ? "" : ", ") + std::string(name);
  }
  if (!resume && marked && !overwrite)
    throw ConfigError(dir + ": holds an earlier run (hint: resume it, or overwrite to start over)");
  if (!resume && !marked && !found.empty()) {
    throw ConfigError(dir + ": holds " + found + " without " + kRunMarker +
                      ", so no run of tiedlora is known to have written them; nothing there is removed or "
                      "overwritten (hint: choose another output folder, or move those away yourself)");
  }
  if (!resume && marked) {
    for (const char* name : kRunOutputs) util::remove_tree(util::join_path(dir, name));
  }
  util::make_directories(dir);
  if (!marked) {
    formats::write_text_file(util::join_path(dir, kRunMarker),
                             "{\"written_by\": \"tiedlora\", \"note\": \"a training run's output folder: --overwrite "
                             "removes only the run's own outputs here\"}\n");
  }
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
