// tiedlora/hf_config.h: the module tree of a Hugging Face GPT-2 or Llama model, from config.json alone.
// Used by `tiedlora params` to count adapter parameters without loading weights. Torch-free.
#pragma once

#include <string>
#include <vector>

#include "tiedlora/module_selection.h"

namespace tiedlora {

struct HfDescribeOptions {
  /// Describe Llama attention as one fused `self_attn.qkv_proj` (d -> (heads + 2 kv_heads) * head_dim),
  /// the layout of Megatron/NeMo (the Tied-LoRA paper's models) and of Phi-3, instead of q/k/v_proj.
  bool fused_qkv = false;
};

/// The modules (containers and linear layers, HF names, tree order) of the model that `config_path`
/// (a config.json, or a folder holding one) describes. model_type "gpt2" and "llama" (and the
/// Llama-architecture types "mistral" and "qwen2") are understood. Throws tiedlora::FormatError
/// naming the file and key for missing or invalid fields and unsupported model types.
std::vector<ModuleDescription> describe_hf_model(const std::string& config_path, const HfDescribeOptions& options = {});

}  // namespace tiedlora
