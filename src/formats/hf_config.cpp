// hf_config.cpp: tiedlora/formats/hf_config.h. config.json parsed once into ModelConfig; the module tree of
// each model type written once (describe_model), matching what the model builders register.
#include "tiedlora/formats/hf_config.h"

#include <nlohmann/json.hpp>

#include "tiedlora/core/error.h"
#include "util/files.h"
#include "util/text.h"

namespace tiedlora {
namespace {

using nlohmann::json;

class ConfigReader {
 public:
  ConfigReader(std::string source, json config) : source_(std::move(source)), j_(std::move(config)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }
  int64_t positive(const char* key) const {
    if (!has(key)) throw FormatError(source_ + ": missing key '" + key + "'");
    return checked(key, j_.at(key));
  }
  int64_t positive_or(const char* key, int64_t fallback) const {
    return has(key) ? checked(key, j_.at(key)) : fallback;
  }
  double number_or(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    if (!j_.at(key).is_number()) throw FormatError(source_ + ": key '" + std::string(key) + "' must be a number");
    return j_.at(key).get<double>();
  }
  bool flag_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!j_.at(key).is_boolean()) throw FormatError(source_ + ": key '" + std::string(key) + "' must be true or false");
    return j_.at(key).get<bool>();
  }
  const json& raw() const { return j_; }
  const std::string& source() const { return source_; }

 private:
  int64_t checked(const char* key, const json& v) const {
    if (!v.is_number_integer() || v.get<int64_t>() <= 0) {
      throw FormatError(source_ + ": key '" + std::string(key) + "' must be a positive integer, got " + v.dump());
    }
    return v.get<int64_t>();
  }
  std::string source_;
  json j_;
};

// Token ids: an integer or a list of integers, generation_config.json first.
std::vector<int64_t> token_ids(const json& generation, const json& config, const char* key) {
  std::vector<int64_t> out;
  for (const json* source : {&generation, &config}) {
    if (!source->is_object() || !source->contains(key) || source->at(key).is_null()) continue;
    const json& v = source->at(key);
    if (v.is_number_integer())
      out.push_back(v.get<int64_t>());
    else if (v.is_array()) {
      for (const auto& x : v) {
        if (x.is_number_integer()) out.push_back(x.get<int64_t>());
      }
    }
    if (!out.empty()) break;
  }
  return out;
}

void read_gpt2(const ConfigReader& c, ModelConfig& m) {
  m.family = ModelConfig::Family::gpt2;
  m.vocab_size = c.positive("vocab_size");
  m.max_positions = c.positive_or("n_positions", 1024);
  m.hidden_size = c.positive("n_embd");
  m.num_layers = c.positive("n_layer");
  m.num_heads = m.num_kv_heads = c.positive("n_head");
  if (m.hidden_size % m.num_heads) {
    throw FormatError(c.source() + ": n_embd " + std::to_string(m.hidden_size) + " is not a multiple of n_head " +
                      std::to_string(m.num_heads));
  }
  m.head_dim = m.hidden_size / m.num_heads;
  m.intermediate_size = c.positive_or("n_inner", 4 * m.hidden_size);
  m.norm_eps = c.number_or("layer_norm_epsilon", 1e-5);
  m.qkv_bias = m.o_bias = m.mlp_bias = true;
  m.tie_word_embeddings = c.flag_or("tie_word_embeddings", true);
}

void read_llama(const ConfigReader& c, ModelConfig& m) {
  m.family = ModelConfig::Family::llama;
  m.vocab_size = c.positive("vocab_size");
  m.hidden_size = c.positive("hidden_size");
  m.num_layers = c.positive("num_hidden_layers");
  m.num_heads = c.positive("num_attention_heads");
  m.num_kv_heads = c.positive_or("num_key_value_heads", m.num_heads);
  m.intermediate_size = c.positive("intermediate_size");
  if (!c.has("head_dim") && m.hidden_size % m.num_heads != 0) {
    throw FormatError(c.source() + ": hidden_size " + std::to_string(m.hidden_size) +
                      " is not divisible by num_attention_heads " + std::to_string(m.num_heads) +
                      " and no head_dim is given");
  }
  m.head_dim = c.positive_or("head_dim", m.hidden_size / m.num_heads);
  if (m.num_heads % m.num_kv_heads != 0) {
    throw FormatError(c.source() + ": num_attention_heads " + std::to_string(m.num_heads) +
                      " is not a multiple of num_key_value_heads " + std::to_string(m.num_kv_heads));
  }
  m.norm_eps = c.number_or("rms_norm_eps", 1e-6);
  m.tie_word_embeddings = c.flag_or("tie_word_embeddings", false);
  // Biases: Llama's attention_bias puts one on all four projections; Qwen2 has them on q, k, v only.
  const bool attention_bias = c.flag_or("attention_bias", false);
  m.qkv_bias = m.model_type == "qwen2" ? true : attention_bias;
  m.o_bias = m.model_type == "qwen2" ? false : attention_bias;
  m.mlp_bias = c.flag_or("mlp_bias", false);
  // Sliding-window attention: Mistral applies `sliding_window` to every layer; Qwen2 only with
  // use_sliding_window, and then to some layers (max_window_layers), which the builders do not model.
  if (m.model_type == "mistral" && c.has("sliding_window")) m.sliding_window = c.positive("sliding_window");
  if (m.model_type == "qwen2" && c.flag_or("use_sliding_window", false)) {
    throw FormatError(c.source() +
                      ": use_sliding_window is true; Qwen2's per-layer sliding-window attention is not "
                      "supported (hint: models trained with it set the flag; most Qwen2 checkpoints do not)");
  }
  // RoPE: transformers 4 writes rope_theta (and rope_scaling); transformers 5 writes rope_parameters.
  m.rope_theta = c.number_or("rope_theta", 10000.0);
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    if (!c.has(key)) continue;
    const json& rope = c.raw().at(key);
    if (!rope.is_object()) throw FormatError(c.source() + ": '" + key + "' must be an object");
    const std::string type = rope.value("rope_type", rope.value("type", std::string("default")));
    if (type != "default") {
      throw FormatError(c.source() + ": " + key + " type '" + type +
                        "' is not supported (hint: only plain RoPE with rope_theta is)");
    }
    if (rope.contains("rope_theta")) {
      if (!rope.at("rope_theta").is_number())
        throw FormatError(c.source() + ": " + key + ".rope_theta must be a number");
      m.rope_theta = rope.at("rope_theta").get<double>();
    }
  }
}

ModelConfig parse(json config, json generation, const std::string& source) {
  if (!config.is_object()) throw FormatError(source + ": the config must be a JSON object");
  if (!config.contains("model_type") || !config.at("model_type").is_string()) {
    throw FormatError(source + ": missing string key 'model_type'");
  }
  ModelConfig m;
  m.source = source;
  m.model_type = config.at("model_type").get<std::string>();
  m.json_text = config.dump(2);
  m.eos_token_ids = token_ids(generation, config, "eos_token_id");
  const auto bos = token_ids(generation, config, "bos_token_id");
  m.bos_token_id = bos.empty() ? -1 : bos[0];
  const ConfigReader reader(source, std::move(config));
  if (m.model_type == "gpt2")
    read_gpt2(reader, m);
  else if (m.model_type == "llama" || m.model_type == "mistral" || m.model_type == "qwen2")
    read_llama(reader, m);
  else {
    throw FormatError(source + ": model_type '" + m.model_type +
                      "' is not supported (supported: gpt2, llama, mistral, qwen2)");
  }
  return m;
}

void add_container(std::vector<ModuleDescription>& out, std::string name, std::string type) {
  out.push_back(ModuleDescription{std::move(name), std::move(type), false, {}});
}
void add_linear(std::vector<ModuleDescription>& out, std::string name, int64_t in, int64_t out_features) {
  out.push_back(ModuleDescription{std::move(name), "Linear", true, LinearShape{in, out_features}});
}

}  // namespace

ModelConfig read_model_config(const std::string& config_path) {
  const std::string path = util::is_directory(config_path) ? util::join_path(config_path, "config.json") : config_path;
  if (!util::is_regular_file(path)) {
    throw FormatError(path + ": cannot open the model config (hint: pass a config.json or a model folder)");
  }
  json config = util::parse_json_strict(util::read_text_file(path), path);
  // generation_config.json beside it may name more eos tokens.
  const std::string generation_path = util::join_path(util::parent_path(path), "generation_config.json");
  json generation = util::is_regular_file(generation_path)
                        ? util::parse_json_strict(util::read_text_file(generation_path), generation_path)
                        : json();
  return parse(std::move(config), std::move(generation), path);
}

ModelConfig model_config_from_json(const std::string& json_text, const std::string& source) {
  return parse(util::parse_json_strict(json_text, source), json(), source);
}

std::vector<ModuleDescription> describe_model(const ModelConfig& m, const HfDescribeOptions& options) {
  const int64_t d = m.hidden_size;
  std::vector<ModuleDescription> out;
  if (m.family == ModelConfig::Family::gpt2) {
    if (options.fused_qkv) {
      throw ConfigError(m.source + ": --fused-qkv applies to Llama models; GPT-2's c_attn is already fused");
    }
    add_container(out, "transformer", "GPT2Model");
    add_container(out, "transformer.h", "ModuleList");
    for (int64_t i = 0; i < m.num_layers; ++i) {
      const std::string block = "transformer.h." + std::to_string(i);
      add_container(out, block, "GPT2Block");
      add_container(out, block + ".attn", "GPT2Attention");
      add_linear(out, block + ".attn.c_attn", d, 3 * d);
      add_linear(out, block + ".attn.c_proj", d, d);
      add_container(out, block + ".mlp", "GPT2MLP");
      add_linear(out, block + ".mlp.c_fc", d, m.intermediate_size);
      add_linear(out, block + ".mlp.c_proj", m.intermediate_size, d);
    }
  } else {
    const int64_t q_out = m.num_heads * m.head_dim, kv_out = m.num_kv_heads * m.head_dim;
    add_container(out, "model", "LlamaModel");
    add_container(out, "model.layers", "ModuleList");
    for (int64_t i = 0; i < m.num_layers; ++i) {
      const std::string block = "model.layers." + std::to_string(i);
      add_container(out, block, "LlamaDecoderLayer");
      add_container(out, block + ".self_attn", "LlamaAttention");
      if (options.fused_qkv) {
        add_linear(out, block + ".self_attn.qkv_proj", d, q_out + 2 * kv_out);
      } else {
        add_linear(out, block + ".self_attn.q_proj", d, q_out);
        add_linear(out, block + ".self_attn.k_proj", d, kv_out);
        add_linear(out, block + ".self_attn.v_proj", d, kv_out);
      }
      add_linear(out, block + ".self_attn.o_proj", q_out, d);
      add_container(out, block + ".mlp", "LlamaMLP");
      add_linear(out, block + ".mlp.gate_proj", d, m.intermediate_size);
      add_linear(out, block + ".mlp.up_proj", d, m.intermediate_size);
      add_linear(out, block + ".mlp.down_proj", m.intermediate_size, d);
    }
  }
  add_linear(out, "lm_head", d, m.vocab_size);
  return out;
}

std::vector<ModuleDescription> describe_hf_model(const std::string& config_path, const HfDescribeOptions& options) {
  return describe_model(read_model_config(config_path), options);
}

}  // namespace tiedlora
