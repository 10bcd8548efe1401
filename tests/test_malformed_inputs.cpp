// test_malformed_inputs.cpp: every file of tests/data/malformed (listed in its expected.json) gets a
// tiedlora::FormatError naming the file and holding the words expected.json gives. The same files seed
// the fuzz target (tests/fuzz).
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tiedlora/core/error.h"
#include "tiedlora/formats/adapter_config.h"
#include "tiedlora/formats/safetensors.h"

namespace {

std::string data_dir() {
  const char* root = std::getenv("TIEDLORA_SOURCE_DIR");
  return std::string(root ? root : ".") + "/tests/data/malformed";
}

TEST(MalformedInputs, EachGetsAClearFormatError) {
  std::ifstream manifest(data_dir() + "/expected.json");
  ASSERT_TRUE(manifest) << "cannot read " << data_dir() << "/expected.json";
  const auto expected = nlohmann::json::parse(manifest);
  ASSERT_GE(expected.size(), 20u);
  for (const auto& [file, spec] : expected.items()) {
    const std::string path = data_dir() + "/" + file;
    std::string message = "no error";
    try {
      if (spec.at("kind") == "safetensors") {
        tiedlora::formats::SafetensorsFile::open(path);
      } else {
        std::ifstream in(path);
        const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        tiedlora::parse_adapter_config(text, path);
      }
    } catch (const tiedlora::FormatError& e) {
      message = e.what();
    } catch (const std::exception& e) {
      message = std::string("wrong exception type: ") + e.what();
    }
    EXPECT_NE(message.find(file), std::string::npos) << file << ": " << message;
    EXPECT_NE(message.find(spec.at("expect").get<std::string>()), std::string::npos) << file << ": " << message;
  }
}

}  // namespace
