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
//
// Named adapters (docs/adapters.md): a layer may carry several adapters under names, of any method, rank
// or mask. The adapter named "default" (kDefaultAdapter) registers its tensors on the layer itself
// (`lora_A`, `lora_B`, `lora_u`, `lora_v`, `tied_factors`), as a single adapter always has; another adapter
// `NAME` registers them under the child `lora_adapters.NAME`. A forward applies the active adapters
// (set_active_adapters; several add up), or, inside a RowAdaptersScope, the adapter each row of the batch
// names (mixed-adapter batches).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <torch/nn/cloneable.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "tiedlora/core/functional.h"
#include "tiedlora/core/method.h"

namespace tiedlora {

/// The adapter name used when none is given (PEFT's "default"): PEFT's multi-adapter folders keep it at
/// the top of the folder, the others in subfolders by name.
inline constexpr const char* kDefaultAdapter = "default";

/// Throws tiedlora::ConfigError unless `name` can name an adapter: 1 to 64 letters, digits, '_' or '-' (it
/// becomes a module name and a folder name), and not "__base__" (PEFT's name for "no adapter").
void check_adapter_name(const std::string& name);

/// The adapter each row of a batch uses: row i of every adapted layer's input (its first dimension) gets
/// adapter `adapter_of_row[i]`, or none for "". A layer that does not carry a row's adapter computes that
/// row without one (as PEFT's mixed batches do).
class RowAdapters {
 public:
  explicit RowAdapters(std::vector<std::string> adapter_of_row);
  const std::vector<std::string>& adapter_of_row() const { return adapter_of_row_; }
  int64_t rows() const { return static_cast<int64_t>(adapter_of_row_.size()); }
  /// The distinct adapter names the rows use ("" excluded), sorted.
  const std::vector<std::string>& adapters() const { return adapters_; }
  /// The rows naming `adapter` as int64 indices on `device` (made once per device); undefined when none.
  at::Tensor rows_of(const std::string& adapter, at::Device device) const;
  /// The routing in force on the calling thread (RowAdaptersScope), or null.
  static std::shared_ptr<const RowAdapters> current();

 private:
  std::vector<std::string> adapter_of_row_;
  std::vector<std::string> adapters_;
  std::map<std::string, at::Tensor> rows_;  // on the CPU
  mutable std::map<std::pair<std::string, std::string>, at::Tensor> on_device_;
  mutable std::mutex mutex_;
};

/// Routes the forwards that run on this thread while it lives by `routing` (the previous routing comes
/// back after). Activation checkpointing replays it in the backward pass. Use tiedlora::route_rows() to
/// build one checked against a model's adapters.
class RowAdaptersScope {
 public:
  explicit RowAdaptersScope(std::shared_ptr<const RowAdapters> routing);
  ~RowAdaptersScope();
  RowAdaptersScope(const RowAdaptersScope&) = delete;
  RowAdaptersScope& operator=(const RowAdaptersScope&) = delete;

 private:
  std::shared_ptr<const RowAdapters> previous_;
};

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
  bool has_adapter(const std::string& adapter) const { return adapters_.count(adapter) > 0; }
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

  /// The adapters a forward outside a RowAdaptersScope applies (their updates add up), and merge_()
  /// merges; names the layer does not carry are skipped. A merged layer is unmerged first. Default:
  /// {"default"}.
  void set_active_adapters(std::vector<std::string> adapters);
  const std::vector<std::string>& active_adapters() const { return active_; }

  /// Makes this layer's weight the tensor `weight` (same shape), e.g. a language-model head tied to the
  /// token embedding; the tensor is shared, not copied.
  void tie_weight_(const at::Tensor& weight);

  /// Off: the layer computes x W^T + bias with the original W (the adapters stay attached; a merged
  /// layer is unmerged first).
  void set_adapter_enabled(bool enabled);
  bool adapter_enabled() const { return enabled_; }

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
  // One named adapter: its configuration and tensors, registered on holder(name) (this layer for the
  // default adapter, `lora_adapters.<name>` otherwise; found by name, never kept as a pointer, which a
  // copied layer, as Cloneable::clone of a parent makes, would keep pointing at the original).
  struct Slot {
    AdapterKind kind = AdapterKind::none;
    AdapterMethod method = AdapterMethod::lora();
    LoraOptions lora;
    std::shared_ptr<TiedLoraFactorsImpl> factors;  // tied adapters
    bool owns_factors = false;                     // registered as the holder's child "tied_factors"
    at::Tensor a, b;                               // plain LoRA's own A and B
    at::Tensor u, v;
  };
  Slot& new_slot(const std::string& adapter, AdapterKind kind);
  const Slot& slot(const std::string& adapter, const char* what) const;
  torch::nn::Module& holder(const std::string& adapter);
  void register_adapter_tensors(const std::string& adapter, Slot& slot);
  void release(const std::string& adapter, Slot& slot);
  void sync_default_fields();
  void freeze_base();
  at::Tensor adapter_input(const at::Tensor& input, const Slot& slot);
  at::Tensor routed_forward(const at::Tensor& input, const RowAdapters& routing);

  std::map<std::string, Slot> adapters_;
  std::vector<std::string> active_{kDefaultAdapter};
  bool enabled_ = true;
  std::shared_ptr<torch::nn::Module> named_holders_;  // the child "lora_adapters", while a named adapter exists
  at::Tensor original_weight_;                        // defined while merged
  at::Tensor wrapped_weight_, wrapped_bias_;          // handed from a wrapped torch::nn::Linear to reset()
  bool weight_tied_ = false;                          // the weight is shared with another module (tie_weight_)
};
TORCH_MODULE(LoraLinear);

/// A LoraLinear carrying a tied adapter: `TiedLoraLinear layer(base_linear, factors);`.
using TiedLoraLinear = LoraLinear;

}  // namespace tiedlora
