// adapter_set.cpp: the store of a layer's named adapters and the naming rule of their modules (see
// tiedlora/core/adapter_set.h).
#include "tiedlora/core/adapter_set.h"

#include <algorithm>
#include <sstream>

#include <ATen/ATen.h>

#include "core/precision.h"
#include "core/tie_groups.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/modules.h"

namespace tiedlora {

std::string stored_parameter_name(const std::string& name) {
  // `<layer>.lora_adapters.default.<tensor>` -> `<layer>.<tensor>`
  const std::string holder = std::string(kAdapterHoldersModule) + "." + kDefaultAdapter + ".";
  for (size_t pos = name.find(holder); pos != std::string::npos; pos = name.find(holder, pos + 1)) {
    if (pos == 0 || name[pos - 1] == '.') return name.substr(0, pos) + name.substr(pos + holder.size());
  }
  // `tiedlora_groups.<adapter>.<group>...` -> `tiedlora_groups.<group>...` (default) or `tiedlora_groups_<adapter>...`
  const std::string groups = std::string(kTieGroupsModule) + ".";
  for (size_t pos = name.find(groups); pos != std::string::npos; pos = name.find(groups, pos + 1)) {
    if (pos != 0 && name[pos - 1] != '.') continue;
    const size_t adapter_begin = pos + groups.size(), adapter_end = name.find('.', adapter_begin);
    if (adapter_end == std::string::npos) break;
    const std::string adapter = name.substr(adapter_begin, adapter_end - adapter_begin);
    const std::string registry =
        adapter == kDefaultAdapter ? kTieGroupsModule : std::string(kTieGroupsModule) + "_" + adapter;
    return name.substr(0, pos) + registry + name.substr(adapter_end);
  }
  return name;
}

// ---- AdapterSlot ------------------------------------------------------------------------------------------

const at::Tensor& AdapterSlot::lora_A() const { return factors ? factors->lora_A : a; }
const at::Tensor& AdapterSlot::lora_B() const { return factors ? factors->lora_B : b; }
functional::LowRankUpdate AdapterSlot::update() const { return {lora_A(), lora_B(), u, v, lora.scale()}; }

// ---- AdapterSet -------------------------------------------------------------------------------------------

std::vector<std::string> AdapterSet::names() const {
  std::vector<std::string> out;
  for (const auto& [name, slot] : slots_) out.push_back(name);
  return out;
}

const AdapterSlot* AdapterSet::find(const std::string& name) const {
  auto it = slots_.find(name);
  return it == slots_.end() ? nullptr : &it->second;
}

const AdapterSlot& AdapterSet::at(const std::string& name, const char* what) const {
  if (const AdapterSlot* slot = find(name)) return *slot;
  std::string carried;
  for (const auto& [n, s] : slots_) carried += (carried.empty() ? "" : ", ") + n;
  throw ConfigError(std::string("LoraLinear::") + what + ": the layer carries no adapter named '" + name +
                    "' (it carries " + (carried.empty() ? std::string("none") : carried) + ")");
}

AdapterSlot& AdapterSet::at(const std::string& name, const char* what) {
  return const_cast<AdapterSlot&>(static_cast<const AdapterSet&>(*this).at(name, what));
}

using detail::child_of;

AdapterSlot& AdapterSet::add(torch::nn::Module& layer, const std::string& name, AdapterKind kind) {
  check_adapter_name(name);
  TORCH_CHECK(!contains(name), "LoraLinear: the layer already carries an adapter named '", name, "'");
  std::shared_ptr<torch::nn::Module> holders = child_of(layer, kAdapterHoldersModule);
  if (!holders)
    holders = layer.register_module(kAdapterHoldersModule, std::make_shared<torch::nn::Module>("LoraAdapters"));
  holders->register_module(name, std::make_shared<torch::nn::Module>("LoraAdapter"));
  AdapterSlot& slot = slots_[name];
  slot.kind = kind;
  return slot;
}

// Holders are found by name, never kept as pointers: a copied layer (Cloneable::clone of a parent copies it
// into place) would keep pointing at the original's.
torch::nn::Module& AdapterSet::holder(torch::nn::Module& layer, const std::string& name) const {
  const std::shared_ptr<torch::nn::Module> holders = child_of(layer, kAdapterHoldersModule);
  const std::shared_ptr<torch::nn::Module> found = holders ? child_of(*holders, name) : nullptr;
  TORCH_INTERNAL_ASSERT(found, "LoraLinear: no holder for the adapter ", name);
  return *found;
}

void AdapterSet::remove(torch::nn::Module& layer, const std::string& name) {
  AdapterSlot& slot = at(name, "detach_adapter");
  if (slot.owns_factors)
    slot.factors->set_owned(false);  // layers still sharing them are refused by trainable_parameters()
  slots_.erase(name);
  const std::lock_guard<std::mutex> lock(stack_cache_.mutex);
  stack_cache_ = StackCache();
  const std::shared_ptr<torch::nn::Module> holders = child_of(layer, kAdapterHoldersModule);
  holders->unregister_module(name);
  if (holders->children().empty()) layer.unregister_module(kAdapterHoldersModule);
}

void AdapterSet::release_factors() {
  for (auto& [name, slot] : slots_) {
    if (slot.owns_factors && slot.factors) slot.factors->set_owned(false);
  }
}

void AdapterSet::set_active(std::vector<std::string> names) {
  for (const auto& name : names) check_adapter_name(name);
  active_ = std::move(names);
}

std::vector<std::string> AdapterSet::active_here() const {
  std::vector<std::string> out;
  for (const auto& name : active_) {
    if (contains(name) && std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
  }
  return out;
}

std::vector<functional::AdapterCall> AdapterSet::calls(const at::Tensor& input, bool training,
                                                       const RowAdapters* routing) const {
  std::vector<functional::AdapterCall> out;
  if (slots_.empty() || !enabled_) return out;
  // Adapter dropout on the rows an adapter serves, each adapter its own mask (as each has its own dropout
  // in PEFT); undefined when it does not apply.
  auto branch_input = [&](const AdapterSlot& slot, const functional::AdapterRows& rows) {
    const double p = training ? slot.lora.dropout() : 0.0;
    if (p == 0.0) return at::Tensor();
    const at::Tensor mine = rows.index.defined() ? input.index_select(0, rows.index)
                            : rows.begin >= 0    ? input.narrow(0, rows.begin, rows.end - rows.begin)
                                                 : input;
    return adapter_dropout(mine, p);
  };
  if (!routing) {
    // The active adapters carried here, each once (no list of names built per forward).
    for (auto it = active_.begin(); it != active_.end(); ++it) {
      const AdapterSlot* slot = find(*it);
      if (!slot || std::find(active_.begin(), it, *it) != it) continue;
      out.push_back(
          {slot->update(), functional::AdapterRows::all(), branch_input(*slot, functional::AdapterRows::all())});
    }
    return out;
  }
  for (const auto& name : routing->adapters()) {
    const AdapterSlot* slot = find(name);
    if (!slot) continue;  // rows of adapters this layer does not carry get the base layer alone
    if (input.dim() < 2 || input.size(0) != routing->rows()) {
      std::ostringstream shape;
      shape << input.sizes();
      throw ConfigError("an adapted layer's input " + shape.str() + " has " +
                        std::to_string(input.dim() < 2 ? 1 : input.size(0)) +
                        " rows in its first dimension, but the "
                        "row routing (RowAdaptersScope) names adapters for " +
                        std::to_string(routing->rows()) +
                        " (hint: route the rows of the batch; a layer applied to flattened tokens, such as a head over "
                        "selected positions, cannot serve a mixed batch)");
    }
    const auto range = routing->range_of(name);
    const auto rows = range ? functional::AdapterRows::range(range->first, range->second)
                            : functional::AdapterRows::indices(routing->rows_of(name, input.device()));
    out.push_back({slot->update(), rows, branch_input(*slot, rows)});
  }
  return out;
}

functional::StackedFactors AdapterSet::stacked_factors(const std::vector<functional::AdapterCall>& calls,
                                                       const at::Tensor& input) const {
  if (calls.size() < 2 || at::GradMode::is_enabled()) return {};
  const at::ScalarType type = functional::detail::compute_type(input.scalar_type());
  std::vector<at::Tensor> sources;
  std::vector<std::pair<const void*, int64_t>> states;
  for (const auto& call : calls) {
    for (const at::Tensor* t : {&call.update.lora_a, &call.update.lora_b}) {
      // Inference tensors have no version counter to tell an in-place change: stacked anew every time.
      if (t->is_inference()) return functional::StackedFactors::of(calls, type);
      sources.push_back(*t);
      states.emplace_back(t->data_ptr(), t->_version());
    }
  }
  const std::lock_guard<std::mutex> lock(stack_cache_.mutex);
  StackCache& cache = stack_cache_;
  bool same = cache.stacked.defined() && cache.sources.size() == sources.size() && cache.states == states &&
              cache.stacked.lora_a.scalar_type() == type;
  for (size_t i = 0; same && i < sources.size(); ++i) same = cache.sources[i].is_same(sources[i]);
  if (!same) {
    cache.stacked = functional::StackedFactors::of(calls, type);
    cache.sources = std::move(sources);
    cache.states = std::move(states);
  }
  return cache.stacked;
}

}  // namespace tiedlora
