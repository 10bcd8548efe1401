// tests/test_support.h: helpers shared by the C++ tests: reference-data paths, seeded random tensors and
// closeness checks that report where and by how much two tensors differ.
#pragma once

#include <cstdlib>
#include <functional>
#include <string>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <gtest/gtest.h>

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

/// Autocast on `device` (CPU or CUDA) in `dtype` for one scope; the previous state comes back after, as
/// torch.autocast's __exit__ does.
class ScopedAutocast {
 public:
  ScopedAutocast(at::DeviceType device, at::ScalarType dtype)
      : device_(device), was_enabled_(at::autocast::is_autocast_enabled(device)),
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
