// src/llm/tokenizer/pre_tokenize.cpp: UTF-8 decoding, character classes and the pre-tokenizer splitters of
// pre_tokenize.h (the regexes of GPT-2, Llama 3 and Qwen2, and Digits), written out by hand.
#include "llm/tokenizer/pre_tokenize.h"

#include <algorithm>

namespace tiedlora::tokenizer_detail {

namespace {

struct ClassRange {
  uint32_t first;
  uint32_t last;
  uint8_t mask;
};

constexpr ClassRange kClassRanges[] = {
#include "llm/tokenizer/unicode_table.inc"
};

// ASCII is looked up directly: it is most of the text.
struct AsciiTable {
  uint8_t mask[128] = {};
  AsciiTable() {
    for (const auto& r : kClassRanges) {
      for (uint32_t c = r.first; c <= r.last && c < 128; ++c) mask[c] = r.mask;
    }
  }
};
const AsciiTable kAscii;

constexpr uint32_t kInvalidBase = 0x110000;  // pseudo code points for invalid bytes

}  // namespace

uint8_t char_class(uint32_t c) {
  if (c < 128) return kAscii.mask[c];
  const auto* end = std::end(kClassRanges);
  const auto* it =
      std::upper_bound(std::begin(kClassRanges), end, c, [](uint32_t v, const ClassRange& r) { return v < r.first; });
  if (it == std::begin(kClassRanges)) return 0;
  --it;
  return c <= it->last ? it->mask : 0;
}

void decode_utf8(std::string_view text, DecodedText* out) {
  out->code_points.clear();
  out->classes.clear();
  out->offsets.clear();
  const auto* s = reinterpret_cast<const unsigned char*>(text.data());
  const std::size_t n = text.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned char b = s[i];
    uint32_t cp = kInvalidBase + b;
    std::size_t len = 1;
    auto cont = [&](std::size_t k) { return i + k < n && (s[i + k] & 0xC0) == 0x80; };
    if (b < 0x80) {
      cp = b;
    } else if (b >= 0xC2 && b <= 0xDF && cont(1)) {
      cp = ((b & 0x1Fu) << 6) | (s[i + 1] & 0x3Fu);
      len = 2;
    } else if (b >= 0xE0 && b <= 0xEF && cont(1) && cont(2)) {
      const uint32_t v = ((b & 0x0Fu) << 12) | ((s[i + 1] & 0x3Fu) << 6) | (s[i + 2] & 0x3Fu);
      if (v >= 0x800 && !(v >= 0xD800 && v <= 0xDFFF)) {  // no overlong forms, no surrogates
        cp = v;
        len = 3;
      }
    } else if (b >= 0xF0 && b <= 0xF4 && cont(1) && cont(2) && cont(3)) {
      const uint32_t v =
          ((b & 0x07u) << 18) | ((s[i + 1] & 0x3Fu) << 12) | ((s[i + 2] & 0x3Fu) << 6) | (s[i + 3] & 0x3Fu);
      if (v >= 0x10000 && v <= 0x10FFFF) {
        cp = v;
        len = 4;
      }
    }
    out->code_points.push_back(cp);
    out->classes.push_back(cp < kInvalidBase ? char_class(cp) : 0);
    out->offsets.push_back(static_cast<uint32_t>(i));
    i += len;
  }
  out->offsets.push_back(static_cast<uint32_t>(n));
}

const char* split_pattern_regex(SplitPattern pattern) {
  switch (pattern) {
    case SplitPattern::kGpt2: return R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
    case SplitPattern::kLlama3:
      return R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
    case SplitPattern::kQwen2:
      return R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  }
  return "";
}

namespace {

// The matcher of one pattern at one position of a decoded piece; returns the match length in code points
// (always >= 1: each pattern matches at every position).
class Matcher {
 public:
  explicit Matcher(const DecodedText& t) : cp_(t.code_points), cls_(t.classes), n_(t.size()) {}

  bool letter(std::size_t i) const { return i < n_ && (cls_[i] & kLetter); }
  bool number(std::size_t i) const { return i < n_ && (cls_[i] & kNumber); }
  bool space(std::size_t i) const { return i < n_ && (cls_[i] & kSpace); }
  // [^\s\p{L}\p{N}]
  bool other(std::size_t i) const { return i < n_ && !(cls_[i] & (kLetter | kNumber | kSpace)); }
  bool is(std::size_t i, uint32_t c) const { return i < n_ && cp_[i] == c; }
  bool newline(std::size_t i) const { return is(i, '\r') || is(i, '\n'); }

  std::size_t run(std::size_t i, bool (Matcher::*pred)(std::size_t) const) const {
    std::size_t j = i;
    while ((this->*pred)(j)) ++j;
    return j - i;
  }

  // \s+(?!\S)|\s+ at a whitespace character: the greedy run backs off one character so that a following
  // non-space starts the next piece (with its leading space), unless the run ends the text.
  std::size_t trailing_space(std::size_t i) const {
    const std::size_t k = run(i, &Matcher::space);
    if (i + k == n_) return k;
    return k >= 2 ? k - 1 : 1;
  }

  std::size_t gpt2(std::size_t i) const {
    // 's|'t|'re|'ve|'m|'ll|'d (case-sensitive)
    if (cp_[i] == '\'' && i + 1 < n_) {
      const uint32_t c = cp_[i + 1];
      if (c == 's' || c == 't' || c == 'm' || c == 'd') return 2;
      if ((c == 'r' || c == 'v') && is(i + 2, 'e')) return 3;
      if (c == 'l' && is(i + 2, 'l')) return 3;
    }
    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: the optional space is only taken when the class follows;
    // backing off to no space never helps because a space belongs to none of the three classes.
    const std::size_t start = cp_[i] == ' ' ? i + 1 : i;
    if (letter(start)) return start - i + run(start, &Matcher::letter);
    if (number(start)) return start - i + run(start, &Matcher::number);
    if (other(start)) return start - i + run(start, &Matcher::other);
    // \s+(?!\S)|\s+ (cp_[i] is whitespace: every other character matched above)
    return trailing_space(i);
  }

  // Llama 3 (max_digits 3) and Qwen2 (max_digits 1).
  std::size_t llama3(std::size_t i, std::size_t max_digits) const {
    // (?i:'s|'t|'re|'ve|'m|'ll|'d): Oniguruma's case folding also matches U+017F (long s) for s.
    if (cp_[i] == '\'' && i + 1 < n_) {
      const uint32_t c = cp_[i + 1];
      auto fold = [](uint32_t x) { return x == 0x17F ? uint32_t('s') : (x >= 'A' && x <= 'Z' ? x + 32 : x); };
      const uint32_t f = fold(c);
      if (f == 's' || f == 't' || f == 'm' || f == 'd') return 2;
      if (i + 2 < n_) {
        const uint32_t g = fold(cp_[i + 2]);
        // only ASCII letters fold to r, v, e, l here
        if ((f == 'r' || f == 'v') && g == 'e' && cp_[i + 1] < 128 && cp_[i + 2] < 128) return 3;
        if (f == 'l' && g == 'l' && cp_[i + 1] < 128 && cp_[i + 2] < 128) return 3;
      }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if (!newline(i) && !letter(i) && !number(i) && letter(i + 1)) return 1 + run(i + 1, &Matcher::letter);
    if (letter(i)) return run(i, &Matcher::letter);
    // \p{N}{1,3} or \p{N}
    if (number(i)) return std::min(run(i, &Matcher::number), max_digits);
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    const std::size_t start = cp_[i] == ' ' ? i + 1 : i;
    if (other(start)) {
      std::size_t j = start + run(start, &Matcher::other);
      j += run(j, &Matcher::newline);
      return j - i;
    }
    // \s*[\r\n]+: the whitespace run up to and including its last CR or LF.
    const std::size_t k = run(i, &Matcher::space);
    for (std::size_t q = i + k; q > i; --q) {
      if (newline(q - 1)) return q - i;
    }
    // \s+(?!\S)|\s+
    return trailing_space(i);
  }

 private:
  const std::vector<uint32_t>& cp_;
  const std::vector<uint8_t>& cls_;
  std::size_t n_;
};

}  // namespace

void split_by_pattern(std::string_view text, SplitPattern pattern, std::vector<std::pair<uint32_t, uint32_t>>* pieces) {
  thread_local DecodedText decoded;
  decode_utf8(text, &decoded);
  const Matcher m(decoded);
  std::size_t i = 0;
  while (i < decoded.size()) {
    std::size_t len = 0;
    switch (pattern) {
      case SplitPattern::kGpt2: len = m.gpt2(i); break;
      case SplitPattern::kLlama3: len = m.llama3(i, 3); break;
      case SplitPattern::kQwen2: len = m.llama3(i, 1); break;
    }
    pieces->emplace_back(decoded.offsets[i], decoded.offsets[i + len]);
    i += len;
  }
}

void split_digits(std::string_view text, std::vector<std::pair<uint32_t, uint32_t>>* pieces) {
  thread_local DecodedText decoded;
  decode_utf8(text, &decoded);
  std::size_t run_start = 0;
  for (std::size_t i = 0; i < decoded.size(); ++i) {
    if (decoded.classes[i] & kNumeric) {
      if (run_start < i) pieces->emplace_back(decoded.offsets[run_start], decoded.offsets[i]);
      pieces->emplace_back(decoded.offsets[i], decoded.offsets[i + 1]);
      run_start = i + 1;
    }
  }
  if (run_start < decoded.size()) pieces->emplace_back(decoded.offsets[run_start], decoded.offsets[decoded.size()]);
}

}  // namespace tiedlora::tokenizer_detail
