// src/llm/tokenizer/bpe_tokenizer.cpp: BpeTokenizer's tables, encode() and decode(): added-token matching, the
// pre-tokenizer pipeline, the byte-level mapping and the BPE merge loop, each following what the Python
// `tokenizers` package (0.23) does so that the ids are identical.
#include <algorithm>
#include <cstdio>
#include <mutex>
#include <queue>
#include <stdexcept>
#include <unordered_map>

#include "llm/tokenizer/pre_tokenize.h"
#include "tiedlora/core/error.h"
#include "tiedlora/llm/tokenizer.h"
#include "util/text.h"

namespace tiedlora {

namespace td = tokenizer_detail;

namespace {

// GPT-2's bytes_to_unicode(): printable bytes stand for themselves, the others for U+0100 onwards.
struct ByteAlphabet {
  std::string byte_to_char[256];  // UTF-8 of the character standing for each byte
  std::unordered_map<uint32_t, uint8_t> char_to_byte;
  ByteAlphabet() {
    std::vector<int> printable;
    for (int b = '!'; b <= '~'; ++b) printable.push_back(b);
    for (int b = 0xA1; b <= 0xAC; ++b) printable.push_back(b);
    for (int b = 0xAE; b <= 0xFF; ++b) printable.push_back(b);
    uint32_t code[256];
    bool is_printable[256] = {};
    for (int b : printable) is_printable[b] = true;
    int extra = 0;
    for (int b = 0; b < 256; ++b) code[b] = is_printable[b] ? static_cast<uint32_t>(b) : 256u + extra++;
    for (int b = 0; b < 256; ++b) {
      const uint32_t c = code[b];
      std::string s;
      if (c < 0x80) {
        s += static_cast<char>(c);
      } else {
        s += static_cast<char>(0xC0 | (c >> 6));
        s += static_cast<char>(0x80 | (c & 0x3F));
      }
      byte_to_char[b] = s;
      char_to_byte[c] = static_cast<uint8_t>(b);
    }
  }
};

const ByteAlphabet& byte_alphabet() {
  static const ByteAlphabet alphabet;
  return alphabet;
}

// What the ByteLevel decoder makes of one token: the bytes its characters stand for when all of them are
// in the alphabet, else the token's own UTF-8 (tokenizers' decoders/byte_level.rs does the same).
std::string token_bytes(const std::string& token) {
  const auto& alphabet = byte_alphabet();
  td::DecodedText decoded;
  td::decode_utf8(token, &decoded);
  std::string out;
  for (uint32_t c : decoded.code_points) {
    auto it = alphabet.char_to_byte.find(c);
    if (it == alphabet.char_to_byte.end()) return token;
    out += static_cast<char>(it->second);
  }
  return out;
}

// A token for messages: quoted, control bytes escaped, UTF-8 kept readable.
std::string printable(std::string_view s) { return util::quote_for_message(s, /*keep_utf8=*/true); }

struct PendingMerge {
  uint32_t rank;
  uint32_t pos;
  int32_t new_id;
  // std::priority_queue is a max-heap: "less" means later, so the top is the lowest rank, then leftmost.
  bool operator<(const PendingMerge& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
};

constexpr std::size_t kCacheCapacity = 1 << 16;
constexpr std::size_t kCacheMaxPieceBytes = 256;  // longer pieces are rare and not worth keeping

}  // namespace

const char* pre_tokenizer_name(PreTokenizer p) {
  switch (p) {
    case PreTokenizer::kGpt2: return "gpt2";
    case PreTokenizer::kDigitsThenGpt2: return "digits+gpt2";
    case PreTokenizer::kLlama3: return "llama3";
    case PreTokenizer::kQwen2: return "qwen2";
    case PreTokenizer::kNone: return "none";
  }
  return "?";
}

// ---- the immutable tables ------------------------------------------------------------------------------

struct BpeTokenizer::Impl {
  struct MergeRule {
    uint32_t rank;
    int32_t new_id;
  };
  // A byte trie over added tokens' contents; `token` is the index into config.added_tokens or -1.
  struct TrieNode {
    std::vector<std::pair<uint8_t, uint32_t>> children;  // sorted by byte
    int token = -1;
  };
  struct Symbol {
    int32_t id;
    int32_t prev;
    int32_t next;
    uint32_t len;  // 0 once merged into its left neighbour
  };

  BpeTokenizerConfig config;
  std::vector<std::string> id_to_token;
  std::vector<uint8_t> id_flags;  // bit 0: present, bit 1: special
  std::vector<std::string> id_to_bytes;
  std::unordered_map<std::string, int32_t> token_to_id;
  std::unordered_map<uint64_t, MergeRule> merges;
  // Initial symbols of a byte: its alphabet character's id, or byte-fallback ids, or unk (marked by
  // byte_is_unk), or nothing (dropped).
  std::vector<int32_t> byte_symbols[256];
  bool byte_is_unk[256] = {};
  std::vector<TrieNode> trie[2];  // [0] non-normalized added tokens, [1] normalized ones

  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache;

  explicit Impl(BpeTokenizerConfig c);

  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  [[noreturn]] void fail(const std::string& what) const { throw FormatError(config.source + ": " + what); }

  void add_to_trie(int which, const std::string& content, int index) {
    auto& nodes = trie[which];
    if (nodes.empty()) nodes.emplace_back();
    uint32_t node = 0;
    for (unsigned char c : content) {
      auto& ch = nodes[node].children;
      auto it = std::lower_bound(ch.begin(), ch.end(), c,
                                 [](const std::pair<uint8_t, uint32_t>& e, uint8_t v) { return e.first < v; });
      if (it != ch.end() && it->first == c) {
        node = it->second;
      } else {
        const uint32_t next = static_cast<uint32_t>(nodes.size());
        ch.insert(it, {c, next});
        nodes.emplace_back();  // may reallocate: `ch` is not used afterwards
        node = next;
      }
    }
    nodes[node].token = index;
  }

  // Length of the longest added token (of trie `which`) starting at text[pos], and its index.
  std::pair<std::size_t, int> longest_match(int which, std::string_view text, std::size_t pos) const {
    const auto& nodes = trie[which];
    std::pair<std::size_t, int> best{0, -1};
    if (nodes.empty()) return best;
    uint32_t node = 0;
    for (std::size_t i = pos; i < text.size(); ++i) {
      const auto& ch = nodes[node].children;
      const uint8_t c = static_cast<uint8_t>(text[i]);
      auto it = std::lower_bound(ch.begin(), ch.end(), c,
                                 [](const std::pair<uint8_t, uint32_t>& e, uint8_t v) { return e.first < v; });
      if (it == ch.end() || it->first != c) break;
      node = it->second;
      if (nodes[node].token >= 0) best = {i + 1 - pos, nodes[node].token};
    }
    return best;
  }

  struct Segment {
    std::size_t begin, end;
    int added;  // index into config.added_tokens, or -1 for text to pre-tokenize
  };
  void split_added(int which, std::string_view text, std::size_t base, std::vector<Segment>* out) const;
  template <typename Emit>
  void for_each_piece(std::string_view segment, const Emit& emit) const;
  void encode_piece(std::string_view piece, std::vector<TokenId>* out) const;
  void merge_word(std::string_view piece, std::vector<int32_t>* ids) const;
};

BpeTokenizer::Impl::Impl(BpeTokenizerConfig c) : config(std::move(c)) {
  if (std::all_of(config.vocab.begin(), config.vocab.end(), [](const std::string& t) { return t.empty(); })) {
    fail("the vocabulary is empty (hint: the tokenizer file is incomplete; every text would encode to nothing)");
  }
  const auto& alphabet = byte_alphabet();
  std::size_t size = config.vocab.size();
  for (const auto& t : config.added_tokens) {
    if (t.id < 0 || t.id > (1 << 30))
      fail("added token " + printable(t.content) + " has invalid id " + std::to_string(t.id));
    size = std::max(size, static_cast<std::size_t>(t.id) + 1);
  }
  id_to_token.resize(size);
  id_flags.assign(size, 0);
  token_to_id.reserve(size * 2);
  for (std::size_t id = 0; id < config.vocab.size(); ++id) {
    if (config.vocab[id].empty()) continue;  // a hole
    id_to_token[id] = config.vocab[id];
    id_flags[id] |= 1;
    token_to_id[config.vocab[id]] = static_cast<int32_t>(id);  // a duplicate keeps the last id, as HF's dict
  }
  for (std::size_t i = 0; i < config.added_tokens.size(); ++i) {
    const auto& t = config.added_tokens[i];
    if (t.content.empty()) fail("added token with id " + std::to_string(t.id) + " is empty");
    if ((id_flags[t.id] & 1) && id_to_token[t.id] != t.content) {
      fail("added token " + printable(t.content) + " has id " + std::to_string(t.id) +
           ", which the vocabulary gives to " + printable(id_to_token[t.id]));
    }
    id_to_token[t.id] = t.content;
    id_flags[t.id] |= 1 | (t.special ? 2 : 0);
    token_to_id[t.content] = static_cast<int32_t>(t.id);
    add_to_trie(t.normalized ? 1 : 0, t.content, static_cast<int>(i));
  }
  id_to_bytes.resize(size);
  for (std::size_t id = 0; id < size; ++id) {
    if (id_flags[id] & 1) id_to_bytes[id] = token_bytes(id_to_token[id]);
  }
  auto lookup = [&](const std::string& s) -> int32_t {
    auto it = token_to_id.find(s);
    return it == token_to_id.end() ? -1 : it->second;
  };
  merges.reserve(config.merges.size() * 2);
  for (std::size_t rank = 0; rank < config.merges.size(); ++rank) {
    const auto& [left, right] = config.merges[rank];
    const int32_t a = lookup(left), b = lookup(right), m = lookup(left + right);
    const std::string where = "merge " + std::to_string(rank) + " (" + printable(left) + " " + printable(right) + ")";
    if (a < 0)
      fail(where + ": " + printable(left) +
           " is not in the vocabulary (hint: vocabulary and merges from different tokenizers?)");
    if (b < 0)
      fail(where + ": " + printable(right) +
           " is not in the vocabulary (hint: vocabulary and merges from different tokenizers?)");
    if (m < 0) fail(where + ": the merged token " + printable(left + right) + " is not in the vocabulary");
    merges[pair_key(a, b)] = MergeRule{static_cast<uint32_t>(rank), m};  // a repeated pair keeps the last rank, as HF
  }
  if (config.unk_id &&
      (*config.unk_id < 0 || static_cast<std::size_t>(*config.unk_id) >= size || !(id_flags[*config.unk_id] & 1))) {
    fail("unknown-token id " + std::to_string(*config.unk_id) + " is not in the vocabulary");
  }
  for (const auto* id : {&config.bos_id, &config.eos_id}) {
    if (*id && (**id < 0 || static_cast<std::size_t>(**id) >= size)) {
      fail("bos/eos id " + std::to_string(**id) + " is outside the vocabulary (size " + std::to_string(size) + ")");
    }
  }
  for (auto ids : {&config.prefix_ids, &config.suffix_ids}) {
    for (TokenId id : *ids) {
      if (id < 0 || static_cast<std::size_t>(id) >= size)
        fail("post-processor id " + std::to_string(id) + " is outside the vocabulary");
    }
  }
  // Initial symbols per byte, as tokenizers' BPE::merge_word treats one byte-level character.
  for (int byte = 0; byte < 256; ++byte) {
    const std::string& ch = alphabet.byte_to_char[byte];
    const int32_t id = lookup(ch);
    if (id >= 0) {
      byte_symbols[byte] = {id};
      continue;
    }
    if (config.byte_fallback) {
      std::vector<int32_t> ids;
      for (unsigned char b : ch) {
        char name[8];
        std::snprintf(name, sizeof name, "<0x%02X>", b);
        const int32_t f = lookup(name);
        if (f < 0) {
          ids.clear();
          break;
        }
        ids.push_back(f);
      }
      if (!ids.empty()) {
        byte_symbols[byte] = ids;
        continue;
      }
    }
    if (config.unk_id) {
      byte_symbols[byte] = {static_cast<int32_t>(*config.unk_id)};
      byte_is_unk[byte] = true;
    }
  }
}

// ---- encode -----------------------------------------------------------------------------------------------

// tokenizers' AddedVocabulary::find_matches: leftmost-longest matches, lstrip/rstrip widening a match over
// whitespace (never into the previous match), the text between matches kept as segments to pre-tokenize.
void BpeTokenizer::Impl::split_added(int which, std::string_view text, std::size_t base,
                                     std::vector<Segment>* out) const {
  std::size_t done = 0;  // end of the previous match
  std::size_t pos = 0;
  while (pos < text.size()) {
    const auto [len, index] = longest_match(which, text, pos);
    if (index < 0) {
      ++pos;
      continue;
    }
    std::size_t start = pos, stop = pos + len;
    const AddedToken& token = config.added_tokens[index];
    // Whitespace next to the match, one character at a time (never more of the text than is swallowed).
    auto space_before = [&](std::size_t p) {
      while (p > done) {
        std::size_t q = p - 1;
        while (q > done && (static_cast<uint8_t>(text[q]) & 0xC0) == 0x80) --q;  // start of the previous character
        td::DecodedText d;
        td::decode_utf8(text.substr(q, p - q), &d);
        if (d.size() != 1 || !(d.classes[0] & td::kSpace)) break;
        p = q;
      }
      return p;
    };
    auto space_after = [&](std::size_t p) {
      while (p < text.size()) {
        td::DecodedText d;
        td::decode_utf8(text.substr(p, std::min<std::size_t>(4, text.size() - p)), &d);
        if (d.size() == 0 || !(d.classes[0] & td::kSpace)) break;
        p += d.offsets[1];
      }
      return p;
    };
    if (token.lstrip) start = std::max(space_before(start), done);
    if (token.rstrip) stop = space_after(stop);
    if (done < start) out->push_back({base + done, base + start, -1});
    out->push_back({base + start, base + stop, index});
    done = pos = stop;
  }
  if (done < text.size()) out->push_back({base + done, base + text.size(), -1});
}

// The pre-tokenizer pipeline on one special-token-free segment; `emit` receives each piece's bytes.
template <typename Emit>
void BpeTokenizer::Impl::for_each_piece(std::string_view segment, const Emit& emit) const {
  // ByteLevel: optional prefix space, then GPT-2's regex when it has use_regex.
  auto byte_level = [&](std::string_view piece, bool use_regex) {
    if (piece.empty()) return;
    std::string prefixed;
    if (config.add_prefix_space && piece.front() != ' ') {
      prefixed = " ";
      prefixed += piece;
      piece = prefixed;
    }
    if (!use_regex) {
      emit(piece);
      return;
    }
    std::vector<std::pair<uint32_t, uint32_t>> parts;
    td::split_by_pattern(piece, td::SplitPattern::kGpt2, &parts);
    for (const auto& [b, e] : parts) emit(piece.substr(b, e - b));
  };
  std::vector<std::pair<uint32_t, uint32_t>> parts;
  switch (config.pre_tokenizer) {
    case PreTokenizer::kGpt2: byte_level(segment, true); return;
    case PreTokenizer::kNone: byte_level(segment, false); return;
    case PreTokenizer::kDigitsThenGpt2:
      td::split_digits(segment, &parts);
      for (const auto& [b, e] : parts) byte_level(segment.substr(b, e - b), true);
      return;
    case PreTokenizer::kLlama3:
    case PreTokenizer::kQwen2:
      td::split_by_pattern(
          segment, config.pre_tokenizer == PreTokenizer::kLlama3 ? td::SplitPattern::kLlama3 : td::SplitPattern::kQwen2,
          &parts);
      for (const auto& [b, e] : parts) byte_level(segment.substr(b, e - b), false);
      return;
  }
}

// tokenizers' Word::merge_all: a heap of candidate merges ordered by (rank, position); a popped candidate is
// applied when its left symbol is still alive and still forms a pair whose merge gives the same token.
void BpeTokenizer::Impl::merge_word(std::string_view piece, std::vector<int32_t>* ids) const {
  std::vector<Symbol> symbols;
  symbols.reserve(piece.size());
  auto add = [&](int32_t id, uint32_t len) {
    const int32_t index = static_cast<int32_t>(symbols.size());
    if (!symbols.empty()) symbols.back().next = index;
    symbols.push_back({id, index - 1, -1, len});
  };
  int32_t pending_unk = -1;
  uint32_t pending_unk_len = 0;
  for (unsigned char byte : piece) {
    const auto& initial = byte_symbols[byte];
    const uint32_t char_len = static_cast<uint32_t>(byte_alphabet().byte_to_char[byte].size());
    if (initial.empty()) continue;  // no symbol, no unk: dropped, as tokenizers does without unk_token
    if (byte_is_unk[byte]) {
      if (pending_unk >= 0 && config.fuse_unk) {
        pending_unk_len += char_len;
      } else {
        if (pending_unk >= 0) add(pending_unk, pending_unk_len);
        pending_unk = initial[0];
        pending_unk_len = char_len;
      }
      continue;
    }
    if (pending_unk >= 0) {
      add(pending_unk, pending_unk_len);
      pending_unk = -1;
    }
    if (initial.size() == 1) {
      add(initial[0], char_len);
    } else {
      for (int32_t id : initial) add(id, 1);  // byte fallback: one symbol per byte of the character
    }
  }
  if (pending_unk >= 0) add(pending_unk, pending_unk_len);

  std::priority_queue<PendingMerge> queue;
  for (std::size_t i = 0; i + 1 < symbols.size(); ++i) {
    auto it = merges.find(pair_key(symbols[i].id, symbols[i + 1].id));
    if (it != merges.end()) queue.push({it->second.rank, static_cast<uint32_t>(i), it->second.new_id});
  }
  while (!queue.empty()) {
    const PendingMerge top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.len == 0 || left.next < 0) continue;
    const int32_t right_pos = left.next;
    const Symbol right = symbols[right_pos];
    auto current = merges.find(pair_key(left.id, right.id));
    if (current == merges.end() || current->second.new_id != top.new_id) continue;  // expired
    left.id = top.new_id;
    left.len += right.len;
    left.next = right.next;
    symbols[right_pos].len = 0;
    if (right.next >= 0) symbols[right.next].prev = static_cast<int32_t>(top.pos);
    if (left.prev >= 0) {
      auto it = merges.find(pair_key(symbols[left.prev].id, left.id));
      if (it != merges.end()) queue.push({it->second.rank, static_cast<uint32_t>(left.prev), it->second.new_id});
    }
    if (left.next >= 0) {
      auto it = merges.find(pair_key(left.id, symbols[left.next].id));
      if (it != merges.end()) queue.push({it->second.rank, top.pos, it->second.new_id});
    }
  }
  ids->clear();
  for (const auto& s : symbols) {
    if (s.len != 0) ids->push_back(s.id);
  }
}

void BpeTokenizer::Impl::encode_piece(std::string_view piece, std::vector<TokenId>* out) const {
  if (config.ignore_merges) {
    std::string mapped;
    for (unsigned char b : piece) mapped += byte_alphabet().byte_to_char[b];
    auto it = token_to_id.find(mapped);
    if (it != token_to_id.end()) {
      out->push_back(it->second);
      return;
    }
  }
  const bool cacheable = piece.size() <= kCacheMaxPieceBytes;
  std::string key;
  if (cacheable) {
    key.assign(piece);
    std::lock_guard<std::mutex> lock(cache_mutex);
    auto it = cache.find(key);
    if (it != cache.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  merge_word(piece, &ids);
  out->insert(out->end(), ids.begin(), ids.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (cache.size() >= kCacheCapacity) cache.clear();
    cache.emplace(std::move(key), std::move(ids));
  }
}

// ---- BpeTokenizer -----------------------------------------------------------------------------------------

BpeTokenizer::BpeTokenizer(BpeTokenizerConfig config) : impl_(std::make_shared<const Impl>(std::move(config))) {}

std::vector<TokenId> BpeTokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const Impl& im = *impl_;
  std::vector<TokenId> ids;
  ids.reserve(text.size() / 3 + 4);
  if (add_special_tokens) ids.insert(ids.end(), im.config.prefix_ids.begin(), im.config.prefix_ids.end());
  // Two passes, as tokenizers: non-normalized added tokens over the whole text, then normalized ones in the
  // gaps (without a normalizer the two differ only in precedence).
  std::vector<Impl::Segment> first, segments;
  im.split_added(0, text, 0, &first);
  for (const auto& s : first) {
    if (s.added >= 0) {
      segments.push_back(s);
    } else {
      im.split_added(1, text.substr(s.begin, s.end - s.begin), s.begin, &segments);
    }
  }
  for (const auto& s : segments) {
    if (s.added >= 0) {
      ids.push_back(im.config.added_tokens[s.added].id);
    } else {
      im.for_each_piece(text.substr(s.begin, s.end - s.begin),
                        [&](std::string_view piece) { im.encode_piece(piece, &ids); });
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), im.config.suffix_ids.begin(), im.config.suffix_ids.end());
  return ids;
}

std::string BpeTokenizer::decode(const std::vector<TokenId>& ids, bool skip_special_tokens) const {
  const Impl& im = *impl_;
  std::string out;
  for (TokenId id : ids) {
    if (!has_id(id)) {
      throw Error(im.config.source + ": decode: token id " + std::to_string(id) + " is not in the vocabulary (size " +
                  std::to_string(im.id_to_token.size()) + ")");
    }
    if (skip_special_tokens && (im.id_flags[id] & 2)) continue;
    out += im.id_to_bytes[id];
  }
  return out;
}

std::string valid_utf8(std::string_view bytes) {
  static constexpr const char* kReplacement = "\xEF\xBF\xBD";  // U+FFFD
  std::string out;
  out.reserve(bytes.size());
  const std::size_t n = bytes.size();
  for (std::size_t i = 0; i < n;) {
    const auto b = static_cast<unsigned char>(bytes[i]);
    if (b < 0x80) {
      out += static_cast<char>(b);
      ++i;
      continue;
    }
    // The length of the character a lead byte starts and the range of its second byte (Unicode Table 3-7:
    // no overlong forms, no surrogates, nothing above U+10FFFF); the later bytes are 80..BF.
    std::size_t length = 0;
    unsigned char low = 0x80, high = 0xBF;
    if (b >= 0xC2 && b <= 0xDF)
      length = 2;
    else if (b == 0xE0)
      length = 3, low = 0xA0;
    else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF)
      length = 3;
    else if (b == 0xED)
      length = 3, high = 0x9F;
    else if (b == 0xF0)
      length = 4, low = 0x90;
    else if (b >= 0xF1 && b <= 0xF3)
      length = 4;
    else if (b == 0xF4)
      length = 4, high = 0x8F;
    std::size_t valid = length == 0 ? 0 : 1;  // bytes of a possible character seen so far
    while (valid > 0 && valid < length && i + valid < n) {
      const auto c = static_cast<unsigned char>(bytes[i + valid]);
      if (valid == 1 ? (c < low || c > high) : (c < 0x80 || c > 0xBF)) break;
      ++valid;
    }
    if (length > 0 && valid == length) {
      out.append(bytes.data() + i, length);
      i += length;
    } else {  // the maximal subpart (at least the lead byte) is one replacement character
      out += kReplacement;
      i += std::max<std::size_t>(valid, 1);
    }
  }
  return out;
}

std::vector<std::string> BpeTokenizer::pre_tokenize(std::string_view text) const {
  std::vector<std::string> pieces;
  impl_->for_each_piece(text, [&](std::string_view piece) { pieces.emplace_back(piece); });
  return pieces;
}

std::size_t BpeTokenizer::vocab_size() const { return impl_->id_to_token.size(); }

bool BpeTokenizer::has_id(TokenId id) const {
  return id >= 0 && static_cast<std::size_t>(id) < impl_->id_flags.size() && (impl_->id_flags[id] & 1);
}

bool BpeTokenizer::is_special(TokenId id) const { return has_id(id) && (impl_->id_flags[id] & 2); }

std::optional<TokenId> BpeTokenizer::token_to_id(std::string_view token) const {
  auto it = impl_->token_to_id.find(std::string(token));
  if (it == impl_->token_to_id.end()) return std::nullopt;
  return it->second;
}

const std::string& BpeTokenizer::id_to_token(TokenId id) const {
  if (!has_id(id)) throw std::out_of_range("tiedlora::BpeTokenizer: no token has id " + std::to_string(id));
  return impl_->id_to_token[id];
}

std::optional<TokenId> BpeTokenizer::bos_id() const { return impl_->config.bos_id; }
std::optional<TokenId> BpeTokenizer::eos_id() const { return impl_->config.eos_id; }
const BpeTokenizerConfig& BpeTokenizer::config() const { return impl_->config; }

}  // namespace tiedlora
