// initialization.h (private to core): the initial values of adapter factors (docs/method.md's rule), drawn
// from a seeded CPU generator when a seed is given, else from the device's global generator.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <ATen/ATen.h>

#include "tiedlora/core/options.h"

namespace tiedlora::detail {

class Initializer {
 public:
  Initializer(const LoraOptions& lora, at::Device device);
  at::Tensor uniform(at::IntArrayRef shape, double bound);
  at::Tensor normal(at::IntArrayRef shape, double std);
  at::Tensor full(at::IntArrayRef shape, double value);

 private:
  at::ScalarType dtype_;
  at::Device device_;
  std::optional<at::Generator> generator_;
};

/// A: kaiming-uniform (bound 1/sqrt(d_in)) or gaussian with standard deviation 1/r.
at::Tensor initial_a(Initializer& init, const LoraOptions& lora, int64_t in_features);
/// B: zero when it carries the zero of the update, else kaiming-uniform over its fan-in r.
at::Tensor initial_b(Initializer& init, const LoraOptions& lora, const AdapterMethod& method, int64_t out_features);

}  // namespace tiedlora::detail
