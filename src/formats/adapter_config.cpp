// adapter_config.cpp: reading and writing adapter_config.json (see tiedlora/formats/adapter_config.h). Torch-free.
#include "tiedlora/formats/adapter_config.h"

#include <cmath>
#include <regex>
#include <set>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "tiedlora/core/error.h"
#include "tiedlora/core/module_selection.h"
#include "util/python_regex.h"
#include "util/text.h"

namespace tiedlora {
namespace {

using nlohmann::json;

class Fields {
 public:
  Fields(const json& j, std::string source) : j_(j), source_(std::move(source)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }
  std::string string_or(const char* key, std::string fallback) const {
    if (!has(key)) return fallback;
    if (!j_.at(key).is_string()) fail(key, "must be a string");
    return j_.at(key).get<std::string>();
  }
  bool bool_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!j_.at(key).is_boolean()) fail(key, "must be true or false");
    return j_.at(key).get<bool>();
  }
  double probability_or(const char* key, double fallback) const {
    const double p = number_or(key, fallback);
    if (!(p >= 0.0 && p < 1.0)) fail(key, "must be in [0, 1), got " + std::to_string(p));
    return p;
  }
  double number_or(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    if (!j_.at(key).is_number() || !std::isfinite(j_.at(key).get<double>())) fail(key, "must be a finite number");
    return j_.at(key).get<double>();
  }
  int64_t positive_int(const char* key) const {
    if (!has(key)) fail(key, "is missing");
    const json& v = j_.at(key);
    if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() > (int64_t{1} << 20)) {
      fail(key, "must be a positive integer, got " + v.dump());
    }
    return v.get<int64_t>();
  }
  std::vector<std::string> modules(const char* key) const {
    std::vector<std::string> out;
    if (!has(key)) return out;
    const json& v = j_.at(key);
    if (v.is_string()) {  // PEFT: a string is a full-match regex (Python's dialect)
      try {
        util::compile_python_fullmatch(v.get<std::string>());
      } catch (const std::invalid_argument& e) {
        fail(key, "= " + util::quote_for_message(v.get<std::string>()) + " cannot be matched exactly: " + e.what() +
                      " (hint: tiedlora translates Python regular expressions into std::regex and refuses what it "
                      "cannot translate exactly; list the module names instead)");
      }
      return {"re:" + v.get<std::string>()};
    }
    if (!v.is_array()) fail(key, "must be a list of module names or a regex string");
    for (const auto& item : v) {
      if (!item.is_string()) fail(key, "must hold strings only");
      out.push_back(item.get<std::string>());
    }
    return out;
  }
  // A PEFT feature tiedlora does not implement: present with a non-default value is an error.
  void unsupported(const char* key, const json& default_value, const std::string& what) const {
    if (!has(key)) return;
    const json& v = j_.at(key);
    const bool empty = (v.is_object() || v.is_array()) && v.empty();
    if (v == default_value || empty) return;
    fail(key, "= " + v.dump() + ": " + what + " is not supported by tiedlora (hint: merge or convert it with PEFT)");
  }
  [[noreturn]] void fail(const std::string& key, const std::string& message) const {
    throw FormatError(source_ + ": field '" + key + "' " + message);
  }
  const json& raw() const { return j_; }
  const std::string& source() const { return source_; }

 private:
  const json& j_;
  std::string source_;
};

void read_common(const Fields& f, AdapterConfig& c) {
  c.rank = f.positive_int("r");
  c.fan_in_fan_out = f.bool_or("fan_in_fan_out", false);
  c.target_modules = f.modules("target_modules");
  c.exclude_modules = f.modules("exclude_modules");
  c.base_model_name_or_path = f.string_or("base_model_name_or_path", "");
  const std::string bias = f.string_or("bias", "none");
  if (bias != "none") f.fail("bias", "= \"" + bias + "\": trained biases are not supported by tiedlora");
  f.unsupported("modules_to_save", nullptr, "modules_to_save (fully trained extra modules)");
  f.unsupported("layers_to_transform", nullptr, "layers_to_transform in a saved adapter");
}

// rank_pattern / alpha_pattern in the file's order (PEFT takes the first key that matches, in the order of
// the dict json.load made, which is the file's), each key checked to be a pattern tiedlora runs exactly.
template <typename T>
std::vector<std::pair<std::string, T>> read_pattern(const Fields& f, const nlohmann::ordered_json& in_file_order,
                                                    const char* key) {
  std::vector<std::pair<std::string, T>> out;
  if (!f.has(key)) return out;
  const nlohmann::ordered_json& v = in_file_order.at(key);
  if (!v.is_object()) f.fail(key, "must be an object of pattern -> value");
  for (const auto& [pattern, value] : v.items()) {
    try {
      util::compile_peft_key_pattern(pattern);
    } catch (const std::invalid_argument& e) {
      f.fail(key, "key " + util::quote_for_message(pattern) + " cannot be matched exactly: " + e.what() +
                      " (hint: PEFT reads these keys as Python regular expressions; tiedlora translates them into "
                      "std::regex and refuses what it cannot translate exactly, rather than apply another scale)");
    }
    if constexpr (std::is_same_v<T, int64_t>) {
      if (!value.is_number_integer() || value.template get<int64_t>() <= 0)
        f.fail(key, "values must be positive integers");
      out.emplace_back(pattern, value.template get<int64_t>());
    } else {
      if (!value.is_number() || !std::isfinite(value.template get<double>()) || !(value.template get<double>() > 0)) {
        f.fail(key,
               "values must be positive finite numbers (a zero or negative alpha disables or inverts the "
               "adapter), got " +
                   value.dump() + " for key " + util::quote_for_message(pattern));
      }
      out.emplace_back(pattern, value.template get<double>());
    }
  }
  return out;
}

AdapterConfig read_lora(const Fields& f, const nlohmann::ordered_json& in_file_order) {
  AdapterConfig c;
  c.type = AdapterType::lora;
  c.method = AdapterMethod::lora();
  read_common(f, c);
  c.alpha = f.number_or("lora_alpha", 8.0);  // PEFT's default
  if (!(c.alpha > 0))
    f.fail("lora_alpha", "must be positive (a zero or negative alpha disables or inverts the adapter)");
  c.use_rslora = f.bool_or("use_rslora", false);
  c.dropout = f.probability_or("lora_dropout", 0.0);
  c.rank_pattern = read_pattern<int64_t>(f, in_file_order, "rank_pattern");
  c.alpha_pattern = read_pattern<double>(f, in_file_order, "alpha_pattern");
  f.unsupported("use_dora", false, "DoRA (use_dora)");
  f.unsupported("lora_bias", false, "lora_bias");
  f.unsupported("layer_replication", nullptr, "layer_replication");
  f.unsupported("target_parameters", nullptr, "target_parameters (LoRA on raw parameters)");
  f.unsupported("trainable_token_indices", nullptr, "trainable_token_indices");
  f.unsupported("alora_invocation_tokens", nullptr, "aLoRA (alora_invocation_tokens)");
  f.unsupported("use_qalora", false, "QA-LoRA (use_qalora)");
  f.unsupported("use_bdlora", nullptr, "use_bdlora");
  return c;
}

AdapterConfig read_vera(const Fields& f) {
  AdapterConfig c;
  c.type = AdapterType::vera;
  c.method = AdapterMethod::parse("tied-uv");
  read_common(f, c);
  c.alpha = static_cast<double>(c.rank);  // VeRA has no scaling: s = 1
  c.dropout = f.probability_or("vera_dropout", 0.0);
  c.vera_save_projection = f.bool_or("save_projection", true);
  return c;
}

AdapterConfig read_tiedlora(const Fields& f) {
  AdapterConfig c;
  c.type = AdapterType::tiedlora;
  const int64_t version = f.has("format_version") ? f.positive_int("format_version") : 0;
  if (version != 1) f.fail("format_version", "must be 1 (this tiedlora reads version 1 of its adapter format)");
  try {
    c.method = AdapterMethod::parse(f.string_or("method", ""));
  } catch (const ConfigError& e) {
    f.fail("method", std::string("is invalid: ") + e.what());
  }
  read_common(f, c);
  c.alpha = f.number_or("lora_alpha", static_cast<double>(c.rank));
  if (!(c.alpha > 0))
    f.fail("lora_alpha", "must be positive (a zero or negative alpha disables or inverts the adapter)");
  c.use_rslora = f.bool_or("use_rslora", false);
  c.dropout = f.probability_or("lora_dropout", 0.0);
  if (f.has("init_seed")) {
    const json& seed = f.raw().at("init_seed");
    if (!seed.is_number_unsigned()) f.fail("init_seed", "must be a non-negative integer or null");
    c.init_seed = seed.get<uint64_t>();
  }
  if (!f.has("tie_groups") || !f.raw().at("tie_groups").is_array() || f.raw().at("tie_groups").empty()) {
    f.fail("tie_groups", "must be a non-empty list of {name, key, modules}");
  }
  std::set<std::string> seen_modules, seen_keys;
  for (const auto& g : f.raw().at("tie_groups")) {
    Fields group(g, f.source());
    if (!g.is_object()) f.fail("tie_groups", "entries must be objects");
    AdapterGroup entry;
    entry.name = group.string_or("name", "");
    entry.key = group.string_or("key", "");
    entry.modules = group.modules("modules");
    if (entry.name.empty() || entry.key.empty() || entry.modules.empty()) {
      f.fail("tie_groups", "entries need a name, a key and a non-empty list of modules");
    }
    if (entry.key.find('.') != std::string::npos) f.fail("tie_groups", "key '" + entry.key + "' must not contain '.'");
    if (!seen_keys.insert(entry.key).second) f.fail("tie_groups", "key '" + entry.key + "' appears twice");
    for (const auto& m : entry.modules) {
      if (m.rfind("re:", 0) == 0) f.fail("tie_groups", "group '" + entry.name + "' lists a regex, not module names");
      if (!seen_modules.insert(m).second) f.fail("tie_groups", "module '" + m + "' is in two groups");
    }
    if (!c.method.tied && entry.modules.size() != 1) {
      f.fail("tie_groups", "group '" + entry.name + "' has " + std::to_string(entry.modules.size()) +
                               " modules but method '" + c.method.name() + "' is untied");
    }
    c.groups.push_back(std::move(entry));
  }
  return c;
}

json number(double value) {
  if (value == std::floor(value) && std::abs(value) < 1e15) return static_cast<int64_t>(value);
  return value;
}

}  // namespace

namespace {

// The translation is exact for module names of printable ASCII (Python's \w, \s and '.' see code points,
// std::regex bytes); other names are refused rather than matched differently.
void check_matchable(const std::string& module) {
  for (unsigned char c : module) {
    if (c < 0x20 || c > 0x7e) {
      throw FormatError("module name " + util::quote_for_message(module) +
                        " holds characters other than printable ASCII, which tiedlora cannot match against "
                        "adapter_config.json patterns exactly");
    }
  }
}

}  // namespace

bool peft_pattern_matches(const std::string& module, const std::string& pattern) {
  check_matchable(module);
  try {
    return std::regex_match(module, util::compile_peft_key_pattern(pattern));
  } catch (const std::invalid_argument& e) {
    throw FormatError("pattern " + util::quote_for_message(pattern) + " cannot be matched exactly: " + e.what());
  }
}

std::string AdapterConfig::target_modules_text() const {
  if (target_modules.size() == 1 && target_modules.front().rfind("re:", 0) == 0) {
    return util::quote_for_message(target_modules.front().substr(3));
  }
  std::string text = "[";
  for (std::size_t i = 0; i < target_modules.size(); ++i)
    text += (i ? ", " : "") + util::quote_for_message(target_modules[i]);
  return text + "]";
}

namespace {

// PEFT's rule for target_modules and exclude_modules: a string (stored as "re:...") is a full-match regex,
// a list entry matches the name itself or a dot-separated suffix of it.
bool selected_by(const std::vector<std::string>& patterns, const std::string& module) {
  for (const auto& pattern : patterns) {
    if (pattern.rfind("re:", 0) == 0) {
      check_matchable(module);
      if (std::regex_match(module, util::compile_python_fullmatch(pattern.substr(3)))) return true;
      continue;
    }
    if (name_matches(module, pattern)) return true;  // the name itself or a dot-separated suffix
  }
  return false;
}

}  // namespace

bool AdapterConfig::targets(const std::string& module) const {
  if (target_modules.empty()) return true;  // no list to check against
  return selected_by(target_modules, module) && !selected_by(exclude_modules, module);
}

double AdapterConfig::scale_for(const std::string& module, int64_t layer_rank) const {
  double a = alpha;
  for (const auto& [pattern, value] : alpha_pattern) {
    if (peft_pattern_matches(module, pattern)) {
      a = value;
      break;
    }
  }
  return adapter_scale(a, layer_rank, use_rslora);
}

AdapterConfig parse_adapter_config(const std::string& text, const std::string& source) {
  const json j = util::parse_json_strict(text, source);
  if (!j.is_object()) throw FormatError(source + ": adapter_config.json must be a JSON object");
  Fields f(j, source);
  const auto in_file_order = nlohmann::ordered_json::parse(text);  // valid: parse_json_strict accepted it
  if (!f.has("peft_type")) f.fail("peft_type", "is missing (hint: is this a PEFT or tiedlora adapter folder?)");
  const std::string type = f.string_or("peft_type", "");
  if (type == "LORA") return read_lora(f, in_file_order);
  if (type == "VERA") return read_vera(f);
  if (type == "TIEDLORA") return read_tiedlora(f);
  f.fail("peft_type", "= \"" + type + "\" is not supported (tiedlora reads LORA, VERA and TIEDLORA adapters)");
}

std::string adapter_config_json(const AdapterConfig& c) {
  json j;
  j["base_model_name_or_path"] = c.base_model_name_or_path.empty() ? json(nullptr) : json(c.base_model_name_or_path);
  j["bias"] = "none";
  j["fan_in_fan_out"] = c.fan_in_fan_out;
  j["inference_mode"] = true;
  j["lora_alpha"] = number(c.alpha);
  j["lora_dropout"] = c.dropout;
  j["r"] = c.rank;
  j["target_modules"] = c.target_modules;
  j["use_rslora"] = c.use_rslora;
  j["modules_to_save"] = nullptr;
  if (c.type == AdapterType::lora) {
    json ranks = json::object(), alphas = json::object();
    for (const auto& [p, v] : c.rank_pattern) ranks[p] = v;
    for (const auto& [p, v] : c.alpha_pattern) alphas[p] = number(v);
    j["peft_type"] = "LORA";
    j["alpha_pattern"] = alphas;
    j["rank_pattern"] = ranks;
    j["init_lora_weights"] = true;
    j["layers_pattern"] = nullptr;
    j["layers_to_transform"] = nullptr;
    j["revision"] = nullptr;
    j["task_type"] = nullptr;
    j["use_dora"] = false;
  } else if (c.type == AdapterType::tiedlora) {
    j["peft_type"] = "TIEDLORA";
    j["format_version"] = 1;
    j["method"] = c.method.name();
    j["init_seed"] = c.init_seed ? json(*c.init_seed) : json(nullptr);
    json groups = json::array();
    for (const auto& g : c.groups) groups.push_back({{"name", g.name}, {"key", g.key}, {"modules", g.modules}});
    j["tie_groups"] = groups;
  } else {
    throw Error("tiedlora writes LORA and TIEDLORA adapters, not VERA (hint: export it as LoRA)");
  }
  return j.dump(2) + "\n";  // nlohmann's object keys are sorted, as PEFT's json.dump(sort_keys=True)
}

}  // namespace tiedlora
