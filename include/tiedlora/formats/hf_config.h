// tiedlora/formats/hf_config.h: a Hugging Face model's architecture, from its config.json, parsed once. The
// one description of each supported model type: the model builders (tiedlora/llm/causal_lm.h) build from
// it and `tiedlora params` lists its module tree (describe_model), so the two cannot disagree. Torch-free.
//
// Supported: gpt2; llama and the Llama-architecture types mistral (sliding-window attention: sequences up
// to the window, refused beyond it by the model) and qwen2 (bias on q/k/v, none on o_proj; sliding-window
// layers refused). Anything the builders cannot honour (another model_type, a RoPE scaling type other than
// the default) is refused here, for both, with FormatError naming the file and key.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tiedlora/core/module_selection.h"

namespace tiedlora {

struct ModelConfig {
  enum class Family { gpt2, llama };
  std::string source;      ///< the config.json path (or, for a GGUF file, "<file> (metadata)"), for messages
  std::string model_type;  ///< as written: gpt2, llama, mistral, qwen2
  Family family = Family::llama;
  int64_t vocab_size = 0, hidden_size = 0, num_layers = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  int64_t intermediate_size = 0;
  int64_t max_positions = 0;   ///< GPT-2's n_positions; 0 for RoPE models
  int64_t sliding_window = 0;  ///< attention window of every layer (mistral); 0: full attention
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  bool qkv_bias = false, o_bias = false, mlp_bias = false;  ///< GPT-2: all true
  bool tie_word_embeddings = false;
  std::vector<int64_t> eos_token_ids;  ///< generation_config.json first, then config.json
  int64_t bos_token_id = -1;
  std::string json_text;  ///< the config as read (save_pretrained writes it back)
};

/// Reads `config_path` (a config.json, or a folder holding one; generation_config.json beside it adds
/// token ids). Throws tiedlora::FormatError naming the file and key for missing or invalid fields and
/// unsupported model types or features.
ModelConfig read_model_config(const std::string& config_path);
/// The same from JSON text made elsewhere (a GGUF file's metadata); `source` names it in messages.
ModelConfig model_config_from_json(const std::string& json_text, const std::string& source);

struct HfDescribeOptions {
  /// Describe Llama attention as one fused `self_attn.qkv_proj` (d -> (heads + 2 kv_heads) * head_dim),
  /// the layout of Megatron/NeMo (the Tied-LoRA paper's models) and of Phi-3, instead of q/k/v_proj.
  bool fused_qkv = false;
};

/// The modules (containers and linear layers, HF names, tree order) of the model `config` describes: the
/// tree the builders make.
std::vector<ModuleDescription> describe_model(const ModelConfig& config, const HfDescribeOptions& options = {});
/// describe_model(read_model_config(config_path), options).
std::vector<ModuleDescription> describe_hf_model(const std::string& config_path, const HfDescribeOptions& options = {});

}  // namespace tiedlora
