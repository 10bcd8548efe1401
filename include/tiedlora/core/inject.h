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
// registered once under the root as `tiedlora_groups.<adapter>.<group name with '.' replaced by '-'>` (the
// naming rule of tiedlora/core/adapter_set.h). Selection never matches the library's own modules (adapter
// holders, the tie-group registry).
//
// Several named adapters (docs/adapters.md) live on one model: inject or load each under its own name
// (InjectOptions::adapter_name), then use the model-level API of tiedlora/core/adapters.h.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>

#include "tiedlora/core/adapters.h"
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
  TORCH_ARG(std::vector<std::string>, output_heads) = { "lm_head" };
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
    std::string name;           ///< tie group (or, untied, the layers reported together)
    std::string registered_as;  ///< module name of the shared factors ("" when untied)
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

}  // namespace tiedlora
