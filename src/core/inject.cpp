// inject.cpp: adapter injection into a module tree (see tiedlora/core/inject.h).
#include "tiedlora/core/inject.h"

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
  options.lora().validate();
  if (child_of(root, kGroupsName)) {
    throw ConfigError("the model already carries tiedlora adapters (it has a '" + std::string(kGroupsName) +
                      "' module); inject into a fresh model");
  }
  // A model carries one adapter configuration (what save_adapter writes and load_adapter reads); more
  // layers may join it, but another method, rank or scale is refused now rather than at save time.
  for (const auto& [name, layer] : adapted_layers(root)) {
    if (!layer->same_configuration(method, options.lora())) {
      throw ConfigError("the model already carries a " + layer->method().name() + " adapter of rank " +
                        std::to_string(layer->lora_options().rank()) + " (on '" + name + "'), and one model carries one adapter "
                        "configuration, so " + method.name() + " at rank " + std::to_string(options.lora().rank()) +
                        " cannot be added (hint: inject with the same method, rank and alpha, or into a fresh model)");
    }
  }

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
        if (lora->has_adapter()) throw ConfigError("'" + name + "' already carries an adapter");
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
    for (const at::Tensor* t : {&layer->lora_A(), &layer->lora_B(), &layer->lora_u, &layer->lora_v}) {
      if (t->defined()) existing_adapter.insert(t->unsafeGetTensorImpl());
    }
  }
  for (auto& p : root.parameters()) {
    if (!existing_adapter.count(p.unsafeGetTensorImpl())) p.requires_grad_(false);
  }

  InjectionReport report;
  report.method = method;
  report.rank = options.lora().rank();
  report.scale = options.lora().scale();
  torch::nn::ModuleDict registry;
  auto attach = [&](Plan& plan, TiedLoraFactors factors) -> std::shared_ptr<LoraLinearImpl> {
    const LoraOptions lora = options_for(options.lora(), plan.name);
    if (plan.in_place) {
      if (factors.is_empty()) plan.in_place->attach_lora(lora);
      else plan.in_place->attach_tied(factors);
      return plan.in_place;
    }
    LoraLinear layer = factors.is_empty() ? LoraLinear(plan.to_replace, lora) : LoraLinear(plan.to_replace, factors);
    (plan.parent ? *plan.parent : root).replace_module(plan.child_key, layer.ptr());
    return layer.ptr();
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
      entry.registered_as = std::string(kGroupsName) + "." + key;
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
      for (const auto& t : layer->parameters(/*recurse=*/false)) group_tensors.push_back(t);
    }
    entry.trainable_parameters = count_unique(group_tensors, /*trainable_only=*/true);
    report.groups.push_back(std::move(entry));
  }
  if (!registry->empty()) root.register_module(kGroupsName, registry);

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
    if (layer->adapter_kind() == AdapterKind::tied && !registered.count(layer->lora_A().unsafeGetTensorImpl())) {
      throw ConfigError("layer '" + name + "' uses Tied-LoRA factors that no module of this model registers, so "
                        "they would not train (hint: keep the layer that owns them, the first one attached, in "
                        "the model, or inject with inject_adapters())");
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
  if (child_of(module, kGroupsName)) module.unregister_module(kGroupsName);
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

void merge_adapters_(torch::nn::Module& module) {
  for (auto& [name, layer] : adapted_layers(module)) layer->merge_();
}

void unmerge_adapters_(torch::nn::Module& module) {
  for (auto& [name, layer] : adapted_layers(module)) layer->unmerge_();
}

std::string InjectionReport::to_json(int indent) const {
  nlohmann::ordered_json j;
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
