// tiedlora/llm/causal_lm.h: decoder-only language models in the LibTorch C++ frontend.
//   CausalLM       the model interface: logits, hidden states (also of packed rows), KV cache, activation
//                  checkpointing; GPT-2 and Llama (also Mistral, Qwen2) implement it with Hugging Face module
//                  names, so adapter targets such as `c_attn` or `q_proj` mean what they mean in PEFT
//   build/load     build_model, load_hf_weights, load_pretrained, load_gguf_model, load_any; save_pretrained
//   generation     EvalModeGuard, generate_greedy, generate_greedy_batch (KV cache, left-padded batches)
// Sources: src/llm/models/ (one file per concept: attention, gpt2, llama, load_hf, load_gguf, generate).
//
// Every linear layer is a tiedlora::LoraLinear, so inject_adapters() and load_adapter() attach adapters in
// place and every adapted layer goes through tiedlora::functional::lora_linear().
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

namespace tiedlora::llm::models {

/// The architecture-independent facts about a loaded model.
struct ModelInfo {
  std::string model_type;  ///< "gpt2" or "llama"
  int64_t vocab_size = 0;
  int64_t num_layers = 0;
  int64_t max_positions = 0;           ///< 0: no learned limit (RoPE)
  std::vector<int64_t> eos_token_ids;  ///< from config.json / generation_config.json
  int64_t bos_token_id = -1;
  bool tie_word_embeddings = false;
  /// Checkpoint layout of the linear weights is (in, out) (GPT-2's Conv1D): PEFT's fan_in_fan_out.
  bool fan_in_fan_out = false;
  /// The config.json the model was built from (for a GGUF file: the one made from its metadata), as JSON
  /// text; save_pretrained() writes it back.
  std::string config_json;
};

/// Keys and values of every layer for incremental decoding: (batch, kv_heads, positions, head_dim).
struct KVCache {
  std::vector<at::Tensor> keys, values;
  /// Optional (batch, cached + new positions) bool, false at padding: the caller sets it before each
  /// forward to run left-padded rows together (generate_greedy_batch). Padding keys are never attended
  /// and positions count real tokens only, so each row computes what it would alone.
  at::Tensor attention_mask;
  int64_t length() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }
};

/// Several sequences laid end to end in each row of a batch (packing): row r of the input begins with
/// segments of lengths `segment_lengths[r]`; the rest of the row, if any, is padding. Each segment is
/// computed as if it ran alone: its positions restart at 0 and its tokens attend causally within it only,
/// so attention costs the sum of the squared segment lengths, not the square of the row. Padding attends to
/// nothing (its outputs are zero before the output projection) and nothing attends to it.
struct PackedLayout {
  std::vector<std::vector<int64_t>> segment_lengths;
};

/// A decoder-only language model.
class CausalLM : public torch::nn::Module {
 public:
  /// Logits (batch, tokens, vocab) for `input_ids` (batch, tokens), continuing `cache` when given (the
  /// cache is extended in place).
  at::Tensor forward(const at::Tensor& input_ids, KVCache* cache = nullptr) {
    return logits(hidden_states(input_ids, cache));
  }
  /// The final hidden states (batch, tokens, dim), after the last norm and before the output head.
  /// Training computes the head only where the loss needs it (the completion tokens), which saves most of
  /// the head's cost for a large vocabulary.
  at::Tensor hidden_states(const at::Tensor& input_ids, KVCache* cache = nullptr) {
    return forward_hidden(input_ids, cache, nullptr);
  }
  /// The hidden states of packed rows (PackedLayout): equal, segment by segment, to running each segment
  /// alone. Throws tiedlora::ConfigError for another number of rows, a length that is not positive, or
  /// segments longer than their row (what they leave of a row is padding).
  at::Tensor hidden_states(const at::Tensor& input_ids, const PackedLayout& layout);
  /// The output head: logits (..., vocab) of hidden states (..., dim).
  virtual at::Tensor logits(const at::Tensor& hidden) = 0;
  virtual const ModelInfo& info() const = 0;

  /// Activation checkpointing per decoder block: while training with gradients, each block keeps only its
  /// input and recomputes its activations in the backward pass (the same gradients: the random state of
  /// adapter dropout is replayed), trading about one more forward pass for the activation memory of all
  /// blocks but one.
  void set_activation_checkpointing(bool on) { checkpoint_activations_ = on; }
  bool activation_checkpointing() const { return checkpoint_activations_; }

 protected:
  /// The architecture's forward pass through its transformer body, to the final hidden states (after the
  /// last norm, before the output head); `packed` and `cache` are never both set.
  virtual at::Tensor forward_hidden(const at::Tensor& input_ids, KVCache* cache, const PackedLayout* packed) = 0;

 private:
  bool checkpoint_activations_ = false;
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

/// Whether `path` names a GGUF file (by its extension), as load_any decides.
bool is_gguf_path(const std::string& path);

/// build_model for a folder or load_gguf_model for a .gguf file.
std::shared_ptr<CausalLM> load_any(const std::string& path, at::ScalarType dtype = at::kFloat);

/// Writes `model` as a Hugging Face folder: config.json (ModelInfo::config_json) and model.safetensors
/// (sharded above max_shard_bytes) with the base weights as they are now (merged layers hold their merged
/// weights), in `dtype` (nullopt: as held), GPT-2 Conv1D weights transposed back, a tied head stored once,
/// adapter tensors left out. Atomic: a temporary folder renamed at the end. Refuses an existing `folder`
/// unless `overwrite`. This turns a GGUF base into a checkpoint that merge-weights and PEFT can use.
struct SavePretrainedOptions {
  std::optional<at::ScalarType> dtype;  ///< dtype of floating tensors written; nullopt: as held
  bool overwrite = false;               ///< replace an existing folder
  uint64_t max_shard_bytes = uint64_t{5} << 30;
};
void save_pretrained(const CausalLM& model, const std::string& folder, const SavePretrainedOptions& options = {});

/// Puts `model` in eval mode for its lifetime and gives back the training mode it found, however the scope
/// ends (decoding, validation inside a training loop).
class EvalModeGuard {
 public:
  explicit EvalModeGuard(torch::nn::Module& model) : model_(model), was_training_(model.is_training()) { model.eval(); }
  ~EvalModeGuard() { model_.train(was_training_); }
  EvalModeGuard(const EvalModeGuard&) = delete;
  EvalModeGuard& operator=(const EvalModeGuard&) = delete;

 private:
  torch::nn::Module& model_;
  bool was_training_;
};

struct GenerateOptions {
  int64_t max_new_tokens = 32;
  std::vector<int64_t> stop_token_ids;  ///< empty: the model's eos tokens
  /// Mixed-adapter generation: the adapter of each prompt ("" = none), one entry per prompt; empty: the
  /// model's active adapters for every prompt. Checked against the model's adapters (route_rows).
  std::vector<std::string> prompt_adapters;
};

/// Greedy decoding with a KV cache (generate_greedy_batch of one prompt): the prompt's continuation (without the
/// prompt), stopping after a stop token (included) or max_new_tokens.
std::vector<int64_t> generate_greedy(CausalLM& model, const std::vector<int64_t>& prompt,
                                     const GenerateOptions& options = {});

/// Greedy decoding of many prompts at once, until every row has stopped. Prompts of unequal length are
/// left-padded with an attention mask; the tokens then equal one-prompt decoding's up to the float rounding
/// of the batched matmuls (a near-tie between two logits can break differently). Prompts of one length
/// need no mask and run exactly as alone.
std::vector<std::vector<int64_t>> generate_greedy_batch(CausalLM& model,
                                                        const std::vector<std::vector<int64_t>>& prompts,
                                                        const GenerateOptions& options = {});

}  // namespace tiedlora::llm::models
