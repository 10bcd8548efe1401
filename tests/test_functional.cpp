// test_functional.cpp: functional::lora_linear against (1) autograd through plain ATen ops in float64 for
// every freeze mask, (2) central finite differences, and (3) PEFT's LoRA layer (reference files made by
// tests/reference/make_peft_lora_reference.py) in fp32 and bf16.
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/autocast_mode.h>
#include <c10/core/CPUAllocator.h>
#include <torch/torch.h>

#include "test_support.h"
#include "tiedlora/core/functional.h"
#include "tiedlora/core/inject.h"
#include "tiedlora/core/method.h"
#include "tiedlora/core/modules.h"
#include "tiedlora/formats/safetensors.h"

namespace {

using tiedlora::AdapterMethod;
using tiedlora::testing::all_close;

struct Inputs {
  torch::Tensor x, xa, w, bias, a, b, u, v, dy;
  double scale = 0.75;
};

// Random non-zero values everywhere (never the zero initialisation), double precision.
Inputs random_inputs(const AdapterMethod& m, bool with_bias, bool with_dropout_input, uint64_t seed) {
  torch::manual_seed(seed);
  const auto opts = torch::TensorOptions(torch::kDouble);
  const int64_t in = 7, out = 5, r = 3;
  Inputs in_;
  in_.x = torch::randn({2, 4, in}, opts).requires_grad_(true);
  if (with_dropout_input) in_.xa = torch::randn({2, 4, in}, opts).requires_grad_(true);
  in_.w = torch::randn({out, in}, opts);
  if (with_bias) in_.bias = torch::randn({out}, opts);
  in_.a = torch::randn({r, in}, opts).requires_grad_(m.train_a);
  in_.b = torch::randn({out, r}, opts).requires_grad_(m.train_b);
  if (m.has_u()) in_.u = torch::randn({r}, opts).requires_grad_(true);
  if (m.has_v()) in_.v = torch::randn({out}, opts).requires_grad_(true);
  in_.dy = torch::randn({2, 4, out}, opts);
  return in_;
}

// The layer written with plain ATen ops, for autograd to differentiate.
torch::Tensor reference_forward(const Inputs& p) {
  torch::Tensor y = torch::matmul(p.x, p.w.t());
  if (p.bias.defined()) y = y + p.bias;
  torch::Tensor h = torch::matmul(p.xa.defined() ? p.xa : p.x, p.a.t());
  if (p.u.defined()) h = h * p.u;
  torch::Tensor low = torch::matmul(h, p.b.t());
  if (p.v.defined()) low = low * p.v;
  return y + p.scale * low;
}

torch::Tensor ours_forward(const Inputs& p) {
  return tiedlora::functional::lora_linear(p.x, p.w, p.bias, {p.a, p.b, p.u, p.v, p.scale}, p.xa);
}

std::vector<std::pair<std::string, torch::Tensor>> differentiable(const Inputs& p) {
  std::vector<std::pair<std::string, torch::Tensor>> out = {{"x", p.x}, {"xa", p.xa}, {"A", p.a},
                                                            {"B", p.b}, {"u", p.u},   {"v", p.v}};
  std::vector<std::pair<std::string, torch::Tensor>> kept;
  for (auto& [name, t] : out) {
    if (t.defined() && t.requires_grad()) kept.emplace_back(name, t);
  }
  return kept;
}

std::vector<torch::Tensor> gradients(const torch::Tensor& y, const Inputs& p) {
  std::vector<torch::Tensor> targets;
  for (auto& [name, t] : differentiable(p)) targets.push_back(t);
  return torch::autograd::grad({y}, targets, {p.dy});
}

const std::vector<std::string> kMasks = {"lora",     "tied-ab",  "tied-abuv", "tied-uv",     "tied-b",
                                         "tied-v",   "tied-bv",  "tied-abv",  "tied-abu",    "tied-av",
                                         "tied-buv", "tied-auv", "tied-bu",   "untied-abuv", "untied-bv"};

class EveryMask : public ::testing::TestWithParam<std::string> {};

TEST_P(EveryMask, GradientsMatchAutogradThroughAtenInFloat64) {
  const AdapterMethod method = AdapterMethod::parse(GetParam());
  for (bool bias : {false, true}) {
    for (bool dropout_input : {false, true}) {
      Inputs p = random_inputs(method, bias, dropout_input, 17);
      const auto expected_y = reference_forward(p);
      const auto ours_y = ours_forward(p);
      ASSERT_TRUE(all_close(ours_y, expected_y, 1e-12, 1e-12, "y"));
      const auto expected = gradients(expected_y, p);
      const auto ours = gradients(ours_y, p);
      const auto names = differentiable(p);
      ASSERT_FALSE(names.empty());
      for (size_t i = 0; i < names.size(); ++i) {
        EXPECT_TRUE(
            all_close(ours[i], expected[i], 1e-11, 1e-11,
                      GetParam() + " d" + names[i].first + (bias ? " bias" : "") + (dropout_input ? " xa" : "")));
      }
    }
  }
}

TEST_P(EveryMask, GradientsMatchCentralFiniteDifferences) {
  const AdapterMethod method = AdapterMethod::parse(GetParam());
  Inputs p = random_inputs(method, /*bias=*/true, /*dropout_input=*/false, 29);
  const auto analytic = gradients(ours_forward(p), p);
  const auto names = differentiable(p);
  const double eps = 1e-6;
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < names.size(); ++i) {
    torch::Tensor t = names[i].second;
    auto flat = t.view({-1});
    // Every element of the small tensors, a spread of elements of x.
    const int64_t step = std::max<int64_t>(1, flat.numel() / 12);
    for (int64_t k = 0; k < flat.numel(); k += step) {
      const double original = flat[k].item<double>();
      flat[k].fill_(original + eps);
      const double plus = (ours_forward(p) * p.dy).sum().item<double>();
      flat[k].fill_(original - eps);
      const double minus = (ours_forward(p) * p.dy).sum().item<double>();
      flat[k].fill_(original);
      const double numeric = (plus - minus) / (2 * eps);
      const double exact = analytic[i].view({-1})[k].item<double>();
      EXPECT_NEAR(exact, numeric, 1e-6 * (1 + std::abs(numeric)))
          << GetParam() << " d" << names[i].first << "[" << k << "]";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Masks, EveryMask, ::testing::ValuesIn(kMasks), [](const auto& info) {
  std::string name = info.param;
  for (char& c : name) {
    if (c == '-') c = '_';
  }
  return name;
});

TEST(LoraLinearFunctional, SharedFactorGradientIsTheSumOverLayers) {
  torch::manual_seed(3);
  const auto opts = torch::TensorOptions(torch::kDouble);
  auto a = torch::randn({4, 6}, opts).requires_grad_(true);
  auto b = torch::randn({5, 4}, opts).requires_grad_(true);
  std::vector<torch::Tensor> w, x, u, v;
  for (int l = 0; l < 3; ++l) {
    w.push_back(torch::randn({5, 6}, opts));
    x.push_back(torch::randn({8, 6}, opts));
    u.push_back(torch::randn({4}, opts).requires_grad_(true));
    v.push_back(torch::randn({5}, opts).requires_grad_(true));
  }
  torch::Tensor loss = torch::zeros({}, opts), da_sum = torch::zeros_like(a), db_sum = torch::zeros_like(b);
  for (int l = 0; l < 3; ++l) {
    auto y = tiedlora::functional::lora_linear(x[l], w[l], {}, {a, b, u[l], v[l], 0.5});
    auto g = torch::autograd::grad({y.square().sum()}, {a, b}, {}, /*retain_graph=*/true);
    da_sum += g[0];
    db_sum += g[1];
    loss = loss + y.square().sum();
  }
  loss.backward();
  EXPECT_TRUE(all_close(a.grad(), da_sum, 1e-12, 1e-12, "dA"));
  EXPECT_TRUE(all_close(b.grad(), db_sum, 1e-12, 1e-12, "dB"));
}

// ---- the one choke point with several adapters and routed rows -------------------------------------------

// Four adapters on one layer in one call: plain LoRA on the slice of rows [0, 2), a tied-abuv adapter on the
// gathered rows {2, 4}, a v-only adapter with its own (dropout) input on the slice [3, 4), and a plain LoRA
// adapter on every row on top; row 5 is served by the last one alone. Random values everywhere.
struct RoutedCase {
  torch::Tensor x, w, bias, dy;
  std::vector<tiedlora::functional::AdapterCall> calls;
  std::vector<torch::Tensor> rows;  // each call's rows as indices (undefined: every row)
};

RoutedCase routed_case(torch::ScalarType type, bool with_all_rows_adapter) {
  using tiedlora::functional::AdapterRows;
  torch::manual_seed(41);
  const auto o = torch::TensorOptions(torch::kDouble);
  const int64_t in = 7, out = 5;
  RoutedCase c;
  c.x = torch::randn({6, 3, in}, o).to(type).requires_grad_(true);
  c.w = torch::randn({out, in}, o).to(type);
  c.bias = torch::randn({out}, o).to(type);
  c.dy = torch::randn({6, 3, out}, o).to(type);
  auto leaf = [&](std::vector<int64_t> shape) { return torch::randn(shape, o).to(type).requires_grad_(true); };
  c.calls.push_back({{leaf({3, in}), leaf({out, 3}), {}, {}, 0.5}, AdapterRows::range(0, 2), {}});
  c.rows.push_back(torch::arange(0, 2));
  c.calls.push_back(
      {{leaf({4, in}), leaf({out, 4}), leaf({4}), leaf({out}), 1.5}, AdapterRows::indices(torch::tensor({2, 4})), {}});
  c.rows.push_back(torch::tensor({2, 4}));
  c.calls.push_back(
      {{leaf({2, in}), leaf({out, 2}), {}, leaf({out}), 2.0}, AdapterRows::range(3, 4), leaf({1, 3, in})});
  c.rows.push_back(torch::arange(3, 4));
  if (with_all_rows_adapter) {
    c.calls.push_back({{leaf({2, in}), leaf({out, 2}), {}, {}, 0.25}, AdapterRows::all(), {}});
    c.rows.emplace_back();
  }
  return c;
}

// The routed layer written with plain ATen ops in float64, for autograd to differentiate.
torch::Tensor routed_reference(const RoutedCase& c) {
  auto f64 = [](const torch::Tensor& t) { return t.defined() ? t.to(torch::kDouble) : t; };
  torch::Tensor y = torch::matmul(f64(c.x), f64(c.w).t()) + f64(c.bias);
  for (size_t k = 0; k < c.calls.size(); ++k) {
    const auto& u = c.calls[k].update;
    const torch::Tensor rows_in = c.calls[k].adapter_input.defined() ? f64(c.calls[k].adapter_input)
                                  : c.rows[k].defined()              ? f64(c.x).index_select(0, c.rows[k])
                                                                     : f64(c.x);
    torch::Tensor h = torch::matmul(rows_in, f64(u.lora_a).t());
    if (u.u.defined()) h = h * f64(u.u);
    torch::Tensor low = torch::matmul(h, f64(u.lora_b).t());
    if (u.v.defined()) low = low * f64(u.v);
    y = c.rows[k].defined() ? y.index_add(0, c.rows[k], u.scale * low) : y + u.scale * low;
  }
  return y;
}

// x, then every adapter's tensors (and its own input), as gradients are taken.
std::vector<torch::Tensor> routed_leaves(const RoutedCase& c) {
  std::vector<torch::Tensor> out{c.x};
  for (const auto& call : c.calls) {
    for (const auto& t : call.update.tensors()) out.push_back(t);
    if (call.adapter_input.defined()) out.push_back(call.adapter_input);
  }
  return out;
}

TEST(LoraLinearRouted, EveryGradientMatchesFloat64AutogradInFloat64AndFloat32) {
  for (const auto type : {torch::kDouble, torch::kFloat}) {
    RoutedCase c = routed_case(type, /*with_all_rows_adapter=*/true);
    const auto ours = tiedlora::functional::lora_linear(c.x, c.w, c.bias, c.calls);
    const auto expected = routed_reference(c);
    const double tol = type == torch::kDouble ? 1e-12 : 2e-5;
    ASSERT_TRUE(all_close(ours.to(torch::kDouble), expected, tol, tol, "y"));
    const auto leaves = routed_leaves(c);
    const auto got = torch::autograd::grad({ours}, leaves, {c.dy});
    const auto want = torch::autograd::grad({expected}, leaves, {c.dy.to(torch::kDouble)});
    for (size_t i = 0; i < leaves.size(); ++i) {
      ASSERT_TRUE(got[i].defined()) << "gradient " << i;
      EXPECT_GT(want[i].abs().max().item<double>(), 0) << "gradient " << i << " is zero: the test would be blind";
      EXPECT_TRUE(all_close(got[i].to(torch::kDouble), want[i], tol, tol * want[i].abs().max().item<double>(),
                            std::string(c10::toString(type)) + " gradient " + std::to_string(i)));
    }
  }
}

// Without gradients (generation, evaluation) lora_linear skips the autograd node, and runs of plain-LoRA calls
// on adjacent slices of one length, rank and scale run as batched GEMMs. Every case gives the float64 reference
// and the training path's output:
//   - "batched": a call on every row, then a run of two calls on the halves (the run starts at call 1, so a
//     stack read at the wrong calls fails), with the factors stacked by lora_linear and given as
//     StackedFactors;
//   - "broken runs": adjacent slices whose scale, rank or length differ, and a gap, so each call runs alone;
//   - "mixed kinds": routed_case (u, v, gathered rows, an adapter's own input).
TEST(LoraLinearRouted, WithoutGradientsTheSameOutputAsWithThem) {
  using tiedlora::functional::AdapterRows;
  using tiedlora::functional::StackedFactors;
  for (const auto type : {torch::kDouble, torch::kFloat}) {
    RoutedCase mixed_kinds = routed_case(type, /*with_all_rows_adapter=*/true);
    const int64_t in = mixed_kinds.w.size(1), out = mixed_kinds.w.size(0);
    auto leaf = [&](std::vector<int64_t> shape) { return torch::randn(shape).to(type).requires_grad_(true); };
    auto with_calls = [&](std::vector<std::tuple<int, int, int, double>> calls) {
      RoutedCase c = routed_case(type, /*with_all_rows_adapter=*/false);
      c.calls.clear();
      c.rows.clear();
      for (const auto& [first, last, rank, scale] : calls) {
        const auto rows = first < 0 ? AdapterRows::all() : AdapterRows::range(first, last);
        c.calls.push_back({{leaf({rank, in}), leaf({out, rank}), {}, {}, scale}, rows, {}});
        c.rows.push_back(first < 0 ? torch::Tensor() : torch::arange(first, last));
      }
      return c;
    };
    const RoutedCase batched = with_calls({{-1, -1, 3, 0.75}, {0, 3, 3, 0.5}, {3, 6, 3, 0.5}});
    const RoutedCase broken_runs =
        with_calls({{0, 1, 3, 0.5}, {1, 2, 3, 2.0}, {2, 3, 4, 2.0}, {3, 5, 4, 2.0}, {5, 6, 4, 2.0}});
    const StackedFactors stacked = StackedFactors::of(batched.calls, type);  // the branch dtype of fp32 and fp64
    ASSERT_TRUE(stacked.defined());
    EXPECT_EQ(stacked.lora_a.sizes(), (c10::IntArrayRef{3, 3, in}));
    EXPECT_FALSE(StackedFactors::of(broken_runs.calls, torch::kFloat).defined()) << "ranks differ";
    EXPECT_FALSE(StackedFactors::of(mixed_kinds.calls, torch::kFloat).defined()) << "u and v";
    struct Case {
      const char* name;
      const RoutedCase* c;
      const StackedFactors* stacked;
    };
    for (const Case& k : {Case{"batched", &batched, nullptr}, Case{"batched, stacked given", &batched, &stacked},
                          Case{"broken runs", &broken_runs, nullptr}, Case{"mixed kinds", &mixed_kinds, nullptr}}) {
      const auto with_grad = tiedlora::functional::lora_linear(k.c->x, k.c->w, k.c->bias, k.c->calls);
      torch::NoGradGuard no_grad;
      const auto without = tiedlora::functional::lora_linear(k.c->x, k.c->w, k.c->bias, k.c->calls, k.stacked);
      const double tol = type == torch::kDouble ? 1e-12 : 2e-5;
      const std::string what = std::string(k.name) + " in " + c10::toString(type);
      EXPECT_FALSE(without.requires_grad()) << what;
      EXPECT_TRUE(all_close(without.to(torch::kDouble), routed_reference(*k.c), tol, tol, what + " against float64"));
      EXPECT_TRUE(all_close(without, with_grad.detach(), tol, tol, what + " against the training path"));
    }
  }
}

// Stacked factors that do not fit the calls are refused, naming the tensor and the call.
TEST(LoraLinearRouted, RejectsStackedFactorsThatDoNotFitTheCalls) {
  using tiedlora::functional::StackedFactors;
  RoutedCase c = routed_case(torch::kFloat, /*with_all_rows_adapter=*/false);
  std::vector<tiedlora::functional::AdapterCall> calls{c.calls[0], c.calls[0]};
  calls[1].rows = tiedlora::functional::AdapterRows::range(2, 4);
  StackedFactors stacked = StackedFactors::of(calls, torch::kFloat);
  ASSERT_TRUE(stacked.defined());
  StackedFactors one_short{stacked.lora_a.narrow(0, 0, 1), stacked.lora_b};
  const std::string short_error = tiedlora::testing::error_of([&] {
    torch::NoGradGuard no_grad;
    tiedlora::functional::lora_linear(c.x, c.w, c.bias, calls, &one_short);
  });
  EXPECT_NE(short_error.find("stacked.lora_a must hold the factors of the 2 calls"), std::string::npos) << short_error;
  StackedFactors wrong_rank{torch::randn({2, 4, c.w.size(1)}), stacked.lora_b};
  const std::string rank_error =
      tiedlora::testing::error_of([&] { tiedlora::functional::lora_linear(c.x, c.w, c.bias, calls, &wrong_rank); });
  EXPECT_NE(rank_error.find("stacked.lora_a[0]"), std::string::npos) << rank_error;
}

// One adapter alone on its rows (the N = 1 call) gives the routed call's output on those rows and the same
// gradients for that adapter, which sees only its own rows; a row no call serves is the plain layer.
TEST(LoraLinearRouted, EachAdapterOnItsRowsEqualsTheOneAdapterCall) {
  RoutedCase c = routed_case(torch::kDouble, /*with_all_rows_adapter=*/false);
  const auto routed = tiedlora::functional::lora_linear(c.x, c.w, c.bias, c.calls);
  for (size_t k = 0; k < c.calls.size(); ++k) {
    const auto& call = c.calls[k];
    const auto x_rows = c.x.detach().index_select(0, c.rows[k]).requires_grad_(true);
    const auto alone = tiedlora::functional::lora_linear(x_rows, c.w, c.bias, call.update, call.adapter_input);
    EXPECT_TRUE(all_close(routed.index_select(0, c.rows[k]), alone, 1e-13, 1e-13, "y of call " + std::to_string(k)));
    std::vector<torch::Tensor> mine = call.update.tensors();
    const auto from_routed = torch::autograd::grad({routed}, mine, {c.dy}, /*retain_graph=*/true);
    const auto from_alone = torch::autograd::grad({alone}, mine, {c.dy.index_select(0, c.rows[k])});
    for (size_t i = 0; i < mine.size(); ++i) {
      EXPECT_TRUE(all_close(from_routed[i], from_alone[i], 1e-12, 1e-12,
                            "call " + std::to_string(k) + " factor " + std::to_string(i)));
    }
  }
  const auto plain = torch::addmm(c.bias, c.x.detach()[5], c.w.t());
  EXPECT_TRUE(all_close(routed.detach()[5], plain, 1e-13, 1e-13, "row 5 (no adapter)"));
}

TEST(LoraLinearRouted, RejectsRowsThatDoNotFitTheInput) {
  using tiedlora::functional::AdapterRows;
  RoutedCase c = routed_case(torch::kFloat, false);
  auto with_rows = [&](AdapterRows rows, at::Tensor adapter_input = {}) {
    std::vector<tiedlora::functional::AdapterCall> calls{
        {c.calls[0].update, std::move(rows), std::move(adapter_input)}};
    return tiedlora::testing::error_of([&] { tiedlora::functional::lora_linear(c.x, c.w, c.bias, calls); });
  };
  EXPECT_NE(with_rows(AdapterRows::range(4, 9)).find("rows [4, 9)"), std::string::npos);
  EXPECT_NE(with_rows(AdapterRows::indices(torch::tensor({1.0}))).find("rows must be a 1-D int64"), std::string::npos);
  EXPECT_NE(with_rows(AdapterRows::range(0, 2), torch::randn({3, 3, 7})).find("adapter_input must have the shape"),
            std::string::npos);
  std::vector<tiedlora::functional::AdapterCall> calls{{c.calls[0].update, AdapterRows::range(0, 1), {}}};
  EXPECT_NE(tiedlora::testing::error_of([&] {
              tiedlora::functional::lora_linear(torch::randn({7}), c.w, c.bias, calls);
            }).find("batch dimension"),
            std::string::npos);
}

TEST(LoraLinearFunctional, RejectsBadArgumentsNamingThem) {
  const auto x = torch::randn({4, 6});
  const auto w = torch::randn({5, 6});
  const auto a = torch::randn({2, 6});
  const auto b = torch::randn({5, 2});
  auto message_of = [](auto&& fn) {
    try {
      fn();
    } catch (const std::exception& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  using tiedlora::functional::lora_linear;
  EXPECT_NE(message_of([&] { lora_linear(torch::randn({4, 7}), w, {}, {a, b, {}, {}, 1.0}); }).find("d_in = 6"),
            std::string::npos);
  EXPECT_NE(message_of([&] { lora_linear(x, w, {}, {torch::randn({2, 5}), b, {}, {}, 1.0}); }).find("lora_a"),
            std::string::npos);
  EXPECT_NE(message_of([&] { lora_linear(x, w, {}, {a, torch::randn({5, 3}), {}, {}, 1.0}); }).find("lora_b"),
            std::string::npos);
  EXPECT_NE(message_of([&] { lora_linear(x, w, {}, {a, b, torch::randn({3}), {}, 1.0}); }).find("u must be"),
            std::string::npos);
  EXPECT_NE(message_of([&] { lora_linear(x, w, {}, {a, b, {}, torch::randn({4}), 1.0}); }).find("v must be"),
            std::string::npos);
  EXPECT_NE(message_of([&] { lora_linear(x, w, torch::randn({3}), {a, b, {}, {}, 1.0}); }).find("bias"),
            std::string::npos);
  EXPECT_NE(message_of([&] { lora_linear(x, w.clone().requires_grad_(true), {}, {a, b, {}, {}, 1.0}); }).find("frozen"),
            std::string::npos);
  EXPECT_NE(
      message_of([&] { lora_linear(x.to(torch::kInt), w, {}, {a, b, {}, {}, 1.0}); }).find("input must be a floating"),
      std::string::npos);
}

// ---- against PEFT -----------------------------------------------------------------------------------------

struct PeftCase {
  std::map<std::string, torch::Tensor> t;
  std::map<std::string, std::string> meta;
};

PeftCase load_case(const std::string& name) {
  const std::string path = tiedlora::testing::reference_dir() + "/peft_lora_" + name + ".safetensors";
  auto file = tiedlora::formats::SafetensorsFile::open(path);
  PeftCase c;
  for (const auto& n : file.names()) c.t[n] = file.tensor(n).clone();
  c.meta = file.metadata();
  return c;
}

struct OurRun {
  torch::Tensor y, dx, da, db;
};

// CPU autocast for one scope.
struct CpuAutocast : tiedlora::testing::ScopedAutocast {
  explicit CpuAutocast(torch::ScalarType dtype) : ScopedAutocast(at::kCPU, dtype) {}
};

OurRun run_ours(const PeftCase& c) {
  const auto& w = c.t.at("weight");
  torch::nn::Linear base(torch::nn::LinearOptions(w.size(1), w.size(0)).bias(c.t.count("bias") > 0));
  {
    torch::NoGradGuard no_grad;
    base->weight.set_data(w.clone());
    if (c.t.count("bias")) base->bias.set_data(c.t.at("bias").clone());
  }
  const int64_t rank = std::stoll(c.meta.at("rank"));
  tiedlora::LoraLinear layer(
      base,
      tiedlora::LoraOptions(rank).alpha(std::stod(c.meta.at("alpha"))).use_rslora(c.meta.at("use_rslora") == "true"));
  EXPECT_DOUBLE_EQ(layer->scale(), std::stod(c.meta.at("peft_scaling")));
  {
    torch::NoGradGuard no_grad;
    layer->lora_A().copy_(c.t.at("lora_A"));
    layer->lora_B().copy_(c.t.at("lora_B"));
  }
  auto x = c.t.at("x").clone().requires_grad_(true);
  std::optional<CpuAutocast> autocast;
  if (c.meta.count("autocast") && c.meta.at("autocast") == "torch.bfloat16") autocast.emplace(torch::kBFloat16);
  auto y = layer->forward(x);
  y.backward(c.t.at("dy"));
  return {y.detach(), x.grad(), layer->lora_A().grad(), layer->lora_B().grad()};
}

// Ours against the float64 truth, never further than PEFT (max and mean), for y, dx, dA, dB.
void expect_at_least_as_close_as_peft(const PeftCase& c, const OurRun& ours, const std::string& label) {
  const std::vector<std::tuple<std::string, torch::Tensor, std::string>> outputs = {
      {"y", ours.y, "y"}, {"dx", ours.dx, "dx"}, {"dA", ours.da, "dA"}, {"dB", ours.db, "dB"}};
  for (const auto& [name, tensor, key] : outputs) {
    const auto ours_err = tiedlora::testing::difference(tensor, c.t.at("truth_" + key));
    const auto peft_err = tiedlora::testing::difference(c.t.at("peft_" + key), c.t.at("truth_" + key));
    EXPECT_LE(ours_err.max_abs, peft_err.max_abs * 1.0001 + 1e-12) << label << " " << name;
    EXPECT_LE(ours_err.mean_abs, peft_err.mean_abs * 1.0001 + 1e-12) << label << " " << name;
    std::cout << "[" << label << " " << name << "] max |err| vs float64: ours " << ours_err.max_abs << ", PEFT "
              << peft_err.max_abs << "; mean: ours " << ours_err.mean_abs << ", PEFT " << peft_err.mean_abs << "\n";
  }
}

TEST(LoraLinearVsPeft, Float32MatchesPeft) {
  for (const std::string name : {"fp32", "fp32_rslora"}) {
    const PeftCase c = load_case(name);
    const OurRun ours = run_ours(c);
    EXPECT_EQ(ours.y.scalar_type(), torch::kFloat);
    EXPECT_TRUE(all_close(ours.y, c.t.at("peft_y"), 1e-5, 1e-6, name + " y vs PEFT"));
    EXPECT_TRUE(all_close(ours.dx, c.t.at("peft_dx"), 1e-5, 1e-6, name + " dx vs PEFT"));
    EXPECT_TRUE(all_close(ours.da, c.t.at("peft_dA"), 1e-5, 1e-5, name + " dA vs PEFT"));
    EXPECT_TRUE(all_close(ours.db, c.t.at("peft_dB"), 1e-5, 1e-5, name + " dB vs PEFT"));
    EXPECT_TRUE(all_close(ours.y, c.t.at("truth_y"), 1e-5, 1e-6, name + " y vs float64"));
  }
}

TEST(LoraLinearVsPeft, Bfloat16IsAtLeastAsCloseToFloat64AsPeft) {
  const PeftCase c = load_case("bf16");
  const OurRun ours = run_ours(c);
  EXPECT_EQ(ours.y.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(ours.dx.scalar_type(), torch::kBFloat16);
  EXPECT_EQ(ours.da.scalar_type(), torch::kFloat);  // adapters stay fp32, as PEFT keeps them
  const std::vector<std::tuple<std::string, torch::Tensor, std::string>> outputs = {
      {"y", ours.y, "y"}, {"dx", ours.dx, "dx"}, {"dA", ours.da, "dA"}, {"dB", ours.db, "dB"}};
  for (const auto& [name, tensor, key] : outputs) {
    const auto ours_err = tiedlora::testing::difference(tensor, c.t.at("truth_" + key));
    const auto peft_err = tiedlora::testing::difference(c.t.at("peft_" + key), c.t.at("truth_" + key));
    // One rounding instead of PEFT's several: never worse than PEFT, max and mean.
    EXPECT_LE(ours_err.max_abs, peft_err.max_abs * 1.0001 + 1e-12) << name;
    EXPECT_LE(ours_err.mean_abs, peft_err.mean_abs * 1.0001 + 1e-12) << name;
    // And the same values as PEFT up to bf16 rounding (2 ulp at the output's magnitude).
    const double ulp = std::ldexp(1.0, -7);
    EXPECT_TRUE(all_close(tensor, c.t.at("peft_" + key), 2 * ulp, 2 * ulp * ours_err.max_ref, name + " vs PEFT"));
    std::cout << "[bf16 " << name << "] max |err| vs float64: ours " << ours_err.max_abs << ", PEFT "
              << peft_err.max_abs << "; mean: ours " << ours_err.mean_abs << ", PEFT " << peft_err.mean_abs << "\n";
  }
}

// ---- precision contract: autocast, storage dtypes --------------------------------------------------------

TEST(LoraLinearVsPeft, CpuAutocastBf16IsAtLeastAsCloseToFloat64AsPeft) {
  const PeftCase c = load_case("autocast_bf16");
  ASSERT_EQ(c.meta.at("autocast"), "torch.bfloat16");
  const OurRun ours = run_ours(c);
  EXPECT_EQ(ours.y.scalar_type(), torch::kBFloat16);  // what torch::nn::Linear returns under the autocast
  EXPECT_EQ(ours.dx.scalar_type(), torch::kFloat);    // the input's own dtype
  EXPECT_EQ(ours.da.scalar_type(), torch::kFloat);
  expect_at_least_as_close_as_peft(c, ours, "autocast bf16");
}

TEST(LoraLinearAutocast, ReturnsWhatTorchLinearReturnsUnderTheSameAutocast) {
  for (const auto dtype : {torch::kBFloat16, torch::kHalf}) {
    for (const std::string method : {"lora", "tied-abuv"}) {
      torch::manual_seed(21);
      torch::nn::Linear plain(torch::nn::LinearOptions(48, 40));
      tiedlora::LoraLinear layer(torch::nn::Linear(torch::nn::LinearOptions(48, 40)), tiedlora::LoraOptions(4));
      if (method != "lora") {
        tiedlora::TiedLoraFactors factors(48, 40, AdapterMethod::parse(method), tiedlora::LoraOptions(4));
        layer = tiedlora::LoraLinear(torch::nn::Linear(torch::nn::LinearOptions(48, 40)), factors);
      }
      {
        torch::NoGradGuard no_grad;
        layer->weight.copy_(plain->weight);
        layer->bias.copy_(plain->bias);
      }
      const auto x = torch::randn({6, 48}).requires_grad_(true);
      CpuAutocast autocast(dtype);
      const auto expected = plain(x);
      const auto y = layer(x);  // a fresh adapter: dW = 0
      ASSERT_EQ(y.scalar_type(), dtype) << method;
      EXPECT_TRUE(torch::equal(y, expected))
          << method << " in " << dtype << ": the base path differs from torch::nn::Linear";
      y.sum().backward();
      EXPECT_EQ(x.grad().scalar_type(), torch::kFloat);
      EXPECT_TRUE(torch::isfinite(x.grad()).all().item<bool>());
      for (const auto& p : tiedlora::trainable_parameters(*layer)) {
        ASSERT_TRUE(p.grad().defined()) << method;
        EXPECT_EQ(p.grad().scalar_type(), torch::kFloat) << method;
      }
    }
  }
}

TEST(LoraLinearAutocast, FactorGradientsAreExactOnTheAutocastInputs) {
  // Under bf16 autocast the layer sees x, W and bias rounded to bf16; on those inputs every factor gradient
  // (A, B, u, v) and dx must be the float64 ones to fp32 accuracy: the low-rank math runs in fp32.
  torch::manual_seed(22);
  const int64_t in = 40, out = 24, r = 4;
  auto x = torch::randn({3, 5, in}).requires_grad_(true);
  const auto w = torch::randn({out, in}) / std::sqrt(in), bias = torch::randn({out}) * 0.1;
  auto a = (torch::randn({r, in}) / std::sqrt(in)).requires_grad_(true);
  auto b = torch::randn({out, r}).requires_grad_(true), u = torch::randn({r}).requires_grad_(true);
  auto v = torch::randn({out}).requires_grad_(true);
  const auto dy = torch::randn({3, 5, out}).to(torch::kBFloat16);
  {
    CpuAutocast autocast(torch::kBFloat16);
    const auto y = tiedlora::functional::lora_linear(x, w, bias, {a, b, u, v, 0.5});
    ASSERT_EQ(y.scalar_type(), torch::kBFloat16);
    y.backward(dy);
  }
  auto d = [](const torch::Tensor& t) { return t.detach().to(torch::kDouble); };
  auto rounded = [&](const torch::Tensor& t) { return t.detach().to(torch::kBFloat16).to(torch::kDouble); };
  auto x64 = rounded(x).requires_grad_(true), a64 = d(a).requires_grad_(true), b64 = d(b).requires_grad_(true);
  auto u64 = d(u).requires_grad_(true), v64 = d(v).requires_grad_(true);
  const auto y64 = torch::matmul(x64, rounded(w).t()) + rounded(bias) +
                   0.5 * torch::matmul(torch::matmul(x64, a64.t()) * u64, b64.t()) * v64;
  y64.backward(dy.to(torch::kDouble));
  EXPECT_TRUE(all_close(a.grad(), a64.grad(), 1e-4, 1e-5, "dA"));
  EXPECT_TRUE(all_close(b.grad(), b64.grad(), 1e-4, 1e-5, "dB"));
  EXPECT_TRUE(all_close(u.grad(), u64.grad(), 1e-4, 1e-5, "du"));
  EXPECT_TRUE(all_close(v.grad(), v64.grad(), 1e-4, 1e-5, "dv"));
  // dx: the base part dY W runs in bf16 (as in torch::nn::Linear), so bf16 accuracy.
  EXPECT_TRUE(all_close(x.grad(), x64.grad(), 2e-2, 2e-2, "dx"));
}

// Counts what the CPU allocator hands out while it is installed (every CPU tensor goes through it).
class CountingAllocator final : public c10::Allocator {
 public:
  explicit CountingAllocator(c10::Allocator* inner) : inner_(inner) {}
  c10::DataPtr allocate(size_t n) override {
    total += n;
    largest = std::max<size_t>(largest, n);
    return inner_->allocate(n);
  }
  c10::DeleterFnPtr raw_deleter() const override { return inner_->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
  std::atomic<size_t> total{0}, largest{0};

 private:
  c10::Allocator* inner_;
};

TEST(LoraLinearPrecision, MixedSixteenBitDtypesAreRefusedOutsideAutocast) {
  const auto w = torch::randn({6, 8}).to(torch::kHalf), a = torch::randn({2, 8}), b = torch::randn({6, 2});
  const auto x = torch::randn({3, 8}).to(torch::kBFloat16);
  try {
    tiedlora::functional::lora_linear(x, w, {}, {a, b, {}, {}, 1.0});
    FAIL() << "bf16 activations with an fp16 weight were accepted";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("input is BFloat16 but weight is Half"), std::string::npos) << e.what();
  }
  CpuAutocast autocast(torch::kBFloat16);  // under autocast both become bf16: accepted
  EXPECT_EQ(tiedlora::functional::lora_linear(x, w, {}, {a, b, {}, {}, 1.0}).scalar_type(), torch::kBFloat16);
}

TEST(LoraLinearPrecision, ABf16OrFp16WeightIsNeverCopiedIntoFp32) {
  for (const auto dtype : {torch::kBFloat16, torch::kHalf}) {
    torch::manual_seed(23);
    const int64_t in = 1024, out = 1024;
    tiedlora::LoraLinear layer(torch::nn::Linear(torch::nn::LinearOptions(in, out)), tiedlora::LoraOptions(8));
    layer->to(dtype);  // the whole layer in `dtype`, then the adapter back to fp32 as PEFT keeps it
    {
      torch::NoGradGuard no_grad;
      layer->lora_A().set_data(layer->lora_A().to(torch::kFloat));
      layer->lora_B().set_data(torch::randn({out, 8}) * 0.1);
    }
    const auto x = torch::randn({4, in}).to(dtype).requires_grad_(true);
    const size_t fp32_weight = static_cast<size_t>(in * out) * sizeof(float);
    c10::Allocator* previous = c10::GetCPUAllocator();
    CountingAllocator counting(previous);
    c10::SetCPUAllocator(&counting, /*priority=*/100);
    torch::Tensor y;
    {
      y = layer(x);
      y.sum().backward();
    }
    c10::SetCPUAllocator(previous, /*priority=*/100);
    EXPECT_EQ(y.scalar_type(), dtype);
    EXPECT_TRUE(x.grad().defined() && layer->lora_A().grad().defined() && layer->lora_B().grad().defined());
    // An fp32 copy of W (4 MiB) would be one allocation of that size; everything else here is activation-
    // or adapter-sized.
    EXPECT_LT(counting.largest.load(), fp32_weight / 4) << dtype << ": a weight-sized allocation happened";
    EXPECT_LT(counting.total.load(), fp32_weight / 2) << dtype << ": " << counting.total.load() << " bytes allocated";
    std::cout << "[" << dtype << " 1024x1024 layer, forward+backward of 4 rows] " << counting.total.load()
              << " bytes allocated, largest " << counting.largest.load() << " (an fp32 copy of W: " << fp32_weight
              << ")\n";
  }
}

}  // namespace
