// src/llm/tokenizer/pre_tokenize.h: internal to the tokenizer: UTF-8 decoding, the character classes measured on
// the tokenizers package (unicode_table.inc) and hand-written equivalents of the pre-tokenizer regexes.
//
// Why by hand: tokenizers matches its regexes with Oniguruma (backtracking, lookahead), and a regex library
// with other Unicode tables or without lookahead would cut text differently. Each splitter below follows the
// alternation of one regex, alternative by alternative, with the backtracking resolved analytically; the
// comments say which alternative each branch is. The tests compare the pieces with tokenizers'
// pre_tokenize_str on megabytes of text and on every code point.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace tiedlora::tokenizer_detail {

enum CharClass : uint8_t {
  kLetter = 1,   // Oniguruma \p{L}
  kNumber = 2,   // Oniguruma \p{N}
  kSpace = 4,    // Oniguruma \s (= Rust char::is_whitespace)
  kNumeric = 8,  // Rust char::is_numeric (the Digits pre-tokenizer)
};

/// The class mask of a code point (0 for anything else, including invalid bytes).
uint8_t char_class(uint32_t code_point);

/// A decoded piece of text: code points, their classes and byte offsets (offsets has size() + 1 entries).
/// An invalid UTF-8 byte becomes one pseudo code point 0x110000 + byte with class 0 (tokenizers never sees
/// invalid UTF-8: Python strings are valid; this keeps C++ callers' bytes intact).
struct DecodedText {
  std::vector<uint32_t> code_points;
  std::vector<uint8_t> classes;
  std::vector<uint32_t> offsets;
  std::size_t size() const { return code_points.size(); }
};
void decode_utf8(std::string_view text, DecodedText* out);

/// Which Split regex (Llama 3 style) a pre-tokenizer uses.
enum class SplitPattern {
  kGpt2,    // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  kLlama3,  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
            // ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
  kQwen2,   // the same with \p{N} for \p{N}{1,3}
};

/// The regex source text of each pattern, as it appears in tokenizer.json files.
const char* split_pattern_regex(SplitPattern pattern);

/// Cuts `text` into the pieces an isolated Split with `pattern` gives; appends byte ranges [begin, end)
/// relative to `text`. Every character belongs to exactly one piece (each pattern matches everywhere).
void split_by_pattern(std::string_view text, SplitPattern pattern, std::vector<std::pair<uint32_t, uint32_t>>* pieces);

/// Digits(individual_digits=true): each numeric character alone, the runs between them as pieces.
void split_digits(std::string_view text, std::vector<std::pair<uint32_t, uint32_t>>* pieces);

}  // namespace tiedlora::tokenizer_detail
