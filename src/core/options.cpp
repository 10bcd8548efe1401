// options.cpp: LoraOptions' scale and checks, and the initial values of adapter factors (initialization.h).
#include "tiedlora/core/options.h"

#include <cmath>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "core/initialization.h"
#include "tiedlora/core/error.h"

namespace tiedlora {

// ---- LoraOptions ----------------------------------------------------------------------------------------

double LoraOptions::scale() const { return adapter_scale(effective_alpha(), rank_, use_rslora_); }

void LoraOptions::validate() const {
  if (rank_ <= 0) throw ConfigError("adapter rank must be positive, got " + std::to_string(rank_));
  if (!(dropout_ >= 0.0 && dropout_ < 1.0)) {
    throw ConfigError("adapter dropout must be in [0, 1), got " + std::to_string(dropout_));
  }
  if (!at::isFloatingType(dtype_)) {
    throw ConfigError(std::string("adapter dtype must be floating point, got ") + c10::toString(dtype_));
  }
  if (alpha_ && !(std::isfinite(*alpha_) && *alpha_ > 0)) {
    throw ConfigError(
        "adapter alpha must be a positive finite number (zero or negative disables or inverts the "
        "adapter), got " +
        std::to_string(*alpha_));
  }
}

namespace detail {
namespace {

// The user's seed mixed with a stream name (FNV-1a), so that layers seeded alike draw different values.
uint64_t stream_seed(uint64_t seed, const std::string& stream) {
  if (stream.empty()) return seed;
  uint64_t h = 1469598103934665603ull ^ seed;
  for (unsigned char c : stream) h = (h ^ c) * 1099511628211ull;
  return h;
}

}  // namespace

// Seeded values are drawn on the CPU (so that a seed gives the same adapter on every device), then moved.
Initializer::Initializer(const LoraOptions& lora, at::Device device) : dtype_(lora.dtype()), device_(device) {
  if (lora.seed()) generator_ = at::make_generator<at::CPUGeneratorImpl>(stream_seed(*lora.seed(), lora.seed_stream()));
}

at::Tensor Initializer::uniform(at::IntArrayRef shape, double bound) {
  if (!generator_) return at::empty(shape, at::TensorOptions(dtype_).device(device_)).uniform_(-bound, bound);
  return at::empty(shape, at::TensorOptions(dtype_)).uniform_(-bound, bound, *generator_).to(device_);
}

at::Tensor Initializer::normal(at::IntArrayRef shape, double std) {
  if (!generator_) return at::empty(shape, at::TensorOptions(dtype_).device(device_)).normal_(0.0, std);
  return at::empty(shape, at::TensorOptions(dtype_)).normal_(0.0, std, *generator_).to(device_);
}

at::Tensor Initializer::full(at::IntArrayRef shape, double value) {
  return at::full(shape, value, at::TensorOptions(dtype_).device(device_));
}

at::Tensor initial_a(Initializer& init, const LoraOptions& lora, int64_t in_features) {
  if (lora.init() == LoraInit::gaussian) return init.normal({lora.rank(), in_features}, 1.0 / lora.rank());
  return init.uniform({lora.rank(), in_features}, 1.0 / std::sqrt(static_cast<double>(in_features)));
}

at::Tensor initial_b(Initializer& init, const LoraOptions& lora, const AdapterMethod& method, int64_t out_features) {
  if (method.zero_factor() == AdapterMethod::ZeroFactor::b) return init.full({out_features, lora.rank()}, 0.0);
  return init.uniform({out_features, lora.rank()}, 1.0 / std::sqrt(static_cast<double>(lora.rank())));
}

}  // namespace detail
}  // namespace tiedlora
