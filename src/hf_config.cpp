// hf_config.cpp: module names and linear shapes of GPT-2 and Llama models from their config.json.
#include "tiedlora/hf_config.h"

#include <sys/stat.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "tiedlora/error.h"

namespace tiedlora {
namespace {

using nlohmann::json;

class ConfigReader {
 public:
  ConfigReader(std::string path, json config) : path_(std::move(path)), config_(std::move(config)) {}

  int64_t positive(const std::string& key) const {
    if (!config_.contains(key)) throw FormatError(path_ + ": missing key '" + key + "'");
    return check(key, config_.at(key));
  }
  int64_t positive_or(const std::string& key, int64_t fallback) const {
    if (!config_.contains(key) || config_.at(key).is_null()) return fallback;
    return check(key, config_.at(key));
  }
  const json& raw() const { return config_; }
  const std::string& path() const { return path_; }

 private:
  int64_t check(const std::string& key, const json& value) const {
    if (!value.is_number_integer() || value.get<int64_t>() <= 0) {
      throw FormatError(path_ + ": key '" + key + "' must be a positive integer, got " + value.dump());
    }
    return value.get<int64_t>();
  }
  std::string path_;
  json config_;
};

void add_container(std::vector<ModuleDescription>& out, std::string name, std::string type) {
  out.push_back(ModuleDescription{std::move(name), std::move(type), false, {}});
}
void add_linear(std::vector<ModuleDescription>& out, std::string name, int64_t in, int64_t out_features) {
  out.push_back(ModuleDescription{std::move(name), "Linear", true, LinearShape{in, out_features}});
}

std::vector<ModuleDescription> describe_gpt2(const ConfigReader& c) {
  const int64_t d = c.positive("n_embd");
  const int64_t layers = c.positive("n_layer");
  const int64_t inner = c.positive_or("n_inner", 4 * d);
  const int64_t vocab = c.positive("vocab_size");
  std::vector<ModuleDescription> out;
  add_container(out, "transformer", "GPT2Model");
  add_container(out, "transformer.h", "ModuleList");
  for (int64_t i = 0; i < layers; ++i) {
    const std::string block = "transformer.h." + std::to_string(i);
    add_container(out, block, "GPT2Block");
    add_container(out, block + ".attn", "GPT2Attention");
    add_linear(out, block + ".attn.c_attn", d, 3 * d);
    add_linear(out, block + ".attn.c_proj", d, d);
    add_container(out, block + ".mlp", "GPT2MLP");
    add_linear(out, block + ".mlp.c_fc", d, inner);
    add_linear(out, block + ".mlp.c_proj", inner, d);
  }
  add_linear(out, "lm_head", d, vocab);
  return out;
}

std::vector<ModuleDescription> describe_llama(const ConfigReader& c, const HfDescribeOptions& options) {
  const int64_t d = c.positive("hidden_size");
  const int64_t layers = c.positive("num_hidden_layers");
  const int64_t heads = c.positive("num_attention_heads");
  const int64_t kv_heads = c.positive_or("num_key_value_heads", heads);
  const int64_t ffn = c.positive("intermediate_size");
  const int64_t vocab = c.positive("vocab_size");
  if (!c.raw().contains("head_dim") && d % heads != 0) {
    throw FormatError(c.path() + ": hidden_size " + std::to_string(d) + " is not divisible by num_attention_heads " +
                      std::to_string(heads) + " and no head_dim is given");
  }
  const int64_t head_dim = c.positive_or("head_dim", d / heads);
  if (heads % kv_heads != 0) {
    throw FormatError(c.path() + ": num_attention_heads " + std::to_string(heads) +
                      " is not a multiple of num_key_value_heads " + std::to_string(kv_heads));
  }
  std::vector<ModuleDescription> out;
  add_container(out, "model", "LlamaModel");
  add_container(out, "model.layers", "ModuleList");
  for (int64_t i = 0; i < layers; ++i) {
    const std::string block = "model.layers." + std::to_string(i);
    add_container(out, block, "LlamaDecoderLayer");
    add_container(out, block + ".self_attn", "LlamaAttention");
    if (options.fused_qkv) {
      add_linear(out, block + ".self_attn.qkv_proj", d, (heads + 2 * kv_heads) * head_dim);
    } else {
      add_linear(out, block + ".self_attn.q_proj", d, heads * head_dim);
      add_linear(out, block + ".self_attn.k_proj", d, kv_heads * head_dim);
      add_linear(out, block + ".self_attn.v_proj", d, kv_heads * head_dim);
    }
    add_linear(out, block + ".self_attn.o_proj", heads * head_dim, d);
    add_container(out, block + ".mlp", "LlamaMLP");
    add_linear(out, block + ".mlp.gate_proj", d, ffn);
    add_linear(out, block + ".mlp.up_proj", d, ffn);
    add_linear(out, block + ".mlp.down_proj", ffn, d);
  }
  add_linear(out, "lm_head", d, vocab);
  return out;
}

}  // namespace

std::vector<ModuleDescription> describe_hf_model(const std::string& config_path, const HfDescribeOptions& options) {
  // POSIX stat rather than std::filesystem: see docs/design.md (LibTorch's wheel shadows its symbols).
  std::string path = config_path;
  struct stat info {};
  if (::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) path += "/config.json";
  std::ifstream in(path);
  if (!in) throw FormatError(path + ": cannot open the model config (hint: pass a config.json or a model folder)");
  json config;
  try {
    config = json::parse(in);
  } catch (const json::exception& e) {
    throw FormatError(path + ": not valid JSON (" + e.what() + ")");
  }
  if (!config.is_object()) throw FormatError(path + ": the config must be a JSON object");
  if (!config.contains("model_type") || !config.at("model_type").is_string()) {
    throw FormatError(path + ": missing string key 'model_type'");
  }
  const std::string type = config.at("model_type").get<std::string>();
  ConfigReader reader(path, std::move(config));
  if (type == "gpt2") {
    if (options.fused_qkv) throw ConfigError(path + ": --fused-qkv applies to Llama models; GPT-2's c_attn is already fused");
    return describe_gpt2(reader);
  }
  if (type == "llama" || type == "mistral" || type == "qwen2") return describe_llama(reader, options);
  throw FormatError(path + ": model_type '" + type + "' is not supported (supported: gpt2, llama)");
}

}  // namespace tiedlora
