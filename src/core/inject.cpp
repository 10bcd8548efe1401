// inject.cpp: adapter injection into a module tree (see tiedlora/core/inject.h).
#include "tiedlora/core/inject.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <torch/nn/modules/container/moduledict.h>

#include "tiedlora/core/error.h"

namespace tiedlora {
namespace {

constexpr const char* kGroupsName = "tiedlora_groups";

// The root's registry of the tie groups of adapter `adapter`.
std::string groups_module(const std::string& adapter) {
  return adapter == kDefaultAdapter ? kGroupsName : std::string(kGroupsName) + "_" + adapter;
}

std::shared_ptr<torch::nn::Module> child_of(const torch::nn::Module& parent, const std::string& name) {
  for (const auto& item : parent.named_children()) {
    if (item.key() == name) return item.value();
  }
  return nullptr;
}

// Splits "a.b.c" into the parent "a.b" and the child "c".
std::pair<std::string, std::string> split_parent(const std::string& name) {
  const auto dot = name.rfind('.');
  if (dot == std::string::npos) return {"", name};
  return {name.substr(0, dot), name.substr(dot + 1)};
}

std::shared_ptr<torch::nn::Module> find_module(torch::nn::Module& root, const std::string& name) {
  std::shared_ptr<torch::nn::Module> current;
  torch::nn::Module* node = &root;
  std::istringstream parts(name);
  std::string part;
  while (std::getline(parts, part, '.')) {
    current = child_of(*node, part);
    if (!current) return nullptr;
    node = current.get();
  }
  return current;
}

// Each layer or group draws from its own stream of the user's seed (LoraOptions::seed_stream).
LoraOptions options_for(const LoraOptions& lora, const std::string& name) {
  LoraOptions out = lora;
  out.seed_stream(name);
  return out;
}

std::string registry_key(const std::string& group) {
  std::string key = group;
  for (char& c : key) {
    if (c == '.') c = '-';
  }
  return key;
}

// One layer to adapt: either a LoraLinear (in place) or a torch::nn::Linear to replace in its parent.
struct Plan {
  std::string name;
  std::shared_ptr<torch::nn::Module> parent;
  std::string child_key;
  std::shared_ptr<LoraLinearImpl> in_place;   // set for LoraLinear targets
  torch::nn::Linear to_replace{nullptr};      // set for torch::nn::Linear targets
};

int64_t count_unique(const std::vector<at::Tensor>& tensors, bool trainable_only) {
  std::unordered_set<const void*> seen;
  int64_t total = 0;
  for (const auto& t : tensors) {
    if (!t.defined() || (trainable_only && !t.requires_grad())) continue;
    if (seen.insert(t.unsafeGetTensorImpl()).second) total += t.numel();
  }
  return total;
}

}  // namespace

InjectionReport inject_adapters(torch::nn::Module& root, const InjectOptions& options) {
  const AdapterMethod method = options.method();
  const std::string& adapter = options.adapter_name();
  check_adapter_name(adapter);
  options.lora().validate();
  const std::string groups_name = groups_module(adapter);
  if (child_of(root, groups_name)) {
    throw ConfigError("the model already carries the tied adapter '" + adapter + "' (it has a '" + groups_name +
                      "' module) (hint: inject under another adapter_name, or delete_adapter() it first)");
  }
  // One adapter has one configuration (what save_adapter writes and load_adapter reads); more layers may
  // join it, but another method, rank or scale is refused now rather than at save time.
  for (const auto& [name, layer] : adapted_layers(root, adapter)) {
    if (!layer->same_configuration(method, options.lora(), adapter)) {
      throw ConfigError("the model already carries a " + layer->method(adapter).name() + " adapter '" + adapter +
                        "' of rank " + std::to_string(layer->lora_options(adapter).rank()) + " (on '" + name +
                        "'), and one adapter has one configuration, so " + method.name() + " at rank " +
                        std::to_string(options.lora().rank()) + " cannot be added to it (hint: inject with the same "
                        "method, rank and alpha, or under another adapter_name)");
    }
  }
  const std::vector<std::string> names_before = adapter_names(root);
  const std::vector<std::string> active = names_before.empty() ? std::vector<std::string>{adapter} : active_adapters(root);

  // Describe the tree for selection. The named_modules() dictionary holds references to every module, so
  // it lives only inside this block: the reference counts checked below must not include it.
  std::vector<ModuleDescription> descriptions;
  {
    const auto modules = root.named_modules("", /*include_self=*/false);
    for (const auto& item : modules) {
      ModuleDescription d{item.key(), item.value()->name(), false, {}};
      if (auto* linear = item.value()->as<torch::nn::LinearImpl>()) {
        d.is_linear = true;
        d.shape = {linear->options.in_features(), linear->options.out_features()};
      } else if (auto* lora = item.value()->as<LoraLinearImpl>()) {
        d.is_linear = true;
        d.shape = {lora->options.in_features(), lora->options.out_features()};
      }
      descriptions.push_back(std::move(d));
    }
  }
  SelectionOptions selection{options.targets(), options.exclude(), options.layers(), options.output_heads(),
                             options.tie_groups()};
  const std::vector<ModuleGroup> groups = select_modules(descriptions, selection, method);

  // Check every layer before changing anything.
  std::map<std::string, Plan> plans;
  for (const auto& group : groups) {
    for (const auto& name : group.modules) {
      Plan plan;
      plan.name = name;
      auto [parent_name, key] = split_parent(name);
      plan.parent = parent_name.empty() ? nullptr : find_module(root, parent_name);
      plan.child_key = key;
      torch::nn::Module& parent = plan.parent ? *plan.parent : root;
      std::shared_ptr<torch::nn::Module> module = child_of(parent, key);
      TORCH_INTERNAL_ASSERT(module, "selected module ", name, " vanished from the tree");
      if (auto lora = std::dynamic_pointer_cast<LoraLinearImpl>(module)) {
        if (lora->has_adapter(adapter)) throw ConfigError("'" + name + "' already carries the adapter '" + adapter + "'");
        plan.in_place = std::move(lora);
      } else {
        // Held by the parent's registry and by `module` here; anything more is a member holder, a
        // Sequential or a ModuleList that would keep calling the old layer.
        if (module.use_count() > 2) {
          throw ConfigError(
              "cannot adapt '" + name + "': it is a torch::nn::Linear that its parent (" + parent.name() +
              ") also holds outside its module registry (a member, a Sequential or a ModuleList), so the "
              "parent's forward would keep calling the plain layer and skip the adapter (hint: declare the "
              "layer as tiedlora::LoraLinear(torch::nn::LinearOptions(...)), a drop-in for torch::nn::Linear "
              "that receives its adapter in place)");
        }
        auto linear = std::dynamic_pointer_cast<torch::nn::LinearImpl>(module);
        TORCH_INTERNAL_ASSERT(linear, "selected module ", name, " is not a linear layer");
        plan.to_replace = torch::nn::Linear(std::move(linear));
      }
      plans.emplace(name, std::move(plan));
    }
  }

  // Registry keys and devices are checked here too, so nothing below can fail half-way.
  {
    std::map<std::string, std::string> owner_of_key;
    auto claim = [&](const std::string& owner) {
      const std::string key = registry_key(owner);
      auto [it, inserted] = owner_of_key.emplace(key, owner);
      if (!inserted) {
        throw ConfigError("tie groups '" + it->second + "' and '" + owner + "' both map to the module name '" + key +
                          "' (hint: rename one of them)");
      }
    };
    for (const auto& group : groups) {
      const Plan& first = plans.at(group.modules.front());
      const auto device = first.in_place ? first.in_place->weight.device() : first.to_replace->weight.device();
      for (const auto& name : group.modules) {
        const Plan& plan = plans.at(name);
        const auto d = plan.in_place ? plan.in_place->weight.device() : plan.to_replace->weight.device();
        if (method.tied && d != device) {
          throw ConfigError("tie group '" + group.name + "' spans devices: '" + group.modules.front() + "' is on " +
                            device.str() + " but '" + name + "' is on " + d.str() +
                            " (hint: layers sharing A and B must be on one device)");
        }
        if (!method.tied && !method.is_plain_lora()) claim(name);
      }
      if (method.tied) claim(group.name);
    }
  }

  // Freeze everything but the adapters already in the model (a second injection of the same configuration
  // extends the adapter; it must not freeze what the first one added); new adapters add their own tensors.
  std::unordered_set<const void*> existing_adapter;
  for (const auto& [name, layer] : adapted_layers(root)) {
    for (const auto& carried : layer->adapter_names()) {
      for (const auto& t : layer->update(carried).tensors()) existing_adapter.insert(t.unsafeGetTensorImpl());
    }
  }
  for (auto& p : root.parameters()) {
    if (!existing_adapter.count(p.unsafeGetTensorImpl())) p.requires_grad_(false);
  }

  InjectionReport report;
  report.adapter_name = adapter;
  report.method = method;
  report.rank = options.lora().rank();
  report.scale = options.lora().scale();
  torch::nn::ModuleDict registry;
  auto attach = [&](Plan& plan, TiedLoraFactors factors) -> std::shared_ptr<LoraLinearImpl> {
    const LoraOptions lora = options_for(options.lora(), plan.name);
    std::shared_ptr<LoraLinearImpl> layer = plan.in_place;
    if (!layer) {
      layer = LoraLinear(plan.to_replace).ptr();
      (plan.parent ? *plan.parent : root).replace_module(plan.child_key, layer);
    }
    if (factors.is_empty()) layer->attach_lora(lora, adapter);
    else layer->attach_tied(factors, adapter);
    return layer;
  };
  auto make_factors = [&](const std::string& owner, const ModuleGroup& group, at::Device device) {
    TiedLoraFactors factors(TiedLoraFactorsOptions(group.shape.in_features, group.shape.out_features, method,
                                                   options_for(options.lora(), owner))
                                .name(owner));
    factors->to(device);
    factors->set_owned(true);  // registered below under tiedlora_groups, so the layers only refer to it
    const std::string key = registry_key(owner);  // distinct: claim() refused owners that would collide
    registry->update({{key, factors.ptr()}});
    return std::make_pair(factors, key);
  };

  for (const auto& group : groups) {
    InjectionReport::Group entry{group.name, "", group.shape, group.modules, 0};
    std::vector<at::Tensor> group_tensors;
    auto device_of = [&](const Plan& plan) {
      return plan.in_place ? plan.in_place->weight.device() : plan.to_replace->weight.device();
    };
    TiedLoraFactors shared(nullptr);
    if (method.tied) {
      auto [factors, key] = make_factors(group.name, group, device_of(plans.at(group.modules.front())));
      shared = factors;
      entry.registered_as = groups_name + "." + key;
      group_tensors.push_back(factors->lora_A);
      group_tensors.push_back(factors->lora_B);
    }
    for (const auto& name : group.modules) {
      Plan& plan = plans.at(name);
      TiedLoraFactors factors = shared;
      if (!method.tied && !method.is_plain_lora()) {
        // Untied masks other than plain LoRA: each layer is a tie group of one.
        factors = make_factors(name, group, device_of(plan)).first;
        group_tensors.push_back(factors->lora_A);
        group_tensors.push_back(factors->lora_B);
      }
      auto layer = attach(plan, factors);
      for (const auto& t : layer->update(adapter).tensors()) group_tensors.push_back(t);
    }
    entry.trainable_parameters = count_unique(group_tensors, /*trainable_only=*/true);
    report.groups.push_back(std::move(entry));
  }
  if (!registry->empty()) root.register_module(groups_name, registry);
  // The active set is the model's: layers adapted just now follow it like the others.
  for (const auto& item : root.modules(/*include_self=*/false)) {
    if (auto* layer = item->as<LoraLinearImpl>()) layer->set_active_adapters(active);
  }

  const auto all = root.parameters();
  report.trainable_parameters = count_unique(all, true);
  report.total_parameters = count_unique(all, false);
  return report;
}

std::vector<at::Tensor> trainable_parameters(const torch::nn::Module& module) {
  std::vector<at::Tensor> out;
  std::unordered_set<const void*> registered;
  std::unordered_map<const void*, std::string> name_of_trainable;
  for (const auto& item : module.named_parameters()) {
    const at::Tensor& p = item.value();
    registered.insert(p.unsafeGetTensorImpl());
    if (!p.requires_grad()) continue;
    auto [it, first] = name_of_trainable.emplace(p.unsafeGetTensorImpl(), item.key());
    if (first) {
      out.push_back(p);
      continue;
    }
    // LibTorch's parameters() does not de-duplicate, so an optimizer over it would step this tensor twice.
    throw ConfigError("the trainable tensor '" + it->second + "' is registered a second time as '" + item.key() +
                      "', so an optimizer over parameters() would update it twice per step (hint: do not register "
                      "TiedLoraFactors yourself: the first layer attached to them, or inject_adapters(), does)");
  }
  // Shared factors that no module of this tree registers would silently never train: refuse.
  for (const auto& [name, layer] : adapted_layers(module)) {
    for (const auto& adapter : layer->adapter_names()) {
      if (layer->adapter_kind(adapter) == AdapterKind::tied && !registered.count(layer->lora_A(adapter).unsafeGetTensorImpl())) {
        throw ConfigError("layer '" + name + "' uses Tied-LoRA factors (adapter '" + adapter + "') that no module of "
                          "this model registers, so they would not train (hint: keep the layer that owns them, the "
                          "first one attached, in the model, or inject with inject_adapters())");
      }
    }
  }
  return out;
}

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
    if (layer->adapter_enabled()) layer->merge_and_detach_();
    else layer->detach_adapter();
  }
  std::vector<std::string> registries;
  for (const auto& item : module.named_children()) {
    if (item.key() == kGroupsName || item.key().rfind(std::string(kGroupsName) + "_", 0) == 0) registries.push_back(item.key());
  }
  for (const auto& name : registries) module.unregister_module(name);
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

std::vector<std::pair<std::string, LoraLinear>> adapted_layers(const torch::nn::Module& module, const std::string& adapter) {
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
  const std::string registry = groups_module(adapter);
  if (child_of(module, registry)) module.unregister_module(registry);
  const bool was_active = std::find(active.begin(), active.end(), adapter) != active.end();
  active.erase(std::remove(active.begin(), active.end(), adapter), active.end());
  const std::vector<std::string> remaining = adapter_names(module);
  if (was_active && active.empty() && !remaining.empty()) active = {remaining.front()};  // PEFT's choice
  for (auto* layer : lora_layers(module)) layer->set_active_adapters(active);
}

std::shared_ptr<const RowAdapters> route_rows(const torch::nn::Module& module, std::vector<std::string> adapter_of_row) {
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
    if (!std::isfinite(weights[k])) throw ConfigError("add_weighted_adapter: the weight of '" + sources[k] + "' is not finite");
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
  if (child_of(module, groups_module(name))) {
    throw ConfigError("add_weighted_adapter: the model already has a module '" + groups_module(name) +
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
            a.push_back(layer->factors(sources[k])->lora_A.to(at::kFloat).mul(weights[k]).mul(layer->scale(sources[k])));
            b.push_back(layer->factors(sources[k])->lora_B.to(at::kFloat));
          }
          TiedLoraFactors factors(TiedLoraFactorsOptions(first->options.in_features(), first->options.out_features(), method, lora)
                                      .name(first->options.name()));
          factors->to(first->lora_A.device());
          factors->lora_A.copy_(at::cat(a, 0));
          factors->lora_B.copy_(at::cat(b, 1));
          factors->set_owned(true);
          const std::string key = registry_key(first->options.name().empty() ? layer_name : first->options.name());
          if (registry->contains(key)) throw ConfigError("add_weighted_adapter: two tie groups map to the module name '" + key + "'");
          registry->update({{key, factors.ptr()}});
          it = made.emplace(first.get(), factors).first;
        }
        layer->attach_tied(it->second, name);
        if (method.has_u()) {
          std::vector<at::Tensor> u;
          for (size_t k = 0; k < sources.size(); ++k) {
            const at::Tensor& uk = layer->lora_u_of(sources[k]);
            u.push_back(uk.defined() ? uk.to(at::kFloat) : at::ones({layer->lora_options(sources[k]).rank()}, layer->weight.options().dtype(at::kFloat)));
          }
          layer->lora_u_of(name).copy_(at::cat(u, 0));
        }
      }
      module.register_module(groups_module(name), registry);
    }
  } catch (...) {
    // All or nothing: whatever part of the new adapter exists goes again.
    for (auto& [layer_name, layer] : layers) {
      if (layer->has_adapter(name)) layer->detach_adapter(name);
    }
    if (child_of(module, groups_module(name))) module.unregister_module(groups_module(name));
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

std::string InjectionReport::to_json(int indent) const {
  nlohmann::ordered_json j;
  if (!adapter_name.empty() && adapter_name != kDefaultAdapter) j["adapter"] = adapter_name;
  j["method"] = method.name();
  j["rank"] = rank;
  j["scale"] = scale;
  j["trainable_parameters"] = trainable_parameters;
  j["total_parameters"] = total_parameters;
  j["groups"] = nlohmann::ordered_json::array();
  for (const auto& g : groups) {
    nlohmann::ordered_json entry;
    entry["name"] = g.name;
    if (!g.registered_as.empty()) entry["registered_as"] = g.registered_as;
    entry["in_features"] = g.shape.in_features;
    entry["out_features"] = g.shape.out_features;
    entry["layers"] = g.modules.size();
    entry["trainable_parameters"] = g.trainable_parameters;
    entry["modules"] = g.modules;
    j["groups"].push_back(entry);
  }
  return j.dump(indent);
}

std::string InjectionReport::summary() const {
  std::ostringstream out;
  out << "tiedlora: " << method.name() << ", rank " << rank << ", scale " << scale << "\n";
  for (const auto& g : groups) {
    out << "  " << g.name << "  " << g.modules.size() << " x (" << g.shape.in_features << " -> "
        << g.shape.out_features << ")  trainable " << g.trainable_parameters << "\n";
  }
  out << "  trainable " << trainable_parameters << " of " << total_parameters << " parameters ("
      << (total_parameters ? 100.0 * static_cast<double>(trainable_parameters) / static_cast<double>(total_parameters) : 0.0)
      << " %)\n";
  return out.str();
}

}  // namespace tiedlora
