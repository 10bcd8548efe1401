// tiedlora/formats/adapter_config.h: adapter_config.json of the three adapter types tiedlora reads, and of the two
// it writes. Torch-free (the fuzz target drives parse_adapter_config).
//
//   LORA      PEFT's LoRA (read and written in PEFT's exact layout)
//   VERA      PEFT's VeRA (read: it is the tied-uv configuration with shared frozen A/B sliced per layer)
//   TIEDLORA  tiedlora's own Tied-LoRA type (read and written; docs/adapter-format.md)
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "tiedlora/core/method.h"

namespace tiedlora {

enum class AdapterType { lora, vera, tiedlora };

/// One tie group of a TIEDLORA adapter.
struct AdapterGroup {
  std::string name;                  ///< e.g. "model.layers.*.self_attn.q_proj"
  std::string key;                   ///< tensor-name key of its shared A/B ("model-layers-*-self_attn-q_proj")
  std::vector<std::string> modules;  ///< module paths, HF names
};

struct AdapterConfig {
  AdapterType type = AdapterType::lora;
  AdapterMethod method;  ///< lora for LORA, tied-uv for VERA
  int64_t rank = 8;
  double alpha = 8;  ///< lora_alpha; VERA: equal to rank (VeRA has no scaling)
  bool use_rslora = false;
  double dropout = 0.0;
  bool fan_in_fan_out = false;  ///< targets store W as (in, out) (GPT-2 Conv1D)
  std::vector<std::string> target_modules;
  std::vector<std::string> exclude_modules;  ///< PEFT's exclude_modules (a list, or a "re:" regex)
  std::string base_model_name_or_path;
  std::optional<uint64_t> init_seed;  ///< TIEDLORA: the seed the adapter was initialised with
  std::vector<AdapterGroup> groups;   ///< TIEDLORA only
  /// LORA: per-module rank / alpha overrides (PEFT's rank_pattern / alpha_pattern, pattern -> value), in
  /// the file's order: the first key that matches a module wins, as in PEFT.
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  bool vera_save_projection = true;  ///< VERA: the shared A/B are in the file

  /// The scale of module `module` whose A has `rank` rows (LORA honours rank/alpha patterns).
  double scale_for(const std::string& module, int64_t rank) const;
  /// Whether target_modules selects `module` and exclude_modules does not (PEFT's
  /// check_target_module_exists: a list entry equals the name or a dot-separated suffix of it; a string is
  /// a full-match Python regex). True when target_modules is empty.
  bool targets(const std::string& module) const;
  /// target_modules as written in the file, for messages.
  std::string target_modules_text() const;
};

/// Parses adapter_config.json text. `source` names the file in messages. Throws tiedlora::FormatError for
/// malformed JSON or fields, and for PEFT features tiedlora does not implement (DoRA, modules_to_save,
/// trainable bias, embedding or convolution targets, ...), naming the field, with a hint.
AdapterConfig parse_adapter_config(const std::string& text, const std::string& source);

/// The JSON text tiedlora writes for `config` (PEFT's LoRA field set for LORA; the documented TIEDLORA
/// fields otherwise). Throws tiedlora::Error for VERA (tiedlora does not write VeRA).
std::string adapter_config_json(const AdapterConfig& config);

/// PEFT's pattern rule for rank_pattern / alpha_pattern keys: `module` ends with the pattern at a dot
/// boundary, the pattern read as a Python regular expression (re.match(rf"(.*\.)?({pattern})$", module)).
/// Patterns are translated exactly into std::regex (util/python_regex.h) or refused: parse_adapter_config
/// refuses a file with such a key, and this function throws tiedlora::FormatError naming the pattern.
bool peft_pattern_matches(const std::string& module, const std::string& pattern);

}  // namespace tiedlora
