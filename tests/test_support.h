// tests/test_support.h: helpers shared by the C++ tests: reference-data paths, seeded random tensors and
// closeness checks that report where and by how much two tensors differ.
#pragma once

#include <cstdlib>
#include <functional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>
#include <torch/nn/module.h>

namespace tiedlora::testing {

/// Folder of the reference files made by tests/reference/*.py (CTest passes it in the environment).
inline std::string reference_dir() {
  const char* dir = std::getenv("TIEDLORA_REFERENCE_DIR");
  return dir ? dir : "";
}

/// Max |a - b| and the max |b|, both in float64.
struct Difference {
  double max_abs = 0;
  double max_ref = 0;
  double mean_abs = 0;
};

inline Difference difference(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor d = (a.to(at::kDouble) - b.to(at::kDouble)).abs();
  return {d.max().item<double>(), b.to(at::kDouble).abs().max().item<double>(), d.mean().item<double>()};
}

/// |a - b| <= atol + rtol * |b| elementwise; the message names the tensor and the worst element.
inline ::testing::AssertionResult all_close(const at::Tensor& a, const at::Tensor& b, double rtol, double atol,
                                            const std::string& what) {
  if (a.sizes() != b.sizes()) {
    return ::testing::AssertionFailure() << what << ": shapes differ " << a.sizes() << " vs " << b.sizes();
  }
  const at::Tensor a64 = a.to(at::kDouble), b64 = b.to(at::kDouble);
  const at::Tensor excess = (a64 - b64).abs() - (atol + rtol * b64.abs());
  const double worst = excess.max().item<double>();
  if (worst <= 0 && !a64.isnan().any().item<bool>()) return ::testing::AssertionSuccess();
  const int64_t at_index = excess.flatten().argmax().item<int64_t>();
  return ::testing::AssertionFailure() << what << ": element " << at_index << " is "
                                       << a64.flatten()[at_index].item<double>() << ", expected "
                                       << b64.flatten()[at_index].item<double>() << " (rtol " << rtol << ", atol "
                                       << atol << ", max |diff| " << difference(a, b).max_abs << ")";
}

/// Every trainable parameter of `model` (each tensor once) drawn from N(0, scale^2) with `seed`: a fresh
/// adapter's B is zero, which would leave A's gradient zero and a gradient test blind.
inline void randomize_trainable(torch::nn::Module& model, uint64_t seed, double scale = 0.2) {
  at::NoGradGuard no_grad;
  at::Generator generator = at::detail::createCPUGenerator(seed);
  for (auto& p : model.parameters()) {
    if (p.requires_grad()) p.copy_(at::normal(0.0, scale, p.sizes(), generator, p.scalar_type()));
  }
}

/// The loss `loss_of()` returns and the gradient of every trainable parameter of `model` (by name, each
/// tensor once) after its backward; the gradients are cleared first and after.
struct LossAndGradients {
  double loss = 0;
  std::vector<std::pair<std::string, at::Tensor>> gradients;
};
inline LossAndGradients loss_and_gradients(torch::nn::Module& model, const std::function<at::Tensor()>& loss_of) {
  model.zero_grad();
  const at::Tensor loss = loss_of();
  loss.backward();
  LossAndGradients out{loss.item<double>(), {}};
  std::set<const void*> seen;
  for (const auto& item : model.named_parameters()) {
    const at::Tensor& p = item.value();
    if (!p.requires_grad() || !seen.insert(p.unsafeGetTensorImpl()).second) continue;
    out.gradients.emplace_back(item.key(), p.grad().defined() ? p.grad().clone() : at::Tensor());
  }
  model.zero_grad();
  return out;
}

/// The losses agree within `relative` of the reference, and every gradient within `relative` of the
/// reference gradient's largest element; the message names the first parameter that does not.
inline ::testing::AssertionResult same_loss_and_gradients(const LossAndGradients& got, const LossAndGradients& want,
                                                          double relative) {
  if (std::abs(got.loss - want.loss) > relative * std::abs(want.loss)) {
    return ::testing::AssertionFailure() << "loss " << got.loss << ", expected " << want.loss;
  }
  if (got.gradients.size() != want.gradients.size() || want.gradients.empty()) {
    return ::testing::AssertionFailure() << got.gradients.size() << " gradients, expected " << want.gradients.size();
  }
  for (size_t i = 0; i < want.gradients.size(); ++i) {
    const auto& [name, reference] = want.gradients[i];
    const at::Tensor& g = got.gradients[i].second;
    if (!reference.defined() || !g.defined()) return ::testing::AssertionFailure() << name << ": no gradient";
    const Difference d = difference(g, reference);
    if (!(d.max_ref > 0) || !(d.max_abs <= relative * d.max_ref)) {
      return ::testing::AssertionFailure()
             << name << ": max |diff| " << d.max_abs << " against max |gradient| " << d.max_ref;
    }
  }
  return ::testing::AssertionSuccess();
}

/// Autocast on `device` (CPU or CUDA) in `dtype` for one scope; the previous state comes back after, as
/// torch.autocast's __exit__ does.
class ScopedAutocast {
 public:
  ScopedAutocast(at::DeviceType device, at::ScalarType dtype)
      : device_(device),
        was_enabled_(at::autocast::is_autocast_enabled(device)),
        previous_(at::autocast::get_autocast_dtype(device)) {
    at::autocast::set_autocast_dtype(device, dtype);
    at::autocast::set_autocast_enabled(device, true);
  }
  ~ScopedAutocast() {
    at::autocast::set_autocast_enabled(device_, was_enabled_);
    at::autocast::set_autocast_dtype(device_, previous_);
    at::autocast::clear_cache();
  }
  ScopedAutocast(const ScopedAutocast&) = delete;
  ScopedAutocast& operator=(const ScopedAutocast&) = delete;

 private:
  at::DeviceType device_;
  bool was_enabled_;
  at::ScalarType previous_;
};

/// The message of the exception `fn` throws, or "no error".
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

}  // namespace tiedlora::testing
