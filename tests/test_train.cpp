// test_train.cpp: fine-tuning (tiedlora/llm/train.h) on tiny random GPT-2 and Llama models: the schedule,
// batches and their loss masks, exact resume (the same losses, bit for bit, as an uninterrupted run, with
// adapter dropout on so the RNG state matters), a short fine-tune whose loss falls and whose adapter
// round-trips through save/load, early stopping's restored adapter, batched greedy decoding against
// one-prompt decoding, and save_pretrained against the Hugging Face loader.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <thread>
#include <tuple>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "chart/chart.h"
#include "test_support.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/distributed/launch.h"
#include "tiedlora/formats/adapter.h"
#include "tiedlora/formats/hf_config.h"
#include "tiedlora/formats/merge_checkpoint.h"
#include "tiedlora/formats/safetensors.h"
#include "tiedlora/llm/causal_lm.h"
#include "tiedlora/llm/train.h"
#include "util/files.h"

namespace tt = tiedlora::llm::train;
using nlohmann::json;
using tiedlora::llm::models::CausalLM;

namespace {

std::string make_temp_dir() {
  std::string pattern =
      (std::getenv("TMPDIR") ? std::string(std::getenv("TMPDIR")) : std::string("/tmp")) + "/tiedlora_train_XXXXXX";
  if (!::mkdtemp(pattern.data())) throw std::runtime_error("mkdtemp failed");
  return pattern;
}

constexpr int64_t kVocab = 61;

std::string write_config(const std::string& dir, const std::string& type) {
  json config = type == "gpt2"
                    ? json{{"model_type", "gpt2"}, {"vocab_size", kVocab}, {"n_positions", 64}, {"n_embd", 32},
                           {"n_layer", 2},         {"n_head", 4},          {"eos_token_id", 1}}
                    : json{{"model_type", "llama"},    {"vocab_size", kVocab},   {"hidden_size", 32},
                           {"intermediate_size", 64},  {"num_hidden_layers", 2}, {"num_attention_heads", 4},
                           {"num_key_value_heads", 2}, {"rms_norm_eps", 1e-5},   {"tie_word_embeddings", false},
                           {"eos_token_id", 1}};
  std::ofstream(dir + "/config.json") << config.dump(2);
  return dir + "/config.json";
}

// A fresh tiny model: same seed, same weights.
std::shared_ptr<CausalLM> tiny_model(const std::string& dir, const std::string& type = "llama") {
  torch::manual_seed(42);
  return tiedlora::llm::models::build_model(write_config(dir, type));
}

// A learnable task: the completion is a fixed marker token, the prompt's last token, then the end token 1.
std::vector<tt::TokenizedExample> tiny_task(int count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<tt::TokenizedExample> out;
  for (int i = 0; i < count; ++i) {
    tt::TokenizedExample e;
    const int length = 4 + static_cast<int>(rng() % 6);
    for (int j = 0; j < length; ++j) e.prompt.push_back(2 + static_cast<int64_t>(rng() % (kVocab - 2)));
    e.completion = {7, e.prompt[length - 1], 1};
    out.push_back(e);
  }
  return out;
}

void inject(CausalLM& model, const std::string& method, double dropout = 0.0) {
  const bool gpt2 = model.info().model_type == "gpt2";
  tiedlora::inject_adapters(model,
                            tiedlora::InjectOptions()
                                .targets(gpt2 ? std::vector<std::string>{"c_attn", "c_fc"}
                                              : std::vector<std::string>{"q_proj", "v_proj", "up_proj", "down_proj"})
                                .method(method)
                                .lora(tiedlora::LoraOptions(4).dropout(dropout).seed(7)));
}

std::vector<json> read_metrics(const std::string& path) {
  std::vector<json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) out.push_back(json::parse(line));
  return out;
}

tt::TrainOptions small_options(const std::string& dir) {
  tt::TrainOptions o;
  o.max_steps = 8;
  o.batch_size = 4;
  o.grad_accum = 2;
  o.lr = 1e-2;
  o.warmup_steps = 2;
  o.min_lr_ratio = 0.1;
  o.weight_decay = 0.01;
  o.eval_every = 2;
  o.max_length = 16;
  o.seed = 3;
  o.output_dir = dir;
  return o;
}

}  // namespace

TEST(Schedule, WarmupThenCosine) {
  // Warmup counts the current step: 1/4, 2/4, 3/4, 4/4 of the peak.
  for (int s = 0; s < 4; ++s) EXPECT_DOUBLE_EQ(tt::cosine_with_warmup(s, 20, 4, 2.0), 2.0 * (s + 1) / 4);
  EXPECT_DOUBLE_EQ(tt::cosine_with_warmup(4, 20, 4, 2.0), 2.0);          // cosine starts at the peak
  EXPECT_NEAR(tt::cosine_with_warmup(12, 20, 4, 2.0), 1.0, 1e-12);       // half way: half the peak
  EXPECT_NEAR(tt::cosine_with_warmup(12, 20, 4, 2.0, 0.5), 1.5, 1e-12);  // floor at peak * min_ratio
  EXPECT_NEAR(tt::cosine_with_warmup(20, 20, 4, 2.0, 0.1), 0.2, 1e-12);
  double previous = 3.0;
  for (int s = 4; s < 20; ++s) {
    const double lr = tt::cosine_with_warmup(s, 20, 4, 2.0);
    EXPECT_LT(lr, previous);
    previous = lr;
  }
}

TEST(Data, BatchMasksPromptAndPadding) {
  tt::TokenizedExample a{{5, 6, 7}, {8, 9, 1}}, b{{5, 6, 7, 10, 11, 12}, {13, 1}};
  const tt::Batch batch = tt::make_batch({&a, &b}, /*pad_id=*/0, /*max_length=*/64);
  // Longest sequence: 8 tokens, so 7 inputs.
  ASSERT_EQ(batch.input_ids.sizes(), (std::vector<int64_t>{2, 7}));
  EXPECT_TRUE(torch::equal(batch.input_ids[0], torch::tensor({5, 6, 7, 8, 9, 0, 0})));
  EXPECT_TRUE(torch::equal(batch.labels[0], torch::tensor({-100, -100, 8, 9, 1, -100, -100})));
  EXPECT_TRUE(torch::equal(batch.input_ids[1], torch::tensor({5, 6, 7, 10, 11, 12, 13})));
  EXPECT_TRUE(torch::equal(batch.labels[1], torch::tensor({-100, -100, -100, -100, -100, 13, 1})));
  EXPECT_EQ(batch.target_tokens, 5);
  EXPECT_EQ(batch.tokens, 5 + 7);
}

TEST(Data, LongPromptsLoseTheirStart) {
  tt::TokenizedExample e{{20, 21, 22, 23, 24, 25}, {30, 1}};
  const tt::Batch batch = tt::make_batch({&e}, 0, /*max_length=*/5);  // keeps 3 prompt tokens
  EXPECT_TRUE(torch::equal(batch.input_ids[0], torch::tensor({23, 24, 25, 30})));
  EXPECT_TRUE(torch::equal(batch.labels[0], torch::tensor({-100, -100, 30, 1})));
  tt::TokenizedExample too_long{{1}, {2, 3, 4, 5, 6}};
  EXPECT_THROW(tt::make_batch({&too_long}, 0, 5), tiedlora::ConfigError);
}

// Examples of varied lengths (prompts of 3 to 14 tokens, completions of 2 to 6) with random ids.
std::vector<tt::TokenizedExample> varied_examples(int count, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<tt::TokenizedExample> out(count);
  for (auto& e : out) {
    for (uint64_t j = 0, n = 3 + rng() % 12; j < n; ++j)
      e.prompt.push_back(2 + static_cast<int64_t>(rng() % (kVocab - 2)));
    for (uint64_t j = 0, n = 2 + rng() % 5; j < n; ++j)
      e.completion.push_back(2 + static_cast<int64_t>(rng() % (kVocab - 2)));
  }
  return out;
}

std::vector<const tt::TokenizedExample*> pointers(const std::vector<tt::TokenizedExample>& examples) {
  std::vector<const tt::TokenizedExample*> out;
  for (const auto& e : examples) out.push_back(&e);
  return out;
}

TEST(Data, PackedBatchLaysExamplesEndToEnd) {
  tt::TokenizedExample a{{5, 6, 7}, {8, 9, 1}}, b{{5, 6, 7, 10, 11, 12}, {13, 1}}, c{{20, 21}, {22, 1}};
  const tt::Batch padded = tt::make_batch({&a, &b, &c}, 0, 64);
  const tt::Batch packed = tt::make_packed_batch({&a, &b, &c}, 0, 64);
  // Longest first: b (7 inputs), a (5), c (3), in one row of 15 without padding.
  ASSERT_EQ(packed.input_ids.sizes(), (std::vector<int64_t>{1, 15}));
  EXPECT_EQ(packed.layout.segment_lengths, (std::vector<std::vector<int64_t>>{{7, 5, 3}}));
  EXPECT_TRUE(torch::equal(packed.input_ids[0], torch::tensor({5, 6, 7, 10, 11, 12, 13, 5, 6, 7, 8, 9, 20, 21, 22})));
  EXPECT_TRUE(torch::equal(packed.labels[0],
                           torch::tensor({-100, -100, -100, -100, -100, 13, 1, -100, -100, 8, 9, 1, -100, 22, 1})));
  EXPECT_EQ(packed.tokens, padded.tokens);
  EXPECT_EQ(packed.target_tokens, padded.target_tokens);
  EXPECT_FALSE(padded.packed());
  // Rows of at most 8 tokens: b alone (then padding, outside every segment), a and c together.
  const tt::Batch rows = tt::make_packed_batch({&a, &b, &c}, 0, 64, /*row_limit=*/8);
  ASSERT_EQ(rows.input_ids.sizes(), (std::vector<int64_t>{2, 8}));
  EXPECT_EQ(rows.layout.segment_lengths, (std::vector<std::vector<int64_t>>{{7}, {5, 3}}));
  EXPECT_EQ(rows.labels[0][7].item<int64_t>(), -100);
  EXPECT_EQ(rows.tokens, padded.tokens);
  // An example longer than the limit gets a row of its own.
  EXPECT_EQ(tt::make_packed_batch({&a, &b}, 0, 64, 4).layout.segment_lengths,
            (std::vector<std::vector<int64_t>>{{7}, {5}}));
  tt::TokenizedExample lone{{5}, {}};
  EXPECT_THROW(tt::make_packed_batch({&lone}, 0, 64), tiedlora::ConfigError);
}

// Whether the autograd graph behind `t` holds a node whose name contains `fragment`.
bool autograd_graph_has(const at::Tensor& t, const std::string& fragment) {
  std::vector<torch::autograd::Node*> pending{t.grad_fn().get()};
  std::set<torch::autograd::Node*> seen;
  while (!pending.empty()) {
    torch::autograd::Node* node = pending.back();
    pending.pop_back();
    if (!node || !seen.insert(node).second) continue;
    if (node->name().find(fragment) != std::string::npos) return true;
    for (const auto& edge : node->next_edges()) pending.push_back(edge.function.get());
  }
  return false;
}

// A packed batch computes what the padded batch of the same examples computes: the loss and every adapter
// gradient, for both architectures, a LoRA and a Tied-LoRA adapter, in one row and in rows with padding.
TEST(Packing, LossAndGradientsEqualThePaddedBatch) {
  const std::string root = make_temp_dir();
  const auto examples = varied_examples(7, 11);
  const auto items = pointers(examples);
  for (const std::string type : {"llama", "gpt2"}) {
    for (const std::string method : {"lora", "tied-abuv"}) {
      auto model = tiny_model(root, type);
      inject(*model, method);
      tiedlora::testing::randomize_trainable(*model, 5);
      model->train();
      const auto padded = tiedlora::testing::loss_and_gradients(
          *model, [&] { return tt::completion_loss_sum(*model, tt::make_batch(items, 0, 24)); });
      for (int64_t row_limit : {0, 20}) {
        const tt::Batch batch = tt::make_packed_batch(items, 0, 24, row_limit);
        const auto packed =
            tiedlora::testing::loss_and_gradients(*model, [&] { return tt::completion_loss_sum(*model, batch); });
        EXPECT_TRUE(tiedlora::testing::same_loss_and_gradients(packed, padded, 1e-5))
            << type << " " << method << " row_limit " << row_limit;
      }
    }
  }
  auto model = tiny_model(root);
  const auto ids = torch::randint(2, kVocab, {2, 6});
  EXPECT_THROW(model->hidden_states(ids, tiedlora::llm::models::PackedLayout{{{3, 3}, {6, 1}}}), tiedlora::ConfigError);
  EXPECT_THROW(model->hidden_states(ids, tiedlora::llm::models::PackedLayout{{{6}}}), tiedlora::ConfigError);
  EXPECT_THROW(model->hidden_states(ids, tiedlora::llm::models::PackedLayout{{{6}, {0, 6}}}), tiedlora::ConfigError);
  // Padding after the segments is outside them: a row of 100 holding one example of 10 is that example alone
  // (GPT-2's 64 positions bound the example, not the row).
  for (const std::string type : {"llama", "gpt2"}) {
    auto m = tiny_model(root, type);
    m->eval();
    const auto row = torch::randint(2, kVocab, {1, 100});
    const auto packed = m->hidden_states(row, tiedlora::llm::models::PackedLayout{{{4, 6}}});
    EXPECT_TRUE(tiedlora::testing::all_close(packed.narrow(1, 4, 6), m->hidden_states(row.narrow(1, 4, 6)), 1e-5, 1e-6,
                                             type + " second segment"));
    EXPECT_TRUE(torch::isfinite(packed).all().item<bool>());
  }
  tiedlora::util::remove_tree(root);
}

// Activation checkpointing recomputes each block in the backward pass: the same loss and gradients, also
// with adapter dropout (its masks are replayed) and tie groups' shared factors (reached from every layer).
TEST(ActivationCheckpointing, SameGradientsWithDropoutAndSharedFactors) {
  const std::string root = make_temp_dir();
  const auto examples = varied_examples(5, 12);
  const auto items = pointers(examples);
  for (const std::string type : {"llama", "gpt2"}) {
    auto model = tiny_model(root, type);
    inject(*model, "tied-abuv", /*dropout=*/0.2);
    tiedlora::testing::randomize_trainable(*model, 6);
    model->train();
    for (bool packed : {false, true}) {
      const tt::Batch batch = packed ? tt::make_packed_batch(items, 0, 24) : tt::make_batch(items, 0, 24);
      std::vector<at::Tensor> drawn_after;  // the random state after the backward pass: the replay must put it back
      auto run = [&](bool checkpoint) {
        model->set_activation_checkpointing(checkpoint);
        torch::manual_seed(9);  // the same dropout masks in both runs
        auto result =
            tiedlora::testing::loss_and_gradients(*model, [&] { return tt::completion_loss_sum(*model, batch); });
        drawn_after.push_back(torch::rand({4}));
        return result;
      };
      const auto plain = run(false), checkpointed = run(true);
      EXPECT_TRUE(tiedlora::testing::same_loss_and_gradients(checkpointed, plain, 1e-6))
          << type << " packed " << packed;
      EXPECT_TRUE(torch::equal(drawn_after[0], drawn_after[1])) << "the recomputation left the random state changed";
      // The blocks really ran under checkpointing (and do not outside training).
      const auto ids = tt::make_batch(items, 0, 24).input_ids;
      model->set_activation_checkpointing(true);
      EXPECT_TRUE(autograd_graph_has(model->hidden_states(ids), "CheckpointFunction")) << type;
      model->eval();
      EXPECT_FALSE(autograd_graph_has(model->hidden_states(ids), "CheckpointFunction")) << type << " in eval mode";
      model->train();
      model->set_activation_checkpointing(false);
      EXPECT_FALSE(autograd_graph_has(model->hidden_states(ids), "CheckpointFunction")) << type;
      // The dropout really drew masks: another seed gives another loss.
      model->set_activation_checkpointing(false);
      torch::manual_seed(10);
      EXPECT_NE(tt::completion_loss_sum(*model, batch).item<double>(), plain.loss);
    }
    // Under autocast the recomputation runs in the forward's precision (the backward pass itself runs
    // outside the autocast scope): bf16 gradients, not fp32 ones.
    const tt::Batch batch = tt::make_packed_batch(items, 0, 24);
    auto autocast_run = [&](bool checkpoint) {
      model->set_activation_checkpointing(checkpoint);
      torch::manual_seed(9);
      return tiedlora::testing::loss_and_gradients(*model, [&] {
        const tiedlora::testing::ScopedAutocast bf16(at::kCPU, at::kBFloat16);
        return tt::completion_loss_sum(*model, batch);
      });
    };
    const auto plain = autocast_run(false), checkpointed = autocast_run(true);
    EXPECT_TRUE(tiedlora::testing::same_loss_and_gradients(checkpointed, plain, 1e-6))
        << type << " under bf16 autocast";
    model->set_activation_checkpointing(false);
  }
  tiedlora::util::remove_tree(root);
}

TEST(Trainer, PackedRunFollowsThePaddedRunAndPackingIsOnWhereExact) {
  const std::string root = make_temp_dir();
  const auto train = varied_examples(40, 13);
  auto run = [&](std::optional<bool> packing, const std::string& method, double dropout, bool checkpoint = false) {
    auto model = tiny_model(root);
    inject(*model, method, dropout);
    tt::TrainOptions o;
    o.max_steps = 6;
    o.batch_size = 6;
    o.lr = 1e-2;
    o.max_length = 24;
    o.packing = packing;
    o.checkpoint_activations = checkpoint;
    tt::Trainer trainer(*model, train, {}, o, 0);
    std::vector<double> losses;
    tt::TrainCallbacks callbacks;
    callbacks.on_step = [&](const tt::StepRecord& r) {
      losses.push_back(r.loss);
      EXPECT_EQ(model->activation_checkpointing(), checkpoint) << "during the run the model follows the option";
    };
    trainer.run(callbacks);
    std::vector<at::Tensor> adapter;
    for (const auto& p : tiedlora::trainable_parameters(*model)) adapter.push_back(p.detach().clone());
    EXPECT_FALSE(model->activation_checkpointing()) << "the run gives the model its own setting back";
    return std::make_tuple(*trainer.options().packing, losses, adapter);
  };
  for (const std::string method : {"lora", "tied-abuv"}) {
    const auto [packed_on, packed_losses, packed_adapter] = run(std::nullopt, method, 0.0);
    const auto [padded_on, padded_losses, padded_adapter] = run(false, method, 0.0);
    EXPECT_TRUE(packed_on) << "packing is exact without dropout: on by default";
    EXPECT_FALSE(padded_on);
    ASSERT_EQ(packed_losses.size(), 6u);
    for (size_t i = 0; i < packed_losses.size(); ++i) {
      EXPECT_NEAR(packed_losses[i], padded_losses[i], 1e-5 * padded_losses[i]) << method << " step " << i + 1;
    }
    // Adam divides by the gradient's running RMS, which magnifies float rounding in elements whose gradient
    // is near zero: the adapters agree to 1e-4 of their largest element after six steps.
    for (size_t i = 0; i < packed_adapter.size(); ++i) {
      const auto d = tiedlora::testing::difference(packed_adapter[i], padded_adapter[i]);
      EXPECT_LE(d.max_abs, 1e-4 * d.max_ref) << method << " adapter tensor " << i;
    }
  }
  EXPECT_FALSE(std::get<0>(run(std::nullopt, "lora", 0.1))) << "with dropout, the default is the padded layout";
  // TrainOptions::checkpoint_activations: the same run, loss for loss.
  const auto plain_losses = std::get<1>(run(true, "tied-abuv", 0.1));
  const auto checkpointed_losses = std::get<1>(run(true, "tied-abuv", 0.1, /*checkpoint=*/true));
  ASSERT_EQ(checkpointed_losses.size(), plain_losses.size());
  for (size_t i = 0; i < plain_losses.size(); ++i)
    EXPECT_NEAR(checkpointed_losses[i], plain_losses[i], 1e-6 * plain_losses[i]);
  tiedlora::util::remove_tree(root);
}

// A reference adapter beside the one to train: trainable but not active, it would sit in the optimizer
// without a gradient, so the Trainer refuses it until it is frozen; then only the active adapter trains,
// and a named adapter (no "default") trains as well.
TEST(Trainer, TrainsTheActiveNamedAdapterAndRefusesTrainableInactiveOnes) {
  const std::string root = make_temp_dir();
  const auto train = varied_examples(12, 5);
  auto model = tiny_model(root);
  tiedlora::inject_adapters(*model, tiedlora::InjectOptions()
                                        .targets({"q_proj", "v_proj"})
                                        .method("tied-abuv")
                                        .lora(tiedlora::LoraOptions(4).seed(3))
                                        .adapter_name("candidate"));
  tiedlora::inject_adapters(
      *model,
      tiedlora::InjectOptions().targets({"q_proj"}).lora(tiedlora::LoraOptions(2).seed(4)).adapter_name("reference"));
  ASSERT_EQ(tiedlora::active_adapters(*model), std::vector<std::string>{"candidate"});
  tt::TrainOptions o;
  o.max_steps = 2;
  o.batch_size = 4;
  o.max_length = 24;
  const std::string refused = tiedlora::testing::error_of([&] { tt::Trainer(*model, train, {}, o, 0); });
  EXPECT_NE(refused.find("adapter 'reference' has trainable tensors"), std::string::npos) << refused;
  EXPECT_NE(refused.find("set_adapter_trainable"), std::string::npos) << refused;
  tiedlora::set_adapter_trainable(*model, "reference", false);
  std::vector<at::Tensor> reference_before;
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model, "reference")) {
    reference_before.push_back(layer->lora_B("reference").detach().clone());
  }
  tt::Trainer(*model, train, {}, o, 0).run();
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model, "candidate")) {
    EXPECT_GT(layer->lora_v_of("candidate").abs().max().item<double>(), 0) << name << ": the candidate did not train";
  }
  size_t i = 0;
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model, "reference")) {
    EXPECT_TRUE(at::equal(layer->lora_B("reference"), reference_before[i++])) << name << ": the frozen reference moved";
  }
}

// A checkpoint written before packing existed has no packing options: it resumes as the padded run it was,
// and a run that would pack by default is refused with a hint; a packed checkpoint is not resumed padded.
TEST(Trainer, CheckpointsFromBeforePackingResumeAsPaddedRuns) {
  const std::string root = make_temp_dir();
  const auto train = varied_examples(24, 15);
  auto options = [&](std::optional<bool> packing, const std::string& dir) {
    tt::TrainOptions o;
    o.max_steps = 4;
    o.batch_size = 4;
    o.max_length = 24;
    o.packing = packing;
    o.output_dir = dir;
    return o;
  };
  auto trainer_for = [&](std::optional<bool> packing, const std::string& dir) {
    auto model = tiny_model(root);
    inject(*model, "lora");
    return std::make_pair(model, std::make_unique<tt::Trainer>(*model, train, std::vector<tt::TokenizedExample>{},
                                                               options(packing, dir), 0));
  };
  {
    auto old_run = options(false, root + "/old");
    old_run.stop_at_step = 2;
    auto model = tiny_model(root);
    inject(*model, "lora");
    tt::Trainer(*model, train, {}, old_run, 0).run();
  }
  const std::string checkpoint = tt::Trainer::latest_checkpoint(root + "/old");
  ASSERT_FALSE(checkpoint.empty());
  {  // as an older tiedlora wrote it
    std::ifstream in(checkpoint + "/trainer_state.json");
    json state = json::parse(in);
    for (const char* key : {"packing", "pack_length", "group_by_length"}) state["options"].erase(key);
    std::ofstream(checkpoint + "/trainer_state.json") << state.dump(2);
  }
  auto [auto_model, automatic] = trainer_for(std::nullopt, root + "/old");
  EXPECT_NE(tiedlora::testing::error_of([&] { automatic->resume_from(checkpoint); }).find("--no-packing"),
            std::string::npos);
  auto [padded_model, padded] = trainer_for(false, root + "/old");
  padded->resume_from(checkpoint);
  EXPECT_EQ(padded->run().steps_done, 4);

  {
    auto packed_run = options(true, root + "/packed");
    packed_run.stop_at_step = 2;
    auto model = tiny_model(root);
    inject(*model, "lora");
    tt::Trainer(*model, train, {}, packed_run, 0).run();
  }
  auto [other_model, other] = trainer_for(false, root + "/packed");
  EXPECT_NE(tiedlora::testing::error_of([&] {
              other->resume_from(tt::Trainer::latest_checkpoint(root + "/packed"));
            }).find("packing"),
            std::string::npos);
  tiedlora::util::remove_tree(root);
}

// Checkpoints keep the parameter names of the layout before one naming rule held for every adapter (the
// default adapter's tensors on the layer itself, tie groups under `tiedlora_groups.<group>`), so checkpoints
// written before it resume; and a checkpoint written so resumes.
TEST(Trainer, CheckpointsKeepTheEarlierParameterNames) {
  const std::string root = make_temp_dir();
  const auto train = varied_examples(16, 15);
  for (const std::string method : {"lora", "tied-abuv"}) {
    tt::TrainOptions o;
    o.max_steps = 2;
    o.batch_size = 4;
    o.max_length = 24;
    o.output_dir = root + "/" + method;
    o.stop_at_step = 1;
    auto model = tiny_model(root);
    inject(*model, method);
    tt::Trainer(*model, train, {}, o, 0).run();
    const std::string checkpoint = tt::Trainer::latest_checkpoint(o.output_dir);
    ASSERT_FALSE(checkpoint.empty());
    const auto tensors = tiedlora::formats::load_safetensors(checkpoint + "/state.safetensors");
    size_t adapter_tensors = 0;
    for (const auto& [name, t] : tensors) {
      EXPECT_EQ(name.find("lora_adapters"), std::string::npos) << name;
      EXPECT_EQ(name.find("tiedlora_groups.default"), std::string::npos) << name;
      adapter_tensors += name.rfind("param.", 0) == 0;
    }
    EXPECT_GT(adapter_tensors, 0u);
    if (method == "lora") {
      EXPECT_TRUE(tensors.count("param.model.layers.0.self_attn.q_proj.lora_A"));
    } else {
      EXPECT_TRUE(tensors.count("param.model.layers.0.self_attn.q_proj.lora_u"));
      EXPECT_TRUE(std::any_of(tensors.begin(), tensors.end(), [](const auto& item) {
        return item.first.rfind("param.tiedlora_groups.", 0) == 0 &&
               item.first.find("q_proj.lora_A") != std::string::npos;
      }));
    }
    auto resumed_model = tiny_model(root);
    inject(*resumed_model, method);
    o.stop_at_step = 0;
    tt::Trainer resumed(*resumed_model, train, {}, o, 0);
    resumed.resume_from(checkpoint);
    EXPECT_EQ(resumed.run().steps_done, 2) << method;
  }
  tiedlora::util::remove_tree(root);
}

TEST(Trainer, LengthGroupedOrderSortsEachRunOfTheShuffle) {
  const auto train = varied_examples(130, 14);
  tt::TrainOptions o;
  o.batch_size = 2;   // runs of 100 examples
  o.max_length = 12;  // truncation counts: lengths are capped
  o.seed = 4;
  for (int64_t epoch : {0, 1}) {
    const auto shuffled = tt::epoch_order(train, o, epoch);
    o.group_by_length = true;
    const auto grouped = tt::epoch_order(train, o, epoch);
    o.group_by_length = false;
    ASSERT_EQ(grouped.size(), train.size());
    for (int64_t first : {0, 100}) {
      const int64_t last = std::min<int64_t>(first + 100, 130);
      // The same examples in each run, longest first.
      EXPECT_TRUE(std::is_permutation(grouped.begin() + first, grouped.begin() + last, shuffled.begin() + first));
      for (int64_t i = first + 1; i < last; ++i) {
        EXPECT_GE(tt::batch_length(train[grouped[i - 1]], o.max_length),
                  tt::batch_length(train[grouped[i]], o.max_length));
      }
    }
  }
  EXPECT_NE(tt::epoch_order(train, o, 0), tt::epoch_order(train, o, 1));
}

// The output folder of a run (issue: an --overwrite run that destroyed its own --model): overwrite removes
// only a marked run's own outputs, never an input and never a file a run did not write; every refusal leaves
// the folder as it was.
TEST(OutputFolder, OverwriteRemovesOnlyTheRunsOwnOutputsAndNeverAnInput) {
  namespace util = tiedlora::util;
  const std::string root = make_temp_dir(), dir = root + "/run";
  auto touch = [](const std::string& path) {
    util::make_directories(util::parent_path(path));
    std::ofstream(path) << "x";
  };
  auto refusal = [&](const std::string& folder, bool resume, bool overwrite,
                     std::vector<std::pair<std::string, std::string>> inputs = {}) {
    return tiedlora::testing::error_of([&] { tt::prepare_output_dir(folder, resume, overwrite, inputs); });
  };
  tt::prepare_output_dir(dir, false, false);
  ASSERT_TRUE(util::path_exists(dir + "/" + tt::kRunMarker));
  for (const char* name :
       {"/metrics.jsonl", "/checkpoints/step-2/state.json", "/merged/config.json", "/notes.txt", "/data/train.jsonl"})
    touch(dir + name);
  EXPECT_NE(refusal(dir, false, false).find("holds an earlier run"), std::string::npos);
  // The model inside the run's merged/ (train from runs/x/merged with --output runs/x): refused, untouched.
  for (const std::string model : {dir + "/merged", dir + "/merged/config.json"}) {
    const std::string error = refusal(dir, false, true, {{"--model", model}});
    EXPECT_NE(error.find("the --model " + model), std::string::npos) << error;
    EXPECT_TRUE(util::path_exists(dir + "/merged/config.json") && util::path_exists(dir + "/metrics.jsonl"));
  }
  // Data elsewhere in the folder is not an output: the overwrite goes ahead and removes the outputs alone.
  tt::prepare_output_dir(dir, false, true, {{"--train", dir + "/data/train.jsonl"}});
  for (const char* gone : {"/metrics.jsonl", "/checkpoints", "/merged"}) EXPECT_FALSE(util::path_exists(dir + gone));
  for (const char* kept : {"/notes.txt", "/data/train.jsonl"}) EXPECT_TRUE(util::path_exists(dir + kept)) << kept;
  EXPECT_TRUE(util::path_exists(dir + "/" + tt::kRunMarker));
  // An output folder inside the model's folder.
  touch(root + "/model/config.json");
  EXPECT_NE(refusal(root + "/model/run", false, false, {{"--model", root + "/model"}}).find("lies inside"),
            std::string::npos);
  EXPECT_FALSE(util::path_exists(root + "/model/run"));
  // checkpoints/ and metrics.jsonl without the marker: not a run tiedlora marked, nothing removed, overwrite or
  // not; resuming it (a run from before the marker) keeps everything and marks it.
  const std::string foreign = root + "/foreign";
  touch(foreign + "/checkpoints/mine.bin");
  touch(foreign + "/metrics.jsonl");
  for (const bool overwrite : {false, true}) {
    EXPECT_NE(refusal(foreign, false, overwrite).find("without tiedlora_run.json"), std::string::npos);
    EXPECT_TRUE(util::path_exists(foreign + "/checkpoints/mine.bin") && util::path_exists(foreign + "/metrics.jsonl"));
  }
  tt::prepare_output_dir(foreign, /*resume=*/true, false);
  EXPECT_TRUE(util::path_exists(foreign + "/checkpoints/mine.bin") &&
              util::path_exists(foreign + "/" + tt::kRunMarker));
  util::remove_tree(root);
}

TEST(Data, JsonlErrorsNameFileAndLine) {
  const std::string dir = make_temp_dir();
  std::ofstream(dir + "/bad.jsonl") << "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\"}\n";
  try {
    tt::read_jsonl(dir + "/bad.jsonl");
    FAIL() << "no error";
  } catch (const tiedlora::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("bad.jsonl:2: missing \"completion\""), std::string::npos) << e.what();
  }
  std::ofstream(dir + "/broken.jsonl") << "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \n";
  EXPECT_THROW(tt::read_jsonl(dir + "/broken.jsonl"), tiedlora::FormatError);
  std::ofstream(dir + "/good.jsonl") << "{\"prompt\": \"p\", \"completion\": \"c\", \"task\": \"qa\", \"id\": 3}\n\n";
  const auto examples = tt::read_jsonl(dir + "/good.jsonl");
  ASSERT_EQ(examples.size(), 1u);
  EXPECT_EQ(examples[0].task, "qa");
}

TEST(Evaluation, SquadNormalisation) {
  EXPECT_EQ(tt::normalize_answer("  The Albany."), "albany");
  EXPECT_EQ(tt::normalize_answer("a harbor  survey!"), "harbor survey");
  EXPECT_EQ(tt::normalize_answer("1,200"), "1200");
  EXPECT_NE(tt::normalize_answer("12"), tt::normalize_answer("21"));
}

// The heart of --resume: stop after step 4 (checkpoint), continue in a fresh process-like setting (new
// model, new trainer), and get the same numbers as one uninterrupted run.
TEST(Trainer, ResumeContinuesExactly) {
  const std::string root = make_temp_dir();
  const auto train = tiny_task(40, 1), validation = tiny_task(8, 2);

  auto whole_model = tiny_model(root);
  inject(*whole_model, "tied-abuv", /*dropout=*/0.1);
  tt::Trainer whole(*whole_model, train, validation, small_options(root + "/whole"), 0);
  const tt::TrainResult whole_result = whole.run();
  ASSERT_EQ(whole_result.steps_done, 8);

  {
    auto first_model = tiny_model(root);
    inject(*first_model, "tied-abuv", 0.1);
    auto options = small_options(root + "/split");
    options.stop_at_step = 4;
    tt::Trainer first(*first_model, train, validation, options, 0);
    const tt::TrainResult stopped = first.run();
    EXPECT_TRUE(stopped.interrupted);
    EXPECT_EQ(stopped.steps_done, 4);
  }
  torch::manual_seed(999);  // the resumed run must not depend on the generator's state before resuming
  auto second_model = tiny_model(root);
  inject(*second_model, "tied-abuv", 0.1);
  tt::Trainer second(*second_model, train, validation, small_options(root + "/split"), 0);
  const std::string checkpoint = tt::Trainer::latest_checkpoint(root + "/split");
  ASSERT_NE(checkpoint.find("step-00000004"), std::string::npos) << checkpoint;
  second.resume_from(checkpoint);
  const tt::TrainResult resumed = second.run();
  EXPECT_EQ(resumed.steps_done, 8);
  EXPECT_EQ(resumed.best_step, whole_result.best_step);

  const auto a = read_metrics(root + "/whole/metrics.jsonl"), b = read_metrics(root + "/split/metrics.jsonl");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    for (const char* key : {"step", "loss", "lr", "grad_norm", "tokens", "target_tokens", "validation_loss"}) {
      if (a[i].contains(key)) EXPECT_EQ(a[i].at(key), b[i].at(key)) << "metrics line " << i + 1 << ", " << key;
    }
  }
  const auto pa = tiedlora::trainable_parameters(*whole_model), pb = tiedlora::trainable_parameters(*second_model);
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(torch::equal(pa[i], pb[i])) << "parameter " << i;

  // A checkpoint refuses a run with another schedule.
  auto other_model = tiny_model(root);
  inject(*other_model, "tied-abuv", 0.1);
  auto other_options = small_options(root + "/split");
  other_options.lr = 5e-3;
  tt::Trainer other(*other_model, train, validation, other_options, 0);
  try {
    other.resume_from(checkpoint);
    FAIL() << "resumed with another lr";
  } catch (const tiedlora::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("lr"), std::string::npos) << e.what();
  }
  // ... and other data of the same size.
  auto changed = train;
  changed[3].completion[0] = 8;
  tt::Trainer other_data(*other_model, changed, validation, small_options(root + "/split"), 0);
  try {
    other_data.resume_from(checkpoint);
    FAIL() << "resumed with other data";
  } catch (const tiedlora::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("other training or validation data"), std::string::npos) << e.what();
  }
}

// The library installs no signal handler: its long operations stop when their stop_requested callback says
// so. The trainer checkpoints and returns; the merge abandons its temporary folder and writes nothing.
// Without a stop, merge-weights and LoraLinear::merge_ give the same bits (one merge function).
// The Trainer owns adapter dropout's generator: a run (with dropout, and with activation checkpointing,
// which replays it) and a resume neither read nor write the global generator, and its masks do not depend
// on the global generator's state.
TEST(Trainer, OwnsItsRandomnessAndLeavesTheGlobalGeneratorAlone) {
  const std::string root = make_temp_dir();
  const auto train = tiny_task(24, 1);
  auto losses_of_a_run = [&](uint64_t global_seed, bool checkpointing, const std::string& dir) {
    auto model = tiny_model(root);
    inject(*model, "tied-abuv", /*dropout=*/0.3);
    torch::manual_seed(global_seed);
    const at::Tensor global_before = at::detail::getDefaultCPUGenerator().get_state();
    auto options = small_options(dir);
    options.checkpoint_activations = checkpointing;
    tt::Trainer(*model, train, {}, options, 0).run();
    EXPECT_TRUE(torch::equal(at::detail::getDefaultCPUGenerator().get_state(), global_before))
        << "the run moved the global generator";
    std::vector<double> losses;
    for (const auto& line : read_metrics(dir + "/metrics.jsonl")) {
      if (line.contains("loss")) losses.push_back(line.at("loss").get<double>());
    }
    return losses;
  };
  const auto first = losses_of_a_run(1, false, root + "/a"), second = losses_of_a_run(12345, false, root + "/b");
  ASSERT_FALSE(first.empty());
  EXPECT_EQ(first, second) << "dropout masks followed the global generator";
  const auto checkpointed = losses_of_a_run(7, true, root + "/c");
  ASSERT_EQ(checkpointed.size(), first.size());
  for (size_t i = 0; i < first.size(); ++i) EXPECT_NEAR(checkpointed[i], first[i], 1e-5 * std::abs(first[i])) << i;
  tiedlora::util::remove_tree(root);
}

TEST(Cancellation, TrainerAndMergeStopWhenAsked) {
  const std::string root = make_temp_dir();
  auto model = tiny_model(root, "gpt2");  // Conv1D weights: merge-weights merges them transposed
  inject(*model, "tied-abuv");
  auto options = small_options(root + "/run");
  options.eval_every = 0;
  tt::Trainer trainer(*model, tiny_task(40, 1), {}, options, 0);
  int asked = 0;
  tt::TrainCallbacks callbacks;
  callbacks.stop_requested = [&] { return ++asked == 3; };
  const tt::TrainResult stopped = trainer.run(callbacks);
  EXPECT_TRUE(stopped.interrupted);
  EXPECT_EQ(stopped.steps_done, 3);
  EXPECT_NE(stopped.last_checkpoint.find("step-00000003"), std::string::npos) << stopped.last_checkpoint;

  tiedlora::SaveAdapterOptions save;
  save.fan_in_fan_out = model->info().fan_in_fan_out;
  tiedlora::save_adapter(*model, root + "/adapter", save);
  tiedlora::llm::models::save_pretrained(*model, root + "/base");
  tiedlora::MergeOptions merge;
  merge.base = root + "/base";
  merge.adapter = root + "/adapter";
  merge.out = root + "/merged";
  int tensors = 0;
  merge.stop_requested = [&] { return ++tensors > 2; };
  EXPECT_THROW(tiedlora::merge_checkpoint(merge), tiedlora::Cancelled);
  EXPECT_FALSE(std::ifstream(merge.out + "/config.json").good());
  EXPECT_EQ(tensors, 3);
  merge.stop_requested = nullptr;
  const tiedlora::MergeReport report = tiedlora::merge_checkpoint(merge);
  EXPECT_EQ(report.merged.size(), 4u);  // c_attn and c_fc of both layers

  tiedlora::merge_adapters_(*model);
  const auto merged = tiedlora::formats::Checkpoint::open(merge.out);
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model)) {
    // The checkpoint stores GPT-2's Conv1D weights as (in, out); the module holds (out, in).
    const std::string tensor = name + ".weight";
    const std::string stored = merged.contains(tensor) ? tensor : tensor.substr(tensor.find('.') + 1);
    EXPECT_TRUE(torch::equal(merged.tensor(stored).t(), layer->weight)) << name;
  }
}

// One architecture description: the module tree `tiedlora params` lists (describe_hf_model) is the tree the
// builder makes, layer for layer, for every supported model_type; Qwen2's q/k/v biases exist in both, and
// Mistral's sliding window is honoured up to the window and refused beyond it.
TEST(ModelConfig, ParamsAndBuilderDescribeTheSameModel) {
  const std::string root = make_temp_dir();
  const json llama = {{"vocab_size", kVocab},   {"hidden_size", 32},        {"intermediate_size", 48},
                      {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 2},
                      {"eos_token_id", 1}};
  std::vector<json> configs = {{{"model_type", "gpt2"},
                                {"vocab_size", kVocab},
                                {"n_positions", 64},
                                {"n_embd", 32},
                                {"n_layer", 2},
                                {"n_head", 4},
                                {"n_inner", 40}}};
  for (const char* type : {"llama", "mistral", "qwen2"}) {
    json c = llama;
    c["model_type"] = type;
    if (std::string(type) == "mistral") c["sliding_window"] = 8;
    configs.push_back(c);
  }
  for (const json& config : configs) {
    const std::string type = config.at("model_type");
    SCOPED_TRACE(type);
    const std::string path = root + "/" + type + ".json";
    std::ofstream(path) << config.dump();
    std::map<std::string, tiedlora::LinearShape> described;
    for (const auto& m : tiedlora::describe_hf_model(path)) {
      if (m.is_linear) described[m.name] = m.shape;
    }
    const auto model = tiedlora::llm::models::build_model(path);
    std::map<std::string, tiedlora::LinearShape> built;
    for (const auto& item : model->named_modules("", /*include_self=*/false)) {
      if (const auto* layer = item.value()->as<tiedlora::LoraLinearImpl>()) {
        built[item.key()] = {layer->options.in_features(), layer->options.out_features()};
      }
    }
    ASSERT_EQ(described.size(), built.size());
    for (const auto& [name, shape] : described) {
      ASSERT_TRUE(built.count(name)) << name;
      EXPECT_EQ(built[name].in_features, shape.in_features) << name;
      EXPECT_EQ(built[name].out_features, shape.out_features) << name;
    }
    const auto params = model->named_parameters();
    if (type == "qwen2") {
      EXPECT_NE(params.find("model.layers.0.self_attn.q_proj.bias"), nullptr);
      EXPECT_NE(params.find("model.layers.0.self_attn.v_proj.bias"), nullptr);
      EXPECT_EQ(params.find("model.layers.0.self_attn.o_proj.bias"), nullptr);
    }
    if (type == "mistral") {
      torch::NoGradGuard no_grad;
      EXPECT_NO_THROW(model->forward(torch::randint(2, kVocab, {1, 8})));
      EXPECT_THROW(model->forward(torch::randint(2, kVocab, {1, 9})), c10::Error);
    }
  }
  // A Qwen2 trained with sliding windows is refused by both, with the key named.
  json windowed = llama;
  windowed["model_type"] = "qwen2";
  windowed["use_sliding_window"] = true;
  std::ofstream(root + "/qwen2_window.json") << windowed.dump();
  for (int which = 0; which < 2; ++which) {
    try {
      if (which == 0)
        tiedlora::describe_hf_model(root + "/qwen2_window.json");
      else
        tiedlora::llm::models::build_model(root + "/qwen2_window.json");
      ADD_FAILURE() << "a Qwen2 config with use_sliding_window was accepted";
    } catch (const tiedlora::FormatError& e) {
      EXPECT_NE(std::string(e.what()).find("use_sliding_window"), std::string::npos) << e.what();
    }
  }
}

TEST(Trainer, RefusesExamplesThatCannotFitBeforeTraining) {
  const std::string root = make_temp_dir();
  auto model = tiny_model(root);
  inject(*model, "lora");
  auto train = tiny_task(8, 1);
  train[5].completion.assign(20, 3);
  try {
    tt::Trainer trainer(*model, train, {}, small_options(root + "/run"), 0);
    FAIL() << "accepted a completion longer than max_length";
  } catch (const tiedlora::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("training example 6"), std::string::npos) << e.what();
  }
}

// Early stopping: with an improvement threshold nothing can meet, the second evaluation exhausts patience 1;
// the first evaluation's adapter comes back, and resuming the final checkpoint does not train on.
TEST(Trainer, EarlyStoppingStaysStoppedOnResume) {
  const std::string root = make_temp_dir();
  const auto train = tiny_task(40, 1), validation = tiny_task(8, 2);
  auto options = small_options(root + "/run");
  options.max_steps = 30;
  options.eval_every = 1;
  options.patience = 1;
  options.min_delta = 1e9;
  auto model = tiny_model(root);
  inject(*model, "lora");
  tt::Trainer trainer(*model, train, validation, options, 0);
  const tt::TrainResult result = trainer.run();
  ASSERT_TRUE(result.stopped_early);
  EXPECT_EQ(result.steps_done, 2);
  EXPECT_EQ(result.best_step, 1);
  EXPECT_EQ(trainer.validation_loss(), result.best_validation_loss);

  auto again_model = tiny_model(root);
  inject(*again_model, "lora");
  tt::Trainer again(*again_model, train, validation, options, 0);
  again.resume_from(tt::Trainer::latest_checkpoint(root + "/run"));
  const tt::TrainResult resumed = again.run();
  EXPECT_TRUE(resumed.stopped_early);
  EXPECT_EQ(resumed.steps_done, result.steps_done);
  EXPECT_EQ(again.validation_loss(), result.best_validation_loss);
}

// A short fine-tune: the loss falls, the best adapter is the one kept, and the saved adapter gives the
// same logits when loaded into a fresh copy of the base model.
TEST(Trainer, ShortFineTuneLearnsAndTheAdapterRoundTrips) {
  for (const std::string type : {"llama", "gpt2"}) {
    SCOPED_TRACE(type);
    const std::string root = make_temp_dir();
    const auto train = tiny_task(64, 5), validation = tiny_task(16, 6);
    auto model = tiny_model(root, type);
    inject(*model, type == "gpt2" ? "lora" : "tied-abuv");
    tt::TrainOptions options = small_options(root + "/run");
    options.max_steps = 40;
    options.eval_every = 5;
    options.lr = 3e-2;
    tt::Trainer trainer(*model, train, validation, options, 0);
    const double before = trainer.validation_loss();
    const tt::TrainResult result = trainer.run();
    const double after = trainer.validation_loss();
    EXPECT_EQ(after, result.best_validation_loss);  // the restored adapter is the best one
    EXPECT_LT(after, 0.8 * before) << "validation loss " << before << " -> " << after;
    const auto metrics = read_metrics(root + "/run/metrics.jsonl");
    double first = 0, last = 0;
    int steps = 0;
    for (const auto& m : metrics) {
      if (!m.contains("loss")) continue;
      ++steps;
      if (steps <= 5) first += m.at("loss").get<double>() / 5;
      if (steps > 35) last += m.at("loss").get<double>() / 5;
    }
    EXPECT_EQ(steps, 40);
    EXPECT_LT(last, 0.8 * first) << "train loss of the first 5 steps " << first << ", of the last 5 " << last;

    tiedlora::SaveAdapterOptions save;
    save.fan_in_fan_out = model->info().fan_in_fan_out;
    tiedlora::save_adapter(*model, root + "/adapter", save);
    auto reloaded = tiny_model(root, type);
    tiedlora::load_adapter(*reloaded, root + "/adapter");
    model->eval();
    reloaded->eval();
    torch::NoGradGuard no_grad;
    const auto batch = tt::make_batch({&validation[0], &validation[1]}, 0, 16);
    EXPECT_TRUE(torch::equal(model->forward(batch.input_ids), reloaded->forward(batch.input_ids)));

#if TIEDLORA_WITH_CHART  // a build without cairo has no charts (tools/chart/chart_stub.cpp says so)
    // The loss curve is a PNG.
    tiedlora::chart::write_line_chart(root + "/loss.png", {{"train", {1, 2, 3}, {3, 2, 1.5}, false}}, {"t", "x", "y"});
    std::ifstream png(root + "/loss.png", std::ios::binary);
    char signature[8];
    png.read(signature, 8);
    EXPECT_EQ(std::string(signature, 8), std::string("\x89PNG\r\n\x1a\n", 8));
    // And an SVG, with the series drawn as a path; any other extension is refused by name.
    tiedlora::chart::write_line_chart(root + "/loss.svg", {{"train", {1, 2, 3}, {3, 2, 1.5}, false}}, {"t", "x", "y"});
    std::ifstream svg_file(root + "/loss.svg");
    const std::string svg((std::istreambuf_iterator<char>(svg_file)), std::istreambuf_iterator<char>());
    EXPECT_NE(svg.find("<svg"), std::string::npos);
    EXPECT_NE(svg.find("<path"), std::string::npos);
    EXPECT_THROW(tiedlora::chart::write_line_chart(root + "/loss.bmp", {{"train", {1, 2}, {3, 2}, false}}, {}),
                 tiedlora::Error);
#endif
  }
}

TEST(Generation, BatchedEqualsOnePromptAtATime) {
  for (const std::string type : {"llama", "gpt2"}) {
    SCOPED_TRACE(type);
    const std::string root = make_temp_dir();
    auto model = tiny_model(root, type);
    // Sharpen the random model's logits so greedy choices are not near-ties.
    {
      torch::NoGradGuard no_grad;
      for (auto& p : model->parameters()) p.mul_(3.0);
    }
    std::vector<std::vector<int64_t>> prompts = {
        {5, 9, 13}, {7, 8, 9, 10, 11, 12, 13, 14, 15}, {20}, {33, 2, 40, 41, 3}};
    tiedlora::llm::models::GenerateOptions options;
    options.max_new_tokens = 8;
    options.stop_token_ids = {1};
    const auto batched = tiedlora::llm::models::generate_greedy_batch(*model, prompts, options);
    ASSERT_EQ(batched.size(), prompts.size());
    for (size_t i = 0; i < prompts.size(); ++i) {
      EXPECT_EQ(batched[i], tiedlora::llm::models::generate_greedy(*model, prompts[i], options)) << "prompt " << i;
    }
    // Padding must not leak into the logits of a left-padded row.
    tiedlora::llm::models::KVCache cache;
    cache.attention_mask = torch::tensor({0, 0, 1, 1, 1}, torch::kLong).to(torch::kBool).unsqueeze(0);
    torch::NoGradGuard no_grad;
    const auto padded = model->forward(torch::tensor({50, 51, 5, 9, 13}, torch::kLong).unsqueeze(0), &cache);
    const auto alone = model->forward(torch::tensor({5, 9, 13}, torch::kLong).unsqueeze(0));
    EXPECT_TRUE(tiedlora::testing::all_close(padded.narrow(1, 2, 3), alone, 1e-5, 1e-5, "left-padded logits"));
  }
}

TEST(SavePretrained, RoundTripsThroughTheHuggingFaceLoader) {
  for (const std::string type : {"llama", "gpt2"}) {
    SCOPED_TRACE(type);
    const std::string root = make_temp_dir();
    auto model = tiny_model(root, type);
    inject(*model, "lora");  // adapter tensors are not written
    tiedlora::llm::models::save_pretrained(*model, root + "/saved");
    EXPECT_THROW(tiedlora::llm::models::save_pretrained(*model, root + "/saved"), tiedlora::ConfigError);
    torch::manual_seed(1);  // other random weights, then loaded
    auto loaded = tiedlora::llm::models::load_pretrained(root + "/saved");
    for (const auto& item : loaded->named_parameters()) {
      const auto* original = model->named_parameters().find(item.key());
      ASSERT_NE(original, nullptr) << item.key();
      EXPECT_TRUE(torch::equal(item.value(), *original)) << item.key();
    }
    if (type != "gpt2") continue;
    // A tied model's checkpoint that stores the head too (transformers reads such files): accepted when the
    // head is the embedding, refused by name when it is not.
    const auto saved = tiedlora::formats::Checkpoint::open(root + "/saved");
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    for (const auto& name : saved.names()) tensors.emplace_back(name, saved.tensor(name).clone());
    const at::Tensor embedding = saved.tensor("transformer.wte.weight").clone();
    for (const bool same : {true, false}) {
      auto with_head = tensors;
      with_head.emplace_back("lm_head.weight", same ? embedding : embedding + 1);
      tiedlora::formats::save_safetensors(root + "/saved/model.safetensors", with_head, {{"format", "pt"}});
      if (same) {
        EXPECT_NO_THROW(tiedlora::llm::models::load_pretrained(root + "/saved"));
      } else {
        try {
          tiedlora::llm::models::load_pretrained(root + "/saved");
          ADD_FAILURE() << "a head that is not the tied embedding was accepted";
        } catch (const tiedlora::FormatError& e) {
          EXPECT_NE(std::string(e.what()).find("'lm_head.weight' is not the embedding"), std::string::npos) << e.what();
        }
      }
    }
  }
}

// ---- data parallelism: the pieces that need no second process (tests/distributed runs the processes) ------

namespace {

// Sets environment variables for one test and restores them after.
class ScopedEnvironment {
 public:
  explicit ScopedEnvironment(std::vector<std::pair<std::string, std::string>> values) {
    for (const char* name :
         {"OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
          "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
          "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"}) {
      const char* old = std::getenv(name);
      saved_.emplace_back(name, old ? std::optional<std::string>(old) : std::nullopt);
      ::unsetenv(name);
    }
    for (const auto& [name, value] : values) ::setenv(name.c_str(), value.c_str(), 1);
  }
  ~ScopedEnvironment() {
    for (const auto& [name, value] : saved_) {
      if (value)
        ::setenv(name.c_str(), value->c_str(), 1);
      else
        ::unsetenv(name.c_str());
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

}  // namespace

TEST(Distributed, ShardsCoverEveryItemOnceInOrder) {
  for (int64_t count : {0, 1, 5, 8, 13}) {
    for (int world : {1, 2, 3, 8}) {
      int64_t next = 0;
      for (int rank = 0; rank < world; ++rank) {
        const auto [begin, end] = tiedlora::distributed::shard_range(count, rank, world);
        EXPECT_EQ(begin, next);
        EXPECT_LE(end - begin, count / world + 1);
        EXPECT_GE(end - begin, count / world);
        next = end;
      }
      EXPECT_EQ(next, count) << count << " items, " << world << " ranks";
    }
  }
}

TEST(Distributed, LauncherEnvironments) {
  namespace dist = tiedlora::distributed;
  {
    const ScopedEnvironment env({});
    const auto launch = dist::LaunchEnvironment::from_environment();
    EXPECT_EQ(launch.launcher, dist::LaunchEnvironment::Launcher::none);
    EXPECT_EQ(launch.world_size, 1);
    auto group = dist::init_from_environment();
    EXPECT_EQ(group->backend(), "local");
    EXPECT_EQ(dist::broadcast_text(*group, "only", 0, "text"), "only");
    EXPECT_EQ(dist::all_gather_text(*group, "mine", "text"), std::vector<std::string>{"mine"});
  }
  {
    const ScopedEnvironment env({{"WORLD_SIZE", "4"},
                                 {"RANK", "3"},
                                 {"LOCAL_RANK", "1"},
                                 {"LOCAL_WORLD_SIZE", "2"},
                                 {"MASTER_ADDR", "node0"},
                                 {"MASTER_PORT", "29500"},
                                 {"TORCHELASTIC_USE_AGENT_STORE", "True"},
                                 {"TORCHELASTIC_RESTART_COUNT", "2"}});
    const auto launch = dist::LaunchEnvironment::from_environment();
    EXPECT_EQ(std::string(launch.launcher_name()), "torchrun");
    EXPECT_EQ(std::make_tuple(launch.rank, launch.world_size, launch.local_rank, launch.local_world_size),
              std::make_tuple(3, 4, 1, 2));
    EXPECT_EQ(launch.master_addr, "node0");
    EXPECT_EQ(launch.master_port, 29500);
    EXPECT_TRUE(launch.agent_store);
    EXPECT_EQ(launch.restart_count, 2);
    // CPU processes under torchrun: refused with the launcher that works.
    try {
      dist::init_from_environment();
      ADD_FAILURE() << "CPU processes under torchrun were accepted";
    } catch (const tiedlora::ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("mpirun -np 4"), std::string::npos) << e.what();
    }
  }
  {
    const ScopedEnvironment env({{"OMPI_COMM_WORLD_SIZE", "2"},
                                 {"OMPI_COMM_WORLD_RANK", "1"},
                                 {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                                 {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"}});
    const auto launch = dist::LaunchEnvironment::from_environment();
    EXPECT_EQ(std::string(launch.launcher_name()), "mpirun");
    EXPECT_EQ(std::make_tuple(launch.rank, launch.world_size, launch.local_world_size), std::make_tuple(1, 2, 2));
  }
  for (const auto& bad : std::vector<std::vector<std::pair<std::string, std::string>>>{
           {{"WORLD_SIZE", "2"}, {"RANK", "2"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "1"}},
           {{"WORLD_SIZE", "2"}, {"RANK", "x"}},
           {{"WORLD_SIZE", "2"}, {"RANK", "0"}},  // no store address
           {{"WORLD_SIZE", "2"}, {"RANK", "0"}, {"MASTER_ADDR", "h"}, {"MASTER_PORT", "70000"}}}) {
    const ScopedEnvironment env(bad);
    EXPECT_THROW(dist::LaunchEnvironment::from_environment(), tiedlora::ConfigError) << bad.front().first;
  }
}

namespace {

// A process group whose ranks are threads of this test (the product uses MPI or NCCL): each collective meets
// at a barrier, where the last rank to arrive sums (in rank order) or copies the root's tensor into every
// rank's. A rank that never arrives fails the others after a minute instead of hanging the test.
class ThreadGroup final : public tiedlora::distributed::ProcessGroup {
 public:
  struct Meeting {
    std::mutex mutex;
    std::condition_variable arrived_all;
    int arrived = 0;
    int64_t round = 0;
    std::vector<at::Tensor> tensors;
  };
  ThreadGroup(int rank, int world_size, std::shared_ptr<Meeting> meeting)
      : ProcessGroup(rank, world_size), meeting_(std::move(meeting)) {
    meeting_->tensors.resize(world_size);
  }
  std::string backend() const override { return "threads"; }
  void all_reduce_sum(at::Tensor& tensor, const std::string& what) override {
    meet(tensor, what, [](std::vector<at::Tensor>& tensors) {
      at::Tensor sum = tensors[0].clone();
      for (size_t r = 1; r < tensors.size(); ++r) sum += tensors[r];
      for (auto& t : tensors) t.copy_(sum);
    });
  }
  void broadcast(at::Tensor& tensor, int root, const std::string& what) override {
    meet(tensor, what, [root](std::vector<at::Tensor>& tensors) {
      for (size_t r = 0; r < tensors.size(); ++r) {
        if (static_cast<int>(r) != root) tensors[r].copy_(tensors[root]);
      }
    });
  }
  void abort(int) override { std::abort(); }

 private:
  template <class Combine>
  void meet(at::Tensor& tensor, const std::string& what, Combine&& combine) {
    std::unique_lock<std::mutex> lock(meeting_->mutex);
    meeting_->tensors[rank()] = tensor;  // shares the storage: the combination writes this rank's tensor
    const int64_t round = meeting_->round;
    if (++meeting_->arrived == world_size()) {
      combine(meeting_->tensors);
      meeting_->arrived = 0;
      ++meeting_->round;
      meeting_->arrived_all.notify_all();
    } else if (!meeting_->arrived_all.wait_for(lock, std::chrono::minutes(1),
                                               [&] { return meeting_->round != round; })) {
      throw tiedlora::distributed::Timeout("rank " + std::to_string(rank()) + ": " + what + " timed out");
    }
  }
  std::shared_ptr<Meeting> meeting_;
};

}  // namespace

// The Trainer's data parallelism without a second process: two ranks as threads against one process, in
// fp64 so that only the summation order differs. An uneven share (3 examples over 2 ranks), gradient
// accumulation, sharded validation of an odd-sized set, the initial adapter from rank 0 (rank 1 starts from
// other values), and rank 1 writing nothing.
TEST(Distributed, TwoRanksFollowOneProcessStepForStep) {
  const std::string root = make_temp_dir();
  const auto train = tiny_task(40, 1), validation = tiny_task(7, 2);
  auto options_for = [&](const std::string& dir) {
    tt::TrainOptions o = small_options(dir);
    o.batch_size = 3;
    return o;
  };
  auto make_model = [&] {
    auto model = tiny_model(root);
    inject(*model, "tied-abuv");
    model->to(torch::kDouble);
    return model;
  };
  auto single = make_model();
  tt::Trainer one(*single, train, validation, options_for(root + "/one"), 0);
  const tt::TrainResult one_result = one.run();
  ASSERT_EQ(one_result.steps_done, 8);

  std::vector<std::shared_ptr<CausalLM>> models{make_model(), make_model()};
  {
    torch::NoGradGuard no_grad;
    for (auto& p : tiedlora::trainable_parameters(*models[1])) p.add_(0.5);  // rank 0's broadcast must undo this
  }
  auto meeting = std::make_shared<ThreadGroup::Meeting>();
  std::vector<tt::TrainResult> results(2);
  std::vector<std::string> errors(2);
  std::vector<std::thread> ranks;
  for (int r = 0; r < 2; ++r) {
    ranks.emplace_back([&, r] {
      try {
        tt::TrainOptions o = options_for(root + "/rank" + std::to_string(r));
        o.process_group = std::make_shared<ThreadGroup>(r, 2, meeting);
        tt::Trainer trainer(*models[r], train, validation, o, 0);
        results[r] = trainer.run();
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  }
  for (auto& t : ranks) t.join();
  ASSERT_EQ(errors, (std::vector<std::string>{"", ""}));
  EXPECT_EQ(results[0].steps_done, 8);
  EXPECT_EQ(results[1].best_step, one_result.best_step);
  EXPECT_FALSE(tiedlora::util::path_exists(root + "/rank1")) << "rank 1 wrote its output folder";

  const auto a = read_metrics(root + "/one/metrics.jsonl"), b = read_metrics(root + "/rank0/metrics.jsonl");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    for (const char* key : {"step", "tokens", "target_tokens"}) {
      if (a[i].contains(key)) EXPECT_EQ(a[i].at(key), b[i].at(key)) << "metrics line " << i + 1 << ", " << key;
    }
    for (const char* key : {"loss", "lr", "grad_norm", "validation_loss"}) {
      if (!a[i].contains(key)) continue;
      const double x = a[i].at(key).get<double>(), y = b[i].at(key).get<double>();
      EXPECT_LE(std::abs(x - y), 1e-12 * std::abs(x)) << "metrics line " << i + 1 << ", " << key;
    }
  }
  const auto p1 = tiedlora::trainable_parameters(*single);
  const auto r0 = tiedlora::trainable_parameters(*models[0]), r1 = tiedlora::trainable_parameters(*models[1]);
  ASSERT_EQ(p1.size(), r0.size());
  for (size_t i = 0; i < p1.size(); ++i) {
    EXPECT_TRUE(torch::equal(r0[i], r1[i])) << "the ranks' parameter " << i << " differs";
    EXPECT_LE((p1[i] - r0[i]).abs().max().item<double>(), 1e-10) << "parameter " << i;
  }
}
