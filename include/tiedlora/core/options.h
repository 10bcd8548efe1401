// tiedlora/core/options.h: the options of LoRA and Tied-LoRA layers, as PyTorch's C++ frontend keeps its
// options apart from its modules (`LinearOptions` beside `Linear`): LoraOptions (one adapter's
// hyper-parameters), TiedLoraFactorsOptions (a tie group's shared A and B), LoraLinearOptions (an adaptable
// linear layer).
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <c10/core/ScalarType.h>
#include <torch/arg.h>

#include "tiedlora/core/method.h"

namespace tiedlora {

/// Initialisation of A (and of B when B is not the factor that starts at zero).
enum class LoraInit {
  kaiming_uniform,  ///< PEFT's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming-uniform, a = sqrt(5))
  gaussian,         ///< PEFT's init_lora_weights="gaussian": A ~ N(0, std = 1/r)
};

/// Hyper-parameters of one adapter.
struct LoraOptions {
  /* implicit */ LoraOptions(int64_t rank = 8) : rank_(rank) {}
  /// Rank r of A and B.
  TORCH_ARG(int64_t, rank);
  /// Scale numerator; unset means alpha = r, so s = 1 (the Tied-LoRA paper's setting).
  TORCH_ARG(std::optional<double>, alpha) = std::nullopt;
  /// rsLoRA: s = alpha / sqrt(r) instead of alpha / r.
  TORCH_ARG(bool, use_rslora) = false;
  /// Dropout probability on the adapter's input (training mode only).
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(LoraInit, init) = LoraInit::kaiming_uniform;
  /// Seed for the initial values; unset draws from the global generator (torch::manual_seed).
  TORCH_ARG(std::optional<uint64_t>, seed) = std::nullopt;
  /// Mixed into the seed so that layers seeded alike draw different values; inject_adapters() sets it to
  /// the module or tie-group name.
  TORCH_ARG(std::string, seed_stream) = "";
  /// dtype of the adapter parameters.
  TORCH_ARG(c10::ScalarType, dtype) = c10::ScalarType::Float;

 public:
  double effective_alpha() const { return alpha_ ? *alpha_ : static_cast<double>(rank_); }
  /// The scale s of the update.
  double scale() const;
  /// Throws tiedlora::ConfigError for a non-positive rank, a dropout outside [0, 1) or a non-float dtype.
  void validate() const;
};

struct TiedLoraFactorsOptions {
  TiedLoraFactorsOptions(int64_t in_features, int64_t out_features,
                         AdapterMethod method = AdapterMethod::parse("tied-abuv"), LoraOptions lora = {})
      : in_features_(in_features), out_features_(out_features), method_(method), lora_(std::move(lora)) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  /// Which of A, B, u, v train (A and B here; u and v live in each layer).
  TORCH_ARG(AdapterMethod, method);
  TORCH_ARG(LoraOptions, lora);
  /// The tie group's name (inject_adapters() sets it; saved adapters record it).
  TORCH_ARG(std::string, name) = "";
};

struct LoraLinearOptions {
  LoraLinearOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(bool, bias) = true;
  /// dtype of the weight and bias made by the layer; nullopt: LibTorch's default dtype, as torch::nn::Linear.
  /// A model stored in bf16 is built in bf16 this way, never existing in fp32 first.
  TORCH_ARG(std::optional<at::ScalarType>, dtype) = std::nullopt;
  /// The LoRA adapter to create with the layer; nullopt (the default) builds a plain linear layer with no
  /// adapter, a drop-in torch::nn::Linear.
  TORCH_ARG(std::optional<LoraOptions>, lora) = std::nullopt;
};

/// What a LoraLinear currently carries.
enum class AdapterKind { none, lora, tied };

}  // namespace tiedlora
