// load_gguf.cpp: a Llama model from a GGUF file (llama.cpp's format): built from the file's metadata
// (tiedlora/formats/gguf_names.h), every tensor mapped and checked before any is copied, dequantized one at a
// time and Q/K rows un-permuted back to Hugging Face's RoPE layout.
#include <map>
#include <set>
#include <sstream>

#include <ATen/ATen.h>

#include "llm/models/decoder.h"
#include "tiedlora/core/error.h"
#include "tiedlora/formats/gguf.h"
#include "tiedlora/formats/gguf_names.h"
#include "tiedlora/formats/gguf_tensor.h"

namespace tiedlora::llm::models {

std::shared_ptr<CausalLM> load_gguf_model(const std::string& path, at::ScalarType dtype) {
  const formats::GgufFile file = formats::GgufFile::open(path);
  const ModelConfig config = formats::model_config_of_gguf(file, path);
  const int64_t heads = config.num_heads, kv_heads = config.num_kv_heads;
  // Built in the requested dtype: each tensor is dequantized to fp32 alone and converted as it is copied,
  // so a bf16 load never holds an fp32 model.
  auto model = build_model_from(config, dtype);

  // Map every tensor first, so that a file that does not fit is refused before anything is copied.
  std::map<std::string, std::string> source_of;  // HF name -> GGUF name
  std::vector<std::string> unexpected;
  for (const auto& info : file.tensors()) {
    const std::string hf = formats::hf_name_of_gguf_tensor(info.name);
    if (hf.empty()) {
      if (info.name != "rope_freqs.weight") unexpected.push_back(info.name);  // llama.cpp's cache of inv_freq
      continue;
    }
    source_of[hf] = info.name;
  }
  std::vector<std::string> missing;
  std::set<const void*> seen;
  const auto params = model->named_parameters();
  for (const auto& item : params) {
    if (!seen.insert(item.value().unsafeGetTensorImpl()).second) continue;  // the tied head
    if (!source_of.count(item.key())) missing.push_back(item.key());
  }
  for (auto it = source_of.begin(); it != source_of.end();) {  // e.g. blk.N.* beyond block_count
    if (params.contains(it->first)) {
      ++it;
    } else {
      unexpected.push_back(it->second);
      it = source_of.erase(it);
    }
  }
  if (!missing.empty() || !unexpected.empty()) {
    std::string message = path + ": the GGUF does not fit a Llama model of its own metadata;";
    for (const auto& m : missing) message += " missing '" + m + "'";
    for (const auto& u : unexpected) message += " unexpected '" + u + "'";
    throw FormatError(message + " (hint: is it a Llama-architecture file written by llama.cpp's converter?)");
  }
  at::NoGradGuard no_grad;
  for (const auto& [hf, gguf] : source_of) {
    at::Tensor value = formats::load_gguf_tensor(file, gguf, at::kFloat);
    // llama.cpp permutes Q and K rows for its RoPE; HF's rotate_half layout needs them back.
    if (hf.find("self_attn.q_proj.weight") != std::string::npos) value = formats::unpermute_llama_qk_rows(value, heads);
    if (hf.find("self_attn.k_proj.weight") != std::string::npos)
      value = formats::unpermute_llama_qk_rows(value, kv_heads);
    const at::Tensor& param = params[hf];
    if (value.sizes() != param.sizes()) {
      std::ostringstream msg;
      msg << path << ": tensor '" << gguf << "' is " << value.sizes() << " but '" << hf << "' needs " << param.sizes();
      throw FormatError(msg.str());
    }
    param.copy_(value);
  }
  return model;
}

}  // namespace tiedlora::llm::models
