// adapters.cpp: the model-level adapter API (see tiedlora/core/adapters.h): listing, activation, switching
// on and off, trainability, deletion, row routing, exact combination, merging. Injection is in inject.cpp.
#include "tiedlora/core/adapters.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include <ATen/ATen.h>
#include <torch/nn/modules/container/moduledict.h>

#include "core/tie_groups.h"
#include "tiedlora/core/error.h"

namespace tiedlora {

using detail::registry_key;

void merge_and_unload_(torch::nn::Module& module) {
  // Merge every layer before removing any adapter, so that a refusal (NaN, a tied weight) leaves the
  // model as it was.
  auto layers = adapted_layers(module);
  std::vector<LoraLinearImpl*> merged_here;
  try {
    for (auto& [name, layer] : layers) {
      if (!layer->adapter_enabled() || layer->merged()) continue;
      layer->merge_();
      merged_here.push_back(layer.get());
    }
  } catch (...) {
    for (auto* layer : merged_here) layer->unmerge_();  // layers merged before this call stay merged
    throw;
  }
  for (auto& [name, layer] : layers) {
    if (layer->adapter_enabled())
      layer->merge_and_detach_();
    else
      layer->detach_adapter();
  }
  if (detail::child_of(module, kTieGroupsModule)) module.unregister_module(kTieGroupsModule);
}

std::vector<std::pair<std::string, LoraLinear>> adapted_layers(const torch::nn::Module& module) {
  std::vector<std::pair<std::string, LoraLinear>> out;
  for (const auto& item : module.named_modules("", false)) {
    if (auto layer = std::dynamic_pointer_cast<LoraLinearImpl>(item.value())) {
      if (layer->has_adapter()) out.emplace_back(item.key(), LoraLinear(layer));
    }
  }
  return out;
}

std::vector<std::pair<std::string, LoraLinear>> adapted_layers(const torch::nn::Module& module,
                                                               const std::string& adapter) {
  std::vector<std::pair<std::string, LoraLinear>> out;
  for (auto& [name, layer] : adapted_layers(module)) {
    if (layer->has_adapter(adapter)) out.emplace_back(name, layer);
  }
  return out;
}

std::vector<std::string> adapter_names(const torch::nn::Module& module) {
  std::set<std::string> names;
  for (const auto& [name, layer] : adapted_layers(module)) {
    for (const auto& adapter : layer->adapter_names()) names.insert(adapter);
  }
  return {names.begin(), names.end()};
}

namespace {

// Throws naming `adapter` and the adapters the model carries when it is not one of them.
void require_adapter(const std::vector<std::string>& known, const std::string& adapter, const std::string& what) {
  if (std::find(known.begin(), known.end(), adapter) != known.end()) return;
  std::string list;
  for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
  throw ConfigError(what + ": the model carries no adapter named '" + adapter + "' (it carries " +
                    (list.empty() ? std::string("none") : list) + ")");
}

std::vector<LoraLinearImpl*> lora_layers(torch::nn::Module& module) {
  std::vector<LoraLinearImpl*> out;
  for (const auto& item : module.modules(/*include_self=*/false)) {
    if (auto* layer = item->as<LoraLinearImpl>()) out.push_back(layer);
  }
  return out;
}

}  // namespace

void set_active_adapters(torch::nn::Module& module, const std::vector<std::string>& adapters) {
  const auto known = adapter_names(module);
  for (const auto& adapter : adapters) require_adapter(known, adapter, "set_active_adapters");
  for (auto* layer : lora_layers(module)) layer->set_active_adapters(adapters);
}

std::vector<std::string> active_adapters(const torch::nn::Module& module) {
  const auto layers = adapted_layers(module);
  return layers.empty() ? std::vector<std::string>{} : layers.front().second->active_adapters();
}

void set_adapters_enabled(torch::nn::Module& module, bool enabled) {
  for (auto& [name, layer] : adapted_layers(module)) layer->set_adapter_enabled(enabled);
}

void set_adapter_trainable(torch::nn::Module& module, const std::string& adapter, bool trainable) {
  require_adapter(adapter_names(module), adapter, "set_adapter_trainable");
  for (auto& [name, layer] : adapted_layers(module, adapter)) {
    const AdapterMethod& method = layer->method(adapter);
    const functional::LowRankUpdate u = layer->update(adapter);
    // A and B as the method says (a frozen random A or B of a tied mask stays frozen); u and v exist only
    // when they train.
    u.lora_a.requires_grad_(trainable && method.train_a);
    u.lora_b.requires_grad_(trainable && method.train_b);
    if (u.u.defined()) u.u.requires_grad_(trainable);
    if (u.v.defined()) u.v.requires_grad_(trainable);
  }
}

void delete_adapter(torch::nn::Module& module, const std::string& adapter) {
  require_adapter(adapter_names(module), adapter, "delete_adapter");
  std::vector<std::string> active = active_adapters(module);
  for (auto& [name, layer] : adapted_layers(module, adapter)) layer->detach_adapter(adapter);
  detail::remove_tie_groups(module, adapter);
  const bool was_active = std::find(active.begin(), active.end(), adapter) != active.end();
  active.erase(std::remove(active.begin(), active.end(), adapter), active.end());
  const std::vector<std::string> remaining = adapter_names(module);
  if (was_active && active.empty() && !remaining.empty()) active = {remaining.front()};  // PEFT's choice
  for (auto* layer : lora_layers(module)) layer->set_active_adapters(active);
}

std::shared_ptr<const RowAdapters> route_rows(const torch::nn::Module& module,
                                              std::vector<std::string> adapter_of_row) {
  const auto known = adapter_names(module);
  for (size_t i = 0; i < adapter_of_row.size(); ++i) {
    if (!adapter_of_row[i].empty()) require_adapter(known, adapter_of_row[i], "row " + std::to_string(i));
  }
  return std::make_shared<const RowAdapters>(std::move(adapter_of_row));
}

void add_weighted_adapter(torch::nn::Module& module, const std::vector<std::string>& sources,
                          const std::vector<double>& weights, const std::string& name) {
  check_adapter_name(name);
  const auto known = adapter_names(module);
  if (std::find(known.begin(), known.end(), name) != known.end()) {
    throw ConfigError("add_weighted_adapter: the model already carries an adapter named '" + name + "'");
  }
  if (sources.empty() || sources.size() != weights.size()) {
    throw ConfigError("add_weighted_adapter: give one weight per source adapter and at least one source (got " +
                      std::to_string(sources.size()) + " sources and " + std::to_string(weights.size()) + " weights)");
  }
  for (size_t k = 0; k < sources.size(); ++k) {
    require_adapter(known, sources[k], "add_weighted_adapter");
    if (!std::isfinite(weights[k]))
      throw ConfigError("add_weighted_adapter: the weight of '" + sources[k] + "' is not finite");
  }
  // The layers any source adapts.
  std::vector<std::pair<std::string, LoraLinear>> layers;
  for (auto& [layer_name, layer] : adapted_layers(module)) {
    if (std::any_of(sources.begin(), sources.end(), [&](const std::string& s) { return layer->has_adapter(s); })) {
      layers.emplace_back(layer_name, layer);
    }
  }
  // The tied form: every source tied, without v, on the same layers grouped the same way.
  bool tied = true;
  for (const auto& [layer_name, layer] : layers) {
    for (const auto& source : sources) {
      if (layer->adapter_kind(source) != AdapterKind::tied || layer->method(source).has_v()) tied = false;
    }
    if (!tied) break;
    for (const auto& [other_name, other] : layers) {  // same groups: layers share factors in every source alike
      const bool same_group = layer->factors(sources[0]).get() == other->factors(sources[0]).get();
      for (const auto& source : sources) {
        if ((layer->factors(source).get() == other->factors(source).get()) != same_group) tied = false;
      }
    }
  }
  at::NoGradGuard no_grad;
  // The rank of each source: its largest over the layers (one adapter has one rank).
  std::vector<int64_t> ranks(sources.size(), 0);
  for (const auto& [layer_name, layer] : layers) {
    for (size_t k = 0; k < sources.size(); ++k) {
      if (layer->has_adapter(sources[k])) ranks[k] = std::max(ranks[k], layer->lora_options(sources[k]).rank());
    }
  }
  int64_t rank = 0;
  for (int64_t r : ranks) rank += r;
  if (detail::tie_groups_of(module, name)) {
    throw ConfigError("add_weighted_adapter: the model already has tie groups for '" + name +
                      "' (hint: choose another name)");
  }
  // The result's values are written below; a fixed seed keeps its throw-away initial draw off the global
  // generator. Dropout is the first source's, as PEFT's copy of the first config gives.
  double dropout = 0.0;
  for (const auto& [layer_name, layer] : layers) {
    if (layer->has_adapter(sources[0])) dropout = layer->lora_options(sources[0]).dropout();
  }
  const LoraOptions lora = LoraOptions(rank).alpha(static_cast<double>(rank)).dropout(dropout).seed(0);
  std::vector<LoraLinear> merged;  // attaching unmerges; a failure merges them again
  for (auto& [layer_name, layer] : layers) {
    if (layer->merged()) merged.push_back(layer);
  }
  try {
    if (!tied) {
      for (auto& [layer_name, layer] : layers) {
        std::vector<functional::LowRankUpdate> present;
        std::vector<double> present_weights;
        for (size_t k = 0; k < sources.size(); ++k) {
          if (!layer->has_adapter(sources[k])) continue;
          present.push_back(layer->update(sources[k]));
          present_weights.push_back(weights[k]);
        }
        if (present.empty()) continue;
        const functional::LowRankUpdate cat = functional::concatenated(present, present_weights);
        layer->attach_lora(lora, name);
        // Sources present first, zeros after (PEFT packs them the same way).
        const int64_t r = cat.lora_a.size(0);
        layer->lora_A(name).zero_().narrow(0, 0, r).copy_(cat.lora_a);
        layer->lora_B(name).zero_().narrow(1, 0, r).copy_(cat.lora_b);
      }
    } else {
      AdapterMethod method = AdapterMethod::parse("tied-ab");
      for (const auto& [layer_name, layer] : layers) {
        for (const auto& source : sources) method.train_u = method.train_u || layer->method(source).has_u();
      }
      torch::nn::ModuleDict registry;
      std::map<const TiedLoraFactorsImpl*, TiedLoraFactors> made;  // source 0's factors -> the new group's
      for (auto& [layer_name, layer] : layers) {
        const TiedLoraFactors first = layer->factors(sources[0]);
        auto it = made.find(first.get());
        if (it == made.end()) {
          std::vector<at::Tensor> a, b;
          for (size_t k = 0; k < sources.size(); ++k) {
            a.push_back(
                layer->factors(sources[k])->lora_A.to(at::kFloat).mul(weights[k]).mul(layer->scale(sources[k])));
            b.push_back(layer->factors(sources[k])->lora_B.to(at::kFloat));
          }
          TiedLoraFactors factors(
              TiedLoraFactorsOptions(first->options.in_features(), first->options.out_features(), method, lora)
                  .name(first->options.name()));
          factors->to(first->lora_A.device());
          factors->lora_A.copy_(at::cat(a, 0));
          factors->lora_B.copy_(at::cat(b, 1));
          factors->set_owned(true);
          const std::string key = registry_key(first->options.name().empty() ? layer_name : first->options.name());
          if (registry->contains(key))
            throw ConfigError("add_weighted_adapter: two tie groups map to the module name '" + key + "'");
          registry->update({{key, factors.ptr()}});
          it = made.emplace(first.get(), factors).first;
        }
        layer->attach_tied(it->second, name);
        if (method.has_u()) {
          std::vector<at::Tensor> u;
          for (size_t k = 0; k < sources.size(); ++k) {
            const at::Tensor& uk = layer->lora_u_of(sources[k]);
            u.push_back(uk.defined() ? uk.to(at::kFloat)
                                     : at::ones({layer->lora_options(sources[k]).rank()},
                                                layer->weight.options().dtype(at::kFloat)));
          }
          layer->lora_u_of(name).copy_(at::cat(u, 0));
        }
      }
      detail::register_tie_groups(module, name, registry);
    }
  } catch (...) {
    // All or nothing: whatever part of the new adapter exists goes again.
    for (auto& [layer_name, layer] : layers) {
      if (layer->has_adapter(name)) layer->detach_adapter(name);
    }
    detail::remove_tie_groups(module, name);
    for (auto& layer : merged) layer->merge_();
    throw;
  }
}

void merge_adapters_(torch::nn::Module& module) {
  for (auto& [name, layer] : adapted_layers(module)) layer->merge_();
}

void unmerge_adapters_(torch::nn::Module& module) {
  for (auto& [name, layer] : adapted_layers(module)) layer->unmerge_();
}

}  // namespace tiedlora
