// tiedlora/llm/tokenizer.h: text <-> token ids for the models tiedlora runs, torch-free.
//
// BpeTokenizer is byte-level BPE as GPT-2, Llama 3 and SmolLM2 use it. It loads
//   - GPT-2's vocab.json + merges.txt (from_vocab_and_merges),
//   - a Hugging Face tokenizer.json whose model is BPE with a byte-level pre-tokenizer (from_tokenizer_json),
//   - a GGUF file's tokenizer metadata (from_gguf), or vectors built by any other reader (the constructor),
// and produces the same ids as the Python `tokenizers` package: special tokens are matched whole first
// (leftmost-longest), the rest is pre-tokenized by hand-written equivalents of the tokenizers regexes with
// Unicode classes measured on tokenizers itself, then merged with tokenizers' exact BPE algorithm.
// decode() inverts the byte-level mapping, so decode(encode(text)) == text for any text whose bytes all
// exist in the vocabulary. SentencePieceTokenizer wraps the system's libsentencepiece for Llama 2's
// tokenizer.model (optional at build time). See docs/tokenizers.md for what is supported and how it is verified.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

// The chat templates and prompt formats (ChatMessage, apply_chatml_template, ...) come with the tokenizers.
#include "tiedlora/llm/chat.h"

namespace tiedlora {

namespace formats {
class GgufFile;
}

using TokenId = int64_t;

/// Interface shared by every tokenizer tiedlora loads (load_tokenizer returns one).
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  /// Token ids of `text`. `add_special_tokens` adds what the tokenizer's post-processor adds (a BOS for
  /// Llama 3's tokenizer.json or a GGUF with add_bos_token; nothing for GPT-2 or SmolLM2). Note that the
  /// Python package's encode() defaults to true; chat templates already contain their special tokens.
  virtual std::vector<TokenId> encode(std::string_view text, bool add_special_tokens = false) const = 0;
  /// The bytes the ids stand for (raw bytes: a cut in the middle of a UTF-8 character is kept as is, where
  /// the Python package shows U+FFFD: valid_utf8() gives its text). `skip_special_tokens` drops special tokens
  /// as HF's does.
  virtual std::string decode(const std::vector<TokenId>& ids, bool skip_special_tokens = false) const = 0;
  virtual std::size_t vocab_size() const = 0;
  /// The id of a token given by its vocabulary string (byte-level alphabet for BPE), if it exists.
  virtual std::optional<TokenId> token_to_id(std::string_view token) const = 0;
  /// The vocabulary string of an id; throws std::out_of_range for ids the vocabulary lacks.
  virtual const std::string& id_to_token(TokenId id) const = 0;
  virtual std::optional<TokenId> bos_id() const = 0;
  virtual std::optional<TokenId> eos_id() const = 0;
};

/// `bytes` made valid UTF-8: each maximal invalid subsequence (a byte that cannot start a character, or the
/// start of a character cut short, such as an emoji cut by a token limit) becomes one U+FFFD, as the Python
/// tokenizers package's decode() and Rust's String::from_utf8_lossy give it. What decode() returns is raw
/// bytes; text that leaves tiedlora (printed, written to JSON) goes through this, and token ids stay as they are.
std::string valid_utf8(std::string_view bytes);

/// How text is cut into pieces before BPE, i.e. the tokenizers package's pre_tokenizer.
enum class PreTokenizer {
  /// ByteLevel(use_regex=true): GPT-2's regex
  /// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kGpt2,
  /// Sequence[Digits(individual_digits=true), ByteLevel(use_regex=true)]: SmolLM / SmolLM2, StarCoder.
  kDigitsThenGpt2,
  /// Sequence[Split(<Llama 3 regex>, isolated), ByteLevel(use_regex=false)]: Llama 3, with \p{N}{1,3}.
  kLlama3,
  /// Sequence[Split(<Qwen2 regex>, isolated), ByteLevel(use_regex=false)]: as Llama 3 with single digits.
  kQwen2,
  /// ByteLevel(use_regex=false) alone: no splitting, each special-token-free segment is one piece.
  kNone,
};
const char* pre_tokenizer_name(PreTokenizer pre_tokenizer);

/// A token matched whole in the text before pre-tokenization (HF "added_tokens"; GGUF control and
/// user-defined tokens).
struct AddedToken {
  std::string content;
  TokenId id = 0;
  bool special = true;      ///< special tokens are skipped by decode(skip_special_tokens=true)
  bool lstrip = false;      ///< the match swallows whitespace on its left
  bool rstrip = false;      ///< the match swallows whitespace on its right
  bool normalized = false;  ///< matched after non-normalized ones, in the gaps they leave (HF's two passes)
};

/// Everything that defines a byte-level BPE tokenizer. Readers of other formats fill one and construct
/// BpeTokenizer from it.
struct BpeTokenizerConfig {
  /// vocab[id] = token string in the byte-level alphabet. Ids a vocabulary skips may be left empty
  /// (`has_id` false); added tokens may also live past the end.
  std::vector<std::string> vocab;
  /// Merge rules in priority order ("Ġ t" is {"Ġ", "t"}); rank = position.
  std::vector<std::pair<std::string, std::string>> merges;
  std::vector<AddedToken> added_tokens;
  PreTokenizer pre_tokenizer = PreTokenizer::kGpt2;
  bool add_prefix_space = false;  ///< ByteLevel's add_prefix_space: a space before each segment lacking one
  bool ignore_merges = false;     ///< a piece that is itself a token is emitted whole (Llama 3)
  bool byte_fallback = false;     ///< unknown characters become <0xXX> tokens when those exist
  std::optional<TokenId> unk_id;  ///< unknown characters become this; none: they are dropped, as HF does
  bool fuse_unk = false;          ///< consecutive unknown characters give one unk_id
  std::optional<TokenId> bos_id, eos_id;
  std::vector<TokenId> prefix_ids, suffix_ids;  ///< added around the ids when add_special_tokens is true
  std::string source = "<memory>";              ///< names the origin in error messages
};

/// Byte-level BPE, identical in ids to the Python `tokenizers` package (see the file comment).
/// encode() is thread-safe; a cache keeps the merges of recently seen pieces. Copies are cheap and share
/// the immutable tables.
class BpeTokenizer : public Tokenizer {
 public:
  /// Validates the config (every merge's parts and result in the vocabulary, added-token ids in range,
  /// no duplicate tokens); throws tiedlora::FormatError naming `config.source` and the entry.
  explicit BpeTokenizer(BpeTokenizerConfig config);

  /// GPT-2's files (vocab.json = encoder.json, merges.txt = vocab.bpe). `special_tokens` that exist in
  /// the vocabulary are matched whole, as transformers' GPT2TokenizerFast does with <|endoftext|>.
  static BpeTokenizer from_vocab_and_merges(const std::string& vocab_json_path, const std::string& merges_txt_path,
                                            const std::vector<std::string>& special_tokens = {"<|endoftext|>"});
  /// A Hugging Face tokenizer.json with a BPE model and a supported pre-tokenizer (see PreTokenizer);
  /// anything else (normalizers, Metaspace, unknown regexes) is refused with a FormatError naming the key.
  static BpeTokenizer from_tokenizer_json(const std::string& path);
  /// The tokenizer in a GGUF file's metadata (tokenizer.ggml.model "gpt2"; tokenizer.ggml.pre picks the
  /// pre-tokenizer: "gpt2"/"default", "smollm"/"starcoder", "llama-bpe"/"llama3", "qwen2").
  static BpeTokenizer from_gguf(const formats::GgufFile& file);
  static BpeTokenizer from_gguf(const std::string& path);

  std::vector<TokenId> encode(std::string_view text, bool add_special_tokens = false) const override;
  std::string decode(const std::vector<TokenId>& ids, bool skip_special_tokens = false) const override;
  std::size_t vocab_size() const override;
  std::optional<TokenId> token_to_id(std::string_view token) const override;
  const std::string& id_to_token(TokenId id) const override;
  std::optional<TokenId> bos_id() const override;
  std::optional<TokenId> eos_id() const override;

  bool has_id(TokenId id) const;
  bool is_special(TokenId id) const;
  /// The pieces the pre-tokenizer cuts `text` into (no special-token matching), as UTF-8, before the
  /// byte-level mapping: what tokenizers' pre_tokenize_str returns, mapped back to bytes.
  std::vector<std::string> pre_tokenize(std::string_view text) const;
  const BpeTokenizerConfig& config() const;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;  // immutable after construction; copies share it (and its cache)
};

/// SentencePiece (Llama 2's tokenizer.model) through the system's libsentencepiece. Ids are those of
/// sentencepiece's own encoder (Python's SentencePieceProcessor.encode): control tokens written in the text
/// (e.g. "<s>") are not matched, as in sentencepiece. add_special_tokens puts the BOS first, as Hugging
/// Face's Llama tokenizer does; decode writes control tokens' text unless skip_special_tokens.
/// Only in builds with libsentencepiece (sentencepiece_available()); elsewhere from_file throws.
class SentencePieceTokenizer : public Tokenizer {
 public:
  static SentencePieceTokenizer from_file(const std::string& model_path);

  std::vector<TokenId> encode(std::string_view text, bool add_special_tokens = false) const override;
  std::string decode(const std::vector<TokenId>& ids, bool skip_special_tokens = false) const override;
  std::size_t vocab_size() const override;
  std::optional<TokenId> token_to_id(std::string_view token) const override;
  const std::string& id_to_token(TokenId id) const override;
  std::optional<TokenId> bos_id() const override;
  std::optional<TokenId> eos_id() const override;

 private:
  struct Impl;
  std::shared_ptr<const Impl> impl_;
};

/// Whether this build of tiedlora reads SentencePiece models (CMake option TIEDLORA_SENTENCEPIECE).
bool sentencepiece_available();

/// A Hugging Face folder (tokenizer.json, else vocab.json + merges.txt, else a SentencePiece tokenizer.model;
/// bos/eos names from tokenizer_config.json when present), a tokenizer.json or .model file, or a .gguf file.
std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path);

}  // namespace tiedlora
