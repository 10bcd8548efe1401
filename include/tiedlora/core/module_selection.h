// tiedlora/core/module_selection.h: which linear layers of a model get adapters, and how they are grouped.
// Torch-free, so that injection into a live module tree and the shape-only `tiedlora params` command
// apply exactly the same rules.
//
// A pattern is matched against a module's full dotted name ("model.layers.3.self_attn.q_proj"):
//   - "q_proj" or "self_attn.q_proj": the name equals it or ends with "." + it (PEFT's rule);
//   - "re:<regex>": the regex matches the whole name (ECMAScript syntax);
//   - "all-linear" (targets only): every linear layer except the output head(s).
// A module's layer index is the first purely numeric component of its name ("3" above). Its default tie
// group is its name with that component replaced by "*" ("model.layers.*.self_attn.q_proj"): all layers'
// q_proj share one A/B, and GPT-2's attn.c_proj and mlp.c_proj are two groups.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tiedlora/core/method.h"

namespace tiedlora {

struct SelectionOptions {
  std::vector<std::string> targets;                             ///< patterns, or "all-linear"
  std::vector<std::string> exclude;                             ///< patterns
  std::vector<int64_t> layers;                                  ///< layer indices to keep; empty = all
  std::vector<std::string> output_heads = {"lm_head"};          ///< excluded by "all-linear"
  std::vector<std::pair<std::string, std::string>> tie_groups;  ///< (pattern, group name), first match wins
};

/// What selection needs to know of one module of the tree.
struct ModuleDescription {
  std::string name;
  std::string type_name;  ///< for messages ("torch::nn::Linear", "GPT2Block", ...)
  bool is_linear = false;
  LinearShape shape;  ///< meaningful when is_linear
};

/// Layers that share one A/B (tied), or are reported together (untied).
struct ModuleGroup {
  std::string name;
  LinearShape shape;
  std::vector<std::string> modules;  ///< in tree order
};

/// Returns true when `name` matches `pattern` (see the rules above; "all-linear" is not a pattern here).
bool name_matches(const std::string& name, const std::string& pattern);
/// The first purely numeric component of `name`, if any.
std::optional<int64_t> layer_index(const std::string& name);
/// `name` with its layer-index component replaced by "*".
std::string default_tie_group(const std::string& name);

/// Patterns as a command line gives them: "q_proj,v_proj" -> {"q_proj", "v_proj"} (empty items dropped).
std::vector<std::string> split_pattern_list(const std::string& comma_separated);

/// Selects and groups the linear modules of `modules` (in tree order). Throws tiedlora::ConfigError when
/// a target or exclude pattern matches nothing (with a hint listing real module names), when a plain
/// target names a module that is not a linear layer, when a requested layer index does not exist, when
/// nothing is selected, or when one group would hold layers of different shapes (naming both).
std::vector<ModuleGroup> select_modules(const std::vector<ModuleDescription>& modules, const SelectionOptions& options,
                                        const AdapterMethod& method);

}  // namespace tiedlora
