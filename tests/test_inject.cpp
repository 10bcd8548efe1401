// test_inject.cpp: inject_adapters() on a small transformer-shaped model written with the C++ frontend:
// selection, tie groups, freezing, the report's counts against docs/method.md's formulas, training, merging,
// and every refusal (unknown names, containers, mixed shapes, member-held torch::nn::Linear).
#include <torch/torch.h>

#include "test_support.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/inject.h"

namespace {

using tiedlora::InjectOptions;
using tiedlora::LoraLinear;
using tiedlora::LoraOptions;
using tiedlora::testing::all_close;
using tiedlora::testing::error_of;

constexpr int64_t kDim = 16, kHidden = 24, kLayers = 3, kVocab = 11;

// Linear layers declared as tiedlora::LoraLinear, the drop-in that receives adapters in place.
struct AttentionImpl : torch::nn::Module {
  LoraLinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  AttentionImpl() {
    q_proj = register_module("q_proj", LoraLinear(torch::nn::LinearOptions(kDim, kDim)));
    k_proj = register_module("k_proj", LoraLinear(torch::nn::LinearOptions(kDim, kDim / 2)));
    v_proj = register_module("v_proj", LoraLinear(torch::nn::LinearOptions(kDim, kDim / 2)));
    o_proj = register_module("o_proj", LoraLinear(torch::nn::LinearOptions(kDim / 2, kDim)));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto gate = torch::sigmoid(k_proj(x)) * v_proj(x);
    return o_proj(gate) + torch::tanh(q_proj(x));
  }
};
TORCH_MODULE(Attention);

struct MlpImpl : torch::nn::Module {
  LoraLinear up_proj{nullptr}, down_proj{nullptr};
  MlpImpl() {
    up_proj = register_module("up_proj", LoraLinear(torch::nn::LinearOptions(kDim, kHidden)));
    down_proj = register_module("down_proj", LoraLinear(torch::nn::LinearOptions(kHidden, kDim).bias(false)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return down_proj(torch::gelu(up_proj(x))); }
};
TORCH_MODULE(Mlp);

struct BlockImpl : torch::nn::Module {
  Attention self_attn{nullptr};
  Mlp mlp{nullptr};
  BlockImpl() {
    self_attn = register_module("self_attn", Attention());
    mlp = register_module("mlp", Mlp());
  }
  torch::Tensor forward(torch::Tensor x) {
    x = x + self_attn(x);
    return x + mlp(x);
  }
};
TORCH_MODULE(Block);

struct TinyLmImpl : torch::nn::Module {
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  LoraLinear lm_head{nullptr};
  TinyLmImpl() {
    embed_tokens = register_module("embed_tokens", torch::nn::Embedding(kVocab, kDim));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int i = 0; i < kLayers; ++i) layers->push_back(Block());
    lm_head = register_module("lm_head", LoraLinear(torch::nn::LinearOptions(kDim, kVocab).bias(false)));
  }
  torch::Tensor forward(const torch::Tensor& ids) {
    auto x = embed_tokens(ids);
    for (const auto& layer : *layers) x = layer->as<BlockImpl>()->forward(x);
    return lm_head(x);
  }
};
TORCH_MODULE(TinyLm);

int64_t count(const std::vector<torch::Tensor>& tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += t.numel();
  return n;
}

TEST(Inject, TiedGroupsSpanLayersAndCountsFollowMethodMd) {
  torch::manual_seed(1);
  TinyLm model;
  auto report = tiedlora::inject_adapters(
      *model, InjectOptions().targets({"q_proj", "v_proj"}).method("tied-abuv").lora(LoraOptions(4)));
  ASSERT_EQ(report.groups.size(), 2u);
  EXPECT_EQ(report.groups[0].name, "layers.*.self_attn.q_proj");
  EXPECT_EQ(report.groups[1].name, "layers.*.self_attn.v_proj");
  EXPECT_EQ(report.groups[0].modules.size(), static_cast<size_t>(kLayers));
  EXPECT_EQ(report.groups[0].registered_as, "tiedlora_groups.default.layers-*-self_attn-q_proj");
  // Checkpoints store the earlier layout's name of the group's factors.
  EXPECT_EQ(tiedlora::stored_parameter_name(report.groups[0].registered_as + ".lora_A"),
            "tiedlora_groups.layers-*-self_attn-q_proj.lora_A");
  const auto method = tiedlora::AdapterMethod::parse("tied-abuv");
  const int64_t q = tiedlora::trainable_parameter_count(method, 4, kLayers, {kDim, kDim});
  const int64_t v = tiedlora::trainable_parameter_count(method, 4, kLayers, {kDim, kDim / 2});
  EXPECT_EQ(report.groups[0].trainable_parameters, q);
  EXPECT_EQ(report.groups[1].trainable_parameters, v);
  EXPECT_EQ(report.trainable_parameters, q + v);
  EXPECT_EQ(count(tiedlora::trainable_parameters(*model)), q + v);
  // Layers share the group's A: the same tensor.
  auto q0 = model->layers[0]->as<BlockImpl>()->self_attn->q_proj;
  auto q2 = model->layers[2]->as<BlockImpl>()->self_attn->q_proj;
  EXPECT_EQ(q0->lora_A().data_ptr(), q2->lora_A().data_ptr());
  EXPECT_NE(q0->lora_u.data_ptr(), q2->lora_u.data_ptr());
  // Everything else is frozen.
  for (const auto& p : model->named_parameters()) {
    const bool adapter = p.key().find("lora_") != std::string::npos;
    EXPECT_EQ(p.value().requires_grad(), adapter) << p.key();
  }
  const std::string json = report.to_json();
  EXPECT_NE(json.find("\"trainable_parameters\": " + std::to_string(q + v)), std::string::npos) << json;
}

TEST(Inject, ReportMatchesTheFormulaForEveryPreset) {
  for (const std::string name : {"lora", "tied-ab", "tied-abuv", "tied-uv", "tied-bv", "untied-abuv"}) {
    TinyLm model;
    auto report =
        tiedlora::inject_adapters(*model, InjectOptions().targets({"all-linear"}).method(name).lora(LoraOptions(2)));
    const auto method = tiedlora::AdapterMethod::parse(name);
    int64_t expected = 0;
    for (const auto& g : report.groups) {
      const int64_t formula =
          tiedlora::trainable_parameter_count(method, 2, static_cast<int64_t>(g.modules.size()), g.shape);
      EXPECT_EQ(g.trainable_parameters, formula) << name << " " << g.name;
      expected += formula;
    }
    EXPECT_EQ(report.groups.size(), 6u) << name;  // q, k, v, o, up, down; lm_head excluded by all-linear
    EXPECT_EQ(report.trainable_parameters, expected) << name;
    EXPECT_EQ(count(tiedlora::trainable_parameters(*model)), expected) << name;
    EXPECT_FALSE(model->lm_head->has_adapter()) << name;
  }
}

TEST(Inject, InjectedModelStartsUnchangedThenLearns) {
  torch::manual_seed(2);
  TinyLm model;
  auto ids = torch::randint(0, kVocab, {4, 7});
  auto targets = torch::randint(0, kVocab, {4, 7});
  const auto before = model->forward(ids).detach();
  tiedlora::inject_adapters(
      *model, InjectOptions().targets({"all-linear"}).method("tied-abuv").lora(LoraOptions(4).alpha(8.0)));
  EXPECT_TRUE(all_close(model->forward(ids), before, 1e-5, 1e-5, "zero delta after injection"));
  const auto frozen_before = model->embed_tokens->weight.detach().clone();
  torch::optim::AdamW optimizer(tiedlora::trainable_parameters(*model), torch::optim::AdamWOptions(1e-2));
  auto loss_of = [&] {
    return torch::nn::functional::cross_entropy(model->forward(ids).view({-1, kVocab}), targets.view({-1}));
  };
  const double first = loss_of().item<double>();
  for (int step = 0; step < 30; ++step) {
    optimizer.zero_grad();
    auto loss = loss_of();
    loss.backward();
    optimizer.step();
  }
  const double last = loss_of().item<double>();
  EXPECT_LT(last, first * 0.8) << "loss " << first << " -> " << last;
  EXPECT_TRUE(torch::equal(model->embed_tokens->weight, frozen_before));

  // Merge the whole model: the same outputs; unmerge: the original weights bit for bit.
  model->eval();
  torch::NoGradGuard no_grad;
  const auto adapted = model->forward(ids);
  std::map<std::string, torch::Tensor> weights;
  for (const auto& p : model->named_parameters()) weights[p.key()] = p.value().detach().clone();
  tiedlora::merge_adapters_(*model);
  EXPECT_TRUE(all_close(model->forward(ids), adapted, 1e-5, 1e-5, "merged model"));
  tiedlora::unmerge_adapters_(*model);
  for (const auto& p : model->named_parameters()) EXPECT_TRUE(torch::equal(p.value(), weights.at(p.key()))) << p.key();
}

TEST(Inject, SelectionByRegexExcludeAndLayerIndex) {
  TinyLm model;
  auto report = tiedlora::inject_adapters(*model, InjectOptions()
                                                      .targets({"re:.*\\.(q|k)_proj"})
                                                      .exclude({"layers.1.self_attn.k_proj"})
                                                      .layers({1, 2})
                                                      .method("lora"));
  std::vector<std::string> adapted;
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model)) adapted.push_back(name);
  EXPECT_EQ(adapted, (std::vector<std::string>{"layers.1.self_attn.q_proj", "layers.2.self_attn.q_proj",
                                               "layers.2.self_attn.k_proj"}));
}

TEST(Inject, ExplicitTieGroupsAndMixedShapesAreReported) {
  TinyLm model;
  auto report = tiedlora::inject_adapters(
      *model, InjectOptions().targets({"k_proj", "v_proj"}).method("tied-ab").tie_groups({{"re:.*_proj", "kv"}}));
  ASSERT_EQ(report.groups.size(), 1u);
  EXPECT_EQ(report.groups[0].modules.size(), static_cast<size_t>(2 * kLayers));

  TinyLm other;
  const auto message = error_of([&] {
    tiedlora::inject_adapters(
        *other, InjectOptions().targets({"q_proj", "k_proj"}).method("tied-ab").tie_groups({{"re:.*", "all"}}));
  });
  EXPECT_NE(message.find("tie group 'all' mixes shapes"), std::string::npos) << message;
  EXPECT_NE(message.find("layers.0.self_attn.k_proj"), std::string::npos) << message;
}

TEST(Inject, UnknownNamesAndContainersAreErrorsWithHints) {
  TinyLm model;
  auto message = error_of([&] { tiedlora::inject_adapters(*model, InjectOptions().targets({"q_prj"})); });
  EXPECT_NE(message.find("target 'q_prj' matches no module"), std::string::npos) << message;
  EXPECT_NE(message.find("layers.0.self_attn.q_proj"), std::string::npos) << message;
  message = error_of([&] { tiedlora::inject_adapters(*model, InjectOptions().targets({"self_attn"})); });
  EXPECT_NE(message.find("not a linear layer"), std::string::npos) << message;
  message = error_of([&] { tiedlora::inject_adapters(*model, InjectOptions().targets({"q_proj"}).layers({7})); });
  EXPECT_NE(message.find("layer 7 does not exist"), std::string::npos) << message;
  message = error_of([&] { tiedlora::inject_adapters(*model, InjectOptions().targets({"q_proj"}).method("tied-au")); });
  EXPECT_NE(message.find("neither B nor v"), std::string::npos) << message;
  // Nothing was changed by the failed calls.
  EXPECT_TRUE(tiedlora::adapted_layers(*model).empty());
  for (const auto& p : model->parameters()) EXPECT_TRUE(p.requires_grad());
  // A second injection into an adapted model is refused.
  tiedlora::inject_adapters(*model, InjectOptions().targets({"q_proj"}).method("tied-ab"));
  message = error_of([&] { tiedlora::inject_adapters(*model, InjectOptions().targets({"v_proj"}).method("tied-ab")); });
  EXPECT_NE(message.find("already carries"), std::string::npos) << message;
}

// A model that keeps plain torch::nn::Linear members: its forward would bypass a replaced layer.
struct MemberHeldImpl : torch::nn::Module {
  torch::nn::Linear fc{nullptr};
  MemberHeldImpl() { fc = register_module("fc", torch::nn::Linear(8, 8)); }
};
TORCH_MODULE(MemberHeld);

// A model that reaches its torch::nn::Linear children through the registry only.
struct RegistryOnlyImpl : torch::nn::Module {
  RegistryOnlyImpl() {
    register_module("fc1", torch::nn::Linear(8, 6));
    register_module("fc2", torch::nn::Linear(6, 4));
  }
  torch::Tensor forward(torch::Tensor x) {
    for (const auto& child : named_children()) {
      if (auto* lora = child.value()->as<tiedlora::LoraLinearImpl>())
        x = lora->forward(x);
      else
        x = child.value()->as<torch::nn::LinearImpl>()->forward(x);
    }
    return x;
  }
};
TORCH_MODULE(RegistryOnly);

TEST(Inject, PlainTorchLinearIsReplacedWhenSafeAndRefusedWhenAMemberHoldsIt) {
  MemberHeld held;
  const auto message = error_of([&] { tiedlora::inject_adapters(*held, InjectOptions().targets({"fc"})); });
  EXPECT_NE(message.find("cannot adapt 'fc'"), std::string::npos) << message;
  EXPECT_NE(message.find("tiedlora::LoraLinear"), std::string::npos) << message;
  EXPECT_TRUE(held->fc->weight.requires_grad()) << "a refused injection must change nothing";

  torch::manual_seed(4);
  RegistryOnly model;
  auto x = torch::randn({3, 8});
  const auto before = model->forward(x).detach();
  auto report =
      tiedlora::inject_adapters(*model, InjectOptions().targets({"fc1", "fc2"}).method("lora").lora(LoraOptions(2)));
  EXPECT_EQ(tiedlora::adapted_layers(*model).size(), 2u);
  EXPECT_TRUE(all_close(model->forward(x), before, 1e-6, 1e-6, "replaced layers, zero delta"));
  EXPECT_EQ(count(tiedlora::trainable_parameters(*model)), 2 * (8 + 6) + 2 * (6 + 4));
}

TEST(Inject, SeededInjectionIsReproducibleAndLayersDiffer) {
  TinyLm m1, m2;
  tiedlora::inject_adapters(*m1, InjectOptions().targets({"q_proj"}).method("lora").lora(LoraOptions(2).seed(7)));
  tiedlora::inject_adapters(*m2, InjectOptions().targets({"q_proj"}).method("lora").lora(LoraOptions(2).seed(7)));
  auto l1 = tiedlora::adapted_layers(*m1), l2 = tiedlora::adapted_layers(*m2);
  EXPECT_TRUE(torch::equal(l1[0].second->lora_A(), l2[0].second->lora_A()));
  EXPECT_FALSE(torch::equal(l1[0].second->lora_A(), l1[1].second->lora_A()));
}

}  // namespace

namespace {

TEST(Inject, ASecondInjectionWithAnotherConfigurationIsRefusedUpFront) {
  TinyLm model;
  tiedlora::inject_adapters(*model, InjectOptions().targets({"q_proj"}).method("lora").lora(LoraOptions(4)));
  const auto message = error_of([&] {
    tiedlora::inject_adapters(*model, InjectOptions().targets({"v_proj"}).method("lora").lora(LoraOptions(8)));
  });
  EXPECT_NE(message.find("one adapter has one configuration"), std::string::npos) << message;
  EXPECT_NE(message.find("rank 4"), std::string::npos) << message;
  EXPECT_EQ(tiedlora::adapted_layers(*model).size(), static_cast<size_t>(kLayers)) << "the refusal changed the model";
  // The same configuration may extend the adapter to more layers: it still saves as one adapter, and the
  // first injection's tensors stay trainable.
  const auto before = tiedlora::trainable_parameters(*model).size();
  tiedlora::inject_adapters(*model, InjectOptions().targets({"v_proj"}).method("lora").lora(LoraOptions(4)));
  EXPECT_EQ(tiedlora::adapted_layers(*model).size(), static_cast<size_t>(2 * kLayers));
  EXPECT_EQ(tiedlora::trainable_parameters(*model).size(), 2 * before);
  for (const auto& [name, layer] : tiedlora::adapted_layers(*model)) {
    EXPECT_TRUE(layer->lora_A().requires_grad() && layer->lora_B().requires_grad()) << name << " was frozen";
  }
  // A tied injection after a LoRA one is another method: refused as well.
  const auto tied = error_of([&] {
    tiedlora::inject_adapters(*model, InjectOptions().targets({"o_proj"}).method("tied-abuv").lora(LoraOptions(4)));
  });
  EXPECT_NE(tied.find("one adapter has one configuration"), std::string::npos) << tied;
  EXPECT_NE(tied.find("under another adapter_name"), std::string::npos) << tied;  // the way to carry both
}

}  // namespace

// The naming rule of adapter modules (tiedlora/core/adapter_set.h) and the names checkpoints store: the
// layout before the rule, so checkpoints written earlier resume.
TEST(AdapterNaming, StoredNamesAreThoseOfTheEarlierLayout) {
  using tiedlora::stored_parameter_name;
  EXPECT_EQ(stored_parameter_name("model.layers.0.q_proj.lora_adapters.default.lora_A"),
            "model.layers.0.q_proj.lora_A");
  EXPECT_EQ(stored_parameter_name("q.lora_adapters.default.tied_factors.lora_B"), "q.tied_factors.lora_B");
  EXPECT_EQ(stored_parameter_name("q.lora_adapters.fr.lora_A"), "q.lora_adapters.fr.lora_A");
  EXPECT_EQ(stored_parameter_name("tiedlora_groups.default.layers-*-q.lora_A"), "tiedlora_groups.layers-*-q.lora_A");
  EXPECT_EQ(stored_parameter_name("tiedlora_groups.fr.layers-*-q.lora_A"), "tiedlora_groups_fr.layers-*-q.lora_A");
  EXPECT_EQ(stored_parameter_name("sub.tiedlora_groups.default.g.lora_B"), "sub.tiedlora_groups.g.lora_B");
  EXPECT_EQ(stored_parameter_name("model.embed_tokens.weight"), "model.embed_tokens.weight");
  EXPECT_EQ(stored_parameter_name("my_lora_adapters.default.x"), "my_lora_adapters.default.x");
}

// Selection never matches the library's own modules: a tied adapter on a top-level layer registers its
// group under that layer's name, and a second adapter on the same target still finds only the layer.
TEST(AdapterNaming, SelectionNeverMatchesTheLibrarysOwnModules) {
  struct TopImpl : torch::nn::Module {
    TopImpl() : proj(register_module("proj", tiedlora::LoraLinear(torch::nn::LinearOptions(6, 6)))) {}
    tiedlora::LoraLinear proj;
  };
  auto top = std::make_shared<TopImpl>();
  tiedlora::inject_adapters(*top, InjectOptions().targets({"proj"}).method("tied-abuv").lora(LoraOptions(2).seed(1)));
  const auto report = tiedlora::inject_adapters(
      *top, InjectOptions().targets({"proj"}).method("tied-abuv").lora(LoraOptions(2).seed(2)).adapter_name("second"));
  ASSERT_EQ(report.groups.size(), 1u);
  EXPECT_EQ(report.groups[0].modules, (std::vector<std::string>{"proj"}));
  EXPECT_EQ(report.groups[0].registered_as, "tiedlora_groups.second.proj");
  EXPECT_EQ(top->proj->adapter_names(), (std::vector<std::string>{"default", "second"}));
}
