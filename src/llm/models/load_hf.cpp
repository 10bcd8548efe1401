// load_hf.cpp: Hugging Face checkpoints in and out: load_hf_weights (every tensor checked before any is
// copied; GPT-2's Conv1D weights transposed), load_pretrained and load_any, and save_pretrained (the base
// weights as a Hugging Face folder, adapter tensors left out).
#include <set>
#include <sstream>

#include <ATen/ATen.h>

#include "llm/models/decoder.h"
#include "tiedlora/core/error.h"
#include "tiedlora/formats/safetensors.h"
#include "util/files.h"

namespace tiedlora::llm::models {
namespace {

// GPT-2's Conv1D layers store their weight (in, out).
bool is_conv1d_weight(const std::string& name) {
  static const std::vector<std::string> suffixes = {".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight",
                                                    ".mlp.c_proj.weight"};
  for (const auto& s : suffixes) {
    if (name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0) return true;
  }
  return false;
}

}  // namespace

void load_hf_weights(CausalLM& model, const std::string& checkpoint_path) {
  const formats::Checkpoint checkpoint = formats::Checkpoint::open(checkpoint_path);
  const bool gpt2 = model.info().model_type == "gpt2";
  std::set<std::string> unused;
  for (const auto& n : checkpoint.names()) unused.insert(n);
  std::vector<std::string> missing, misshapen;
  std::vector<std::pair<at::Tensor, std::string>> plan;  // parameter, checkpoint name
  std::set<const void*> seen;
  for (const auto& item : model.named_parameters()) {
    const std::string& name = item.key();
    const at::Tensor& param = item.value();
    if (!seen.insert(param.unsafeGetTensorImpl()).second) continue;  // a tied weight, loaded once
    std::string source;
    // Original GPT-2 checkpoints omit the "transformer." prefix.
    for (const std::string& candidate : {name, name.substr(name.find('.') + 1)}) {
      if (checkpoint.contains(candidate)) {
        source = candidate;
        break;
      }
    }
    if (source.empty()) {
      missing.push_back(name);
      continue;
    }
    unused.erase(source);
    auto shape = checkpoint.entry(source).shape;
    if (gpt2 && is_conv1d_weight(name) && shape.size() == 2) std::swap(shape[0], shape[1]);
    if (shape != param.sizes().vec()) {
      std::ostringstream msg;
      msg << source << " is " << at::IntArrayRef(checkpoint.entry(source).shape) << ", the model expects "
          << param.sizes();
      misshapen.push_back(msg.str());
      continue;
    }
    plan.emplace_back(param, source);
  }
  // A tied model's checkpoint may store the head as well (transformers writes and reads such files): the
  // head is the embedding, so it is accepted when it holds the embedding's values and refused otherwise.
  // (A checkpoint that does not fit at all gets the general error below.)
  if (model.info().tie_word_embeddings && unused.count("lm_head.weight") && missing.empty() && misshapen.empty()) {
    std::string embedding;
    for (const char* candidate : {"model.embed_tokens.weight", "transformer.wte.weight", "wte.weight"}) {
      if (checkpoint.contains(candidate)) embedding = candidate;
    }
    if (embedding.empty() || !at::equal(checkpoint.tensor("lm_head.weight"), checkpoint.tensor(embedding))) {
      throw FormatError(checkpoint_path +
                        ": config.json ties lm_head to the token embedding, but the checkpoint's "
                        "'lm_head.weight' is not the embedding" +
                        (embedding.empty() ? "" : " '" + embedding + "'") +
                        " (hint: set tie_word_embeddings to false in config.json if the head is its own)");
    }
    unused.erase("lm_head.weight");
  }
  // Buffers some checkpoints carry: GPT-2's attention masks, rotary inverse frequencies.
  for (auto it = unused.begin(); it != unused.end();) {
    const std::string& n = *it;
    const bool buffer = n.find("attn.bias") != std::string::npos || n.find("attn.masked_bias") != std::string::npos ||
                        n.find("rotary_emb.inv_freq") != std::string::npos;
    it = buffer ? unused.erase(it) : std::next(it);
  }
  if (!missing.empty() || !misshapen.empty() || !unused.empty()) {
    std::ostringstream msg;
    msg << checkpoint_path << ": the checkpoint does not fit the " << model.info().model_type << " model";
    auto list = [&](const char* what, const auto& items) {
      if (items.empty()) return;
      msg << "; " << items.size() << " " << what << ":";
      size_t shown = 0;
      for (const auto& i : items) {
        if (shown++ == 8) {
          msg << " ...";
          break;
        }
        msg << " '" << i << "'";
      }
    };
    list("missing", missing);
    list("misshapen", misshapen);
    list("unexpected", unused);
    msg << " (hint: is config.json the checkpoint's own?)";
    throw FormatError(msg.str());
  }
  at::NoGradGuard no_grad;
  for (auto& [param, source] : plan) {
    at::Tensor value = checkpoint.tensor(source);
    if (gpt2 && is_conv1d_weight(source)) value = value.t();
    param.copy_(value);
  }
}

std::shared_ptr<CausalLM> load_pretrained(const std::string& folder, at::ScalarType dtype) {
  auto model = build_model(folder, dtype);
  load_hf_weights(*model, folder);
  return model;
}

bool is_gguf_path(const std::string& path) { return path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0; }

std::shared_ptr<CausalLM> load_any(const std::string& path, at::ScalarType dtype) {
  return is_gguf_path(path) ? load_gguf_model(path, dtype) : load_pretrained(path, dtype);
}

namespace {

// Adapter tensors (a LoraLinear's lora_A/B/u/v, the tie groups' shared factors) are not base weights.
bool is_adapter_tensor(const std::string& name) {
  if (name.rfind("tiedlora_groups.", 0) == 0) return true;
  const auto dot = name.rfind('.');
  return name.compare(dot == std::string::npos ? 0 : dot + 1, 5, "lora_") == 0;
}

}  // namespace

void save_pretrained(const CausalLM& model, const std::string& folder, const SavePretrainedOptions& options) {
  const auto& [dtype, overwrite, max_shard_bytes] = options;
  if (util::path_exists(folder) && !overwrite) {
    throw ConfigError(folder + ": already exists (hint: choose another folder or allow overwriting)");
  }
  const ModelInfo& info = model.info();
  if (info.config_json.empty()) throw ConfigError("save_pretrained: the model carries no config.json to write");
  const bool gpt2 = info.model_type == "gpt2";
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::set<const void*> seen;
  for (const auto& item : model.named_parameters()) {
    const std::string& name = item.key();
    if (is_adapter_tensor(name)) continue;
    if (!seen.insert(item.value().unsafeGetTensorImpl()).second) continue;  // a tied head: stored once
    at::Tensor value = item.value().detach().to(at::kCPU);
    if (dtype && value.is_floating_point()) value = value.to(*dtype);
    if (gpt2 && is_conv1d_weight(name)) value = value.t();
    tensors.emplace_back(name, value.contiguous());
  }
  util::StagedDirectory staged(folder);
  const std::string config = info.config_json + "\n";
  util::write_file_atomically(util::join_path(staged.path(), "config.json"),
                              [&](const util::ByteWriter& write) { write(config.data(), config.size()); });
  formats::save_sharded_safetensors(staged.path(), tensors, max_shard_bytes, {{"format", "pt"}});
  staged.publish(overwrite);
}

}  // namespace tiedlora::llm::models
