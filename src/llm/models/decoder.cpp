// decoder.cpp: what both model families are built from: layers made in the model's dtype, the
// DecoderOnlyLM base (ModelInfo, output head, weight tie) and build_model, which picks the family
// (gpt2.cpp, llama.cpp) from the one description of the model (tiedlora/formats/hf_config.h).
#include "llm/models/decoder.h"

#include <ATen/ATen.h>

namespace tiedlora::llm::models {
namespace {

// The architecture-independent facts, from the one description of the model (tiedlora/formats/hf_config.h).
ModelInfo info_from(const ModelConfig& c) {
  ModelInfo info;
  info.model_type = c.family == ModelConfig::Family::gpt2 ? "gpt2" : "llama";
  info.vocab_size = c.vocab_size;
  info.num_layers = c.num_layers;
  info.max_positions = c.max_positions;
  info.eos_token_ids = c.eos_token_ids;
  info.bos_token_id = c.bos_token_id;
  info.tie_word_embeddings = c.tie_word_embeddings;
  info.fan_in_fan_out = c.family == ModelConfig::Family::gpt2;
  info.config_json = c.json_text;
  return info;
}

}  // namespace

LoraLinear linear(int64_t in, int64_t out, bool bias, at::ScalarType dtype) {
  return LoraLinear(LoraLinearOptions(in, out).bias(bias).dtype(dtype));
}

torch::nn::Embedding embedding(int64_t count, int64_t dim, at::ScalarType dtype) {
  at::Tensor weight = at::empty({count, dim}, at::TensorOptions(dtype));
  {
    at::NoGradGuard no_grad;
    weight.normal_();  // torch::nn::Embedding's initialisation
  }
  return torch::nn::Embedding(torch::nn::EmbeddingOptions(count, dim)._weight(weight));
}

DecoderOnlyLM::DecoderOnlyLM(const ModelConfig& config) : info_(info_from(config)) {}

void DecoderOnlyLM::register_head(int64_t dim, const at::Tensor& token_embedding, at::ScalarType dtype) {
  lm_head_ = register_module("lm_head", linear(dim, info_.vocab_size, false, dtype));
  if (info_.tie_word_embeddings) lm_head_->tie_weight_(token_embedding);
}

std::shared_ptr<CausalLM> build_model_from(const ModelConfig& config, at::ScalarType dtype) {
  TORCH_CHECK(at::isFloatingType(dtype), "build_model: dtype must be floating point, got ", dtype);
  std::shared_ptr<CausalLM> model =
      config.family == ModelConfig::Family::gpt2 ? make_gpt2(config, dtype) : make_llama(config, dtype);
  model->to(dtype);
  return model;
}

std::shared_ptr<CausalLM> build_model(const std::string& config_path, at::ScalarType dtype) {
  return build_model_from(read_model_config(config_path), dtype);
}

}  // namespace tiedlora::llm::models
