// test_models.cpp: GPT-2 and Llama in C++ against transformers (tests/reference/make_model_reference.py):
// logits in fp32 and bf16, greedy generation with the KV cache, PEFT LoRA adapters loaded by name giving
// PEFT's logits, Tied-LoRA injected by Hugging Face names, and loader errors. It also writes a Tied-LoRA
// adapter and the logits through it, which tests/models/check_tied_logits.py gives to PEFT.
#include <fstream>

#include <torch/torch.h>

#include "test_support.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/formats/adapter.h"
#include "tiedlora/formats/safetensors.h"
#include "tiedlora/llm/causal_lm.h"
#include "util/files.h"

namespace {

using tiedlora::testing::all_close;
using tiedlora::testing::difference;

std::string models_dir() { return tiedlora::testing::reference_dir() + "/models"; }

std::map<std::string, torch::Tensor> reference(const std::string& name) {
  return tiedlora::formats::load_safetensors(models_dir() + "/" + name + "_reference.safetensors");
}

class EveryModel : public ::testing::TestWithParam<std::string> {};

TEST_P(EveryModel, Fp32LogitsMatchTransformers) {
  auto ref = reference(GetParam());
  auto model = tiedlora::llm::models::load_pretrained(models_dir() + "/" + GetParam());
  model->eval();
  torch::NoGradGuard no_grad;
  const auto logits = model->forward(ref.at("ids"));
  EXPECT_TRUE(all_close(logits, ref.at("logits"), 1e-5, 1e-5 * ref.at("logits").abs().max().item<double>(),
                        GetParam() + " fp32 logits"));
}

TEST_P(EveryModel, Bf16ErrorIsWithinTransformersOwnBf16Error) {
  auto ref = reference(GetParam());
  auto model = tiedlora::llm::models::load_pretrained(models_dir() + "/" + GetParam(), torch::kBFloat16);
  model->eval();
  torch::NoGradGuard no_grad;
  const auto ours = difference(model->forward(ref.at("ids")), ref.at("logits"));
  const auto theirs = difference(ref.at("logits_bf16"), ref.at("logits"));
  std::cout << "[" << GetParam() << " bf16] max |logit error|: ours " << ours.max_abs << ", transformers "
            << theirs.max_abs << "; mean: ours " << ours.mean_abs << ", transformers " << theirs.mean_abs << "\n";
  EXPECT_LE(ours.max_abs, 2.0 * theirs.max_abs);
  EXPECT_LE(ours.mean_abs, 2.0 * theirs.mean_abs);
}

TEST_P(EveryModel, GreedyGenerationWithKvCacheMatchesTransformers) {
  auto ref = reference(GetParam());
  auto model = tiedlora::llm::models::load_pretrained(models_dir() + "/" + GetParam());
  const auto prompt = ref.at("prompt");
  std::vector<int64_t> ids(prompt.data_ptr<int64_t>(), prompt.data_ptr<int64_t>() + prompt.numel());
  tiedlora::llm::models::GenerateOptions options;
  options.max_new_tokens = 12;
  options.stop_token_ids = {-1};  // transformers ran without an eos
  const auto ours = tiedlora::llm::models::generate_greedy(*model, ids, options);
  const auto expected = ref.at("generated");
  ASSERT_EQ(ours.size(), static_cast<size_t>(expected.numel()));
  for (size_t i = 0; i < ours.size(); ++i) EXPECT_EQ(ours[i], expected[i].item<int64_t>()) << "token " << i;
}

TEST_P(EveryModel, PeftLoraLoadedByNameGivesPeftsLogits) {
  auto ref = reference(GetParam());
  auto model = tiedlora::llm::models::load_pretrained(models_dir() + "/" + GetParam());
  tiedlora::load_adapter(*model, models_dir() + "/" + GetParam() + "_lora");
  model->eval();
  torch::NoGradGuard no_grad;
  const auto logits = model->forward(ref.at("ids"));
  EXPECT_TRUE(all_close(logits, ref.at("logits_lora"), 1e-5, 1e-5 * ref.at("logits_lora").abs().max().item<double>(),
                        GetParam() + " logits through PEFT's LoRA"));
  // Merged into the weights: the same logits.
  tiedlora::merge_adapters_(*model);
  EXPECT_TRUE(
      all_close(model->forward(ref.at("ids")), logits, 1e-5, 1e-5 * logits.abs().max().item<double>(), "merged"));
}

TEST_P(EveryModel, TiedLoraInjectsByHuggingFaceNames) {
  torch::manual_seed(9);
  auto ref = reference(GetParam());
  auto model = tiedlora::llm::models::load_pretrained(models_dir() + "/" + GetParam());
  const bool gpt2 = model->info().model_type == "gpt2";
  auto report = tiedlora::inject_adapters(*model, tiedlora::InjectOptions()
                                                      .targets(gpt2 ? std::vector<std::string>{"c_attn", "mlp.c_proj"}
                                                                    : std::vector<std::string>{"q_proj", "down_proj"})
                                                      .method("tied-abuv")
                                                      .lora(tiedlora::LoraOptions(4).seed(5)));
  EXPECT_EQ(report.groups.size(), 2u);
  EXPECT_EQ(report.groups[0].modules.size(), static_cast<size_t>(model->info().num_layers));
  model->eval();
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(all_close(model->forward(ref.at("ids")), ref.at("logits"), 1e-5,
                        1e-5 * ref.at("logits").abs().max().item<double>(), "zero delta at injection"));
  for (auto& p : tiedlora::trainable_parameters(*model)) p.normal_(0.3, 0.3);
  const auto logits = model->forward(ref.at("ids"));
  const std::string folder = models_dir() + "/" + GetParam() + "_cpp_tied";
  tiedlora::util::remove_tree(folder);
  tiedlora::save_adapter(*model, folder, {GetParam(), model->info().fan_in_fan_out, false});
  tiedlora::formats::save_safetensors(
      folder + "_logits.safetensors",
      std::map<std::string, torch::Tensor>{{"ids", ref.at("ids")}, {"logits", logits.contiguous()}});
}

TEST(Models, MergingATiedHeadIsRefusedAndLoadingOverAnAdapterToo) {
  auto model = tiedlora::llm::models::load_pretrained(models_dir() + "/gpt2");
  ASSERT_TRUE(model->info().tie_word_embeddings);
  tiedlora::inject_adapters(*model, tiedlora::InjectOptions().targets({"lm_head"}).method("lora"));
  const auto embedding = model->named_parameters()["transformer.wte.weight"].detach().clone();
  EXPECT_THROW(tiedlora::merge_adapters_(*model), tiedlora::ConfigError);
  EXPECT_TRUE(torch::equal(model->named_parameters()["transformer.wte.weight"], embedding));
  // The model carries an adapter: loading another one is refused before anything changes.
  EXPECT_THROW(tiedlora::load_adapter(*model, models_dir() + "/gpt2_lora"), tiedlora::ConfigError);
  EXPECT_EQ(tiedlora::adapted_layers(*model).size(), 1u);
}

INSTANTIATE_TEST_SUITE_P(Models, EveryModel, ::testing::Values("gpt2", "llama", "llama_tied"));

TEST(Models, ShardedCheckpointLoads) {
  std::ifstream index(models_dir() + "/llama/model.safetensors.index.json");
  EXPECT_TRUE(index.good()) << "the llama reference is meant to be sharded";
}

TEST(Models, LoaderErrorsNameTheTensors) {
  // A checkpoint for another config: every misshapen tensor is named, nothing is copied.
  auto model = tiedlora::llm::models::build_model(models_dir() + "/llama_tied");
  try {
    tiedlora::llm::models::load_hf_weights(*model, models_dir() + "/llama");
    FAIL() << "loading a mismatched checkpoint succeeded";
  } catch (const tiedlora::FormatError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find("does not fit the llama model"), std::string::npos) << message;
    EXPECT_NE(message.find("misshapen"), std::string::npos) << message;
    EXPECT_NE(message.find("model.embed_tokens.weight"), std::string::npos) << message;
  }
  EXPECT_THROW(tiedlora::llm::models::build_model(models_dir() + "/missing"), tiedlora::FormatError);
}

}  // namespace
