// test_tokenizer.cpp: BpeTokenizer against the Python `tokenizers` package (tests/reference/
// make_tokenizer_reference.py): every id of 10.8 MB of State of the Union addresses and of a Unicode soup for
// GPT-2, SmolLM2 (from its GGUF and from a tokenizer.json) and Llama 3 / Qwen2 style pipelines, adversarial
// strings, the pre-tokenizer pieces, the character classes of every code point, decode round trips, the
// ChatML template against transformers' Jinja rendering, and the errors for unsupported tokenizer.json files.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <thread>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "llm/tokenizer/pre_tokenize.h"
#include "tiedlora/core/error.h"
#include "tiedlora/formats/gguf.h"
#include "tiedlora/llm/tokenizer.h"

namespace {

using nlohmann::json;
using tiedlora::BpeTokenizer;
using tiedlora::TokenId;

std::string reference(const std::string& name) {
  const char* dir = std::getenv("TIEDLORA_REFERENCE_DIR");
  return std::string(dir ? dir : ".") + "/tokenizer/" + name;
}

std::string source(const std::string& name) {
  const char* dir = std::getenv("TIEDLORA_SOURCE_DIR");
  return std::string(dir ? dir : ".") + "/" + name;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot read " << path << " (run the reference_tokenizer fixture first)";
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<TokenId> read_ids(const std::string& path) {
  const std::string bytes = read_file(path);
  std::vector<TokenId> ids(bytes.size() / 4);
  for (std::size_t i = 0; i < ids.size(); ++i) {
    int32_t v;
    std::memcpy(&v, bytes.data() + 4 * i, 4);
    ids[i] = v;
  }
  return ids;
}

const json& summary() {
  static const json s = json::parse(read_file(reference("summary.json")));
  return s;
}

// The tokenizers under test, loaded once; names as in the reference script.
const BpeTokenizer& tokenizer(const std::string& name) {
  static std::map<std::string, BpeTokenizer> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return it->second;
  if (name == "gpt2") {
    return cache
        .emplace(name, BpeTokenizer::from_vocab_and_merges(source("tests/data/gpt2/encoder.json"),
                                                           source("tests/data/gpt2/vocab.bpe")))
        .first->second;
  }
  if (name == "smollm2_gguf") {
    return cache.emplace(name, BpeTokenizer::from_gguf(summary()["smollm2_gguf"].get<std::string>())).first->second;
  }
  return cache.emplace(name, BpeTokenizer::from_tokenizer_json(reference(name + "_tokenizer.json"))).first->second;
}

// Compares id sequences and reports the first difference with its neighbourhood.
::testing::AssertionResult same_ids(const std::vector<TokenId>& ours, const std::vector<TokenId>& expected) {
  const std::size_t n = std::min(ours.size(), expected.size());
  for (std::size_t i = 0; i < n; ++i) {
    if (ours[i] != expected[i]) {
      ::testing::AssertionResult failure = ::testing::AssertionFailure();
      failure << "first difference at id " << i << " of " << expected.size() << ": ours";
      for (std::size_t k = i; k < std::min(n, i + 8); ++k) failure << " " << ours[k];
      failure << ", expected";
      for (std::size_t k = i; k < std::min(n, i + 8); ++k) failure << " " << expected[k];
      return failure;
    }
  }
  if (ours.size() != expected.size()) {
    return ::testing::AssertionFailure() << ours.size() << " ids, expected " << expected.size();
  }
  return ::testing::AssertionSuccess();
}

// ---- character classes ----------------------------------------------------------------------------------

TEST(TokenizerUnicode, ClassesMatchTokenizersOnEveryCodePoint) {
  const json classes = json::parse(read_file(reference("unicode_classes.json")));
  std::vector<uint8_t> expected(0x110000, 0);
  for (const auto& r : classes["ranges"]) {
    for (uint32_t c = r[0].get<uint32_t>(); c <= r[1].get<uint32_t>(); ++c) expected[c] = r[2].get<uint8_t>();
  }
  std::size_t checked = 0, wrong = 0;
  for (uint32_t c = 0; c < 0x110000; ++c) {
    if (c >= 0xD800 && c <= 0xDFFF) continue;
    ++checked;
    if (tiedlora::tokenizer_detail::char_class(c) != expected[c]) {
      if (++wrong < 10)
        ADD_FAILURE() << "U+" << std::hex << c << ": class " << int(tiedlora::tokenizer_detail::char_class(c))
                      << ", tokenizers " << classes["tokenizers"] << " says " << int(expected[c])
                      << " (hint: run src/llm/tokenizer/gen_unicode_table.py)";
    }
  }
  EXPECT_EQ(checked, 1112064u);
  EXPECT_EQ(wrong, 0u);
}

TEST(TokenizerUnicode, InvalidUtf8IsKeptByteForByte) {
  const BpeTokenizer& gpt2 = tokenizer("gpt2");
  const std::string bytes = std::string("ok \xff\xfe \xc3 \xe2\x82 \xed\xa0\x80 \xf4\x90\x80\x80 end\x80", 27);
  EXPECT_EQ(gpt2.decode(gpt2.encode(bytes)), bytes);
}

// Text cut inside a character (an emoji cut by --max-new-tokens) as tokenizers' decode gives it: every prefix
// of the ids of texts with 2-, 3- and 4-byte characters (decode_prefixes.json), and the Unicode Standard's own
// example of maximal subparts (Table 3-8), each a single U+FFFD.
TEST(TokenizerUnicode, ValidUtf8ReplacesWhatTokenizersReplaces) {
  const json prefixes = json::parse(read_file(reference("decode_prefixes.json")));
  std::size_t replaced = 0;
  for (const auto& p : prefixes) {
    const auto ids = p["ids"].get<std::vector<TokenId>>();
    const std::string expected = p["decoded"].get<std::string>(),
                      ours = tiedlora::valid_utf8(tokenizer("gpt2").decode(ids));
    EXPECT_EQ(ours, expected) << json(ids).dump();
    replaced += expected.find("\xEF\xBF\xBD") != std::string::npos;
    EXPECT_NO_THROW((void)json(ours).dump()) << json(ids).dump();
  }
  EXPECT_GT(replaced, 5u) << "no prefix cuts a character: the test would be blind";
  const std::string table_3_8("\x61\xF1\x80\x80\xE1\x80\xC2\x62\x80\x63\x80\xBF\x64", 13);
  EXPECT_EQ(tiedlora::valid_utf8(table_3_8),
            "a\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"
            "b\xEF\xBF\xBD"
            "c\xEF\xBF\xBD\xEF\xBF\xBD"
            "d");
  const std::string valid = "plain \xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 \xF4\x8F\xBF\xBF";
  EXPECT_EQ(tiedlora::valid_utf8(valid), valid);
}

// ---- whole texts ----------------------------------------------------------------------------------------

struct TextCase {
  std::string tokenizer, reference_name, text;
};

class WholeText : public ::testing::TestWithParam<TextCase> {};

TEST_P(WholeText, EveryIdMatchesTokenizers) {
  const TextCase& c = GetParam();
  const std::string text = read_file(reference(c.text + ".txt"));
  const std::vector<TokenId> expected = read_ids(reference(c.reference_name + "_" + c.text + ".ids"));
  ASSERT_EQ(expected.size(), summary()["ids"][c.reference_name + "_" + c.text].get<std::size_t>());
  const BpeTokenizer& tok = tokenizer(c.tokenizer);
  const auto start = std::chrono::steady_clock::now();
  // The Python package's encode() adds the post-processor's tokens by default (llama3's BOS).
  const std::vector<TokenId> ids = tok.encode(text, /*add_special_tokens=*/true);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_TRUE(same_ids(ids, expected)) << c.tokenizer << " on " << c.text;
  std::printf("[ info ] %s on %s: %zu ids compared, %.1f MB/s\n", c.tokenizer.c_str(), c.text.c_str(), expected.size(),
              text.size() / seconds / 1e6);
  if (summary()[c.reference_name + "_" + c.text + "_round_trip"].get<bool>()) {
    EXPECT_TRUE(tok.decode(ids) == text) << "decode(encode(text)) differs from the text";
  } else {
    EXPECT_TRUE(tok.decode(ids) != text) << "the Python package does not round-trip this text, but we do";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Tokenizers, WholeText,
    ::testing::Values(TextCase{"gpt2", "gpt2", "sotu"}, TextCase{"gpt2", "gpt2", "soup"},
                      TextCase{"gpt2_prefix", "gpt2_prefix", "sotu"}, TextCase{"gpt2_prefix", "gpt2_prefix", "soup"},
                      TextCase{"llama3", "llama3", "sotu"}, TextCase{"llama3", "llama3", "soup"},
                      TextCase{"qwen2", "qwen2", "sotu"}, TextCase{"qwen2", "qwen2", "soup"},
                      TextCase{"smollm2", "smollm2", "sotu"}, TextCase{"smollm2", "smollm2", "soup"},
                      TextCase{"smollm2_gguf", "smollm2", "sotu"}, TextCase{"smollm2_gguf", "smollm2", "soup"}),
    [](const ::testing::TestParamInfo<TextCase>& info) { return info.param.tokenizer + "_" + info.param.text; });

TEST(Tokenizer, GptTwoFromTokenizerJsonEqualsFromVocabAndMerges) {
  const BpeTokenizer from_json = BpeTokenizer::from_tokenizer_json(reference("gpt2_tokenizer.json"));
  const std::string text = read_file(reference("soup.txt")).substr(0, 200000);
  EXPECT_TRUE(same_ids(from_json.encode(text), tokenizer("gpt2").encode(text)));
  EXPECT_EQ(from_json.vocab_size(), 50257u);
}

TEST(Tokenizer, EncodeIsThreadSafe) {
  const BpeTokenizer gpt2 =
      BpeTokenizer::from_vocab_and_merges(source("tests/data/gpt2/encoder.json"), source("tests/data/gpt2/vocab.bpe"));
  const std::string text = read_file(reference("sotu.txt")).substr(0, 400000);
  const std::vector<TokenId> expected = tokenizer("gpt2").encode(text);
  std::vector<std::vector<TokenId>> results(4);
  std::vector<std::thread> threads;
  for (auto& r : results) threads.emplace_back([&] { r = gpt2.encode(text); });
  for (auto& t : threads) t.join();
  for (const auto& r : results) EXPECT_TRUE(same_ids(r, expected));
}

// ---- adversarial strings --------------------------------------------------------------------------------

TEST(Tokenizer, AdversarialCasesMatchTokenizers) {
  const json cases = json::parse(read_file(reference("cases.json")));
  ASSERT_GT(cases.size(), 50u);
  const std::map<std::string, std::string> loaded = {{"gpt2", "gpt2"},       {"gpt2_prefix", "gpt2_prefix"},
                                                     {"llama3", "llama3"},   {"qwen2", "qwen2"},
                                                     {"smollm2", "smollm2"}, {"smollm2_gguf", "smollm2"}};
  const std::map<std::string, std::string> splitters = {
      {"gpt2", "gpt2"}, {"digits_gpt2", "smollm2"}, {"llama3", "llama3"}, {"qwen2", "qwen2"}};
  std::size_t compared = 0;
  for (const auto& c : cases) {
    const std::string text = c["text"].get<std::string>();
    const std::string label = "case " + json(text).dump().substr(0, 80);
    for (const auto& [ours, ref] : loaded) {
      const BpeTokenizer& tok = tokenizer(ours);
      const auto expected = c["ids"][ref].get<std::vector<TokenId>>();
      const auto ids = tok.encode(text);
      EXPECT_TRUE(same_ids(ids, expected)) << ours << ", " << label;
      compared += expected.size();
      // tokenizers' decode replaces invalid UTF-8 with U+FFFD; ours keeps the bytes, and valid_utf8() makes
      // the same text of them.
      for (const bool skip : {false, true}) {
        const std::string hf = c["decoded"][ref + (skip ? "_skip_special" : "")].get<std::string>();
        EXPECT_EQ(tiedlora::valid_utf8(tok.decode(ids, skip)), hf)
            << ours << (skip ? " (skip special)" : "") << ", " << label;
      }
    }
    EXPECT_TRUE(same_ids(tokenizer("llama3").encode(text, /*add_special_tokens=*/true),
                         c["ids"]["llama3_with_special"].get<std::vector<TokenId>>()))
        << "llama3 with its BOS template, " << label;
    for (const auto& [pattern, ours] : splitters) {
      EXPECT_EQ(tokenizer(ours).pre_tokenize(text), c["pieces"][pattern].get<std::vector<std::string>>())
          << "pre-tokenizer " << pattern << ", " << label;
    }
  }
  std::printf("[ info ] %zu adversarial cases, %zu ids compared\n", cases.size(), compared);
}

TEST(Tokenizer, RoundTripsExactlyWhenEveryByteIsInTheVocabulary) {
  const BpeTokenizer& gpt2 = tokenizer("gpt2");
  std::string all_bytes;
  for (int b = 0; b < 256; ++b) all_bytes += static_cast<char>(b);
  for (const std::string& text :
       {all_bytes, std::string("<|endoftext|> a<|endoftext|>b "), std::string("\xF0\x9F\x98\x80 x")}) {
    EXPECT_EQ(gpt2.decode(gpt2.encode(text)), text);
  }
  // SmolLM2's vocabulary lacks 21 byte symbols (e.g. byte 0x04): tokenizers drops them, and so do we.
  const BpeTokenizer& smol = tokenizer("smollm2_gguf");
  EXPECT_EQ(smol.decode(smol.encode("a\x04z")), "az");
}

TEST(Tokenizer, SpecialTokensAndVocabulary) {
  const BpeTokenizer& smol = tokenizer("smollm2_gguf");
  EXPECT_EQ(smol.vocab_size(), 49152u);
  EXPECT_EQ(smol.bos_id(), TokenId(1));
  EXPECT_EQ(smol.eos_id(), TokenId(2));
  EXPECT_EQ(smol.token_to_id("<|im_start|>"), TokenId(1));
  EXPECT_EQ(smol.id_to_token(2), "<|im_end|>");
  EXPECT_TRUE(smol.is_special(0));
  EXPECT_FALSE(smol.is_special(100));
  EXPECT_EQ(smol.encode("<|im_start|>user\nHi<|im_end|>").front(), 1);
  EXPECT_EQ(smol.decode({1, 2, 100}, /*skip_special_tokens=*/true), smol.decode({100}));
  EXPECT_EQ(smol.config().pre_tokenizer, tiedlora::PreTokenizer::kDigitsThenGpt2);
  EXPECT_TRUE(smol.encode("hi", /*add_special_tokens=*/true) == smol.encode("hi"));  // add_bos_token is false
  const BpeTokenizer& gpt2 = tokenizer("gpt2");
  EXPECT_EQ(gpt2.eos_id(), TokenId(50256));
  EXPECT_THROW(gpt2.decode({50257}), tiedlora::Error);
  EXPECT_THROW(gpt2.id_to_token(-1), std::out_of_range);
}

TEST(Tokenizer, LoadTokenizerFindsEachFormat) {
  auto folder = tiedlora::load_tokenizer(reference("gpt2_hf"));
  EXPECT_EQ(folder->encode("Hello world"), (std::vector<TokenId>{15496, 995}));
  auto gguf = tiedlora::load_tokenizer(summary()["smollm2_gguf"].get<std::string>());
  EXPECT_EQ(gguf->eos_id(), TokenId(2));
  auto json_file = tiedlora::load_tokenizer(reference("qwen2_tokenizer.json"));
  EXPECT_EQ(json_file->vocab_size(), 50259u);
  EXPECT_THROW(tiedlora::load_tokenizer(reference("no-such-folder")), tiedlora::FormatError);
}

// ---- SentencePiece ------------------------------------------------------------------------------------

TEST(SentencePiece, MatchesTheSentencepiecePackage) {
  if (!tiedlora::sentencepiece_available()) GTEST_SKIP() << "this build has no libsentencepiece";
  const auto sp = tiedlora::SentencePieceTokenizer::from_file(reference("spm/tokenizer.model"));
  std::size_t compared = 0;
  for (const std::string name : {"sotu_2mb", "soup"}) {
    const std::string text = read_file(reference(name + ".txt"));
    const std::vector<TokenId> expected = read_ids(reference("spm_" + name + ".ids"));
    const std::vector<TokenId> ids = sp.encode(text);
    EXPECT_TRUE(same_ids(ids, expected)) << name;
    compared += expected.size();
    if (summary()["spm_" + name + "_round_trip"].get<bool>()) EXPECT_TRUE(sp.decode(ids) == text) << name;
  }
  const json cases = json::parse(read_file(reference("cases.json")));
  for (const auto& c : cases) {
    const std::string text = c["text"].get<std::string>();
    const auto expected = c["ids"]["spm"].get<std::vector<TokenId>>();
    EXPECT_TRUE(same_ids(sp.encode(text), expected)) << json(text).dump();
    compared += expected.size();
    const std::string decoded = c["decoded"]["spm"].get<std::string>();
    if (decoded.find("\xEF\xBF\xBD") == std::string::npos) EXPECT_EQ(sp.decode(expected), decoded) << json(text).dump();
  }
  std::printf("[ info ] SentencePiece: %zu ids compared\n", compared);
  EXPECT_EQ(sp.vocab_size(), 4000u);
  EXPECT_EQ(sp.bos_id(), TokenId(1));
  EXPECT_EQ(sp.eos_id(), TokenId(2));
  EXPECT_EQ(sp.id_to_token(1), "<s>");
  EXPECT_EQ(sp.token_to_id("<s>"), TokenId(1));
  EXPECT_FALSE(sp.token_to_id("no such piece").has_value());
  EXPECT_EQ(sp.encode("Hello", /*add_special_tokens=*/true).front(), 1);
  const auto hello = sp.encode("Hello");
  std::vector<TokenId> with_eos = hello;
  with_eos.push_back(2);
  EXPECT_EQ(sp.decode(with_eos), "Hello</s>");
  EXPECT_EQ(sp.decode(with_eos, /*skip_special_tokens=*/true), "Hello");
  EXPECT_THROW(sp.decode({4000}), tiedlora::Error);
  EXPECT_EQ(tiedlora::load_tokenizer(reference("spm"))->encode("Hello"), hello);
  EXPECT_THROW(tiedlora::SentencePieceTokenizer::from_file(reference("cases.json")), tiedlora::FormatError);
}

// ---- chat template --------------------------------------------------------------------------------------

TEST(ChatTemplate, ChatmlMatchesTransformersRenderingOfSmolLM2Template) {
  const json chat = json::parse(read_file(reference("chat.json")));
  const auto info = tiedlora::inspect_chat_template(chat["template"].get<std::string>());
  ASSERT_TRUE(info.is_chatml);
  ASSERT_TRUE(info.default_system_prompt.has_value());
  EXPECT_EQ(*info.default_system_prompt, "You are a helpful AI assistant named SmolLM, trained by Hugging Face");
  // The GGUF's own template gives the same answer.
  const auto gguf = tiedlora::formats::GgufFile::open(summary()["smollm2_gguf"].get<std::string>());
  EXPECT_EQ(tiedlora::inspect_chat_template(gguf.get_string("tokenizer.chat_template")).default_system_prompt,
            info.default_system_prompt);
  for (const auto& r : chat["rendered"]) {
    std::vector<tiedlora::ChatMessage> messages;
    for (const auto& m : r["messages"])
      messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    EXPECT_EQ(
        tiedlora::apply_chatml_template(messages, r["add_generation_prompt"].get<bool>(), info.default_system_prompt),
        r["text"].get<std::string>());
  }
  EXPECT_FALSE(tiedlora::inspect_chat_template("{{ bos_token }}{% for m in messages %}[INST] ...").is_chatml);
}

// ---- refused configurations -----------------------------------------------------------------------------

void expect_refused(const std::function<void(json&)>& edit, const std::string& fragment) {
  json j = json::parse(read_file(reference("gpt2_tokenizer.json")));
  edit(j);
  const std::string path = reference("refused_tokenizer.json");
  std::ofstream(path) << j.dump();
  try {
    BpeTokenizer::from_tokenizer_json(path);
    ADD_FAILURE() << "accepted a tokenizer.json that should be refused (" << fragment << ")";
  } catch (const tiedlora::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("refused_tokenizer.json"), std::string::npos) << e.what();
  }
}

TEST(Tokenizer, UnsupportedTokenizerJsonIsRefusedWithTheKey) {
  expect_refused([](json& j) { j["model"]["type"] = "Unigram"; }, "model.type");
  expect_refused([](json& j) { j["normalizer"] = json{{"type", "NFC"}}; }, "normalizer");
  expect_refused([](json& j) { j["pre_tokenizer"] = json{{"type", "Metaspace"}}; }, "pre_tokenizer");
  expect_refused(
      [](json& j) {
        j["pre_tokenizer"] = json::parse(R"({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\w+"}, "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})");
      },
      "Split regex");
  expect_refused([](json& j) { j["model"]["merges"].push_back("Ġ nosuchtoken"); }, "not in the vocabulary");
  expect_refused([](json& j) { j["model"]["merges"].push_back("a b c"); }, "merge rule");
  expect_refused([](json& j) { j["added_tokens"][0]["single_word"] = true; }, "single_word");
  expect_refused([](json& j) { j["decoder"] = json{{"type", "WordPiece"}}; }, "decoder");
  expect_refused([](json& j) { j["model"]["dropout"] = 0.1; }, "dropout");
}

TEST(Tokenizer, ConfigWithMissingMergeTokenIsRefused) {
  tiedlora::BpeTokenizerConfig config;
  config.vocab = {"a", "b", "ab"};
  config.merges = {{"a", "b"}, {"ab", "c"}};
  config.source = "test-config";
  try {
    BpeTokenizer tok(config);
    ADD_FAILURE() << "a merge with a missing token was accepted";
  } catch (const tiedlora::FormatError& e) {
    EXPECT_NE(std::string(e.what()).find("test-config: merge 1"), std::string::npos) << e.what();
  }
}

}  // namespace

namespace {

TEST(Tokenizer, AnEmptyVocabularyIsRefusedAtLoad) {
  expect_refused(
      [](json& j) {
        j["model"]["vocab"] = json::object();
        j["model"]["merges"] = json::array();
      },
      "the vocabulary is empty");
}

TEST(Tokenizer, LongJsonInMessagesIsCutBetweenTokensNotInsideAWord) {
  // A pre-tokenizer long enough to be cut: its message must end at a JSON boundary and say so.
  json pre = {{"type", "Sequence"}, {"pretokenizers", json::array()}};
  for (int i = 0; i < 12; ++i) pre["pretokenizers"].push_back({{"type", "Punctuation"}, {"behavior", "Isolated"}});
  json j = json::parse(read_file(reference("gpt2_tokenizer.json")));
  j["pre_tokenizer"] = pre;
  const std::string path = reference("refused_long_tokenizer.json");
  std::ofstream(path) << j.dump();
  try {
    BpeTokenizer::from_tokenizer_json(path);
    ADD_FAILURE() << "accepted";
  } catch (const tiedlora::FormatError& e) {
    const std::string what = e.what();
    const auto cut = what.find(" ...");
    ASSERT_NE(cut, std::string::npos) << what;
    const char before = what[cut - 1];
    EXPECT_TRUE(before == ',' || before == ' ') << "cut inside a token: " << what;
    EXPECT_EQ(what.find("Isolat "), std::string::npos) << what;
  }
}

}  // namespace
