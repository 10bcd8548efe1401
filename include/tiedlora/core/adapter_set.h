// tiedlora/core/adapter_set.h: the named adapters of one layer, kept in one store (AdapterSet), and the one
// naming rule of adapter modules.
//
// Naming, the same for every adapter, "default" included (PEFT's `lora_A.<name>` layout, as modules):
//   - adapter NAME's tensors on a layer: its child `lora_adapters.NAME` (`lora_A`, `lora_B` for plain LoRA;
//     `lora_u`, `lora_v` when a tied method trains them; `tied_factors.lora_A/B` on the first layer attached
//     to shared factors that nobody else registers);
//   - adapter NAME's tie groups: the root's `tiedlora_groups.NAME.<group key>` (inject_adapters()).
// Files keep their own names: adapter folders PEFT's (`base_model.model.<module>.lora_A.weight`, tiedlora's
// `tiedlora_groups.<key>.lora_A`), trainer checkpoints the names of the earlier layout (stored_parameter_name),
// so adapters and checkpoints written before this rule still load.
#pragma once

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include "tiedlora/core/forward_context.h"
#include "tiedlora/core/functional.h"
#include "tiedlora/core/options.h"

namespace tiedlora {

class TiedLoraFactorsImpl;

/// The child of an adapted layer that holds its adapters' modules, one per adapter name.
inline constexpr const char* kAdapterHoldersModule = "lora_adapters";
/// The root's child that holds inject_adapters()' tie groups, one ModuleDict per adapter name.
inline constexpr const char* kTieGroupsModule = "tiedlora_groups";

/// A module-tree parameter name as trainer checkpoints store it: the layout before every adapter followed
/// one rule (the default adapter's tensors on the layer itself and its tie groups under `tiedlora_groups`,
/// another adapter's groups under `tiedlora_groups_NAME`). Names of other parameters are returned as given.
std::string stored_parameter_name(const std::string& name);

/// What a layer carries under one adapter name: the configuration and the live tensors.
struct AdapterSlot {
  AdapterKind kind = AdapterKind::none;
  AdapterMethod method = AdapterMethod::lora();
  LoraOptions lora;
  std::shared_ptr<TiedLoraFactorsImpl> factors;  ///< the shared A and B of a tied adapter
  bool owns_factors = false;                     ///< registered as this adapter's `tied_factors`
  at::Tensor a, b;                               ///< plain LoRA's own A and B
  at::Tensor u, v;                               ///< defined when the method trains them

  const at::Tensor& lora_A() const;
  const at::Tensor& lora_B() const;
  /// The update these tensors make (live tensors: what lora_linear and the merges take).
  functional::LowRankUpdate update() const;
};

/// The adapters of one layer: their slots by name, the active set and the on/off switch, and the holder
/// modules of the naming rule above. A LoraLinear keeps one; the holders are registered on that layer,
/// which every call that registers or removes one names.
class AdapterSet {
 public:
  bool empty() const { return slots_.empty(); }
  bool contains(const std::string& name) const { return slots_.count(name) > 0; }
  /// The names carried, sorted.
  std::vector<std::string> names() const;
  /// The slot named `name`; throws tiedlora::ConfigError naming what is carried when absent (`what`: the
  /// asking function, for the message).
  const AdapterSlot& at(const std::string& name, const char* what) const;
  AdapterSlot& at(const std::string& name, const char* what);
  const AdapterSlot* find(const std::string& name) const;

  /// A new, empty slot named `name` (check_adapter_name), its holder `lora_adapters.<name>` registered on
  /// `layer`. Throws when the name is carried already.
  AdapterSlot& add(torch::nn::Module& layer, const std::string& name, AdapterKind kind);
  /// The holder module of adapter `name` on `layer`.
  torch::nn::Module& holder(torch::nn::Module& layer, const std::string& name) const;
  /// Removes the slot and its holder from `layer` (shared factors it registered are handed back).
  void remove(torch::nn::Module& layer, const std::string& name);
  /// Hands back shared factors this set registers, for a layer that goes away.
  void release_factors();

  /// The adapters a forward applies (outside a RowAdaptersScope) and merge_() merges; names not carried
  /// are skipped. Default {"default"}.
  const std::vector<std::string>& active() const { return active_; }
  void set_active(std::vector<std::string> names);
  /// The active adapters this set carries, in the active set's order, each once.
  std::vector<std::string> active_here() const;
  bool enabled() const { return enabled_; }
  void set_enabled(bool enabled) { enabled_ = enabled; }

  /// The calls of one forward over `input` (functional::lora_linear): the active adapters on every row, or,
  /// under a routing, each routed adapter this set carries on its rows; with adapter dropout drawn when
  /// `training` (each adapter its own mask, on its rows). Empty when nothing applies (disabled included).
  std::vector<functional::AdapterCall> calls(const at::Tensor& input, bool training, const RowAdapters* routing) const;
  /// For a forward of `calls` over `input` without gradients: their factors stacked for lora_linear's batched
  /// GEMMs (functional::StackedFactors), kept between forwards and stacked again when the calls name other
  /// tensors or one of them changed (its version counter, storage, dtype or device: an optimizer step, a
  /// load, Module::to). Undefined when gradients are recorded or the calls cannot be stacked.
  functional::StackedFactors stacked_factors(const std::vector<functional::AdapterCall>& calls,
                                             const at::Tensor& input) const;

 private:
  // The stack of the last forward without gradients; a copy of the set (a cloned layer) starts without one.
  struct StackCache {
    StackCache() = default;
    StackCache(const StackCache&) {}
    StackCache& operator=(const StackCache&) { return *this; }
    std::mutex mutex;
    std::vector<at::Tensor> sources;  // each call's A and B, held so that their addresses are not reused
    std::vector<std::pair<const void*, int64_t>> states;  // their storage and version when stacked
    functional::StackedFactors stacked;
  };

  std::map<std::string, AdapterSlot> slots_;
  std::vector<std::string> active_{kDefaultAdapter};
  bool enabled_ = true;
  mutable StackCache stack_cache_;
};

}  // namespace tiedlora
