// inject.cpp: adapter injection into a module tree (see tiedlora/core/inject.h): select the layers, plan and
// check every change, then apply it. The model-level adapter API is in adapters.cpp.
#include "tiedlora/core/inject.h"

#include <map>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <torch/nn/modules/container/moduledict.h>

#include "core/tie_groups.h"
#include "tiedlora/core/error.h"

namespace tiedlora {
namespace {

using detail::child_of;
using detail::registry_key;

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

int64_t count_unique(const std::vector<at::Tensor>& tensors, bool trainable_only) {
  std::unordered_set<const void*> seen;
  int64_t total = 0;
  for (const auto& t : tensors) {
    if (!t.defined() || (trainable_only && !t.requires_grad())) continue;
    if (seen.insert(t.unsafeGetTensorImpl()).second) total += t.numel();
  }
  return total;
}

// Whether a module path lies inside the library's own modules (an adapter's holders, the tie-group
// registry): selection never matches them.
bool is_adapter_module(const std::string& name) {
  std::istringstream parts(name);
  std::string part;
  while (std::getline(parts, part, '.')) {
    if (part == kAdapterHoldersModule || part == kTieGroupsModule) return true;
  }
  return false;
}

// The tree as selection sees it. The named_modules() dictionary holds references to every module, so it
// lives only inside this function: the reference counts checked by plan_layers() must not include it.
std::vector<ModuleDescription> describe(const torch::nn::Module& root) {
  std::vector<ModuleDescription> descriptions;
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    if (is_adapter_module(item.key())) continue;
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
  return descriptions;
}

// One layer to adapt: either a LoraLinear (in place) or a torch::nn::Linear to replace in its parent.
struct Plan {
  std::string name;
  std::shared_ptr<torch::nn::Module> parent;
  std::string child_key;
  std::shared_ptr<LoraLinearImpl> in_place;  // set for LoraLinear targets
  torch::nn::Linear to_replace{nullptr};     // set for torch::nn::Linear targets
  at::Device device() const { return in_place ? in_place->weight.device() : to_replace->weight.device(); }
};

// Refuses a second adapter of the same name with another configuration: one adapter has one configuration
// (what save_adapter writes and load_adapter reads); more layers may join it.
void check_extension(const torch::nn::Module& root, const InjectOptions& options) {
  const std::string& adapter = options.adapter_name();
  if (detail::tie_groups_of(root, adapter)) {
    throw ConfigError("the model already carries the tied adapter '" + adapter + "' (it has a '" +
                      detail::tie_group_module_name(adapter, "*") +
                      "' module) (hint: inject under another "
                      "adapter_name, or delete_adapter() it first)");
  }
  for (const auto& [name, layer] : adapted_layers(root, adapter)) {
    if (!layer->same_configuration(options.method(), options.lora(), adapter)) {
      throw ConfigError("the model already carries a " + layer->method(adapter).name() + " adapter '" + adapter +
                        "' of rank " + std::to_string(layer->lora_options(adapter).rank()) + " (on '" + name +
                        "'), and one adapter has one configuration, so " + options.method().name() + " at rank " +
                        std::to_string(options.lora().rank()) +
                        " cannot be added to it (hint: inject with the same "
                        "method, rank and alpha, or under another adapter_name)");
    }
  }
}

std::map<std::string, Plan> plan_layers(torch::nn::Module& root, const std::vector<ModuleGroup>& groups,
                                        const std::string& adapter) {
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
        if (lora->has_adapter(adapter))
          throw ConfigError("'" + name + "' already carries the adapter '" + adapter + "'");
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
  return plans;
}

// Registry keys and devices, checked before anything changes, so applying cannot fail half-way.
void check_keys_and_devices(const std::vector<ModuleGroup>& groups, const std::map<std::string, Plan>& plans,
                            const AdapterMethod& method) {
  std::map<std::string, std::string> owner_of_key;
  auto claim = [&](const std::string& owner) {
    auto [it, inserted] = owner_of_key.emplace(registry_key(owner), owner);
    if (!inserted) {
      throw ConfigError("tie groups '" + it->second + "' and '" + owner + "' both map to the module name '" +
                        it->first + "' (hint: rename one of them)");
    }
  };
  for (const auto& group : groups) {
    const auto device = plans.at(group.modules.front()).device();
    for (const auto& name : group.modules) {
      const auto d = plans.at(name).device();
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

// Freezes everything but the adapters already in the model (a second injection of the same configuration
// extends the adapter; it must not freeze what the first one added); new adapters add their own tensors.
void freeze_all_but_adapters(torch::nn::Module& root) {
  std::unordered_set<const void*> adapter_tensors;
  for (const auto& [name, layer] : adapted_layers(root)) {
    for (const auto& carried : layer->adapter_names()) {
      for (const auto& t : layer->update(carried).tensors()) adapter_tensors.insert(t.unsafeGetTensorImpl());
    }
  }
  for (auto& p : root.parameters()) {
    if (!adapter_tensors.count(p.unsafeGetTensorImpl())) p.requires_grad_(false);
  }
}

}  // namespace

InjectionReport inject_adapters(torch::nn::Module& root, const InjectOptions& options) {
  const AdapterMethod method = options.method();
  const std::string& adapter = options.adapter_name();
  check_adapter_name(adapter);
  options.lora().validate();
  check_extension(root, options);
  const std::vector<std::string> names_before = adapter_names(root);
  const std::vector<std::string> active =
      names_before.empty() ? std::vector<std::string>{adapter} : active_adapters(root);

  // Plan and check every layer before changing anything.
  const SelectionOptions selection{options.targets(), options.exclude(), options.layers(), options.output_heads(),
                                   options.tie_groups()};
  const std::vector<ModuleGroup> groups = select_modules(describe(root), selection, method);
  std::map<std::string, Plan> plans = plan_layers(root, groups, adapter);
  check_keys_and_devices(groups, plans, method);

  // Apply.
  freeze_all_but_adapters(root);
  InjectionReport report;
  report.adapter_name = adapter;
  report.method = method;
  report.rank = options.lora().rank();
  report.scale = options.lora().scale();
  torch::nn::ModuleDict registry;
  auto attach = [&](Plan& plan, TiedLoraFactors factors) -> std::shared_ptr<LoraLinearImpl> {
    std::shared_ptr<LoraLinearImpl> layer = plan.in_place;
    if (!layer) {
      layer = LoraLinear(plan.to_replace).ptr();
      (plan.parent ? *plan.parent : root).replace_module(plan.child_key, layer);
    }
    if (factors.is_empty())
      layer->attach_lora(options_for(options.lora(), plan.name), adapter);
    else
      layer->attach_tied(factors, adapter);
    return layer;
  };
  // Shared factors, registered below under tiedlora_groups.<adapter>, so the layers only refer to them.
  auto make_factors = [&](const std::string& owner, const ModuleGroup& group, at::Device device) {
    TiedLoraFactors factors(TiedLoraFactorsOptions(group.shape.in_features, group.shape.out_features, method,
                                                   options_for(options.lora(), owner))
                                .name(owner));
    factors->to(device);
    factors->set_owned(true);
    const std::string key = registry_key(owner);  // distinct: check_keys_and_devices() refused collisions
    registry->update({{key, factors.ptr()}});
    return std::make_pair(factors, key);
  };
  for (const auto& group : groups) {
    InjectionReport::Group entry{group.name, "", group.shape, group.modules, 0};
    std::vector<at::Tensor> group_tensors;
    TiedLoraFactors shared(nullptr);
    if (method.tied) {
      auto [factors, key] = make_factors(group.name, group, plans.at(group.modules.front()).device());
      shared = factors;
      entry.registered_as = detail::tie_group_module_name(adapter, key);
      group_tensors.push_back(factors->lora_A);
      group_tensors.push_back(factors->lora_B);
    }
    for (const auto& name : group.modules) {
      Plan& plan = plans.at(name);
      TiedLoraFactors factors = shared;
      if (!method.tied && !method.is_plain_lora()) {
        // Untied masks other than plain LoRA: each layer is a tie group of one.
        factors = make_factors(name, group, plan.device()).first;
        group_tensors.push_back(factors->lora_A);
        group_tensors.push_back(factors->lora_B);
      }
      auto layer = attach(plan, factors);
      for (const auto& t : layer->update(adapter).tensors()) group_tensors.push_back(t);
    }
    entry.trainable_parameters = count_unique(group_tensors, /*trainable_only=*/true);
    report.groups.push_back(std::move(entry));
  }
  if (!registry->empty()) detail::register_tie_groups(root, adapter, registry);
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
      if (layer->adapter_kind(adapter) == AdapterKind::tied &&
          !registered.count(layer->lora_A(adapter).unsafeGetTensorImpl())) {
        throw ConfigError("layer '" + name + "' uses Tied-LoRA factors (adapter '" + adapter +
                          "') that no module of "
                          "this model registers, so they would not train (hint: keep the layer that owns them, the "
                          "first one attached, in the model, or inject with inject_adapters())");
      }
    }
  }
  return out;
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
    out << "  " << g.name << "  " << g.modules.size() << " x (" << g.shape.in_features << " -> " << g.shape.out_features
        << ")  trainable " << g.trainable_parameters << "\n";
  }
  out << "  trainable " << trainable_parameters << " of " << total_parameters << " parameters ("
      << (total_parameters ? 100.0 * static_cast<double>(trainable_parameters) / static_cast<double>(total_parameters)
                           : 0.0)
      << " %)\n";
  return out.str();
}

}  // namespace tiedlora
