// test_method.cpp: the torch-free core — method parsing, docs/method.md's parameter counts (checked against the
// Tied-LoRA paper's numbers), module selection rules and GPT-2 / Llama shapes from config.json.
#include <cstdlib>
#include <fstream>

#include <gtest/gtest.h>

#include "tiedlora/core/error.h"
#include "tiedlora/core/method.h"
#include "tiedlora/core/module_selection.h"
#include "tiedlora/formats/hf_config.h"

namespace {

using tiedlora::AdapterMethod;
using tiedlora::LinearShape;

TEST(AdapterMethod, PresetsAndMasksHaveCanonicalNames) {
  EXPECT_EQ(AdapterMethod::parse("lora").name(), "lora");
  EXPECT_EQ(AdapterMethod::parse("untied-ba").name(), "lora");
  EXPECT_EQ(AdapterMethod::parse("tied-vuba").name(), "tied-abuv");
  const auto tl5 = AdapterMethod::parse("tied-ab");
  EXPECT_TRUE(tl5.tied && tl5.train_a && tl5.train_b && !tl5.has_u() && !tl5.has_v());
  const auto vera = AdapterMethod::parse("tied-uv");
  EXPECT_TRUE(vera.tied && !vera.train_a && !vera.train_b && vera.has_u() && vera.has_v());
  EXPECT_EQ(vera.zero_factor(), AdapterMethod::ZeroFactor::v);
  EXPECT_EQ(tl5.zero_factor(), AdapterMethod::ZeroFactor::b);
}

// docs/method.md: Llama-2-7B fused QKV, L = 32, d_in = 4096, d_out = 12288, r = 8.
TEST(ParameterCounts, ReproduceThePapersLlama2Numbers) {
  const LinearShape qkv{4096, 12288};
  EXPECT_EQ(tiedlora::trainable_parameter_count(AdapterMethod::parse("lora"), 8, 32, qkv), 4194304);
  EXPECT_EQ(tiedlora::trainable_parameter_count(AdapterMethod::parse("tied-ab"), 8, 32, qkv), 131072);
  EXPECT_EQ(tiedlora::trainable_parameter_count(AdapterMethod::parse("tied-uv"), 8, 32, qkv), 393472);
  EXPECT_EQ(tiedlora::trainable_parameter_count(AdapterMethod::parse("tied-abuv"), 8, 32, qkv), 524544);
  EXPECT_DOUBLE_EQ(524544.0 / 4194304.0, 0.12506103515625);  // the paper's "13 %"
  // GPT-2B: L = 24, d = 2048, fused QKV 2048 -> 6144: TL6 is 13.55 % of LoRA.
  const LinearShape gpt2b{2048, 6144};
  const double ratio =
      static_cast<double>(tiedlora::trainable_parameter_count(AdapterMethod::parse("tied-abuv"), 8, 24, gpt2b)) /
      static_cast<double>(tiedlora::trainable_parameter_count(AdapterMethod::parse("lora"), 8, 24, gpt2b));
  EXPECT_NEAR(ratio, 0.1355, 5e-5);
  // Stored (trained + frozen random) parameters of the VeRA-like method include the frozen A and B.
  EXPECT_EQ(tiedlora::stored_parameter_count(AdapterMethod::parse("tied-uv"), 8, 32, qkv), 131072 + 393472);
}

TEST(AdapterScale, AlphaOverRankOrSqrtRank) {
  EXPECT_DOUBLE_EQ(tiedlora::adapter_scale(16, 8, false), 2.0);
  EXPECT_DOUBLE_EQ(tiedlora::adapter_scale(16, 16, true), 4.0);
  EXPECT_THROW(tiedlora::adapter_scale(16, 0, false), tiedlora::ConfigError);
}

TEST(ModuleSelection, PatternsIndicesAndDefaultGroups) {
  using tiedlora::name_matches;
  EXPECT_TRUE(name_matches("model.layers.3.self_attn.q_proj", "q_proj"));
  EXPECT_TRUE(name_matches("model.layers.3.self_attn.q_proj", "self_attn.q_proj"));
  EXPECT_TRUE(name_matches("q_proj", "q_proj"));
  EXPECT_FALSE(name_matches("model.layers.3.self_attn.xq_proj", "q_proj"));
  EXPECT_TRUE(name_matches("model.layers.3.self_attn.q_proj", "re:.*layers\\.[0-3]\\..*q_proj"));
  EXPECT_FALSE(name_matches("model.layers.3.self_attn.q_proj", "re:q_proj"));  // full match only
  EXPECT_THROW(name_matches("x", "re:("), tiedlora::ConfigError);
  EXPECT_EQ(tiedlora::layer_index("transformer.h.11.mlp.c_fc"), 11);
  EXPECT_FALSE(tiedlora::layer_index("lm_head").has_value());
  EXPECT_EQ(tiedlora::default_tie_group("transformer.h.11.attn.c_proj"), "transformer.h.*.attn.c_proj");
  EXPECT_EQ(tiedlora::default_tie_group("lm_head"), "lm_head");
}

std::string write_config(const std::string& name, const std::string& json) {
  const char* tmp = std::getenv("TMPDIR");
  const std::string path = std::string(tmp && *tmp ? tmp : "/tmp") + "/tiedlora_test_" + name + ".json";
  std::ofstream(path) << json;
  return path;
}

TEST(HfConfig, Gpt2GroupsSeparateAttentionAndMlpProjections) {
  const auto path = write_config(
      "gpt2", R"({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257})");
  const auto modules = tiedlora::describe_hf_model(path);
  tiedlora::SelectionOptions options;
  options.targets = {"c_proj"};
  const auto groups = tiedlora::select_modules(modules, options, AdapterMethod::parse("tied-abuv"));
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_EQ(groups[0].name, "transformer.h.*.attn.c_proj");
  EXPECT_EQ(groups[0].shape.in_features, 768);
  EXPECT_EQ(groups[1].name, "transformer.h.*.mlp.c_proj");
  EXPECT_EQ(groups[1].shape.in_features, 3072);
  EXPECT_EQ(groups[1].modules.size(), 12u);
  options.targets = {"all-linear"};
  const auto all = tiedlora::select_modules(modules, options, AdapterMethod::lora());
  EXPECT_EQ(all.size(), 4u);  // c_attn, attn.c_proj, c_fc, mlp.c_proj; lm_head excluded
}

TEST(HfConfig, LlamaWithGroupedQueryAttention) {
  const auto path = write_config("llama", R"({"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
      "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152})");
  const auto modules = tiedlora::describe_hf_model(path);
  tiedlora::SelectionOptions options;
  options.targets = {"k_proj", "o_proj"};
  const auto groups = tiedlora::select_modules(modules, options, AdapterMethod::lora());
  ASSERT_EQ(groups.size(), 2u);
  EXPECT_EQ(groups[0].shape.out_features, 192);  // 3 kv heads x 64
  EXPECT_EQ(groups[1].shape.in_features, 576);
}

TEST(HfConfig, MalformedConfigsNameTheFileAndKey) {
  auto message_of = [](const std::string& json) {
    try {
      tiedlora::describe_hf_model(write_config("bad", json));
    } catch (const tiedlora::FormatError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message_of(R"({"model_type": "gpt2", "n_layer": 2, "vocab_size": 5})").find("missing key 'n_embd'"),
            std::string::npos);
  EXPECT_NE(message_of(R"({"model_type": "gpt2", "n_embd": -4, "n_layer": 2, "vocab_size": 5})")
                .find("'n_embd' must be a positive integer"),
            std::string::npos);
  EXPECT_NE(message_of(R"({"model_type": "bert"})").find("'bert' is not supported"), std::string::npos);
  EXPECT_NE(message_of(R"({"model_type": )").find("not valid JSON"), std::string::npos);
  EXPECT_NE(message_of(R"({"model_type": "gpt2"})").find("tiedlora_test_bad.json"), std::string::npos);
}

}  // namespace
