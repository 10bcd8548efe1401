// tiedlora/core/inject.h: put LoRA or Tied-LoRA adapters on the linear layers of any torch::nn::Module tree.
//
//   auto report = tiedlora::inject_adapters(*model, tiedlora::InjectOptions()
//                     .targets({"q_proj", "v_proj"}).method("tied-abuv").lora(tiedlora::LoraOptions(8)));
//   torch::optim::AdamW opt(tiedlora::trainable_parameters(*model), 1e-3);
//
// Selection follows module_selection.h (exact names, suffixes, "re:" full-match regexes, "all-linear"
// without the output head; exclude patterns; layer indices). Layers declared as tiedlora::LoraLinear get
// their adapter in place. A torch::nn::Linear is replaced by a LoraLinear wrapping its tensors, which works
// when only the parent's registry holds it; when the parent also keeps it in a member holder, a
// Sequential or a ModuleList (whose forward would call the old layer and silently skip the adapter),
// injection refuses with the module's name and the fix. Every check runs before anything is changed.
//
// Afterwards every parameter that is not part of an adapter is frozen. Tied groups' shared factors are
// registered once under the root as `tiedlora_groups.<group name with '.' replaced by '-'>` (for an adapter
// named other than "default": `tiedlora_groups_<adapter>.<group>`).
//
// Several named adapters (docs/adapters.md) live on one model: inject or load each under its own name
// (InjectOptions::adapter_name), choose the active ones (set_active_adapters), disable them all
// (set_adapters_enabled), delete one (delete_adapter), combine some exactly (add_weighted_adapter), or
// give each row of a batch its own adapter (route_rows + RowAdaptersScope: mixed-adapter batches, for
// inference and for training several adapters in one step).
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>

#include "tiedlora/core/module_selection.h"
#include "tiedlora/core/modules.h"

namespace tiedlora {

/// (pattern, group name) pairs.
using TieGroups = std::vector<std::pair<std::string, std::string>>;

struct InjectOptions {
  /// Patterns of the layers to adapt, or {"all-linear"}.
  TORCH_ARG(std::vector<std::string>, targets) = {};
  TORCH_ARG(std::vector<std::string>, exclude) = {};
  /// Layer indices to adapt; empty = every layer.
  TORCH_ARG(std::vector<int64_t>, layers) = {};
  /// Excluded from "all-linear".
  TORCH_ARG(std::vector<std::string>, output_heads) = {"lm_head"};
  /// Explicit tie groups: (pattern, group name), first match wins; the rest use the default grouping.
  TORCH_ARG(TieGroups, tie_groups) = {};
  /// `lora`, `tied-ab`, `tied-abuv`, `tied-uv` or any mask (method.h); a name converts implicitly.
  TORCH_ARG(AdapterMethod, method) = AdapterMethod::lora();
  TORCH_ARG(LoraOptions, lora) = LoraOptions();
  /// The name of the adapter to create (check_adapter_name). A model's first adapter becomes its active
  /// one; later ones leave the active set as it is.
  TORCH_ARG(std::string, adapter_name) = kDefaultAdapter;
};

/// What inject_adapters() did.
struct InjectionReport {
  struct Group {
    std::string name;                  ///< tie group (or, untied, the layers reported together)
    std::string registered_as;         ///< module name of the shared factors ("" when untied)
    LinearShape shape;
    std::vector<std::string> modules;  ///< the adapted layers
    int64_t trainable_parameters = 0;  ///< counted on the live tensors
  };
  std::string adapter_name;
  AdapterMethod method;
  int64_t rank = 0;
  double scale = 1.0;
  std::vector<Group> groups;
  int64_t trainable_parameters = 0;  ///< whole model, each tensor once
  int64_t total_parameters = 0;      ///< whole model, each tensor once

  /// {"method", "rank", "scale", "trainable_parameters", "total_parameters", "groups": [...]}
  std::string to_json(int indent = 2) const;
  /// A short table for people.
  std::string summary() const;
};

/// Adapts the selected linear layers of `root` (see the file comment). Throws tiedlora::ConfigError for
/// selection problems and when a layer cannot be adapted; the tree is unchanged when it throws.
InjectionReport inject_adapters(torch::nn::Module& root, const InjectOptions& options);

/// The parameters of `module` that require grad, each tensor once (shared factors included once). Throws
/// tiedlora::ConfigError when a tied layer's factors are registered by no module of `module` (they would
/// silently not train).
std::vector<at::Tensor> trainable_parameters(const torch::nn::Module& module);

/// Every adapted layer of `module` (carrying any adapter), by name.
std::vector<std::pair<std::string, LoraLinear>> adapted_layers(const torch::nn::Module& module);
/// The layers of `module` that carry the adapter named `adapter`, by name.
std::vector<std::pair<std::string, LoraLinear>> adapted_layers(const torch::nn::Module& module, const std::string& adapter);

/// The names of the adapters the model carries, sorted.
std::vector<std::string> adapter_names(const torch::nn::Module& module);
/// Makes `adapters` the ones every forward applies (their updates add up; an empty list applies none) and
/// merge_adapters_() merges. Throws tiedlora::ConfigError naming an adapter the model does not carry.
void set_active_adapters(torch::nn::Module& module, const std::vector<std::string>& adapters);
/// The active adapters (those of the first adapted layer; set_active_adapters sets every layer alike).
std::vector<std::string> active_adapters(const torch::nn::Module& module);
/// Off: every layer computes with its original weight (adapters kept, merged layers unmerged); on again.
void set_adapters_enabled(torch::nn::Module& module, bool enabled);
/// Freezes (false) or unfreezes (true: the tensors its method trains) the adapter `adapter`. Adapters are
/// trainable when added; a reference adapter kept beside the one being trained is frozen with this (the
/// Trainer refuses trainable adapters that are not active).
void set_adapter_trainable(torch::nn::Module& module, const std::string& adapter, bool trainable);
/// Removes the adapter `adapter` from every layer, with its tie groups' registry; it leaves the active
/// set, and when it was the only active adapter, the first remaining adapter becomes active (as in PEFT).
/// Throws tiedlora::ConfigError when the model does not carry it.
void delete_adapter(torch::nn::Module& module, const std::string& adapter);

/// A routing of batch rows to adapters ("" = none) for RowAdaptersScope, checked against the adapters of
/// `module` (an unknown name is refused, listing the known ones).
std::shared_ptr<const RowAdapters> route_rows(const torch::nn::Module& module, std::vector<std::string> adapter_of_row);

/// Adds adapter `name` equal to the weighted sum of adapters `sources`: dW = sum_k weights[k] dW_k on every
/// layer any source adapts, exactly (by rank concatenation, nothing truncated). When every source is a
/// tied adapter without v on the same tie groups, the result is a tied adapter (shared A = [w_k s_k A_k],
/// B = [B_k], per-layer u = [u_k]; scale 1); otherwise it is plain LoRA in PEFT's "cat" layout
/// (A = [w_k s_k diag(u_k) A_k], B = [diag(v_k) B_k], rank the sum of the ranks, alpha = rank, layers a
/// source misses padded with zeros), which PEFT loads. The new adapter is not made active; it takes the
/// first source's dropout, as PEFT's does. All or nothing: the model is unchanged when it throws.
void add_weighted_adapter(torch::nn::Module& module, const std::vector<std::string>& sources,
                          const std::vector<double>& weights, const std::string& name);

/// merge_() / unmerge_() on every adapted layer of `module`: the active adapters are merged.
void merge_adapters_(torch::nn::Module& module);
/// PEFT's merge_and_unload(), in place: the active adapters of every enabled layer are merged into its
/// weight (fp32, rounded once) and every adapter removed, with the `tiedlora_groups` registries; the layers
/// become plain linear layers and no copy of the original weights is kept (so there is no unmerge).
/// Nothing changes when a layer refuses to merge (NaN or Inf, a weight tied to another module).
void merge_and_unload_(torch::nn::Module& module);
void unmerge_adapters_(torch::nn::Module& module);

}  // namespace tiedlora
