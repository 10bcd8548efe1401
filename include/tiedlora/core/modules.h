// tiedlora/core/modules.h: LoRA and Tied-LoRA layers in the PyTorch C++ frontend's shape
// (Options + Impl + TORCH_MODULE; the options are in tiedlora/core/options.h).
//
//   LoraLinear       a linear layer that can carry adapters. Built from torch::nn::LinearOptions-like
//                    LoraLinearOptions, or wrapping an existing torch::nn::Linear (sharing its weight).
//                    Without an adapter it is a drop-in torch::nn::Linear: declare the layers of your
//                    model as LoraLinear and inject_adapters() attaches adapters in place, so member
//                    holders in your modules stay valid.
//   TiedLoraFactors  the A (r x d_in) and B (d_out x r) shared by the layers of one tie group.
//   TiedLoraLinear   a LoraLinear carrying a tied adapter: shared A/B plus its own u (r) and v (d_out).
//
// Attaching an adapter freezes the layer's weight and bias. Adapter parameters are kept in fp32 by default
// (LoraOptions::dtype) whatever the base dtype, as PEFT does, and the math runs through
// tiedlora::functional::lora_linear(), one call for all the adapters a forward applies. merge_() folds the
// update into the weight (fp32 accumulation, rounded once) and keeps the original weight, so unmerge_()
// restores it bit for bit.
//
// Named adapters (docs/adapters.md): a layer may carry several adapters under names, of any method, rank or
// mask, kept in its AdapterSet (tiedlora/core/adapter_set.h, which also states the one naming rule of their
// modules: `lora_adapters.<name>.lora_A` ...). A forward applies the active adapters (set_active_adapters;
// several add up), or, inside a RowAdaptersScope, the adapter each row of the batch names (mixed-adapter
// batches).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "tiedlora/core/adapter_set.h"
#include "tiedlora/core/forward_context.h"
#include "tiedlora/core/functional.h"
#include "tiedlora/core/method.h"
#include "tiedlora/core/options.h"

namespace tiedlora {

// ---- TiedLoraFactors ----------------------------------------------------------------------------------

/// The A and B shared by a tie group. Exactly one module registers it, so each shared parameter appears
/// once in parameters(), in every optimizer and in to(device): inject_adapters() registers it under the
/// root as `tiedlora_groups.<adapter>.<group>`; otherwise the first layer attached to it registers it as its child
/// `tied_factors`, and later layers keep plain references. Do not register it yourself as well.
class TiedLoraFactorsImpl : public torch::nn::Cloneable<TiedLoraFactorsImpl> {
 public:
  TiedLoraFactorsImpl(int64_t in_features, int64_t out_features,
                      AdapterMethod method = AdapterMethod::parse("tied-abuv"), LoraOptions lora = {})
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
  /// A deep copy with its adapters. A layer on shared Tied-LoRA factors is refused: its clone would keep
  /// training the original's A and B.
  std::shared_ptr<torch::nn::Module> clone(const std::optional<torch::Device>& device = std::nullopt) const override;

  at::Tensor forward(const at::Tensor& input);

  /// Attaches a plain LoRA adapter (own A and B) named `adapter`; freezes weight and bias.
  void attach_lora(const LoraOptions& lora, const std::string& adapter = kDefaultAdapter);
  /// Attaches a tied adapter named `adapter` on `factors` (same shape as this layer); freezes weight and bias.
  void attach_tied(TiedLoraFactors factors, const std::string& adapter = kDefaultAdapter);
  /// Removes every adapter (unmerging first); the weight stays frozen.
  void detach_adapter();
  /// Removes the adapter named `adapter` (unmerging first); the others stay.
  void detach_adapter(const std::string& adapter);
  /// Merges the active adapters into the weight for good and removes every adapter (PEFT's
  /// merge_and_unload for one layer): the layer becomes a plain linear layer whose weight is W + dW,
  /// rounded once; no copy of W is kept.
  void merge_and_detach_();

  /// Whether the layer carries any adapter; has_adapter(name): that one.
  bool has_adapter() const { return !adapters_.empty(); }
  bool has_adapter(const std::string& adapter) const { return adapters_.contains(adapter); }
  /// The names of the adapters the layer carries, sorted.
  std::vector<std::string> adapter_names() const;
  /// What the adapter `adapter` is; AdapterKind::none when the layer does not carry it.
  AdapterKind adapter_kind(const std::string& adapter = kDefaultAdapter) const;
  const AdapterMethod& method(const std::string& adapter = kDefaultAdapter) const;
  const LoraOptions& lora_options(const std::string& adapter = kDefaultAdapter) const;
  /// Whether adapter `adapter` has `method` and `lora`'s rank, alpha and rsLoRA: what one adapter file
  /// holds for every layer (save_adapter, and inject_adapters extending an adapter, require it).
  bool same_configuration(const AdapterMethod& method, const LoraOptions& lora,
                          const std::string& adapter = kDefaultAdapter) const;
  double scale(const std::string& adapter = kDefaultAdapter) const { return lora_options(adapter).scale(); }
  /// A and B of adapter `adapter`: its own, or the shared factors'.
  const at::Tensor& lora_A(const std::string& adapter = kDefaultAdapter) const;
  const at::Tensor& lora_B(const std::string& adapter = kDefaultAdapter) const;
  /// u and v of adapter `adapter` (undefined when its method does not train them).
  const at::Tensor& lora_u_of(const std::string& adapter) const;
  const at::Tensor& lora_v_of(const std::string& adapter) const;
  /// The update of adapter `adapter` (its live tensors, for functional::lora_linear and the merges).
  functional::LowRankUpdate update(const std::string& adapter = kDefaultAdapter) const;
  /// The shared factors of a tied adapter (empty holder otherwise).
  TiedLoraFactors factors(const std::string& adapter = kDefaultAdapter) const;

  /// The store of this layer's adapters (slots, active set, switch).
  const AdapterSet& adapters() const { return adapters_; }

  /// The adapters a forward outside a RowAdaptersScope applies (their updates add up), and merge_()
  /// merges; names the layer does not carry are skipped. A merged layer is unmerged first. Default:
  /// {"default"}.
  void set_active_adapters(std::vector<std::string> adapters);
  const std::vector<std::string>& active_adapters() const { return adapters_.active(); }

  /// Makes this layer's weight the tensor `weight` (same shape), e.g. a language-model head tied to the
  /// token embedding; the tensor is shared, not copied.
  void tie_weight_(const at::Tensor& weight);

  /// Off: the layer computes x W^T + bias with the original W (the adapters stay attached; a merged
  /// layer is unmerged first).
  void set_adapter_enabled(bool enabled);
  bool adapter_enabled() const { return adapters_.enabled(); }

  /// W <- round(W + dW) computed in fp32, dW the sum of the active adapters' updates (rank concatenation,
  /// one rounding); the original W is kept. A second call does nothing; with no active adapter on this
  /// layer it does nothing. Throws (leaving W untouched) when the result would hold NaN or Inf, and for a
  /// weight tied to another module (tie_weight_), whose other user the merge would change too.
  void merge_();
  /// Restores the original W bit for bit. Does nothing when not merged.
  void unmerge_();
  bool merged() const { return original_weight_.defined(); }

  LoraLinearOptions options;
  at::Tensor weight;  ///< (d_out, d_in)
  at::Tensor bias;    ///< (d_out) or undefined
  at::Tensor lora_u;  ///< the default adapter's u (r), defined when its method trains u
  at::Tensor lora_v;  ///< the default adapter's v (d_out), defined when its method trains v

 private:
  void freeze_base();
  // The default adapter's u and v mirrored in the public fields lora_u / lora_v.
  void sync_default_fields();
  void register_adapter_tensors(const std::string& adapter, AdapterSlot& slot);
  // A merged layer computes with W + dW alone; it refuses to train and to serve a mixed-adapter batch.
  at::Tensor merged_forward(const at::Tensor& input) const;

  AdapterSet adapters_;
  at::Tensor original_weight_;                // defined while merged
  at::Tensor wrapped_weight_, wrapped_bias_;  // handed from a wrapped torch::nn::Linear to reset()
  bool weight_tied_ = false;                  // the weight is shared with another module (tie_weight_)
};
TORCH_MODULE(LoraLinear);

/// A LoraLinear carrying a tied adapter: `TiedLoraLinear layer(base_linear, factors);`.
using TiedLoraLinear = LoraLinear;

}  // namespace tiedlora
