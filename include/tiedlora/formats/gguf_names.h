// tiedlora/formats/gguf_names.h: what llama.cpp's names mean to Hugging Face: a GGUF file's Llama metadata
// as a ModelConfig (the config.json it stands for) and its tensor names as Hugging Face's. Format knowledge
// only; building and filling the model is tiedlora::llm::models::load_gguf_model's.
#pragma once

#include <string>

#include "tiedlora/formats/gguf.h"
#include "tiedlora/formats/hf_config.h"

namespace tiedlora::formats {

/// The ModelConfig of a Llama-architecture GGUF file, from its metadata (llama.* keys, the tokenizer's
/// bos/eos ids; the head is tied when the file has no output.weight). Its json_text is the config.json that
/// save_pretrained writes. Throws tiedlora::FormatError naming `path` for another general.architecture.
ModelConfig model_config_of_gguf(const GgufFile& file, const std::string& path);

/// The Hugging Face name of llama.cpp tensor `gguf_name` ("blk.3.attn_q.weight" ->
/// "model.layers.3.self_attn.q_proj.weight"), or "" for a name Llama models do not have.
std::string hf_name_of_gguf_tensor(const std::string& gguf_name);

}  // namespace tiedlora::formats
