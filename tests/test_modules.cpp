// test_modules.cpp: LoraLinear and TiedLoraFactors: initialisation (zero delta, non-zero gradients, masks
// refused), merge/unmerge (exact restoration), enable/disable, dropout, drop-in behaviour, clone, options.
#include <torch/torch.h>

#include "test_support.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/core/modules.h"

namespace {

// Parameter names as trainer checkpoints store them (tiedlora::stored_parameter_name).
std::vector<std::string> stored_names(const torch::nn::Module& module) {
  std::vector<std::string> out;
  for (const auto& name : module.named_parameters().keys()) out.push_back(tiedlora::stored_parameter_name(name));
  return out;
}

using tiedlora::AdapterMethod;
using tiedlora::LoraLinear;
using tiedlora::LoraOptions;
using tiedlora::TiedLoraFactors;
using tiedlora::TiedLoraFactorsOptions;
using tiedlora::testing::all_close;

torch::nn::Linear random_linear(int64_t in, int64_t out, torch::Dtype dtype = torch::kFloat) {
  torch::nn::Linear base(torch::nn::LinearOptions(in, out));
  base->to(dtype);
  return base;
}

// A layer of the given method on a fresh base, plain LoRA or tied on its own factors.
LoraLinear make_layer(const std::string& method_name, torch::nn::Linear base, LoraOptions lora = LoraOptions(4)) {
  const AdapterMethod method = AdapterMethod::parse(method_name);
  if (method.is_plain_lora()) return LoraLinear(base, lora);
  TiedLoraFactors factors(
      TiedLoraFactorsOptions(base->options.in_features(), base->options.out_features(), method, lora));
  return LoraLinear(base, factors);
}

// Makes every adapter tensor random and non-zero, so that the update is not trivially zero.
void randomize_adapter(LoraLinear& layer) {
  torch::NoGradGuard no_grad;
  layer->lora_A().normal_(0, 0.3);
  layer->lora_B().normal_(0, 0.3);
  if (layer->lora_u.defined()) layer->lora_u.normal_(1, 0.3);
  if (layer->lora_v.defined()) layer->lora_v.normal_(1, 0.3);
}

class ValidMethods : public ::testing::TestWithParam<std::string> {};

TEST_P(ValidMethods, StartsAtZeroDeltaWithNonZeroGradient) {
  torch::manual_seed(5);
  auto base = random_linear(12, 10);
  auto layer = make_layer(GetParam(), base);
  auto x = torch::randn({6, 12});
  const auto y0 = base->forward(x).detach();
  auto y = layer->forward(x);
  EXPECT_TRUE(all_close(y, y0, 1e-6, 1e-6, GetParam() + " zero delta at step 0"));
  (y * torch::randn_like(y)).sum().backward();
  double grad_norm = 0;
  int trainable = 0;
  for (const auto& t : {layer->lora_A(), layer->lora_B(), layer->lora_u, layer->lora_v}) {
    if (!t.defined() || !t.requires_grad()) continue;
    ++trainable;
    if (t.grad().defined()) grad_norm += t.grad().abs().sum().item<double>();
  }
  EXPECT_GT(trainable, 0);
  EXPECT_GT(grad_norm, 0.0) << GetParam() << ": every gradient is zero at step 0";
  EXPECT_FALSE(layer->weight.requires_grad());
  EXPECT_FALSE(layer->bias.requires_grad());
}

TEST_P(ValidMethods, MergedOutputEqualsAdaptedAndUnmergeRestoresBitForBit) {
  torch::manual_seed(6);
  for (auto dtype : {torch::kFloat, torch::kBFloat16}) {
    auto base = random_linear(24, 20, dtype);
    auto layer = make_layer(GetParam(), base);
    randomize_adapter(layer);
    const auto original = layer->weight.detach().clone();
    layer->eval();
    torch::NoGradGuard no_grad;
    auto x = torch::randn({9, 24}).to(dtype);
    const auto adapted = layer->forward(x);
    layer->merge_();
    EXPECT_TRUE(layer->merged());
    EXPECT_FALSE(torch::equal(layer->weight, original)) << "merge changed nothing";
    const auto merged = layer->forward(x);
    if (dtype == torch::kFloat) {
      EXPECT_TRUE(all_close(merged, adapted, 1e-5, 1e-5, GetParam() + " merged vs adapted"));
    } else {
      // bf16: W' is rounded once, so the merged layer differs by about one bf16 rounding of W.
      EXPECT_TRUE(all_close(merged, adapted, 3e-2, 3e-2, GetParam() + " merged vs adapted (bf16)"));
    }
    layer->merge_();  // a second merge does nothing
    layer->unmerge_();
    EXPECT_FALSE(layer->merged());
    EXPECT_TRUE(torch::equal(layer->weight, original)) << GetParam() << " unmerge did not restore W exactly";
    EXPECT_TRUE(torch::equal(base->weight, original)) << "the wrapped torch::nn::Linear shares the weight";
  }
}

TEST_P(ValidMethods, MergeComputesTheDeltaOfMethodMd) {
  torch::manual_seed(7);
  auto base = random_linear(8, 6, torch::kDouble);
  auto layer = make_layer(GetParam(), base, LoraOptions(3).alpha(5.0).dtype(torch::kDouble));
  randomize_adapter(layer);
  // dW = s diag(v) B diag(u) A, written out directly.
  auto b = layer->lora_B().detach().clone();
  if (layer->lora_u.defined()) b = b * layer->lora_u.detach().unsqueeze(0);
  if (layer->lora_v.defined()) b = b * layer->lora_v.detach().unsqueeze(1);
  const auto expected = layer->weight.detach() + (5.0 / 3.0) * b.mm(layer->lora_A().detach());
  layer->merge_();
  EXPECT_TRUE(all_close(layer->weight, expected, 1e-14, 1e-14, "merged weight"));
}

INSTANTIATE_TEST_SUITE_P(Methods, ValidMethods,
                         ::testing::Values("lora", "tied-ab", "tied-abuv", "tied-uv", "tied-bv", "tied-v",
                                           "untied-abuv"),
                         [](const auto& info) {
                           std::string name = info.param;
                           for (char& c : name) {
                             if (c == '-') c = '_';
                           }
                           return name;
                         });

TEST(AdapterMethod, RefusesMasksThatCannotStartAtZero) {
  for (const std::string bad : {"tied-a", "tied-au", "tied-u", "untied-au"}) {
    try {
      AdapterMethod::parse(bad);
      ADD_FAILURE() << bad << " was accepted";
    } catch (const tiedlora::ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("neither B nor v"), std::string::npos) << e.what();
    }
  }
  EXPECT_THROW(AdapterMethod::parse("tied-"), tiedlora::ConfigError);
  EXPECT_THROW(AdapterMethod::parse("tied-abx"), tiedlora::ConfigError);
  EXPECT_THROW(AdapterMethod::parse("tied-aab"), tiedlora::ConfigError);
  EXPECT_THROW(AdapterMethod::parse("qlora"), tiedlora::ConfigError);
}

TEST(LoraLinear, MergeRefusesNonFiniteResultAndLeavesWeightUntouched) {
  torch::manual_seed(8);
  auto layer = LoraLinear(random_linear(6, 4), LoraOptions(2));
  randomize_adapter(layer);
  {
    torch::NoGradGuard no_grad;
    layer->lora_B()[1][0] = std::numeric_limits<float>::quiet_NaN();
  }
  const auto before = layer->weight.detach().clone();
  EXPECT_THROW(layer->merge_(), tiedlora::Error);
  EXPECT_FALSE(layer->merged());
  EXPECT_TRUE(torch::equal(layer->weight, before));
}

TEST(LoraLinear, TrainingThroughAMergedLayerIsRefused) {
  auto layer = LoraLinear(random_linear(6, 4), LoraOptions(2));
  layer->merge_();
  layer->train();
  EXPECT_THROW(layer->forward(torch::randn({2, 6})), c10::Error);
  layer->eval();
  EXPECT_NO_THROW(layer->forward(torch::randn({2, 6})));
}

TEST(LoraLinear, DisabledAdapterGivesTheBaseLayer) {
  torch::manual_seed(9);
  auto base = random_linear(10, 7);
  auto layer = LoraLinear(base, LoraOptions(3));
  randomize_adapter(layer);
  auto x = torch::randn({5, 10});
  const auto adapted = layer->forward(x);
  layer->set_adapter_enabled(false);
  EXPECT_TRUE(torch::equal(layer->forward(x), base->forward(x)));
  layer->set_adapter_enabled(true);
  EXPECT_TRUE(torch::equal(layer->forward(x), adapted));
  EXPECT_FALSE(torch::allclose(adapted, base->forward(x)));
  // Disabling a merged adapter gives the original weight back, not the merged one.
  const auto base_y = base->forward(x).detach();
  layer->eval();
  layer->merge_();
  layer->set_adapter_enabled(false);
  EXPECT_FALSE(layer->merged());
  EXPECT_TRUE(torch::equal(layer->forward(x), base_y));
}

TEST(LoraLinear, MergeThatOverflowsHalfPrecisionIsRefused) {
  auto layer = LoraLinear(random_linear(4, 4, torch::kHalf), LoraOptions(2));
  {
    torch::NoGradGuard no_grad;
    layer->weight.fill_(60000.0);  // near fp16's largest value
    layer->lora_A().fill_(100.0);
    layer->lora_B().fill_(100.0);
  }
  const auto before = layer->weight.detach().clone();
  EXPECT_THROW(layer->merge_(), tiedlora::Error);
  EXPECT_TRUE(torch::equal(layer->weight, before));
}

TEST(LoraLinear, DropoutActsOnTheAdapterInputInTrainingOnly) {
  torch::manual_seed(10);
  auto layer = LoraLinear(random_linear(16, 8), LoraOptions(4).dropout(0.5));
  randomize_adapter(layer);
  auto x = torch::randn({32, 16});
  layer->eval();
  const auto eval_y = layer->forward(x);
  layer->train();
  const auto train_y = layer->forward(x);
  EXPECT_FALSE(torch::allclose(train_y, eval_y));
  // The base path is never dropped: with the adapter disabled both modes agree.
  layer->set_adapter_enabled(false);
  EXPECT_TRUE(torch::equal(layer->forward(x), at::linear(x, layer->weight, layer->bias)));
}

TEST(LoraLinear, WithoutAdapterIsADropInTorchLinear) {
  torch::manual_seed(11);
  torch::nn::Linear reference(torch::nn::LinearOptions(9, 4));
  torch::manual_seed(11);
  LoraLinear layer(torch::nn::LinearOptions(9, 4));
  EXPECT_FALSE(layer->has_adapter());
  EXPECT_TRUE(torch::equal(layer->weight, reference->weight));
  EXPECT_TRUE(torch::equal(layer->bias, reference->bias));
  EXPECT_TRUE(layer->weight.requires_grad());
  auto names = layer->named_parameters().keys();
  EXPECT_EQ(names, (std::vector<std::string>{"weight", "bias"}));
  auto x = torch::randn({3, 9});
  EXPECT_TRUE(torch::equal(layer->forward(x), reference->forward(x)));
  layer->attach_lora(LoraOptions(2));
  EXPECT_FALSE(layer->weight.requires_grad());
  // One naming rule for every adapter (tiedlora/core/adapter_set.h); checkpoints store the earlier names.
  EXPECT_EQ(
      layer->named_parameters().keys(),
      (std::vector<std::string>{"weight", "bias", "lora_adapters.default.lora_A", "lora_adapters.default.lora_B"}));
  EXPECT_EQ(stored_names(*layer), (std::vector<std::string>{"weight", "bias", "lora_A", "lora_B"}));
  EXPECT_TRUE(torch::allclose(layer->forward(x), reference->forward(x), 1e-6, 1e-6));
  layer->detach_adapter();
  EXPECT_EQ(layer->named_parameters().keys(), (std::vector<std::string>{"weight", "bias"}));
}

TEST(LoraLinear, SeededInitialisationIsReproducibleAndFollowsPeft) {
  auto a1 = LoraLinear(random_linear(64, 8), LoraOptions(4).seed(42));
  auto a2 = LoraLinear(random_linear(64, 8), LoraOptions(4).seed(42));
  auto a3 = LoraLinear(random_linear(64, 8), LoraOptions(4).seed(43));
  EXPECT_TRUE(torch::equal(a1->lora_A(), a2->lora_A()));
  EXPECT_FALSE(torch::equal(a1->lora_A(), a3->lora_A()));
  EXPECT_EQ(a1->lora_B().abs().max().item<float>(), 0.0f);         // B carries the zero
  EXPECT_LE(a1->lora_A().abs().max().item<float>(), 1.0f / 8.0f);  // kaiming-uniform bound 1/sqrt(64)
  EXPECT_GT(a1->lora_A().abs().max().item<float>(), 0.1f);
  auto g = LoraLinear(random_linear(64, 8), LoraOptions(4).seed(1).init(tiedlora::LoraInit::gaussian));
  EXPECT_NEAR(g->lora_A().std().item<float>(), 0.25f, 0.05f);  // N(0, 1/r)
}

TEST(LoraLinear, CloneOfLoraIsIndependentAndCloneOfTiedIsRefused) {
  auto layer = LoraLinear(random_linear(6, 4), LoraOptions(2));
  randomize_adapter(layer);
  auto copy = std::dynamic_pointer_cast<tiedlora::LoraLinearImpl>(layer->clone());
  ASSERT_TRUE(copy);
  EXPECT_TRUE(torch::equal(copy->lora_A(), layer->lora_A()));
  EXPECT_NE(copy->lora_A().data_ptr(), layer->lora_A().data_ptr());
  EXPECT_EQ(copy->adapter_kind(), tiedlora::AdapterKind::lora);
  auto tied = make_layer("tied-abuv", random_linear(6, 4));
  EXPECT_THROW(tied->clone(), c10::Error);
}

TEST(LoraOptions, ValidatesItsValues) {
  EXPECT_THROW(LoraLinear(random_linear(4, 4), LoraOptions(0)), tiedlora::ConfigError);
  EXPECT_THROW(LoraLinear(random_linear(4, 4), LoraOptions(2).dropout(1.0)), tiedlora::ConfigError);
  EXPECT_THROW(LoraLinear(random_linear(4, 4), LoraOptions(2).dtype(torch::kInt)), tiedlora::ConfigError);
  EXPECT_DOUBLE_EQ(LoraOptions(8).scale(), 1.0);  // alpha defaults to r
  EXPECT_DOUBLE_EQ(LoraOptions(8).alpha(16.0).scale(), 2.0);
  EXPECT_DOUBLE_EQ(LoraOptions(16).alpha(16.0).use_rslora(true).scale(), 4.0);
}

TEST(TiedLoraFactors, LayersOfOneGroupShareAAndB) {
  torch::manual_seed(12);
  TiedLoraFactors factors(TiedLoraFactorsOptions(8, 6, AdapterMethod::parse("tied-abuv"), LoraOptions(2)));
  auto l1 = LoraLinear(random_linear(8, 6), factors);
  auto l2 = LoraLinear(random_linear(8, 6), factors);
  EXPECT_EQ(l1->lora_A().data_ptr(), l2->lora_A().data_ptr());
  EXPECT_NE(l1->lora_u.data_ptr(), l2->lora_u.data_ptr());
  // The first layer registers the shared tensors (nobody else did); the second only refers to them.
  EXPECT_EQ(l1->named_parameters().keys(),
            (std::vector<std::string>{"weight", "bias", "lora_adapters.default.lora_u", "lora_adapters.default.lora_v",
                                      "lora_adapters.default.tied_factors.lora_A",
                                      "lora_adapters.default.tied_factors.lora_B"}));
  EXPECT_EQ(stored_names(*l1), (std::vector<std::string>{"weight", "bias", "lora_u", "lora_v", "tied_factors.lora_A",
                                                         "tied_factors.lora_B"}));
  EXPECT_EQ(stored_names(*l2), (std::vector<std::string>{"weight", "bias", "lora_u", "lora_v"}));
  EXPECT_THROW(LoraLinear(random_linear(8, 5), factors), c10::Error);  // shape mismatch
}

// The README's standalone recipe: factors handed to two layers that nobody registered train with them.
struct PairImpl : torch::nn::Module {
  explicit PairImpl(const TiedLoraFactors& shared)
      : q(register_module("q", LoraLinear(random_linear(8, 6), shared))),
        k(register_module("k", LoraLinear(random_linear(8, 6), shared))) {}
  torch::Tensor forward(const torch::Tensor& x) { return q(x) * k(x); }
  LoraLinear q, k;
};
TORCH_MODULE(Pair);

TEST(TiedLoraFactors, StandaloneFactorsTrainSaveAndMoveWithTheModel) {
  torch::manual_seed(3);
  TiedLoraFactors factors(TiedLoraFactorsOptions(8, 6, AdapterMethod::parse("tied-abuv"), LoraOptions(2)));
  Pair pair(factors);
  const auto params = tiedlora::trainable_parameters(*pair);
  auto holds = [&](const torch::Tensor& t) {
    return std::any_of(params.begin(), params.end(), [&](const torch::Tensor& p) { return p.is_same(t); });
  };
  EXPECT_EQ(params.size(), 6u);  // A, B, and u, v of each layer
  EXPECT_TRUE(holds(factors->lora_A));
  EXPECT_TRUE(holds(factors->lora_B));
  // Each shared tensor once in parameters(), as optimizers over model->parameters() need.
  int a_count = 0;
  for (const auto& p : pair->parameters()) a_count += p.is_same(factors->lora_A);
  EXPECT_EQ(a_count, 1);
  const auto a_before = factors->lora_A.detach().clone();
  torch::optim::AdamW opt(params, 1e-2);
  for (int step = 0; step < 2; ++step) {
    opt.zero_grad();
    pair->forward(torch::randn({5, 8})).sum().backward();
    opt.step();
  }
  EXPECT_FALSE(torch::equal(factors->lora_A, a_before)) << "the shared A did not train";
  pair->to(torch::kDouble);  // moves the shared factors with the layers
  EXPECT_EQ(factors->lora_A.scalar_type(), torch::kDouble);
  EXPECT_EQ(pair->q->lora_A().scalar_type(), torch::kDouble);
}

TEST(TiedLoraFactors, FactorsNobodyRegistersAreRefusedNotSilentlyFrozen) {
  TiedLoraFactors factors(TiedLoraFactorsOptions(8, 6, AdapterMethod::parse("tied-ab"), LoraOptions(2)));
  auto owner = LoraLinear(random_linear(8, 6), factors);
  auto other = LoraLinear(random_linear(8, 6), factors);
  owner->detach_adapter();  // the owner lets go: `other` would now train nothing
  torch::nn::Sequential model(other);
  try {
    tiedlora::trainable_parameters(*model);
    FAIL() << "no error";
  } catch (const tiedlora::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("no module of this model registers"), std::string::npos) << e.what();
  }
}

TEST(TiedLoraFactors, OwnershipFollowsTheOwnerAndDoubleRegistrationIsRefused) {
  TiedLoraFactors factors(TiedLoraFactorsOptions(8, 6, AdapterMethod::parse("tied-abuv"), LoraOptions(2)));
  {
    Pair first(factors);
  }  // its layers are gone: the factors belong to nobody again
  EXPECT_FALSE(factors->owned());
  Pair second(factors);
  int a_count = 0;
  for (const auto& p : second->parameters()) a_count += p.is_same(factors->lora_A);
  EXPECT_EQ(a_count, 1) << "the next layer attached must register the factors";
  // The old recipe also registered the factors by hand: parameters() would list A twice. Refused.
  struct Holder : torch::nn::Module {};
  auto holder = std::make_shared<Holder>();
  holder->register_module("pair", second.ptr());
  holder->register_module("shared", factors.ptr());
  try {
    tiedlora::trainable_parameters(*holder);
    FAIL() << "no error";
  } catch (const tiedlora::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("registered a second time"), std::string::npos) << e.what();
  }
}

TEST(TiedLoraFactors, MethodLoraIsRefused) {
  try {
    TiedLoraFactors factors(TiedLoraFactorsOptions(8, 6, AdapterMethod::lora(), LoraOptions(2)));
    FAIL() << "no error";
  } catch (const tiedlora::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("LoraLinear(base, LoraOptions"), std::string::npos) << e.what();
  }
}

TEST(LoraLinear, MergeAndUnloadKeepsTheMergedWeightAndDropsTheAdapter) {
  for (const std::string method : {"lora", "tied-abuv"}) {
    torch::manual_seed(5);
    auto layer = make_layer(method, random_linear(8, 6));
    randomize_adapter(layer);
    torch::nn::Sequential model(layer);
    const auto x = torch::randn({4, 8});
    torch::NoGradGuard no_grad;
    model->eval();
    const auto adapted = model->forward(x);
    tiedlora::merge_adapters_(*model);
    const auto merged_weight = layer->weight.clone();
    tiedlora::unmerge_adapters_(*model);
    tiedlora::merge_and_unload_(*model);
    EXPECT_FALSE(layer->has_adapter()) << method;
    EXPECT_FALSE(layer->merged()) << method;  // no copy of the original weight is kept
    EXPECT_TRUE(torch::equal(layer->weight, merged_weight)) << method;
    EXPECT_TRUE(all_close(model->forward(x), adapted, 1e-5, 1e-5, "merged and unloaded")) << method;
    EXPECT_TRUE(tiedlora::trainable_parameters(*model).empty()) << method;
    for (const auto& item : model->named_parameters()) {
      EXPECT_EQ(item.key().find("lora"), std::string::npos) << method << ": " << item.key();
    }
  }
}

// A mixed batch without gradients runs on the factors the layer keeps stacked between forwards
// (AdapterSet::stacked_factors); every change of a factor is seen by the next forward, which equals the training
// path's output each time: an in-place change (an optimizer step), set_data (Module::to, loads), an adapter
// detached and attached again under its name.
TEST(LoraLinear, MixedBatchWithoutGradientsSeesEveryChangeOfTheFactors) {
  torch::manual_seed(8);
  LoraLinear layer(random_linear(8, 6), LoraOptions(4));
  layer->attach_lora(LoraOptions(4), "second");
  auto randomize = [&] {
    torch::NoGradGuard no_grad;
    for (auto& p : layer->parameters()) {
      if (p.requires_grad()) p.normal_(0.0, 0.5);
    }
  };
  randomize();
  const auto x = torch::randn({4, 3, 8});
  const tiedlora::RowAdaptersScope scope(std::make_shared<const tiedlora::RowAdapters>(
      std::vector<std::string>{"default", "default", "second", "second"}));
  auto forward_checked = [&](const std::string& after) {
    const auto with_grad = layer->forward(x).detach();
    torch::NoGradGuard no_grad;
    const auto without = layer->forward(x);
    EXPECT_TRUE(all_close(without, with_grad, 1e-5, 1e-5, "after " + after));
    EXPECT_TRUE(torch::equal(layer->forward(x), without)) << "a second forward after " << after;
    return without;
  };
  auto second_b = [&] { return layer->named_parameters()["lora_adapters.second.lora_B"]; };
  auto last = forward_checked("the first forward");
  {
    torch::NoGradGuard no_grad;
    second_b().add_(1.0);
  }
  auto now = forward_checked("an in-place change");
  EXPECT_FALSE(torch::allclose(now, last));
  second_b().set_data(torch::randn({6, 4}));
  last = now;
  now = forward_checked("set_data");
  EXPECT_FALSE(torch::allclose(now, last));
  layer->detach_adapter("second");
  layer->attach_lora(LoraOptions(4), "second");
  randomize();
  last = now;
  now = forward_checked("detach and attach");
  EXPECT_FALSE(torch::allclose(now, last));
}

}  // namespace
