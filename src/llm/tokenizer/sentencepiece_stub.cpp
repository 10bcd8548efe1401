// src/llm/tokenizer/sentencepiece_stub.cpp: SentencePieceTokenizer in builds without libsentencepiece
// (TIEDLORA_SENTENCEPIECE=OFF or not found): from_file throws a clear error, so no object ever exists and
// the other members are unreachable.
#include "tiedlora/core/error.h"
#include "tiedlora/llm/tokenizer.h"

namespace tiedlora {

struct SentencePieceTokenizer::Impl {};

bool sentencepiece_available() { return false; }

SentencePieceTokenizer SentencePieceTokenizer::from_file(const std::string& model_path) {
  throw FormatError(model_path +
                    ": this build of tiedlora has no SentencePiece support (hint: install "
                    "libsentencepiece-dev and reconfigure with -DTIEDLORA_SENTENCEPIECE=ON)");
}

namespace {
[[noreturn]] void unreachable() { throw Error("tiedlora::SentencePieceTokenizer: built without SentencePiece"); }
}  // namespace

std::vector<TokenId> SentencePieceTokenizer::encode(std::string_view, bool) const { unreachable(); }
std::string SentencePieceTokenizer::decode(const std::vector<TokenId>&, bool) const { unreachable(); }
std::size_t SentencePieceTokenizer::vocab_size() const { unreachable(); }
std::optional<TokenId> SentencePieceTokenizer::token_to_id(std::string_view) const { unreachable(); }
const std::string& SentencePieceTokenizer::id_to_token(TokenId) const { unreachable(); }
std::optional<TokenId> SentencePieceTokenizer::bos_id() const { unreachable(); }
std::optional<TokenId> SentencePieceTokenizer::eos_id() const { unreachable(); }

}  // namespace tiedlora
