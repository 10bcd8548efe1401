// tie_groups.cpp: the root's registry of shared Tied-LoRA factors (see tie_groups.h).
#include "core/tie_groups.h"

#include "tiedlora/core/adapter_set.h"

namespace tiedlora::detail {

std::shared_ptr<torch::nn::Module> child_of(const torch::nn::Module& parent, const std::string& name) {
  for (const auto& item : parent.named_children()) {
    if (item.key() == name) return item.value();
  }
  return nullptr;
}

std::string registry_key(const std::string& group) {
  std::string key = group;
  for (char& c : key) {
    if (c == '.') c = '-';
  }
  return key;
}

std::shared_ptr<torch::nn::Module> tie_groups_of(const torch::nn::Module& root, const std::string& adapter) {
  const auto registry = child_of(root, kTieGroupsModule);
  return registry ? child_of(*registry, adapter) : nullptr;
}

void register_tie_groups(torch::nn::Module& root, const std::string& adapter, const torch::nn::ModuleDict& groups) {
  auto registry = child_of(root, kTieGroupsModule);
  if (!registry) registry = root.register_module(kTieGroupsModule, std::make_shared<torch::nn::Module>("TieGroups"));
  registry->register_module(adapter, groups.ptr());
}

void remove_tie_groups(torch::nn::Module& root, const std::string& adapter) {
  const auto registry = child_of(root, kTieGroupsModule);
  if (!registry || !child_of(*registry, adapter)) return;
  registry->unregister_module(adapter);
  if (registry->children().empty()) root.unregister_module(kTieGroupsModule);
}

std::string tie_group_module_name(const std::string& adapter, const std::string& key) {
  return std::string(kTieGroupsModule) + "." + adapter + "." + key;
}

}  // namespace tiedlora::detail
