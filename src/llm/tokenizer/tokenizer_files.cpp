// src/llm/tokenizer/tokenizer_files.cpp: building BpeTokenizer from files: GPT-2's vocab.json + merges.txt, a
// Hugging Face tokenizer.json, and load_tokenizer() choosing among them (and GGUF, SentencePiece) for a path.
//
// A tokenizer.json is accepted only when every part of its pipeline is one tiedlora reproduces exactly
// (BPE model, byte-level pre-tokenizer with a known regex, no normalizer); anything else is refused with a
// FormatError naming the key, so a tokenizer that loads is one that gives the Python package's ids.
#include <sstream>

#include <nlohmann/json.hpp>

#include "llm/tokenizer/pre_tokenize.h"
#include "tiedlora/core/error.h"
#include "tiedlora/llm/tokenizer.h"
#include "util/files.h"
#include "util/text.h"

namespace tiedlora {

namespace {

using nlohmann::json;

constexpr std::size_t kMaxVocabularySize = 1u << 24;  // far above any real vocabulary; guards resize()

json parse_json_file(const std::string& path) {
  const std::string text = util::read_text_file(path);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw FormatError(path + ": invalid JSON: " + e.what());
  }
}

// vocab.json / model.vocab: {"token": id, ...} into an id-indexed vector (holes stay empty).
std::vector<std::string> vocabulary_from_json(const json& vocab, const std::string& where) {
  if (!vocab.is_object()) throw FormatError(where + " must be an object {\"token\": id, ...}");
  std::vector<std::string> out;
  for (const auto& [token, id] : vocab.items()) {
    if (!id.is_number_unsigned() || id.get<uint64_t>() >= kMaxVocabularySize) {
      throw FormatError(where + ": token '" + token + "' has id " + id.dump() + " (expected an integer in [0, " +
                        std::to_string(kMaxVocabularySize) + "))");
    }
    const std::size_t i = id.get<std::size_t>();
    if (i >= out.size()) out.resize(i + 1);
    if (!out[i].empty()) throw FormatError(where + ": id " + std::to_string(i) + " is given to two tokens");
    if (token.empty()) throw FormatError(where + ": the empty string is not a valid token");
    out[i] = token;
  }
  return out;
}

// One merge rule "left right" (tokenizers requires exactly one space).
std::pair<std::string, std::string> parse_merge_line(const std::string& line, const std::string& where) {
  const auto space = line.find(' ');
  if (space == std::string::npos || line.find(' ', space + 1) != std::string::npos || space == 0 ||
      space + 1 == line.size()) {
    throw FormatError(where + ": '" + line.substr(0, 200) + "' is not a merge rule \"<left> <right>\"");
  }
  return {line.substr(0, space), line.substr(space + 1)};
}

// ---- tokenizer.json pieces --------------------------------------------------------------------------------

std::string type_of(const json& node) {
  return node.is_object() && node.contains("type") && node["type"].is_string() ? node["type"].get<std::string>() : "";
}

bool flag(const json& node, const char* key, bool fallback) {
  if (!node.contains(key) || node[key].is_null()) return fallback;
  if (!node[key].is_boolean()) throw FormatError(std::string("'") + key + "' must be a boolean");
  return node[key].get<bool>();
}

struct PipelineChoice {
  PreTokenizer pre_tokenizer;
  bool add_prefix_space;
};

PipelineChoice choose_pre_tokenizer(const json& pre, const std::string& path) {
  const std::string where = path + ": pre_tokenizer";
  const std::string hint =
      " (hint: tiedlora reproduces ByteLevel, Sequence[Digits(individual_digits), ByteLevel] and "
      "Sequence[Split(<GPT-2, Llama 3 or Qwen2 regex>), ByteLevel(use_regex=false)] exactly; other pipelines "
      "would give different ids)";
  auto byte_level = [&](const json& node, bool* use_regex) {
    if (type_of(node) != "ByteLevel") return false;
    *use_regex = flag(node, "use_regex", true);
    return true;
  };
  bool use_regex = false;
  if (byte_level(pre, &use_regex)) {
    return {use_regex ? PreTokenizer::kGpt2 : PreTokenizer::kNone, flag(pre, "add_prefix_space", false)};
  }
  if (type_of(pre) == "Sequence" && pre.contains("pretokenizers") && pre["pretokenizers"].is_array()) {
    const json& steps = pre["pretokenizers"];
    if (steps.size() == 1 && byte_level(steps[0], &use_regex)) {
      return {use_regex ? PreTokenizer::kGpt2 : PreTokenizer::kNone, flag(steps[0], "add_prefix_space", false)};
    }
    if (steps.size() == 2 && byte_level(steps[1], &use_regex)) {
      const json& first = steps[0];
      const bool prefix = flag(steps[1], "add_prefix_space", false);
      if (type_of(first) == "Digits" && use_regex) {
        if (!flag(first, "individual_digits", false)) {
          throw FormatError(where + ": Digits with individual_digits false is not supported" + hint);
        }
        return {PreTokenizer::kDigitsThenGpt2, prefix};
      }
      if (type_of(first) == "Split" && !use_regex) {
        const json& pattern = first.value("pattern", json());
        const std::string behavior = first.value("behavior", std::string());
        if (!pattern.is_object() || !pattern.contains("Regex") || !pattern["Regex"].is_string()) {
          throw FormatError(where + ": Split without a Regex pattern is not supported" + hint);
        }
        if (behavior != "Isolated" || flag(first, "invert", false)) {
          throw FormatError(where + ": Split with behavior '" + behavior + "' (or invert) is not supported" + hint);
        }
        const std::string regex = pattern["Regex"].get<std::string>();
        namespace td = tokenizer_detail;
        if (regex == td::split_pattern_regex(td::SplitPattern::kLlama3)) return {PreTokenizer::kLlama3, prefix};
        if (regex == td::split_pattern_regex(td::SplitPattern::kQwen2)) return {PreTokenizer::kQwen2, prefix};
        if (regex == td::split_pattern_regex(td::SplitPattern::kGpt2)) {
          // Split(GPT-2) then ByteLevel without regex cuts exactly as ByteLevel with its regex.
          return {PreTokenizer::kGpt2, prefix};
        }
        throw FormatError(where + ": the Split regex '" + util::excerpt_for_message(regex, 300) +
                          "' is not one tiedlora knows" + hint);
      }
    }
  }
  throw FormatError(where + ": " + util::excerpt_for_message(pre.dump(), 300) + " is not supported" + hint);
}

// TemplateProcessing's single-sequence template: special tokens before and after $A.
void read_post_processor(const json& post, const std::string& path, BpeTokenizerConfig* config) {
  const std::string where = path + ": post_processor";
  if (post.is_null()) return;
  const std::string type = type_of(post);
  if (type == "ByteLevel") return;  // only adjusts offsets
  if (type == "Sequence") {
    for (const auto& p : post.value("processors", json::array())) read_post_processor(p, path, config);
    return;
  }
  if (type != "TemplateProcessing") {
    throw FormatError(where + ": type '" + type +
                      "' is not supported (hint: tiedlora applies TemplateProcessing, "
                      "ByteLevel and Sequence post-processors)");
  }
  const json& single = post.value("single", json::array());
  const json& specials = post.value("special_tokens", json::object());
  bool after = false;
  for (const auto& item : single) {
    if (item.contains("Sequence")) {
      after = true;
      continue;
    }
    if (!item.contains("SpecialToken")) throw FormatError(where + ": unexpected template item " + item.dump());
    const std::string name = item["SpecialToken"].value("id", std::string());
    if (!specials.contains(name) || !specials[name].contains("ids") || !specials[name]["ids"].is_array()) {
      throw FormatError(where + ": special token '" + name + "' of the template is not in special_tokens");
    }
    for (const auto& id : specials[name]["ids"]) {
      if (!id.is_number_unsigned()) throw FormatError(where + ": special token '" + name + "' has a non-integer id");
      (after ? config->suffix_ids : config->prefix_ids).push_back(id.get<TokenId>());
    }
  }
}

}  // namespace

BpeTokenizer BpeTokenizer::from_vocab_and_merges(const std::string& vocab_json_path, const std::string& merges_txt_path,
                                                 const std::vector<std::string>& special_tokens) {
  BpeTokenizerConfig config;
  config.source = vocab_json_path;
  config.vocab = vocabulary_from_json(parse_json_file(vocab_json_path), vocab_json_path);
  std::istringstream merges(util::read_text_file(merges_txt_path));
  std::string line;
  std::size_t line_number = 0;
  while (std::getline(merges, line)) {
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.rfind("#version", 0) == 0) continue;
    if (line.empty() && merges.peek() == std::char_traits<char>::eof()) break;  // the final newline
    config.merges.push_back(parse_merge_line(line, merges_txt_path + ":" + std::to_string(line_number)));
  }
  for (const auto& s : special_tokens) {
    for (std::size_t id = 0; id < config.vocab.size(); ++id) {
      if (config.vocab[id] == s) config.added_tokens.push_back(AddedToken{s, static_cast<TokenId>(id)});
    }
  }
  // GPT-2 uses <|endoftext|> as BOS, EOS and UNK (transformers' GPT2TokenizerFast).
  for (const auto& t : config.added_tokens) {
    if (t.content == "<|endoftext|>") config.bos_id = config.eos_id = t.id;
  }
  return BpeTokenizer(std::move(config));
}

BpeTokenizer BpeTokenizer::from_tokenizer_json(const std::string& path) {
  const json root = parse_json_file(path);
  if (!root.is_object() || !root.contains("model")) throw FormatError(path + ": not a tokenizer.json (no 'model')");
  const json& model = root["model"];
  BpeTokenizerConfig config;
  config.source = path;
  const std::string model_type = type_of(model);
  if (model_type != "BPE" && !(model_type.empty() && model.contains("merges"))) {
    throw FormatError(path + ": model.type is '" + model_type +
                      "', only BPE is supported (hint: SentencePiece "
                      "tokenizers such as Llama 2's load from tokenizer.model)");
  }
  try {
    if (model.contains("dropout") && !model["dropout"].is_null() && model["dropout"].get<double>() != 0.0) {
      throw FormatError(path + ": model.dropout is set; BPE dropout is random and not supported");
    }
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (model.contains(key) && !model[key].is_null() && !model[key].get<std::string>().empty()) {
        throw FormatError(path + ": model." + key + " is not supported (byte-level BPE does not use it)");
      }
    }
    const json& normalizer = root.value("normalizer", json());
    if (!normalizer.is_null() &&
        !(type_of(normalizer) == "Sequence" && normalizer.value("normalizers", json::array()).empty())) {
      throw FormatError(path + ": normalizer " + util::excerpt_for_message(normalizer.dump(), 200) +
                        " is not supported (hint: byte-level BPE tokenizers have none)");
    }
    const json& decoder = root.value("decoder", json());
    if (type_of(decoder) != "ByteLevel") {
      throw FormatError(path + ": decoder " + util::excerpt_for_message(decoder.dump(), 200) +
                        " is not supported, expected ByteLevel");
    }
    const auto choice = choose_pre_tokenizer(root.value("pre_tokenizer", json()), path);
    config.pre_tokenizer = choice.pre_tokenizer;
    config.add_prefix_space = choice.add_prefix_space;
    config.vocab = vocabulary_from_json(model.value("vocab", json()), path + ": model.vocab");
    config.ignore_merges = flag(model, "ignore_merges", false);
    config.byte_fallback = flag(model, "byte_fallback", false);
    config.fuse_unk = flag(model, "fuse_unk", false);
    if (model.contains("unk_token") && !model["unk_token"].is_null()) {
      const std::string unk = model["unk_token"].get<std::string>();
      for (std::size_t id = 0; id < config.vocab.size(); ++id) {
        if (config.vocab[id] == unk) config.unk_id = static_cast<TokenId>(id);
      }
      if (!config.unk_id) throw FormatError(path + ": model.unk_token '" + unk + "' is not in model.vocab");
    }
    const json& merges = model.value("merges", json::array());
    if (!merges.is_array()) throw FormatError(path + ": model.merges must be an array");
    config.merges.reserve(merges.size());
    for (std::size_t i = 0; i < merges.size(); ++i) {
      const json& m = merges[i];
      const std::string where = path + ": model.merges[" + std::to_string(i) + "]";
      if (m.is_string()) {
        config.merges.push_back(parse_merge_line(m.get<std::string>(), where));
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        config.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
      } else {
        throw FormatError(where + ": expected \"left right\" or [\"left\", \"right\"], got " +
                          util::excerpt_for_message(m.dump(), 200));
      }
    }
    for (const auto& t : root.value("added_tokens", json::array())) {
      AddedToken token;
      token.content = t.at("content").get<std::string>();
      token.id = t.at("id").get<TokenId>();
      token.special = flag(t, "special", false);
      token.lstrip = flag(t, "lstrip", false);
      token.rstrip = flag(t, "rstrip", false);
      token.normalized = flag(t, "normalized", false);
      if (flag(t, "single_word", false)) {
        throw FormatError(path + ": added token '" + token.content + "' has single_word true, which is not supported");
      }
      config.added_tokens.push_back(std::move(token));
    }
    read_post_processor(root.value("post_processor", json()), path, &config);
  } catch (const json::exception& e) {
    throw FormatError(path + ": unexpected structure: " + e.what());
  }
  return BpeTokenizer(std::move(config));
}

std::unique_ptr<Tokenizer> load_tokenizer(const std::string& path) {
  if (util::is_regular_file(path) && util::ends_with(path, ".gguf"))
    return std::make_unique<BpeTokenizer>(BpeTokenizer::from_gguf(path));
  if (util::is_regular_file(path) && util::ends_with(path, "tokenizer.json"))
    return std::make_unique<BpeTokenizer>(BpeTokenizer::from_tokenizer_json(path));
  if (util::is_regular_file(path) && util::ends_with(path, ".model")) {
    return std::make_unique<SentencePieceTokenizer>(SentencePieceTokenizer::from_file(path));
  }
  if (!util::is_directory(path)) {
    throw FormatError(path +
                      ": not a .gguf file, a tokenizer.json, a SentencePiece .model or a folder (hint: pass a "
                      "Hugging Face model folder)");
  }
  const std::string folder = path.back() == '/' ? path : path + "/";
  std::unique_ptr<BpeTokenizer> tokenizer;
  if (util::is_regular_file(folder + "tokenizer.json")) {
    tokenizer = std::make_unique<BpeTokenizer>(BpeTokenizer::from_tokenizer_json(folder + "tokenizer.json"));
  } else if (util::is_regular_file(folder + "vocab.json") && util::is_regular_file(folder + "merges.txt")) {
    tokenizer = std::make_unique<BpeTokenizer>(
        BpeTokenizer::from_vocab_and_merges(folder + "vocab.json", folder + "merges.txt"));
  } else if (util::is_regular_file(folder + "tokenizer.model")) {
    // The model file names its own bos/eos; tokenizer_config.json agrees for Llama 2.
    return std::make_unique<SentencePieceTokenizer>(SentencePieceTokenizer::from_file(folder + "tokenizer.model"));
  } else {
    throw FormatError(folder + ": no tokenizer.json, vocab.json + merges.txt or tokenizer.model found");
  }
  // bos/eos names live in tokenizer_config.json, as strings or {"content": ...}.
  if (util::is_regular_file(folder + "tokenizer_config.json")) {
    const json cfg = parse_json_file(folder + "tokenizer_config.json");
    BpeTokenizerConfig config = tokenizer->config();
    auto id_of = [&](const char* key) -> std::optional<TokenId> {
      if (!cfg.is_object() || !cfg.contains(key)) return std::nullopt;
      const json& v = cfg[key];
      const std::string name =
          v.is_string() ? v.get<std::string>() : (v.is_object() ? v.value("content", std::string()) : "");
      return name.empty() ? std::nullopt : tokenizer->token_to_id(name);
    };
    const auto bos = id_of("bos_token"), eos = id_of("eos_token");
    if (bos || eos) {
      if (bos) config.bos_id = bos;
      if (eos) config.eos_id = eos;
      tokenizer = std::make_unique<BpeTokenizer>(std::move(config));
    }
  }
  return tokenizer;
}

}  // namespace tiedlora
