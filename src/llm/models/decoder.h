// decoder.h (private): what the model files share. The building blocks of both families (layers made in the
// model's dtype, positions, attention with its cache and packing, the per-block runner), the
// DecoderOnlyLM base that holds what GPT-2 and Llama have in common (ModelInfo, the output head and its
// tie), and the builders the loaders call. Public API: tiedlora/llm/causal_lm.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <torch/nn/modules/embedding.h>

#include "llm/models/activation_checkpoint.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/core/modules.h"
#include "tiedlora/formats/hf_config.h"
#include "tiedlora/llm/causal_lm.h"

namespace tiedlora::llm::models {

// ---- layers (decoder.cpp) -------------------------------------------------------------------------------

// Layers whose tensors are made in the model's dtype (a bf16 model never exists in fp32 first, which would
// set the peak memory; transformers' from_pretrained(torch_dtype=...) does the same). The norms are small
// and are converted after construction.
LoraLinear linear(int64_t in, int64_t out, bool bias, at::ScalarType dtype);
torch::nn::Embedding embedding(int64_t count, int64_t dim, at::ScalarType dtype);

/// What GPT-2 and Llama share around their bodies: the ModelInfo and the output head, tied to the token
/// embedding when the config says so.
class DecoderOnlyLM : public CausalLM {
 public:
  at::Tensor logits(const at::Tensor& hidden) override { return lm_head_(hidden); }
  const ModelInfo& info() const override { return info_; }

 protected:
  explicit DecoderOnlyLM(const ModelConfig& config);
  /// Registers `lm_head` (dim -> vocab); called after the body, so the parameters keep Hugging Face's order.
  void register_head(int64_t dim, const at::Tensor& token_embedding, at::ScalarType dtype);

 private:
  ModelInfo info_;
  LoraLinear lm_head_{nullptr};
};

/// The family's model from `config` with random weights (gpt2.cpp, llama.cpp); build_model_from converts the
/// norms to `dtype` too (what the public build_model does).
std::shared_ptr<CausalLM> make_gpt2(const ModelConfig& config, at::ScalarType dtype);
std::shared_ptr<CausalLM> make_llama(const ModelConfig& config, at::ScalarType dtype);
std::shared_ptr<CausalLM> build_model_from(const ModelConfig& config, at::ScalarType dtype);

// ---- positions and attention (attention.cpp) --------------------------------------------------------------

// The positions of the tokens of one forward pass and the longest run of positions any sequence in it
// spans (what a learned position table or a sliding window must cover).
struct Positions {
  at::Tensor ids;
  int64_t span = 0;
};
Positions positions_of(const at::Tensor& input_ids, const KVCache* cache, const PackedLayout* packed);

// Attention over (batch, heads, tokens, head_dim) with the cache extended in place, or within the segments
// of packed rows.
at::Tensor attend(at::Tensor q, at::Tensor k, at::Tensor v, KVCache* cache, size_t layer, const PackedLayout* packed);

// Runs the decoder blocks of one forward pass, each under activation checkpointing when the model asks for
// it (training with gradients, no KV cache), else directly.
class BlockRunner {
 public:
  BlockRunner(const CausalLM& model, KVCache* cache, const PackedLayout* packed) : cache_(cache), packed_(packed) {
    if (!model.activation_checkpointing() || !model.is_training() || !at::GradMode::is_enabled() || cache) return;
    checkpoint_ = true;
    // The recomputation runs after this call returns: it keeps its own copy of the layout.
    if (packed) packed_copy_ = std::make_shared<const PackedLayout>(*packed);
    trainable_ = trainable_parameters(model);  // each tensor once: a tie group's shared factors too
  }
  // `block(x, cache, packed)`; a template, so the common path (no checkpointing: inference, decoding) calls
  // it directly, without a std::function per layer; only the checkpointed one keeps a copy for backward.
  template <class Block>
  at::Tensor operator()(const at::Tensor& x, const Block& block) {
    if (!checkpoint_) return block(x, cache_, packed_);
    return detail::checkpointed(
        [block, layout = packed_copy_](const at::Tensor& in) { return block(in, nullptr, layout.get()); }, x,
        trainable_);
  }

 private:
  KVCache* cache_;
  const PackedLayout* packed_;
  bool checkpoint_ = false;
  std::shared_ptr<const PackedLayout> packed_copy_;
  std::vector<at::Tensor> trainable_;
};

}  // namespace tiedlora::llm::models
