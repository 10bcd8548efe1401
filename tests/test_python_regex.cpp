// test_python_regex.cpp: the Python-regex translator (src/util/python_regex.h) against Python's own `re`
// (tests/reference/make_regex_reference.py): what Python refuses is refused, what is translated selects
// exactly the names Python selects, under PEFT's key rule and the target_modules full-match rule.
#include <fstream>
#include <regex>
#include <stdexcept>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tiedlora/core/error.h"
#include "tiedlora/formats/adapter_config.h"
#include "util/python_regex.h"

namespace {

nlohmann::json load_cases() {
  const char* dir = std::getenv("TIEDLORA_REFERENCE_DIR");
  std::ifstream in(std::string(dir ? dir : ".") + "/regex/cases.json");
  if (!in) throw std::runtime_error("regex reference missing: run tests/reference/make_regex_reference.py");
  return nlohmann::json::parse(in);
}

bool translates(const std::string& pattern) {
  try {
    tiedlora::util::compile_peft_key_pattern(pattern);
    tiedlora::util::compile_python_fullmatch(pattern);
    return true;
  } catch (const std::invalid_argument&) {
    return false;
  }
}

TEST(PythonRegex, AgreesWithPythonOrRefuses) {
  const auto ref = load_cases();
  const auto names = ref.at("names").get<std::vector<std::string>>();
  int translated = 0, python_valid = 0;
  for (const auto& c : ref.at("cases")) {
    const std::string pattern = c.at("pattern");
    const bool ok = translates(pattern);
    if (c.at("python_error").get<bool>()) {
      EXPECT_FALSE(ok) << "Python refuses '" << pattern << "' but it was translated to '"
                       << tiedlora::util::python_to_ecmascript(pattern) << "'";
      continue;
    }
    ++python_valid;
    if (!ok) continue;
    ++translated;
    const std::regex key = tiedlora::util::compile_peft_key_pattern(pattern);
    const std::regex full = tiedlora::util::compile_python_fullmatch(pattern);
    for (const auto& name : names) {
      EXPECT_EQ(std::regex_match(name, key), c.at("key").at(name).get<bool>())
          << "key rule, pattern '" << pattern << "' -> '" << tiedlora::util::python_to_ecmascript(pattern, 2)
          << "', name '" << name << "'";
      EXPECT_EQ(std::regex_match(name, full), c.at("fullmatch").at(name).get<bool>())
          << "fullmatch, pattern '" << pattern << "', name '" << name << "'";
    }
  }
  // The random patterns are mostly simple: nearly all that Python accepts must be translated.
  EXPECT_GT(translated, python_valid * 9 / 10) << translated << " of " << python_valid;
}

TEST(PythonRegex, TranslatesEveryPatternOfTheExactListAndRefusesTheOthers) {
  const auto ref = load_cases();
  for (const auto& p : ref.at("exact")) EXPECT_TRUE(translates(p.get<std::string>())) << p;
  for (const auto& p : ref.at("refused")) EXPECT_FALSE(translates(p.get<std::string>())) << p;
}

TEST(PythonRegex, RefusalNamesTheReason) {
  try {
    tiedlora::util::python_to_ecmascript("(?<=layers\\.0\\.)q_proj");
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("lookbehind"), std::string::npos) << e.what();
  }
}

TEST(PythonRegex, AlphaPatternKeysApplyInTheFilesOrderAndInvalidKeysAreRefused) {
  // Both keys select layers.1's q_proj; the file lists the general one first, so PEFT applies it there.
  const auto config = tiedlora::parse_adapter_config(
      R"({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
          "alpha_pattern": {"self_attn\\.(q|v)_proj": 2, "(?P<l>layers\\.1\\.)self_attn\\.q_proj": 16}})",
      "adapter_config.json");
  EXPECT_DOUBLE_EQ(config.scale_for("model.layers.1.self_attn.q_proj", 4), 0.5);
  EXPECT_DOUBLE_EQ(config.scale_for("model.layers.0.self_attn.q_proj", 4), 0.5);
  EXPECT_DOUBLE_EQ(config.scale_for("model.layers.0.mlp.up_proj", 4), 2.0);
  try {
    tiedlora::parse_adapter_config(R"({"peft_type": "LORA", "r": 4, "alpha_pattern": {"q_proj(": 2}})", "cfg.json");
    FAIL() << "no error";
  } catch (const tiedlora::FormatError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("cfg.json"), std::string::npos) << what;
    EXPECT_NE(what.find("alpha_pattern"), std::string::npos) << what;
    EXPECT_NE(what.find("q_proj("), std::string::npos) << what;
  }
}

TEST(PythonRegex, TargetModulesFollowPeft) {
  auto config = tiedlora::parse_adapter_config(
      R"({"peft_type": "LORA", "r": 4, "target_modules": ["attn.c_proj", "q_proj"]})", "a.json");
  EXPECT_TRUE(config.targets("transformer.h.0.attn.c_proj"));
  EXPECT_FALSE(config.targets("transformer.h.0.mlp.c_proj"));
  EXPECT_TRUE(config.targets("q_proj"));
  EXPECT_FALSE(config.targets("model.layers.0.self_attn.xq_proj"));
  config = tiedlora::parse_adapter_config(
      R"({"peft_type": "LORA", "r": 4, "target_modules": "model\\.layers\\.\\d+\\.self_attn\\.(q|v)_proj"})", "b.json");
  EXPECT_TRUE(config.targets("model.layers.11.self_attn.v_proj"));
  EXPECT_FALSE(config.targets("base.model.layers.11.self_attn.v_proj"));  // a full match, not a suffix
}

}  // namespace
