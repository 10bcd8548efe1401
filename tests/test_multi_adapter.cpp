// test_multi_adapter.cpp: several named adapters on one frozen model (docs/adapters.md). Against PEFT
// (tests/reference/make_multi_adapter_reference.py): its multi-adapter folder read, its mixed-adapter batch
// (`adapter_names=`) and mixed generation, its "cat" combination. Exactness on our own: a mixed batch equals
// each group run alone, two adapters trained in one step equal each trained alone, combinations (LoRA and
// tied) equal the weighted sum of the deltas, merging the active adapters and unmerging exactly. It also
// writes the combination it made, which tests/multi/check_peft_loads.py gives to PEFT.
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

using tiedlora::AdapterKind;
using tiedlora::InjectOptions;
using tiedlora::LoraOptions;
using tiedlora::RowAdaptersScope;
using tiedlora::testing::all_close;
using tiedlora::testing::difference;
using tiedlora::testing::error_of;

std::string multi_dir() { return tiedlora::testing::reference_dir() + "/multi"; }
std::map<std::string, at::Tensor> reference() {
  return tiedlora::formats::load_safetensors(multi_dir() + "/mixed.safetensors");
}

std::shared_ptr<tiedlora::llm::models::CausalLM> base_model() {
  auto model = tiedlora::llm::models::load_pretrained(multi_dir() + "/base");
  model->eval();
  return model;
}

// The adapter name of each row code of the reference (0 default, 1 second, -1 base).
std::vector<std::string> row_names(const at::Tensor& codes) {
  std::vector<std::string> out;
  for (int64_t i = 0; i < codes.size(0); ++i) {
    const int64_t c = codes[i].item<int64_t>();
    out.push_back(c == 0 ? "default" : c == 1 ? "second" : "");
  }
  return out;
}

// Token ids drawn from their own seeded generator: the same ids whatever ran before.
at::Tensor random_ids(int64_t rows, int64_t length, uint64_t seed) {
  at::Generator generator = at::detail::createCPUGenerator(seed);
  return at::randint(3, 97, {rows, length}, generator, at::kLong);
}

at::Tensor logits_with_rows(tiedlora::llm::models::CausalLM& model, const at::Tensor& ids,
                            const std::vector<std::string>& rows) {
  const RowAdaptersScope scope(tiedlora::route_rows(model, rows));
  return model.forward(ids);
}

// A copy of every adapted layer's weight, by layer name.
std::map<std::string, at::Tensor> weights_of(const tiedlora::llm::models::CausalLM& model) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, layer] : tiedlora::adapted_layers(model)) out[name] = layer->weight.clone();
  return out;
}

// A model with three adapters of different methods, ranks and targets, every adapter tensor random.
std::shared_ptr<tiedlora::llm::models::CausalLM> model_with_three_adapters(uint64_t seed) {
  auto model = base_model();
  tiedlora::inject_adapters(*model,
                            InjectOptions().targets({"q_proj", "v_proj"}).lora(LoraOptions(4).alpha(8.0).seed(1)));
  tiedlora::inject_adapters(
      *model,
      InjectOptions().targets({"all-linear"}).method("tied-abuv").lora(LoraOptions(3).seed(2)).adapter_name("tied"));
  tiedlora::inject_adapters(*model, InjectOptions()
                                        .targets({"v_proj", "down_proj"})
                                        .method("tied-uv")
                                        .lora(LoraOptions(5).seed(3))
                                        .adapter_name("vera_like"));
  tiedlora::testing::randomize_trainable(*model, seed, 0.3);
  return model;
}

TEST(NamedAdapters, ReadsPeftMultiAdapterFolderAndMatchesPeftMixedBatch) {
  auto ref = reference();
  auto model = base_model();
  const auto names = tiedlora::load_adapters(*model, multi_dir() + "/peft_adapters");
  EXPECT_EQ(names, (std::vector<std::string>{"default", "second"}));
  EXPECT_EQ(tiedlora::active_adapters(*model), (std::vector<std::string>{"default"}));
  torch::NoGradGuard no_grad;
  const at::Tensor logits = logits_with_rows(*model, ref.at("ids"), row_names(ref.at("rows")));
  const double scale = ref.at("logits").abs().max().item<double>();
  EXPECT_TRUE(all_close(logits, ref.at("logits"), 1e-5, 1e-5 * scale, "mixed-batch logits vs PEFT adapter_names="));
  // The rows really differ by adapter: the same ids under another routing give other logits.
  const at::Tensor all_default = logits_with_rows(*model, ref.at("ids"), std::vector<std::string>(5, "default"));
  EXPECT_GT(difference(all_default.select(0, 1), logits.select(0, 1)).max_abs, 1e-3);
}

TEST(NamedAdapters, MixedGenerationWithKvCacheMatchesPeft) {
  auto ref = reference();
  auto model = base_model();
  tiedlora::load_adapters(*model, multi_dir() + "/peft_adapters");
  std::vector<std::vector<int64_t>> prompts;
  for (int64_t i = 0; i < ref.at("prompts").size(0); ++i) {
    const at::Tensor p = ref.at("prompts")[i].contiguous();
    prompts.emplace_back(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + p.numel());
  }
  tiedlora::llm::models::GenerateOptions options;
  options.max_new_tokens = ref.at("generated").size(1);
  options.stop_token_ids = {-1};  // PEFT ran without an eos
  options.prompt_adapters = row_names(ref.at("prompt_rows"));
  const auto generated = tiedlora::llm::models::generate_greedy_batch(*model, prompts, options);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const at::Tensor want = ref.at("generated")[static_cast<int64_t>(i)].contiguous();
    EXPECT_EQ(generated[i], std::vector<int64_t>(want.data_ptr<int64_t>(), want.data_ptr<int64_t>() + want.numel()))
        << "prompt " << i << " (" << options.prompt_adapters[i] << ")";
    // ... and what the prompt gives alone with its adapter active.
    tiedlora::set_active_adapters(*model, options.prompt_adapters[i].empty()
                                              ? std::vector<std::string>{}
                                              : std::vector<std::string>{options.prompt_adapters[i]});
    tiedlora::llm::models::GenerateOptions alone = options;
    alone.prompt_adapters.clear();
    EXPECT_EQ(tiedlora::llm::models::generate_greedy(*model, prompts[i], alone), generated[i])
        << "prompt " << i << " alone";
  }
}

TEST(NamedAdapters, MixedBatchEqualsEachGroupAloneForEveryMethod) {
  auto model = model_with_three_adapters(21);
  torch::NoGradGuard no_grad;
  const at::Tensor ids = random_ids(6, 11, 41);
  const std::vector<std::string> rows = {"tied", "", "default", "vera_like", "tied", "default"};
  const at::Tensor mixed = logits_with_rows(*model, ids, rows);
  for (const std::string name : {"default", "tied", "vera_like", ""}) {
    std::vector<int64_t> index;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (rows[i] == name) index.push_back(static_cast<int64_t>(i));
    }
    const at::Tensor picked = at::tensor(index, at::kLong);
    tiedlora::set_active_adapters(*model, name.empty() ? std::vector<std::string>{} : std::vector<std::string>{name});
    const at::Tensor alone = model->forward(ids.index_select(0, picked));
    EXPECT_TRUE(all_close(mixed.index_select(0, picked), alone, 1e-6, 1e-6 * alone.abs().max().item<double>(),
                          "rows of adapter '" + name + "'"));
  }
  // Each adapter changes the output of its rows (the test is not blind).
  tiedlora::set_active_adapters(*model, {});
  const at::Tensor base = model->forward(ids);
  for (int64_t row : {0, 2, 3}) EXPECT_GT(difference(mixed[row], base[row]).max_abs, 1e-3) << "row " << row;
  EXPECT_LT(difference(mixed[1], base[1]).max_abs, 1e-5);
}

TEST(NamedAdapters, ActiveSetsAddUpAndMergeThemWithOneRoundingAndUnmergeExactly) {
  auto model = model_with_three_adapters(5);
  torch::NoGradGuard no_grad;
  const at::Tensor ids = random_ids(2, 9, 42);
  const std::map<std::string, at::Tensor> original = weights_of(*model);
  tiedlora::set_active_adapters(*model, {"default", "tied"});
  const at::Tensor both = model->forward(ids);
  // The sum of the two updates, against the adapters applied one by one on the same base.
  tiedlora::set_active_adapters(*model, {});
  const at::Tensor base = model->forward(ids);
  tiedlora::set_active_adapters(*model, {"default"});
  const at::Tensor one = model->forward(ids);
  EXPECT_GT(difference(both, one).max_abs, 1e-3);
  tiedlora::set_active_adapters(*model, {"default", "tied"});
  tiedlora::merge_adapters_(*model);
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model)) {
    EXPECT_EQ(layer->merged(), layer->has_adapter("default") || layer->has_adapter("tied")) << name;
    if (!layer->merged()) continue;
    // W + dW_default + dW_tied in fp32, rounded once.
    at::Tensor want = original.at(name).to(at::kDouble);
    for (const std::string adapter : {"default", "tied"}) {
      if (layer->has_adapter(adapter))
        want += tiedlora::functional::low_rank_delta(layer->update(adapter)).to(at::kDouble);
    }
    EXPECT_TRUE(all_close(layer->weight, want, 0, 2e-7 * want.abs().max().item<double>(), name + " merged weight"));
  }
  EXPECT_TRUE(all_close(model->forward(ids), both, 1e-5, 1e-5 * both.abs().max().item<double>(), "merged logits"));
  EXPECT_NE(error_of([&] { logits_with_rows(*model, ids, {"default", "tied"}); }).find("merged"), std::string::npos);
  tiedlora::unmerge_adapters_(*model);
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model)) {
    EXPECT_TRUE(at::equal(layer->weight, original.at(name))) << name << " is not restored bit for bit";
  }
  tiedlora::set_adapters_enabled(*model, false);
  EXPECT_TRUE(at::equal(model->forward(ids), base));
}

TEST(NamedAdapters, DeleteSaveAndLoadTheMultiAdapterLayout) {
  auto model = model_with_three_adapters(8);
  const std::string folder = tiedlora::util::join_path(::testing::TempDir(), "tiedlora_multi_layout");
  tiedlora::util::remove_tree_quietly(folder);
  tiedlora::delete_adapter(*model, "vera_like");
  EXPECT_EQ(tiedlora::adapter_names(*model), (std::vector<std::string>{"default", "tied"}));
  for (const auto& item : model->named_parameters()) {
    EXPECT_EQ(item.key().find("vera_like"), std::string::npos) << item.key() << " survived delete_adapter";
  }
  EXPECT_NE(error_of([&] { tiedlora::delete_adapter(*model, "vera_like"); }).find("no adapter named 'vera_like'"),
            std::string::npos);
  tiedlora::save_adapters(*model, folder);
  EXPECT_TRUE(tiedlora::util::is_regular_file(folder + "/adapter_config.json"));
  EXPECT_TRUE(tiedlora::util::is_regular_file(folder + "/tied/adapter_model.safetensors"));
  EXPECT_EQ(tiedlora::adapter_folders(folder), (std::vector<std::string>{"default", "tied"}));

  auto reloaded = base_model();
  EXPECT_EQ(tiedlora::load_adapters(*reloaded, folder), (std::vector<std::string>{"default", "tied"}));
  torch::NoGradGuard no_grad;
  const at::Tensor ids = random_ids(3, 7, 43);
  const std::vector<std::string> rows = {"tied", "default", ""};
  EXPECT_TRUE(at::equal(logits_with_rows(*reloaded, ids, rows), logits_with_rows(*model, ids, rows)));
  // Errors name what is wrong.
  EXPECT_NE(error_of([&] {
              tiedlora::load_adapter(*reloaded, folder + "/tied", "tied");
            }).find("already carries an adapter named 'tied'"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              tiedlora::route_rows(*reloaded, {"tied", "nope"});
            }).find("row 1: the model carries no adapter named 'nope'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { tiedlora::set_active_adapters(*reloaded, {"nope"}); }).find("(it carries default, tied)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { logits_with_rows(*reloaded, ids, {"tied"}); }).find("3 rows"), std::string::npos);
  EXPECT_NE(error_of([&] {
              tiedlora::inject_adapters(*reloaded, InjectOptions().targets({"q_proj"}).adapter_name("a.b"));
            }).find("invalid adapter name 'a.b'"),
            std::string::npos);
  tiedlora::util::remove_tree_quietly(folder);
}

TEST(NamedAdapters, ChangingTheActiveSetOfAMergedModelUnmergesExactly) {
  auto model = model_with_three_adapters(17);
  torch::NoGradGuard no_grad;
  const at::Tensor ids = random_ids(2, 8, 44);
  const std::map<std::string, at::Tensor> original = weights_of(*model);
  tiedlora::set_active_adapters(*model, {"tied"});
  const at::Tensor tied_only = model->forward(ids);
  tiedlora::set_active_adapters(*model, {"default"});
  tiedlora::merge_adapters_(*model);
  tiedlora::set_active_adapters(*model, {"tied"});  // unmerges first: the forward is the new set's
  EXPECT_TRUE(at::equal(model->forward(ids), tied_only));
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model)) {
    EXPECT_FALSE(layer->merged()) << name;
    EXPECT_TRUE(at::equal(layer->weight, original.at(name))) << name;
  }
  tiedlora::merge_adapters_(*model);
  tiedlora::delete_adapter(*model, "tied");  // detaching a merged adapter unmerges it first
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model))
    EXPECT_TRUE(at::equal(layer->weight, original.at(name))) << name;
  // The only active adapter deleted: the first remaining one becomes active (PEFT's choice).
  EXPECT_EQ(tiedlora::active_adapters(*model), std::vector<std::string>{"default"});
}

// A parent module cloned (Cloneable copies each child into place): its layers' default adapters still
// detach cleanly, leaving no stale parameters.
TEST(NamedAdapters, ClonedParentDetachesItsAdaptersCleanly) {
  struct NetImpl : torch::nn::Cloneable<NetImpl> {
    NetImpl() { reset(); }
    void reset() override {
      fc = register_module("fc", tiedlora::LoraLinear(tiedlora::LoraLinearOptions(6, 4).lora(LoraOptions(2).seed(1))));
    }
    tiedlora::LoraLinear fc{nullptr};
  };
  auto net = std::make_shared<NetImpl>();
  auto copy = std::dynamic_pointer_cast<NetImpl>(net->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(at::equal(copy->fc->lora_A(), net->fc->lora_A()));
  tiedlora::delete_adapter(*copy, "default");
  for (const auto& item : copy->named_parameters()) {
    EXPECT_EQ(item.key().find("lora_"), std::string::npos) << item.key() << " survived on the clone";
  }
  EXPECT_TRUE(net->fc->has_adapter("default")) << "the original lost its adapter";
}

TEST(NamedAdapters, LoadAdaptersIsAllOrNothing) {
  auto model = model_with_three_adapters(4);
  const std::string folder = tiedlora::util::join_path(::testing::TempDir(), "tiedlora_multi_broken");
  tiedlora::util::remove_tree_quietly(folder);
  tiedlora::save_adapters(*model, folder);
  {  // the last adapter of the folder truncated
    const std::string file = folder + "/vera_like/adapter_model.safetensors";
    std::ofstream(file, std::ios::binary | std::ios::trunc) << "garbage";
  }
  auto target = base_model();
  tiedlora::inject_adapters(*target,
                            InjectOptions().targets({"o_proj"}).lora(LoraOptions(2).seed(9)).adapter_name("mine"));
  std::vector<bool> trainable_before;
  for (const auto& p : target->parameters()) trainable_before.push_back(p.requires_grad());
  const std::string message = error_of([&] { tiedlora::load_adapters(*target, folder); });
  EXPECT_NE(message.find("vera_like"), std::string::npos) << message;
  EXPECT_EQ(tiedlora::adapter_names(*target), std::vector<std::string>{"mine"});
  EXPECT_EQ(tiedlora::active_adapters(*target), std::vector<std::string>{"mine"});
  std::vector<bool> trainable_after;
  for (const auto& p : target->parameters()) trainable_after.push_back(p.requires_grad());
  EXPECT_EQ(trainable_after, trainable_before);
  tiedlora::util::remove_tree_quietly(folder);
}

// In training mode an adapter's dropout draws its mask on its own rows: the other rows are the base
// model's, and gradients flow through the routed branch.
TEST(NamedAdapters, DropoutOfAMixedBatchTouchesOnlyItsRows) {
  auto model = base_model();
  tiedlora::inject_adapters(*model,
                            InjectOptions().targets({"q_proj", "v_proj"}).lora(LoraOptions(4).dropout(0.5).seed(1)));
  tiedlora::testing::randomize_trainable(*model, 3, 0.3);
  const at::Tensor ids = random_ids(2, 8, 45);
  at::Tensor base;
  {
    torch::NoGradGuard no_grad;
    tiedlora::set_adapters_enabled(*model, false);
    base = model->forward(ids);
    tiedlora::set_adapters_enabled(*model, true);
  }
  model->train();
  const at::Tensor logits = logits_with_rows(*model, ids, {"default", ""});
  EXPECT_TRUE(all_close(logits[1], base[1], 1e-6, 1e-6 * base.abs().max().item<double>(), "the row without adapter"));
  EXPECT_GT(difference(logits[0], base[0]).max_abs, 1e-3);
  logits[0].sum().backward();
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model)) {
    ASSERT_TRUE(layer->lora_A().grad().defined()) << name;
    EXPECT_GT(layer->lora_A().grad().abs().max().item<double>(), 0) << name;
  }
}

// generate_greedy_batch without prompt adapters ignores a routing the caller has in force.
TEST(NamedAdapters, GenerationWithoutPromptAdaptersIgnoresAnOuterRouting) {
  auto model = model_with_three_adapters(2);
  const std::vector<std::vector<int64_t>> prompts = {{5, 9, 11, 40}, {7, 8, 20, 33}};
  tiedlora::llm::models::GenerateOptions options;
  options.max_new_tokens = 5;
  const auto plain = tiedlora::llm::models::generate_greedy_batch(*model, prompts, options);
  const RowAdaptersScope outer(tiedlora::route_rows(*model, {"tied", "", "tied"}));
  EXPECT_EQ(tiedlora::llm::models::generate_greedy_batch(*model, prompts, options), plain);
}

// A layer whose weight is tied to another module merges only when it has an active adapter to merge.
TEST(NamedAdapters, TiedWeightRefusesAMergeOnlyWithSomethingToMerge) {
  tiedlora::LoraLinear layer(tiedlora::LoraLinearOptions(6, 4));
  layer->tie_weight_(at::randn({4, 6}));
  layer->attach_lora(LoraOptions(2).seed(1), "other");
  EXPECT_NO_THROW(layer->merge_());  // active {"default"}: nothing here
  EXPECT_FALSE(layer->merged());
  layer->set_active_adapters({"other"});
  EXPECT_NE(error_of([&] { layer->merge_(); }).find("tied to another module"), std::string::npos);
}

// Rows of a batch train different adapters in one step: each row's loss reaches only its adapter, so the
// gradients (and AdamW's steps) equal training each adapter alone on its rows.
TEST(NamedAdapters, TrainingTwoAdaptersInOneStepEqualsTrainingEachAlone) {
  at::Generator generator = at::detail::createCPUGenerator(29);
  const at::Tensor ids = at::randint(3, 97, {4, 10}, generator, at::kLong);
  const std::vector<std::string> rows = {"default", "tied", "tied", "default"};
  auto loss_of_rows = [&](tiedlora::llm::models::CausalLM& model, const at::Tensor& row_ids) {
    const at::Tensor logits = model.forward(row_ids.narrow(1, 0, 9));
    return at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}), row_ids.narrow(1, 1, 9).reshape({-1}));
  };
  auto rows_of = [&](const std::string& name) {
    std::vector<int64_t> index;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (rows[i] == name) index.push_back(static_cast<int64_t>(i));
    }
    return ids.index_select(0, at::tensor(index, at::kLong));
  };
  // The adapter's trained tensors (or their gradients), each shared tensor once per layer that uses it.
  auto trained = [](tiedlora::llm::models::CausalLM& model, const std::string& adapter, bool gradients) {
    std::vector<at::Tensor> out;
    for (const auto& [name, layer] : tiedlora::adapted_layers(model, adapter)) {
      for (const auto& t : layer->update(adapter).tensors()) {
        if (t.requires_grad()) out.push_back((gradients ? t.grad() : t).detach().clone());
      }
    }
    return out;
  };
  auto trained_params = [&](tiedlora::llm::models::CausalLM& model, const std::string& adapter) {
    return trained(model, adapter, false);
  };
  double worst_gradient_ratio = 0;  // printed: the float-rounding level the 1e-5 bound leaves room for
  for (const bool checkpointing : {false, true}) {
    auto together = model_with_three_adapters(13);
    together->train();
    together->set_activation_checkpointing(checkpointing);
    torch::optim::AdamW opt_together(tiedlora::trainable_parameters(*together), torch::optim::AdamWOptions(1e-2));
    std::map<std::string, std::shared_ptr<tiedlora::llm::models::CausalLM>> alone;
    std::map<std::string, std::unique_ptr<torch::optim::AdamW>> opt_alone;
    for (const std::string name : {"default", "tied"}) {
      alone[name] = model_with_three_adapters(13);
      alone[name]->train();
      tiedlora::set_active_adapters(*alone[name], {name});
      opt_alone[name] = std::make_unique<torch::optim::AdamW>(tiedlora::trainable_parameters(*alone[name]),
                                                              torch::optim::AdamWOptions(1e-2));
    }
    for (int step = 0; step < 3; ++step) {
      opt_together.zero_grad();
      {
        // One forward over the mixed batch; each adapter's loss is the mean over its own rows.
        const RowAdaptersScope scope(tiedlora::route_rows(*together, rows));
        const at::Tensor logits = together->forward(ids.narrow(1, 0, 9));
        const at::Tensor token_loss = at::cross_entropy_loss(logits.reshape({-1, logits.size(-1)}),
                                                             ids.narrow(1, 1, 9).reshape({-1}), {}, at::Reduction::None)
                                          .reshape({4, 9})
                                          .mean(1);
        const at::Tensor is_tied = at::tensor({0.0f, 1.0f, 1.0f, 0.0f});
        ((token_loss * (1 - is_tied)).sum() / 2 + (token_loss * is_tied).sum() / 2).backward();
      }
      for (const std::string name : {"default", "tied"}) {
        opt_alone[name]->zero_grad();
        loss_of_rows(*alone[name], rows_of(name)).backward();
        // The exact claim: each adapter's gradient from the mixed step is its gradient alone, up to float
        // rounding (within 1e-5 of the tensor's largest gradient entry).
        const auto got = trained(*together, name, true), want = trained(*alone[name], name, true);
        ASSERT_EQ(got.size(), want.size());
        ASSERT_FALSE(got.empty());
        for (size_t i = 0; i < got.size(); ++i) {
          const auto d = difference(got[i], want[i]);
          EXPECT_GT(d.max_ref, 0) << name << " gradient " << i << " is zero: the test would be blind";
          worst_gradient_ratio = std::max(worst_gradient_ratio, d.max_abs / d.max_ref);
          EXPECT_LE(d.max_abs, 1e-5 * d.max_ref)
              << name << " gradient " << i << " at step " << step << (checkpointing ? " (checkpointing)" : "");
        }
        opt_alone[name]->step();
      }
      opt_together.step();
    }
    // After three AdamW steps the adapters still agree. Adam divides each gradient by its own running
    // magnitude, so rounding-level gradient differences can move an element by more than their own size:
    // 1e-4 relative here, against steps of 1e-2 (lr) per element.
    for (const std::string name : {"default", "tied"}) {
      const auto got = trained_params(*together, name), want = trained_params(*alone[name], name);
      for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_TRUE(all_close(got[i], want[i], 1e-4, 1e-5,
                              name + " tensor " + std::to_string(i) + (checkpointing ? " (checkpointing)" : "")));
      }
    }
    // The third adapter saw no row: untouched in both runs.
    const auto untouched = trained_params(*together, "vera_like"),
               initial = trained_params(*model_with_three_adapters(13), "vera_like");
    for (size_t i = 0; i < untouched.size(); ++i) EXPECT_TRUE(at::equal(untouched[i], initial[i]));
  }
  std::printf("[two adapters in one step] largest gradient difference: %.3g of the largest entry\n",
              worst_gradient_ratio);
}

TEST(Combination, LoraCatEqualsPeftAndTheWeightedSumAndPeftLoadsIt) {
  auto ref = reference();
  auto model = base_model();
  tiedlora::load_adapters(*model, multi_dir() + "/peft_adapters");
  const std::vector<double> weights = {0.7, -0.4};
  tiedlora::add_weighted_adapter(*model, {"default", "second"}, weights, "mix");
  const tiedlora::Adapter peft_mix = tiedlora::Adapter::read(multi_dir() + "/peft_mix/mix");
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model, "mix")) {
    ASSERT_TRUE(peft_mix.contains(name)) << name;
    const auto f = peft_mix.layer(name, {layer->options.in_features(), layer->options.out_features()});
    EXPECT_TRUE(all_close(layer->lora_A("mix"), f.lora_a, 0, 1e-7, name + " A vs PEFT's cat"));
    EXPECT_TRUE(all_close(layer->lora_B("mix"), f.lora_b, 0, 1e-7, name + " B vs PEFT's cat"));
    EXPECT_DOUBLE_EQ(layer->scale("mix"), f.scale);
    // dW_mix = 0.7 dW_default - 0.4 dW_second (fp32).
    at::Tensor want = at::zeros({layer->options.out_features(), layer->options.in_features()}, at::kDouble);
    for (size_t k = 0; k < 2; ++k) {
      const std::string source = k == 0 ? "default" : "second";
      if (layer->has_adapter(source))
        want += weights[k] * tiedlora::functional::low_rank_delta(layer->update(source)).to(at::kDouble);
    }
    const at::Tensor got = tiedlora::functional::low_rank_delta(layer->update("mix"));
    EXPECT_TRUE(all_close(got, want, 0, 1e-6 * want.abs().max().item<double>(), name + " delta"));
  }
  EXPECT_EQ(peft_mix.modules().size(), tiedlora::adapted_layers(*model, "mix").size());
  torch::NoGradGuard no_grad;
  tiedlora::set_active_adapters(*model, {"mix"});
  const at::Tensor logits = model->forward(ref.at("ids"));
  EXPECT_TRUE(
      all_close(logits, ref.at("logits_mix"), 1e-5, 1e-5 * logits.abs().max().item<double>(), "mix logits vs PEFT"));
  // Saved for tests/multi/check_peft_loads.py: PEFT loads our "mix" and computes the same logits.
  const std::string out = multi_dir() + "/cpp_saved";
  tiedlora::util::remove_tree_quietly(out);
  tiedlora::save_adapters(*model, out);
  EXPECT_TRUE(tiedlora::util::is_regular_file(out + "/mix/adapter_config.json"));
}

TEST(Combination, TiedAdaptersCombineIntoATiedAdapterOrExactLora) {
  auto model = base_model();
  // Two tied adapters without v on the same groups (the default grouping): a tied result.
  tiedlora::inject_adapters(*model, InjectOptions()
                                        .targets({"q_proj", "v_proj", "up_proj"})
                                        .method("tied-abu")
                                        .lora(LoraOptions(4).alpha(8.0).dropout(0.1).seed(1))
                                        .adapter_name("t1"));
  tiedlora::inject_adapters(*model, InjectOptions()
                                        .targets({"q_proj", "v_proj", "up_proj"})
                                        .method("tied-ab")
                                        .lora(LoraOptions(2).seed(2))
                                        .adapter_name("t2"));
  tiedlora::inject_adapters(*model, InjectOptions()
                                        .targets({"q_proj", "o_proj"})
                                        .method("tied-abuv")
                                        .lora(LoraOptions(3).seed(3))
                                        .adapter_name("t3"));
  tiedlora::testing::randomize_trainable(*model, 9, 0.3);
  const std::vector<double> weights = {1.5, -0.25};
  const at::Tensor rng = at::detail::getDefaultCPUGenerator().get_state();
  tiedlora::add_weighted_adapter(*model, {"t1", "t2"}, weights, "tied_mix");
  tiedlora::add_weighted_adapter(*model, {"t1", "t3"}, weights, "lora_mix");
  EXPECT_TRUE(at::equal(at::detail::getDefaultCPUGenerator().get_state(), rng)) << "the global generator moved";
  // Refusals leave the model as it was.
  const auto names = tiedlora::adapter_names(*model);
  EXPECT_NE(error_of([&] { tiedlora::add_weighted_adapter(*model, {"t1", "nope"}, weights, "x"); }).find("'nope'"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] { tiedlora::add_weighted_adapter(*model, {"t1"}, weights, "x"); }).find("one weight per source"),
      std::string::npos);
  EXPECT_EQ(tiedlora::adapter_names(*model), names);
  int64_t tied_layers = 0;
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model)) {
    for (const auto& [mix, sources] :
         std::map<std::string, std::vector<std::string>>{{"tied_mix", {"t1", "t2"}}, {"lora_mix", {"t1", "t3"}}}) {
      if (!layer->has_adapter(mix)) continue;
      at::Tensor want = at::zeros({layer->options.out_features(), layer->options.in_features()}, at::kDouble);
      for (size_t k = 0; k < 2; ++k) {
        if (layer->has_adapter(sources[k]))
          want += weights[k] * tiedlora::functional::low_rank_delta(layer->update(sources[k])).to(at::kDouble);
      }
      const at::Tensor got = tiedlora::functional::low_rank_delta(layer->update(mix));
      EXPECT_TRUE(all_close(got, want, 0, 1e-6 * want.abs().max().item<double>(), name + " " + mix));
    }
    if (layer->has_adapter("tied_mix")) {
      EXPECT_EQ(layer->adapter_kind("tied_mix"), AdapterKind::tied) << name;
      EXPECT_EQ(layer->lora_options("tied_mix").rank(), 6);
      EXPECT_EQ(layer->lora_options("tied_mix").dropout(), 0.1) << "the first source's dropout, as PEFT";
      ++tied_layers;
    }
    if (layer->has_adapter("lora_mix")) EXPECT_EQ(layer->adapter_kind("lora_mix"), AdapterKind::lora) << name;
  }
  EXPECT_EQ(tied_layers, 6);  // 3 targets x 2 blocks, sharing the tie groups of t1
  // The tied combination is stored as tied: shared A and B once per group, u per layer.
  const std::string folder = tiedlora::util::join_path(::testing::TempDir(), "tiedlora_tied_mix");
  tiedlora::util::remove_tree_quietly(folder);
  tiedlora::SaveAdapterOptions save;
  save.adapter_name = "tied_mix";
  tiedlora::save_adapter(*model, folder, save);
  EXPECT_EQ(tiedlora::Adapter::read(folder).config().type, tiedlora::AdapterType::tiedlora);
  auto reloaded = base_model();
  tiedlora::load_adapter(*reloaded, folder, "tied_mix");
  for (const auto& [name, layer] : tiedlora::adapted_layers(*reloaded, "tied_mix")) {
    const auto original = tiedlora::adapted_layers(*model, "tied_mix");
    const auto it = std::find_if(original.begin(), original.end(), [&](const auto& p) { return p.first == name; });
    ASSERT_NE(it, original.end());
    EXPECT_TRUE(at::equal(tiedlora::functional::low_rank_delta(layer->update("tied_mix")),
                          tiedlora::functional::low_rank_delta(it->second->update("tied_mix"))))
        << name;
  }
  tiedlora::util::remove_tree_quietly(folder);
}

}  // namespace
