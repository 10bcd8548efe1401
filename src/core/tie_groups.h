// tie_groups.h (private to core): the root's registry of shared Tied-LoRA factors, `tiedlora_groups.<adapter>.<key>`
// (the naming rule of tiedlora/core/adapter_set.h), shared by injection and the model-level adapter API.
#pragma once

#include <memory>
#include <string>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/moduledict.h>

namespace tiedlora::detail {

/// The child of `parent` named `name`, or null.
std::shared_ptr<torch::nn::Module> child_of(const torch::nn::Module& parent, const std::string& name);

/// A tie group's module key: its name with '.' replaced by '-' (module names cannot hold dots).
std::string registry_key(const std::string& group);

/// Adapter `adapter`'s tie groups under `root`, or null.
std::shared_ptr<torch::nn::Module> tie_groups_of(const torch::nn::Module& root, const std::string& adapter);
/// Registers `groups` as adapter `adapter`'s tie groups under `root` (which must not have them yet).
void register_tie_groups(torch::nn::Module& root, const std::string& adapter, const torch::nn::ModuleDict& groups);
/// Removes adapter `adapter`'s tie groups from `root`, and the registry when it is left empty.
void remove_tie_groups(torch::nn::Module& root, const std::string& adapter);
/// The full module name of a tie group's factors: `tiedlora_groups.<adapter>.<key>`.
std::string tie_group_module_name(const std::string& adapter, const std::string& key);

}  // namespace tiedlora::detail
