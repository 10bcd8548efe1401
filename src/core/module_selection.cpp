// module_selection.cpp: pattern matching, layer indices and tie groups (see module_selection.h).
#include "tiedlora/core/module_selection.h"

#include <algorithm>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include "tiedlora/core/error.h"

namespace tiedlora {
namespace {

constexpr const char* kAllLinear = "all-linear";
constexpr const char* kRegexPrefix = "re:";

bool is_regex(const std::string& pattern) { return pattern.rfind(kRegexPrefix, 0) == 0; }

std::vector<std::string> split_dots(const std::string& name) {
  std::vector<std::string> parts;
  std::string part;
  std::istringstream stream(name);
  while (std::getline(stream, part, '.')) parts.push_back(part);
  return parts;
}

bool is_number(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

std::string shape_text(LinearShape shape) {
  return std::to_string(shape.in_features) + " -> " + std::to_string(shape.out_features);
}

// A hint for a pattern that matched nothing: a few real linear-layer names, distinct after the layer index
// is taken out, so the user sees how names are spelt.
std::string name_hint(const std::vector<ModuleDescription>& modules) {
  std::vector<std::string> examples;
  std::set<std::string> seen;
  for (const auto& m : modules) {
    if (!m.is_linear || !seen.insert(default_tie_group(m.name)).second) continue;
    examples.push_back("'" + m.name + "'");
    if (examples.size() == 8) break;
  }
  if (examples.empty()) return "the model has no linear layers";
  std::string hint = "linear layers look like ";
  for (std::size_t i = 0; i < examples.size(); ++i) hint += (i ? ", " : "") + examples[i];
  return hint;
}

}  // namespace

bool name_matches(const std::string& name, const std::string& pattern) {
  if (is_regex(pattern)) {
    try {
      return std::regex_match(name, std::regex(pattern.substr(3), std::regex::ECMAScript));
    } catch (const std::regex_error& e) {
      throw ConfigError("pattern '" + pattern + "' is not a valid regular expression: " + e.what());
    }
  }
  if (pattern.empty()) return false;
  if (name == pattern) return true;
  return name.size() > pattern.size() && name.compare(name.size() - pattern.size(), pattern.size(), pattern) == 0 &&
         name[name.size() - pattern.size() - 1] == '.';
}

std::optional<int64_t> layer_index(const std::string& name) {
  for (const auto& part : split_dots(name)) {
    if (is_number(part) && part.size() < 18) return std::stoll(part);
  }
  return std::nullopt;
}

std::string default_tie_group(const std::string& name) {
  std::string out;
  bool replaced = false;
  for (const auto& part : split_dots(name)) {
    if (!out.empty()) out += '.';
    if (!replaced && is_number(part)) {
      out += '*';
      replaced = true;
    } else {
      out += part;
    }
  }
  return out;
}

std::vector<ModuleGroup> select_modules(const std::vector<ModuleDescription>& modules, const SelectionOptions& options,
                                        const AdapterMethod& method) {
  if (options.targets.empty()) {
    throw ConfigError("no target modules given (hint: name layers such as 'q_proj,v_proj', or 'all-linear'; " +
                      name_hint(modules) + ")");
  }
  if (!method.tied && !options.tie_groups.empty()) {
    throw ConfigError("tie groups were given but method '" + method.name() +
                      "' is untied (hint: use a tied-... method)");
  }
  const bool all_linear =
      std::find(options.targets.begin(), options.targets.end(), kAllLinear) != options.targets.end();

  std::map<std::string, bool> target_used, exclude_used;
  std::set<int64_t> existing_layers;
  std::vector<const ModuleDescription*> chosen;
  for (const auto& module : modules) {
    if (module.name.empty()) continue;  // the root
    if (module.is_linear) {
      if (auto index = layer_index(module.name)) existing_layers.insert(*index);
    }
    bool selected = false;
    for (const auto& target : options.targets) {
      if (target == kAllLinear) continue;
      if (!name_matches(module.name, target)) continue;
      if (!module.is_linear) {
        if (is_regex(target)) continue;  // a regex may sweep over containers; only linear layers count
        throw ConfigError("target '" + target + "' matches '" + module.name + "', a " + module.type_name +
                          ", not a linear layer (hint: target the linear layers inside it; " + name_hint(modules) +
                          ")");
      }
      target_used[target] = true;
      selected = true;
    }
    if (all_linear && module.is_linear) {
      const bool is_head = std::any_of(options.output_heads.begin(), options.output_heads.end(),
                                       [&](const std::string& head) { return name_matches(module.name, head); });
      if (!is_head) selected = true;
      target_used[kAllLinear] = true;
    }
    if (!selected) continue;
    bool excluded = false;
    for (const auto& pattern : options.exclude) {
      if (name_matches(module.name, pattern)) {
        exclude_used[pattern] = true;
        excluded = true;
      }
    }
    if (excluded) continue;
    if (!options.layers.empty()) {
      auto index = layer_index(module.name);
      if (!index || std::find(options.layers.begin(), options.layers.end(), *index) == options.layers.end()) continue;
    }
    chosen.push_back(&module);
  }

  for (const auto& target : options.targets) {
    if (!target_used.count(target)) {
      throw ConfigError("target '" + target + "' matches no " +
                        std::string(target == kAllLinear ? "linear layer" : "module") +
                        " (hint: " + name_hint(modules) + ")");
    }
  }
  for (const auto& pattern : options.exclude) {
    if (!exclude_used.count(pattern)) {
      throw ConfigError("exclude pattern '" + pattern + "' matches no selected module (hint: " + name_hint(modules) +
                        ")");
    }
  }
  for (int64_t index : options.layers) {
    if (!existing_layers.count(index)) {
      std::string range = existing_layers.empty()
                              ? "the model's layer names carry no index"
                              : "layer indices run from " + std::to_string(*existing_layers.begin()) + " to " +
                                    std::to_string(*existing_layers.rbegin());
      throw ConfigError("layer " + std::to_string(index) + " does not exist (" + range + ")");
    }
  }
  if (chosen.empty()) {
    throw ConfigError("the targets select no linear layer once exclusions and layer indices are applied");
  }

  std::vector<ModuleGroup> groups;
  std::map<std::string, std::size_t> group_index;
  for (const ModuleDescription* module : chosen) {
    std::string group = default_tie_group(module->name);
    for (const auto& [pattern, explicit_group] : options.tie_groups) {
      if (name_matches(module->name, pattern)) {
        group = explicit_group;
        break;
      }
    }
    auto [it, inserted] = group_index.emplace(group, groups.size());
    if (inserted) groups.push_back(ModuleGroup{group, module->shape, {}});
    ModuleGroup& g = groups[it->second];
    if (g.shape.in_features != module->shape.in_features || g.shape.out_features != module->shape.out_features) {
      throw ConfigError("tie group '" + group + "' mixes shapes: '" + g.modules.front() + "' is " +
                        shape_text(g.shape) + " but '" + module->name + "' is " + shape_text(module->shape) +
                        " (hint: layers sharing A and B must have the same shape; give them different groups)");
    }
    g.modules.push_back(module->name);
  }
  return groups;
}

std::vector<std::string> split_pattern_list(const std::string& comma_separated) {
  std::vector<std::string> out;
  std::stringstream stream(comma_separated);
  std::string item;
  while (std::getline(stream, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

}  // namespace tiedlora
