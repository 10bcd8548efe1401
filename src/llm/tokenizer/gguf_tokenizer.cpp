// src/llm/tokenizer/gguf_tokenizer.cpp: BpeTokenizer from a GGUF file's tokenizer metadata.
//
// GGUF stores the vocabulary as tokenizer.ggml.tokens (id = index), the merges as "left right" strings, a
// type per token and the pre-tokenizer as a name (tokenizer.ggml.pre) that llama.cpp maps to its regexes.
// The name is mapped here to the Hugging Face pipeline the model was trained with, so the ids equal the
// original tokenizer.json's (for SmolLM2: Digits then ByteLevel, no unknown token: bytes missing from the
// vocabulary are dropped, as both tokenizers and llama.cpp do).
#include <string>

#include "tiedlora/core/error.h"
#include "tiedlora/formats/gguf.h"
#include "tiedlora/llm/tokenizer.h"

namespace tiedlora {

namespace {

// llama.cpp's token types (llama_token_type): 3 control (special), 4 user-defined (matched whole).
constexpr int64_t kTokenTypeControl = 3;
constexpr int64_t kTokenTypeUserDefined = 4;

PreTokenizer pre_tokenizer_for(const std::string& name, const std::string& path) {
  if (name == "default" || name == "gpt2" || name == "gpt-2") return PreTokenizer::kGpt2;
  if (name == "smollm" || name == "starcoder") return PreTokenizer::kDigitsThenGpt2;
  if (name == "llama-bpe" || name == "llama3") return PreTokenizer::kLlama3;
  if (name == "qwen2") return PreTokenizer::kQwen2;
  throw FormatError(path + ": metadata 'tokenizer.ggml.pre' is '" + name +
                    "', a pre-tokenizer tiedlora does not reproduce (hint: supported are default/gpt2, "
                    "smollm/starcoder, llama-bpe/llama3 and qwen2; the model's tokenizer.json may load instead)");
}

}  // namespace

BpeTokenizer BpeTokenizer::from_gguf(const formats::GgufFile& file) {
  const std::string& path = file.path();
  const std::string model = file.get_string("tokenizer.ggml.model");
  if (model != "gpt2") {
    throw FormatError(path + ": metadata 'tokenizer.ggml.model' is '" + model +
                      "', only 'gpt2' (byte-level BPE) is supported (hint: 'llama' is a SentencePiece vocabulary)");
  }
  BpeTokenizerConfig config;
  config.source = path;
  config.vocab = file.get_strings("tokenizer.ggml.tokens");
  const std::string pre = file.get_string("tokenizer.ggml.pre", "default");
  config.pre_tokenizer = pre_tokenizer_for(pre, path);
  config.ignore_merges = config.pre_tokenizer == PreTokenizer::kLlama3;  // as llama.cpp and Llama 3's tokenizer.json
  if (file.has_key("tokenizer.ggml.merges")) {
    const auto& merges = file.get_strings("tokenizer.ggml.merges");
    config.merges.reserve(merges.size());
    for (std::size_t i = 0; i < merges.size(); ++i) {
      const std::string& m = merges[i];
      const auto space = m.find(' ');
      if (space == std::string::npos || space == 0 || space + 1 == m.size() ||
          m.find(' ', space + 1) != std::string::npos) {
        throw FormatError(path + ": metadata 'tokenizer.ggml.merges' element " + std::to_string(i) + " '" +
                          m.substr(0, 100) + "' is not \"<left> <right>\"");
      }
      config.merges.emplace_back(m.substr(0, space), m.substr(space + 1));
    }
  }
  if (file.has_key("tokenizer.ggml.token_type")) {
    const auto types = file.get_ints("tokenizer.ggml.token_type");
    if (types.size() != config.vocab.size()) {
      throw FormatError(path + ": metadata 'tokenizer.ggml.token_type' has " + std::to_string(types.size()) +
                        " entries for " + std::to_string(config.vocab.size()) + " tokens");
    }
    for (std::size_t id = 0; id < types.size(); ++id) {
      if (types[id] == kTokenTypeControl || types[id] == kTokenTypeUserDefined) {
        AddedToken t;
        t.content = config.vocab[id];
        t.id = static_cast<TokenId>(id);
        t.special = types[id] == kTokenTypeControl;
        if (!t.content.empty()) config.added_tokens.push_back(std::move(t));
      }
    }
  }
  auto id_key = [&](const char* key) -> std::optional<TokenId> {
    if (!file.has_key(key)) return std::nullopt;
    const uint64_t id = file.get_uint(key);
    if (id >= config.vocab.size()) {
      throw FormatError(path + ": metadata '" + key + "' is " + std::to_string(id) + ", outside the vocabulary of " +
                        std::to_string(config.vocab.size()) + " tokens");
    }
    return static_cast<TokenId>(id);
  };
  config.bos_id = id_key("tokenizer.ggml.bos_token_id");
  config.eos_id = id_key("tokenizer.ggml.eos_token_id");
  id_key("tokenizer.ggml.unknown_token_id");  // validated only: byte-level BPE drops unknown bytes (see above)
  if (file.get_bool("tokenizer.ggml.add_bos_token", false) && config.bos_id)
    config.prefix_ids.push_back(*config.bos_id);
  if (file.get_bool("tokenizer.ggml.add_eos_token", false) && config.eos_id)
    config.suffix_ids.push_back(*config.eos_id);
  return BpeTokenizer(std::move(config));
}

BpeTokenizer BpeTokenizer::from_gguf(const std::string& path) { return from_gguf(formats::GgufFile::open(path)); }

}  // namespace tiedlora
