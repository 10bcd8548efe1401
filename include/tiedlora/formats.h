// tiedlora/formats.h: the formats layer (target tiedlora::formats; over the core): safetensors, GGUF, PEFT
// adapter folders (save_adapter, load_adapter, export_lora), Hugging Face checkpoint folders with their
// config.json, and merge_checkpoint (tiedlora merge-weights).
#pragma once

#include "tiedlora/core.h"
#include "tiedlora/formats/adapter.h"
#include "tiedlora/formats/adapter_config.h"
#include "tiedlora/formats/files.h"
#include "tiedlora/formats/gguf.h"
#include "tiedlora/formats/gguf_names.h"
#include "tiedlora/formats/gguf_tensor.h"
#include "tiedlora/formats/hf_config.h"
#include "tiedlora/formats/merge_checkpoint.h"
#include "tiedlora/formats/safetensors.h"

namespace tiedlora {
/// The formats layer's namespace before it was named after its folder and target; kept for one release.
namespace io = formats;
}  // namespace tiedlora
