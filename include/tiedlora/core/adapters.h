// tiedlora/core/adapters.h: the model-level adapter API, over every adapted layer of a module tree.
//
// Several named adapters (docs/adapters.md) live on one model (inject_adapters() or load_adapter() each under
// its own name): list them (adapter_names, adapted_layers), choose the active ones (set_active_adapters),
// disable them all (set_adapters_enabled), freeze one (set_adapter_trainable), delete one (delete_adapter),
// combine some exactly (add_weighted_adapter), give each row of a batch its own adapter (route_rows +
// RowAdaptersScope: mixed-adapter batches, for inference and for training several adapters in one step),
// and merge them (merge_adapters_, merge_and_unload_).
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>

#include "tiedlora/core/forward_context.h"
#include "tiedlora/core/modules.h"

namespace tiedlora {

/// Every adapted layer of `module` (carrying any adapter), by name.
std::vector<std::pair<std::string, LoraLinear>> adapted_layers(const torch::nn::Module& module);
/// The layers of `module` that carry the adapter named `adapter`, by name.
std::vector<std::pair<std::string, LoraLinear>> adapted_layers(const torch::nn::Module& module,
                                                               const std::string& adapter);

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
