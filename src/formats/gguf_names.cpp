// gguf_names.cpp: llama.cpp's names in Hugging Face's terms: the Llama metadata keys of a GGUF file as the
// config.json they stand for, and its tensor names (tiedlora/formats/gguf_names.h).
#include "tiedlora/formats/gguf_names.h"

#include <cstdint>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "tiedlora/core/error.h"

namespace tiedlora::formats {

using nlohmann::json;

ModelConfig model_config_of_gguf(const GgufFile& file, const std::string& path) {
  const std::string arch = file.get_string("general.architecture");
  if (arch != "llama") {
    throw FormatError(path + ": general.architecture is '" + arch + "'; tiedlora loads Llama-architecture GGUF files");
  }
  auto key = [&](const std::string& name) { return arch + "." + name; };
  json config;
  config["model_type"] = "llama";
  config["hidden_size"] = file.get_uint(key("embedding_length"));
  config["num_hidden_layers"] = file.get_uint(key("block_count"));
  config["intermediate_size"] = file.get_uint(key("feed_forward_length"));
  const uint64_t heads = file.get_uint(key("attention.head_count"));
  const uint64_t kv_heads = file.get_uint(key("attention.head_count_kv"), heads);
  config["num_attention_heads"] = heads;
  config["num_key_value_heads"] = kv_heads;
  if (file.has_key(key("rope.dimension_count"))) config["head_dim"] = file.get_uint(key("rope.dimension_count"));
  config["rope_theta"] = file.get_float(key("rope.freq_base"), 10000.0);
  config["rms_norm_eps"] = file.get_float(key("attention.layer_norm_rms_epsilon"), 1e-6);
  config["vocab_size"] = file.has_key(key("vocab_size")) ? file.get_uint(key("vocab_size"))
                                                         : file.get_strings("tokenizer.ggml.tokens").size();
  config["tie_word_embeddings"] = !file.has_tensor("output.weight");
  if (file.has_key("tokenizer.ggml.bos_token_id"))
    config["bos_token_id"] = file.get_uint("tokenizer.ggml.bos_token_id");
  if (file.has_key("tokenizer.ggml.eos_token_id"))
    config["eos_token_id"] = file.get_uint("tokenizer.ggml.eos_token_id");
  return model_config_from_json(config.dump(), path + " (metadata)");
}

// llama.cpp's tensor names -> Hugging Face's, per layer and global.
std::string hf_name_of_gguf_tensor(const std::string& gguf) {
  static const std::vector<std::pair<std::string, std::string>> global = {
      {"token_embd.weight", "model.embed_tokens.weight"},
      {"output_norm.weight", "model.norm.weight"},
      {"output.weight", "lm_head.weight"}};
  for (const auto& [from, to] : global) {
    if (gguf == from) return to;
  }
  static const std::vector<std::pair<std::string, std::string>> per_layer = {
      {"attn_norm.weight", "input_layernorm.weight"}, {"ffn_norm.weight", "post_attention_layernorm.weight"},
      {"attn_q.weight", "self_attn.q_proj.weight"},   {"attn_k.weight", "self_attn.k_proj.weight"},
      {"attn_v.weight", "self_attn.v_proj.weight"},   {"attn_output.weight", "self_attn.o_proj.weight"},
      {"ffn_gate.weight", "mlp.gate_proj.weight"},    {"ffn_up.weight", "mlp.up_proj.weight"},
      {"ffn_down.weight", "mlp.down_proj.weight"}};
  if (gguf.rfind("blk.", 0) != 0) return "";
  const auto dot = gguf.find('.', 4);
  if (dot == std::string::npos) return "";
  const std::string layer = gguf.substr(4, dot - 4), rest = gguf.substr(dot + 1);
  for (const auto& [from, to] : per_layer) {
    if (rest == from) return "model.layers." + layer + "." + to;
  }
  return "";
}

}  // namespace tiedlora::formats
