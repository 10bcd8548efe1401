// tiedlora/core/modules.h: LoRA and Tied-LoRA layers in the PyTorch C++ frontend's shape
// (Options + Impl + TORCH_MODULE).
//
//   LoraLinear       a linear layer that can carry an adapter. Built from torch::nn::LinearOptions-like
//                    LoraLinearOptions, or wrapping an existing torch::nn::Linear (sharing its weight).
//                    Without an adapter it is a drop-in torch::nn::Linear: declare the layers of your
//                    model as LoraLinear and inject_adapters() attaches adapters in place, so member
//                    holders in your modules stay valid.
//   TiedLoraFactors  the A (r x d_in) and B (d_out x r) shared by the layers of one tie group.
//   TiedLoraLinear   a LoraLinear carrying a tied adapter: shared A/B plus its own u (r) and v (d_out).
//
// Attaching an adapter freezes the layer's weight and bias. Adapter parameters are kept in fp32 by default
// (LoraOptions::dtype) whatever the base dtype, as PEFT does, and the math runs through
// tiedlora::functional::lora_linear(). merge_() folds the update into the weight (fp32 accumulation,
// rounded once) and keeps the original weight, so unmerge_() restores it bit for bit.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

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

// ---- TiedLoraFactors ----------------------------------------------------------------------------------

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

/// The A and B shared by a tie group. Exactly one module registers it, so each shared parameter appears
/// once in parameters(), in every optimizer and in to(device): inject_adapters() registers it under the
/// root as `tiedlora_groups.<group>`; otherwise the first layer attached to it registers it as its child
/// `tied_factors`, and later layers keep plain references. Do not register it yourself as well.
class TiedLoraFactorsImpl : public torch::nn::Cloneable<TiedLoraFactorsImpl> {
 public:
  TiedLoraFactorsImpl(int64_t in_features, int64_t out_features, AdapterMethod method = AdapterMethod::parse("tied-abuv"),
                      LoraOptions lora = {})
      : TiedLoraFactorsImpl(TiedLoraFactorsOptions(in_features, out_features, method, std::move(lora))) {}
  explicit TiedLoraFactorsImpl(TiedLoraFactorsOptions options);

  void reset() override;
  /// Draws the initial values again (docs/method.md's rule: zero B when B carries the zero, else random).
  void reset_parameters();
  void pretty_print(std::ostream& stream) const override;

  /// Whether a module registers these factors (see the class comment).
  bool owned() const { return owned_; }
  /// Records that a module registers (true) or no longer registers (false) these factors.
  void set_owned(bool owned) { owned_ = owned; }

  TiedLoraFactorsOptions options;
  at::Tensor lora_A;  ///< (r, d_in); requires grad when the method trains A
  at::Tensor lora_B;  ///< (d_out, r); requires grad when the method trains B

 private:
  bool owned_ = false;
};
TORCH_MODULE(TiedLoraFactors);

// ---- LoraLinear -----------------------------------------------------------------------------------------

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

class LoraLinearImpl : public torch::nn::Cloneable<LoraLinearImpl> {
 public:
  LoraLinearImpl(int64_t in_features, int64_t out_features)
      : LoraLinearImpl(LoraLinearOptions(in_features, out_features)) {}
  /// A fresh layer (torch::nn::Linear's initialisation) with the adapter of `options.lora()`, if any;
  /// LoraLinear(in, out) has none.
  explicit LoraLinearImpl(LoraLinearOptions options);
  /// A drop-in for torch::nn::Linear(options): no adapter until one is attached.
  explicit LoraLinearImpl(const torch::nn::LinearOptions& options);
  /// Wraps `base`, sharing its weight and bias tensors, with no adapter yet.
  explicit LoraLinearImpl(const torch::nn::Linear& base);
  /// Wraps `base`, sharing its weight and bias tensors, with a plain LoRA adapter.
  LoraLinearImpl(const torch::nn::Linear& base, const LoraOptions& lora);
  /// Wraps `base` with a tied adapter on the shared `factors`; u and v as the factors' method says.
  LoraLinearImpl(const torch::nn::Linear& base, TiedLoraFactors factors);
  /// A layer that owns shared factors hands the ownership back, so the next layer attached registers them.
  ~LoraLinearImpl() override;

  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  /// Cloning a layer on shared factors would leave the clone training the original's A/B: refused.
  std::shared_ptr<torch::nn::Module> clone(const std::optional<torch::Device>& device = std::nullopt) const override;

  at::Tensor forward(const at::Tensor& input);

  /// Attaches a plain LoRA adapter (own A and B); freezes weight and bias.
  void attach_lora(const LoraOptions& lora);
  /// Attaches a tied adapter on `factors` (same shape as this layer); freezes weight and bias.
  void attach_tied(TiedLoraFactors factors);
  /// Removes the adapter (unmerging first); the weight stays frozen.
  void detach_adapter();
  /// Merges the adapter into the weight for good and removes it (PEFT's merge_and_unload for one layer):
  /// the layer becomes a plain linear layer whose weight is W + dW, rounded once; no copy of W is kept.
  void merge_and_detach_();

  AdapterKind adapter_kind() const { return kind_; }
  bool has_adapter() const { return kind_ != AdapterKind::none; }
  const AdapterMethod& method() const { return method_; }
  const LoraOptions& lora_options() const { return lora_; }
  /// Whether this layer's adapter has `method` and `lora`'s rank, alpha and rsLoRA: what one adapter file
  /// holds for every layer (save_adapter, and inject_adapters extending an adapter, require it).
  bool same_configuration(const AdapterMethod& method, const LoraOptions& lora) const;
  double scale() const { return lora_.scale(); }
  /// A and B in use: this layer's own, or the shared factors'.
  const at::Tensor& lora_A() const;
  const at::Tensor& lora_B() const;
  /// The shared factors of a tied adapter (empty holder otherwise).
  TiedLoraFactors factors() const { return factors_ ? TiedLoraFactors(factors_) : TiedLoraFactors(nullptr); }

  /// Makes this layer's weight the tensor `weight` (same shape), e.g. a language-model head tied to the
  /// token embedding; the tensor is shared, not copied.
  void tie_weight_(const at::Tensor& weight);

  /// Off: the layer computes x W^T + bias with the original W (the adapter stays attached; a merged
  /// layer is unmerged first).
  void set_adapter_enabled(bool enabled);
  bool adapter_enabled() const { return enabled_; }

  /// W <- round(W + B_eff A) computed in fp32; the original W is kept. A second call does nothing.
  /// Throws (leaving W untouched) when the result would hold NaN or Inf, and for a weight tied to another
  /// module (tie_weight_), whose other user the merge would change too.
  void merge_();
  /// Restores the original W bit for bit. Does nothing when not merged.
  void unmerge_();
  bool merged() const { return original_weight_.defined(); }

  LoraLinearOptions options;
  at::Tensor weight;  ///< (d_out, d_in)
  at::Tensor bias;    ///< (d_out) or undefined
  at::Tensor lora_u;  ///< (r), defined when the method trains u
  at::Tensor lora_v;  ///< (d_out), defined when the method trains v

 private:
  void register_adapter_tensors();
  void freeze_base();

  AdapterKind kind_ = AdapterKind::none;
  AdapterMethod method_ = AdapterMethod::lora();
  LoraOptions lora_;
  bool enabled_ = true;
  std::shared_ptr<TiedLoraFactorsImpl> factors_;  // registered here only when this layer owns them
  bool owns_factors_ = false;                     // registered as the child "tied_factors"
  at::Tensor own_a_, own_b_;                      // plain LoRA's A and B, registered as lora_A / lora_B
  at::Tensor original_weight_;                    // defined while merged
  at::Tensor wrapped_weight_, wrapped_bias_;      // handed from a wrapped torch::nn::Linear to reset()
  bool weight_tied_ = false;                      // the weight is shared with another module (tie_weight_)
};
TORCH_MODULE(LoraLinear);

/// A LoraLinear carrying a tied adapter: `TiedLoraLinear layer(base_linear, factors);`.
using TiedLoraLinear = LoraLinear;

}  // namespace tiedlora
