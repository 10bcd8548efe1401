// src/llm/tokenizer/sentencepiece_tokenizer.cpp: SentencePieceTokenizer on the system's libsentencepiece (built
// when CMake finds it, see cmake/TiedloraSentencePiece.cmake; sentencepiece_stub.cpp otherwise). The model
// file carries its own normalizer and algorithm, so encoding is sentencepiece's own; this file only adapts
// the interface and turns sentencepiece's status codes into tiedlora errors.
#include <sentencepiece_processor.h>

#include "tiedlora/core/error.h"
#include "tiedlora/llm/tokenizer.h"

namespace tiedlora {

struct SentencePieceTokenizer::Impl {
  std::string path;
  sentencepiece::SentencePieceProcessor processor;
};

bool sentencepiece_available() { return true; }

SentencePieceTokenizer SentencePieceTokenizer::from_file(const std::string& model_path) {
  auto impl = std::make_shared<Impl>();
  impl->path = model_path;
  const auto status = impl->processor.Load(model_path);
  if (!status.ok()) {
    throw FormatError(model_path + ": not a SentencePiece model: " + status.ToString() +
                      " (hint: Llama 2's tokenizer.model is one; tokenizer.json files load with BpeTokenizer)");
  }
  SentencePieceTokenizer tokenizer;
  tokenizer.impl_ = std::move(impl);
  return tokenizer;
}

std::vector<TokenId> SentencePieceTokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::vector<int> ids;
  const auto status = impl_->processor.Encode(text, &ids);
  if (!status.ok()) throw Error(impl_->path + ": SentencePiece encoding failed: " + status.ToString());
  std::vector<TokenId> out;
  out.reserve(ids.size() + 1);
  if (add_special_tokens && impl_->processor.bos_id() >= 0) out.push_back(impl_->processor.bos_id());
  out.insert(out.end(), ids.begin(), ids.end());
  return out;
}

std::string SentencePieceTokenizer::decode(const std::vector<TokenId>& ids, bool skip_special_tokens) const {
  const auto& sp = impl_->processor;
  std::string out;
  std::vector<int> run;  // ids between control tokens, decoded together (pieces join across them)
  auto flush = [&] {
    if (run.empty()) return;
    std::string text;
    const auto status = sp.Decode(run, &text);
    if (!status.ok()) throw Error(impl_->path + ": SentencePiece decoding failed: " + status.ToString());
    out += text;
    run.clear();
  };
  for (TokenId id : ids) {
    if (id < 0 || id >= sp.GetPieceSize()) {
      throw Error(impl_->path + ": decode: token id " + std::to_string(id) + " is not in the vocabulary (size " +
                  std::to_string(sp.GetPieceSize()) + ")");
    }
    if (sp.IsControl(static_cast<int>(id))) {
      flush();
      if (!skip_special_tokens) out += sp.IdToPiece(static_cast<int>(id));
      continue;
    }
    run.push_back(static_cast<int>(id));
  }
  flush();
  return out;
}

std::size_t SentencePieceTokenizer::vocab_size() const {
  return static_cast<std::size_t>(impl_->processor.GetPieceSize());
}

std::optional<TokenId> SentencePieceTokenizer::token_to_id(std::string_view token) const {
  const int id = impl_->processor.PieceToId(token);
  // PieceToId answers unk_id for unknown pieces; only the unknown piece itself maps there.
  if (id == impl_->processor.unk_id() && impl_->processor.IdToPiece(id) != token) return std::nullopt;
  return id;
}

const std::string& SentencePieceTokenizer::id_to_token(TokenId id) const {
  if (id < 0 || id >= impl_->processor.GetPieceSize()) {
    throw std::out_of_range("tiedlora::SentencePieceTokenizer: no token has id " + std::to_string(id));
  }
  return impl_->processor.IdToPiece(static_cast<int>(id));
}

std::optional<TokenId> SentencePieceTokenizer::bos_id() const {
  const int id = impl_->processor.bos_id();
  return id >= 0 ? std::optional<TokenId>(id) : std::nullopt;
}

std::optional<TokenId> SentencePieceTokenizer::eos_id() const {
  const int id = impl_->processor.eos_id();
  return id >= 0 ? std::optional<TokenId>(id) : std::nullopt;
}

}  // namespace tiedlora
