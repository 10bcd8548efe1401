// test_gguf.cpp: the GGUF reader against llama.cpp's `gguf` Python package (tests/reference/
// make_gguf_reference.py): every metadata type, the tensor table, bit-exact dequantization of every supported
// type, the Llama Q/K un-permutation (also against transformers' own GGUF loading of SmolLM2), the real
// SmolLM2-135M-Instruct GGUF (metadata, all 272 tensors by checksum, a few in full), and malformed inputs:
// every truncation of a valid file, 20,000 random corruptions and hand-made files for each check the parser
// makes, all of which must be a tiedlora::FormatError and never a crash.
#include <sys/mman.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <tuple>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tiedlora/core/error.h"
#include "tiedlora/formats/gguf.h"
#include "tiedlora/formats/gguf_tensor.h"
#include "tiedlora/formats/safetensors.h"

namespace {

using nlohmann::json;
using tiedlora::FormatError;
using tiedlora::formats::GgmlType;
using tiedlora::formats::GgufFile;
using tiedlora::formats::GgufType;
using tiedlora::formats::GgufValue;

std::string reference(const std::string& name) {
  const char* dir = std::getenv("TIEDLORA_REFERENCE_DIR");
  return std::string(dir ? dir : ".") + "/gguf/" + name;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot read " << path << " (run the reference_gguf fixture first)";
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json read_json(const std::string& name) { return json::parse(read_file(reference(name))); }

uint32_t float_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// Bitwise comparison of float32 values with a reference safetensors tensor (F32).
::testing::AssertionResult same_floats(const std::vector<float>& ours, const tiedlora::formats::SafetensorsFile& file,
                                       const std::string& name) {
  const auto [bytes, size] = file.bytes(name);
  if (size != ours.size() * 4) {
    return ::testing::AssertionFailure() << name << ": " << ours.size() << " values, reference has " << size / 4;
  }
  for (std::size_t i = 0; i < ours.size(); ++i) {
    float expected;
    std::memcpy(&expected, bytes + 4 * i, 4);
    if (float_bits(ours[i]) != float_bits(expected)) {
      return ::testing::AssertionFailure()
             << name << ": value " << i << " is " << ours[i] << ", gguf-py gives " << expected << " (bits differ)";
    }
  }
  return ::testing::AssertionSuccess();
}

// Compares a metadata value with the manifest entry {"type", "element_type", "value"}.
void expect_value(const GgufValue& v, const std::string& type, const std::string& element_type, const json& expected,
                  const std::string& key) {
  ASSERT_EQ(tiedlora::formats::gguf_type_name(v.type()), type) << key;
  if (type == "ARRAY") {
    ASSERT_EQ(tiedlora::formats::gguf_type_name(v.element_type()), element_type) << key;
    ASSERT_EQ(v.size(), expected.size()) << key;
    if (element_type == "STRING") {
      EXPECT_EQ(v.as_strings(), expected.get<std::vector<std::string>>()) << key;
    } else if (element_type == "ARRAY") {
      const auto& inner = v.as_arrays();
      for (std::size_t i = 0; i < inner.size(); ++i) {
        const json& e = expected[i];
        const std::string inner_type = e[0].is_array() ? "ARRAY" : e[0].is_string() ? "STRING" : "INT32";
        expect_value(inner[i], "ARRAY", inner_type, e, key + "[" + std::to_string(i) + "]");
      }
    } else if (element_type == "FLOAT32" || element_type == "FLOAT64") {
      EXPECT_EQ(v.as_doubles(), expected.get<std::vector<double>>()) << key;
    } else if (element_type == "BOOL") {
      std::vector<int64_t> bools;
      for (const auto& b : expected) bools.push_back(b.get<bool>() ? 1 : 0);
      EXPECT_EQ(v.as_ints(), bools) << key;
    } else if (element_type == "UINT64") {
      // 2^64 - 1 does not fit in as_ints(); compare through the doubles and the parser's range check.
      EXPECT_EQ(v.as_doubles().size(), expected.size()) << key;
      EXPECT_THROW(v.as_ints(), FormatError) << key;
    } else {
      EXPECT_EQ(v.as_ints(), expected.get<std::vector<int64_t>>()) << key;
    }
    return;
  }
  if (type == "STRING") {
    EXPECT_EQ(v.as_string(), expected.get<std::string>()) << key;
  } else if (type == "BOOL") {
    EXPECT_EQ(v.as_bool(), expected.get<bool>()) << key;
  } else if (type == "FLOAT32" || type == "FLOAT64") {
    EXPECT_EQ(v.as_double(), expected.get<double>()) << key;
  } else if (expected.is_number_unsigned()) {
    EXPECT_EQ(v.as_uint(), expected.get<uint64_t>()) << key;
  } else {
    EXPECT_EQ(v.as_int(), expected.get<int64_t>()) << key;
  }
}

void expect_same_table(const GgufFile& file, const json& manifest) {
  const auto& c = file.contents();
  EXPECT_EQ(c.version, manifest["version"].get<uint32_t>());
  EXPECT_EQ(c.alignment, manifest["alignment"].get<uint64_t>());
  EXPECT_EQ(c.data_offset, manifest["data_offset"].get<uint64_t>());
  ASSERT_EQ(c.tensors.size(), manifest["tensors"].size());
  for (std::size_t i = 0; i < c.tensors.size(); ++i) {
    const auto& t = c.tensors[i];
    const json& e = manifest["tensors"][i];
    EXPECT_EQ(t.name, e["name"].get<std::string>());
    EXPECT_EQ(tiedlora::formats::ggml_type_name(t.type), e["type"].get<std::string>()) << t.name;
    EXPECT_EQ(t.ne, e["ne"].get<std::vector<uint64_t>>()) << t.name;
    EXPECT_EQ(t.offset, e["offset"].get<uint64_t>()) << t.name;
    EXPECT_EQ(t.nbytes, e["nbytes"].get<uint64_t>()) << t.name;
  }
}

// ---- small files written by gguf-py -----------------------------------------------------------------------

TEST(Gguf, ReadsEveryMetadataTypeInVersions2And3) {
  for (const std::string name : {"all_types", "all_types_v2"}) {
    const GgufFile file = GgufFile::open(reference(name + ".gguf"));
    const json manifest = read_json(name + ".json");
    EXPECT_EQ(file.version(), name == "all_types" ? 3u : 2u);
    ASSERT_EQ(file.contents().metadata.size(), manifest["metadata"].size()) << name;
    for (const auto& [key, e] : manifest["metadata"].items()) {
      ASSERT_TRUE(file.has_key(key)) << key;
      expect_value(file.value(key), e["type"].get<std::string>(), e.value("element_type", std::string()), e["value"],
                   key);
    }
    expect_same_table(file, manifest);
  }
}

TEST(Gguf, TypedGettersNameTheKeyOnErrors) {
  const GgufFile file = GgufFile::open(reference("all_types.gguf"));
  EXPECT_EQ(file.get_uint("t.uint8"), 250u);
  EXPECT_EQ(file.get_int("t.int8"), -120);
  EXPECT_EQ(file.get_uint("t.uint64"), 18000000000000000000ull);
  EXPECT_EQ(file.get_float("t.float32"), static_cast<double>(0.1f));
  EXPECT_EQ(file.get_string("missing.key", "fallback"), "fallback");
  EXPECT_EQ(file.get_uint("missing.key", 7), 7u);
  auto expect_error = [&](auto&& call, const std::string& fragment) {
    try {
      call();
      ADD_FAILURE() << "no error for " << fragment;
    } catch (const FormatError& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(fragment), std::string::npos) << what;
      EXPECT_NE(what.find("all_types.gguf"), std::string::npos) << what;
    }
  };
  expect_error([&] { file.get_string("t.uint8"); }, "'t.uint8': expected STRING, found UINT8 250");
  expect_error([&] { file.get_uint("t.int8"); }, "'t.int8': expected a non-negative integer");
  expect_error([&] { file.get_int("t.uint64"); }, "'t.uint64'");
  expect_error([&] { file.value("no.such.key"); }, "'no.such.key' is missing");
  expect_error([&] { file.get_strings("t.array.int32"); }, "expected an array of STRING");
  expect_error([&] { file.tensor("no.such.tensor"); }, "'no.such.tensor' does not exist");
  expect_error([&] { file.dequantize("q2_k.2d"); }, "type Q2_K");
  EXPECT_THROW(GgufFile::open(reference("no-such-file.gguf")), FormatError);
}

TEST(Gguf, DequantizesEveryTypeBitExactly) {
  const auto expected = tiedlora::formats::SafetensorsFile::open(reference("expected.safetensors"));
  std::size_t compared = 0;
  for (const std::string name : {"all_types", "aligned64"}) {
    const GgufFile file = GgufFile::open(reference(name + ".gguf"));
    expect_same_table(file, read_json(name + ".json"));
    for (const auto& t : file.tensors()) {
      if (t.type == GgmlType::Q2_K) continue;
      const std::string key = (name == "aligned64" ? "aligned64." : "") + t.name;
      EXPECT_TRUE(same_floats(file.dequantize(t.name), expected, key)) << tiedlora::formats::ggml_type_name(t.type);
      // The tensor view: shape = ne reversed, same values, and a bf16 conversion of them.
      const at::Tensor tensor = tiedlora::formats::load_gguf_tensor(file, t.name);
      EXPECT_EQ(tensor.sizes().vec(), t.shape());
      EXPECT_TRUE(at::equal(tensor.flatten(), expected.tensor(key)));
      EXPECT_TRUE(
          at::equal(tiedlora::formats::load_gguf_tensor(file, t.name, at::kBFloat16), tensor.to(at::kBFloat16)));
      ++compared;
    }
  }
  EXPECT_EQ(compared, 14u);  // F32 F16 BF16 F64 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K, and F32 + F16 in aligned64
}

TEST(Gguf, UndoesTheLlamaQKPermutation) {
  const GgufFile file = GgufFile::open(reference("permuted.gguf"));
  const auto expected = tiedlora::formats::SafetensorsFile::open(reference("expected.safetensors"));
  const int64_t n_head = static_cast<int64_t>(file.get_uint("llama.attention.head_count"));
  const int64_t n_kv = static_cast<int64_t>(file.get_uint("llama.attention.head_count_kv"));
  for (const auto& [name, heads, key] :
       {std::tuple<std::string, int64_t, std::string>{"blk.0.attn_q.weight", n_head, "permuted.q_hf"},
        {"blk.0.attn_k.weight", n_kv, "permuted.k_hf"}}) {
    const auto& info = file.tensor(name);
    const int64_t rows = static_cast<int64_t>(info.ne[1]), cols = static_cast<int64_t>(info.ne[0]);
    const at::Tensor t =
        tiedlora::formats::unpermute_llama_qk_rows(tiedlora::formats::load_gguf_tensor(file, name), heads);
    EXPECT_TRUE(at::equal(t, expected.tensor(key).reshape({rows, cols})));
  }
  EXPECT_THROW(tiedlora::formats::unpermute_llama_qk_rows(at::zeros({6, 2}), 4), c10::Error);
}

// ---- the real SmolLM2-135M-Instruct GGUF ------------------------------------------------------------------

const json& smollm2_manifest() {
  static const json m = read_json("smollm2.json");
  return m;
}

TEST(GgufSmolLM2, MetadataIsTheModelsConfiguration) {
  const GgufFile file = GgufFile::open(smollm2_manifest()["path"].get<std::string>());
  EXPECT_EQ(file.version(), 3u);
  EXPECT_EQ(file.get_string("general.architecture"), "llama");
  EXPECT_EQ(file.get_uint("llama.block_count"), 30u);
  EXPECT_EQ(file.get_uint("llama.embedding_length"), 576u);
  EXPECT_EQ(file.get_uint("llama.feed_forward_length"), 1536u);
  EXPECT_EQ(file.get_uint("llama.attention.head_count"), 9u);
  EXPECT_EQ(file.get_uint("llama.attention.head_count_kv"), 3u);
  EXPECT_EQ(file.get_float("llama.rope.freq_base"), 100000.0);
  EXPECT_EQ(file.get_uint("llama.vocab_size"), 49152u);
  EXPECT_EQ(file.get_float("llama.attention.layer_norm_rms_epsilon"), static_cast<double>(1e-5f));
  EXPECT_EQ(file.get_strings("tokenizer.ggml.tokens").size(), 49152u);
  EXPECT_EQ(file.get_strings("tokenizer.ggml.merges").size(), 48900u);
  EXPECT_EQ(file.get_string("tokenizer.ggml.pre"), "smollm");
  // Every scalar key as gguf-py reads it.
  std::size_t scalars = 0;
  for (const auto& [key, e] : smollm2_manifest()["metadata"].items()) {
    if (e["type"] == "ARRAY") {
      EXPECT_EQ(file.value(key).size(), e["value"]["length"].get<uint64_t>()) << key;
      continue;
    }
    expect_value(file.value(key), e["type"].get<std::string>(), "", e["value"], key);
    ++scalars;
  }
  EXPECT_EQ(file.contents().metadata.size(), smollm2_manifest()["metadata"].size());
  EXPECT_GT(scalars, 25u);
  expect_same_table(file, smollm2_manifest());
}

TEST(GgufSmolLM2, EveryTensorDequantizesAsGgufPy) {
  const GgufFile file = GgufFile::open(smollm2_manifest()["path"].get<std::string>());
  const json& checksums = smollm2_manifest()["checksums"];
  ASSERT_EQ(file.tensors().size(), 272u);
  std::map<std::string, int> type_counts;
  std::vector<float> values;
  for (const auto& t : file.tensors()) {
    ++type_counts[tiedlora::formats::ggml_type_name(t.type)];
    values.resize(t.numel);
    file.dequantize(t.name, values.data());
    uint64_t sum = 0;  // sum of bits[i] * (i + 1) mod 2^64, as the reference script computes it
    for (uint64_t i = 0; i < values.size(); ++i) sum += static_cast<uint64_t>(float_bits(values[i])) * (i + 1);
    EXPECT_EQ(std::to_string(sum), checksums[t.name]["checksum"].get<std::string>()) << t.name;
    EXPECT_EQ(t.numel, checksums[t.name]["numel"].get<uint64_t>()) << t.name;
  }
  EXPECT_EQ(type_counts["Q4_1"], 210);
  EXPECT_EQ(type_counts["F32"], 61);
  EXPECT_EQ(type_counts["Q8_0"], 1);
}

TEST(GgufSmolLM2, SelectedTensorsInFullAndHuggingFaceProjections) {
  const GgufFile file = GgufFile::open(smollm2_manifest()["path"].get<std::string>());
  const auto expected = tiedlora::formats::SafetensorsFile::open(reference("smollm2_expected.safetensors"));
  for (const std::string name : {"blk.0.attn_norm.weight", "output_norm.weight", "blk.0.attn_q.weight",
                                 "blk.0.attn_k.weight", "blk.0.attn_v.weight", "blk.29.ffn_down.weight"}) {
    EXPECT_TRUE(same_floats(file.dequantize(name), expected, name));
  }
  const at::Tensor embedding = tiedlora::formats::load_gguf_tensor(file, "token_embd.weight");
  EXPECT_EQ(embedding.sizes().vec(), (std::vector<int64_t>{49152, 576}));
  EXPECT_TRUE(at::equal(embedding.slice(0, 0, 64), expected.tensor("token_embd.weight.rows_0_64")));
  EXPECT_TRUE(at::equal(embedding.slice(0, 0, 49152, 1000), expected.tensor("token_embd.weight.rows_every_1000")));
  // transformers' q_proj / k_proj built from the same GGUF = our dequantized, un-permuted attn_q / attn_k.
  for (const int layer : {0, 29}) {
    for (const auto& [gguf_name, hf_name, heads] :
         {std::tuple<std::string, std::string, int64_t>{"attn_q", "q_proj", 9}, {"attn_k", "k_proj", 3}}) {
      const at::Tensor ours = tiedlora::formats::unpermute_llama_qk_rows(
          tiedlora::formats::load_gguf_tensor(file, "blk." + std::to_string(layer) + "." + gguf_name + ".weight"),
          heads);
      const at::Tensor hf =
          expected.tensor("hf.model.layers." + std::to_string(layer) + ".self_attn." + hf_name + ".weight");
      EXPECT_TRUE(at::equal(ours, hf)) << "layer " << layer << " " << hf_name;
    }
  }
}

// ---- malformed inputs ---------------------------------------------------------------------------------------

// Builds GGUF bytes field by field, so each test can break exactly one thing.
class Bytes {
 public:
  Bytes& u8(uint8_t v) { return raw(&v, 1); }
  Bytes& u32(uint32_t v) { return le(v, 4); }
  Bytes& u64(uint64_t v) { return le(v, 8); }
  Bytes& str(const std::string& s) {
    u64(s.size());
    data += s;
    return *this;
  }
  Bytes& raw(const void* p, std::size_t n) {
    data.append(static_cast<const char*>(p), n);
    return *this;
  }
  Bytes& pad_to(std::size_t alignment) {
    while (data.size() % alignment) data += '\0';
    return *this;
  }
  std::string data;

 private:
  Bytes& le(uint64_t v, int n) {
    for (int i = 0; i < n; ++i) data += static_cast<char>((v >> (8 * i)) & 0xFF);
    return *this;
  }
};

struct TensorSpec {
  std::string name;
  std::vector<uint64_t> ne;
  uint32_t type;
  uint64_t offset;
};

// A complete file: header, `kv` (already encoded entries), tensor infos, padding, `data_bytes` of data.
std::string gguf_file(const std::vector<std::string>& kv, const std::vector<TensorSpec>& tensors,
                      std::size_t data_bytes, uint32_t version = 3, std::size_t alignment = 32) {
  Bytes b;
  b.raw("GGUF", 4).u32(version).u64(tensors.size()).u64(kv.size());
  for (const auto& e : kv) b.data += e;
  for (const auto& t : tensors) {
    b.str(t.name).u32(static_cast<uint32_t>(t.ne.size()));
    for (uint64_t n : t.ne) b.u64(n);
    b.u32(t.type).u64(t.offset);
  }
  b.pad_to(alignment);
  b.data.append(data_bytes, '\0');
  return b.data;
}

std::string kv_u32(const std::string& key, uint32_t v) { return Bytes().str(key).u32(4).u32(v).data; }

void expect_format_error(const std::string& bytes, const std::string& fragment) {
  try {
    tiedlora::formats::parse_gguf(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "crafted.gguf");
    ADD_FAILURE() << "accepted a file that should fail with '" << fragment << "'";
  } catch (const FormatError& e) {
    const std::string what = e.what();
    EXPECT_EQ(what.rfind("crafted.gguf: ", 0), 0u) << what;
    EXPECT_NE(what.find(fragment), std::string::npos) << "message: " << what << "\nexpected to contain: " << fragment;
  }
}

TEST(GgufMalformed, EachCheckGivesAClearError) {
  const std::vector<std::string> arch = {Bytes().str("general.architecture").u32(8).str("llama").data};
  const TensorSpec w{"w", {32, 2}, 0, 0};  // F32 32 x 2 = 256 bytes
  // The well-formed base case parses.
  const std::string good = gguf_file(arch, {w}, 256);
  EXPECT_NO_THROW(
      tiedlora::formats::parse_gguf(reinterpret_cast<const uint8_t*>(good.data()), good.size(), "good.gguf"));

  expect_format_error("", "not a GGUF file");
  expect_format_error("GGU", "not a GGUF file");
  expect_format_error("GGUX" + good.substr(4), "starts with 'GGUX'");
  expect_format_error(gguf_file(arch, {w}, 256, 1), "version 1 is not supported");
  expect_format_error(gguf_file(arch, {w}, 256, 4), "unknown GGUF version 4");
  expect_format_error(gguf_file(arch, {w}, 256, 0x03000000), "big-endian");
  expect_format_error(Bytes().raw("GGUF", 4).u32(3).u64(0).u64(1ull << 60).data, "metadata entries");
  expect_format_error(Bytes().raw("GGUF", 4).u32(3).u64(1ull << 60).u64(0).data, "tensors, more than");
  expect_format_error(gguf_file({Bytes().str("k").u32(8).u64(1ull << 40).data}, {}, 0),
                      "metadata 'k': the length of the string value");
  expect_format_error(gguf_file({Bytes().str("k").u32(13).u32(0).data}, {}, 0), "metadata 'k': unknown value type 13");
  expect_format_error(gguf_file({Bytes().str("k").u32(9).u32(77).u64(1).data}, {}, 0), "unknown array element type 77");
  expect_format_error(gguf_file({Bytes().str("k").u32(9).u32(4).u64(1ull << 61).data}, {}, 0), "cannot fit");
  expect_format_error(gguf_file({Bytes().str("k").u32(7).u8(2).data}, {}, 0), "BOOL value is 2");
  expect_format_error(gguf_file({Bytes().str("k").u32(9).u32(7).u64(2).u8(1).u8(3).data}, {}, 0), "BOOL array element");
  {
    Bytes deep;
    deep.str("deep").u32(9);
    for (int i = 0; i < 12; ++i) deep.u32(9).u64(1);
    deep.u32(4).u64(0);
    expect_format_error(gguf_file({deep.data}, {}, 0), "nested deeper");
  }
  expect_format_error(gguf_file({kv_u32("k", 1), kv_u32("k", 2)}, {}, 0), "metadata 'k': duplicate key");
  expect_format_error(gguf_file({kv_u32("general.alignment", 48)}, {}, 0), "power of two");
  expect_format_error(gguf_file({kv_u32("general.alignment", 0)}, {}, 0), "power of two");
  expect_format_error(gguf_file({Bytes().str("general.alignment").u32(10).u64(32).data}, {}, 0), "must be UINT32");
  expect_format_error(gguf_file(arch, {{"w", {1, 1, 1, 1, 1}, 0, 0}}, 32), "tensor 'w': has 5 dimensions");
  expect_format_error(gguf_file(arch, {{"w", {32}, 31, 0}}, 256), "tensor 'w': has unknown type 31");
  expect_format_error(gguf_file(arch, {{"w", {33}, 2, 0}}, 256), "not a multiple of the Q4_0 block size 32");
  expect_format_error(gguf_file(arch, {{"w", {1ull << 40, 1ull << 40}, 0, 0}}, 32), "overflows 64 bits");
  expect_format_error(gguf_file(arch, {{"w", {1ull << 63}, 0, 0}}, 32), "above 2^63");
  expect_format_error(gguf_file(arch, {{"w", {1ull << 62}, 0, 0}}, 32), "size in bytes overflows");
  expect_format_error(gguf_file(arch, {{"w", {8}, 0, 4}}, 256), "not a multiple of the alignment 32");
  expect_format_error(gguf_file(arch, {w}, 255), "the file is truncated");
  expect_format_error(gguf_file(arch, {{"w", {32}, 0, 1ull << 62}}, 256), "needs bytes");
  expect_format_error(gguf_file(arch, {w, {"v", {32}, 0, 64}}, 512),
                      "tensor 'v': data [64, 192) overlaps tensor 'w' [0, 256)");
  expect_format_error(gguf_file(arch, {w, {"w", {8}, 0, 256}}, 512), "tensor 'w': duplicate tensor name");
  {
    std::string no_data = gguf_file(arch, {w}, 0);
    no_data.resize(no_data.size() - 1);  // the padding is cut: the data section would start past the end
    expect_format_error(no_data, "data section");
  }
  // Names with odd bytes are quoted safely in messages.
  expect_format_error(gguf_file(arch, {{std::string("bad\n\xff", 5), {33}, 2, 0}}, 256), "tensor 'bad\\x0a\\xff'");
}

// Counts in the header are checked against the bytes left, but a metadata entry takes ~160 bytes in memory
// for 13 in the file: a 16 GiB file (here a sparse anonymous mapping that reads as zeros) claiming the
// largest count that fits used to make the parser reserve ~200 GB and throw std::bad_alloc. Now it parses
// entries until the second empty key, a duplicate: a FormatError.
TEST(GgufMalformed, HugeCountsNeverDriveAnAllocation) {
  const std::size_t size = std::size_t{16} << 30;
  void* address = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  ASSERT_NE(address, MAP_FAILED);
  const uint64_t remaining = size - 24;
  for (const auto& [tensors, kv] : {std::pair<uint64_t, uint64_t>{0, remaining / 13}, {remaining / 24, 0}}) {
    const std::string header = Bytes().raw("GGUF", 4).u32(3).u64(tensors).u64(kv).data;
    std::memcpy(address, header.data(), header.size());
    try {
      tiedlora::formats::parse_gguf(static_cast<const uint8_t*>(address), size, "huge.gguf");
      ADD_FAILURE() << "accepted a header claiming " << tensors << " tensors and " << kv << " metadata entries";
    } catch (const FormatError& e) {
      EXPECT_NE(std::string(e.what()).find(kv ? "duplicate key" : "duplicate tensor name"), std::string::npos)
          << e.what();
    } catch (const std::bad_alloc&) {
      ADD_FAILURE() << "std::bad_alloc for a header claiming " << tensors << " tensors and " << kv << " entries";
    }
  }
  ::munmap(address, size);
}

TEST(GgufMalformed, EveryTruncationOfAValidFileIsRejected) {
  const std::string bytes = read_file(reference("all_types.gguf"));
  const auto full = tiedlora::formats::parse_gguf(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), "full");
  uint64_t needed = full.data_offset;
  for (const auto& t : full.tensors) needed = std::max(needed, full.data_offset + t.offset + t.nbytes);
  std::size_t rejected = 0;
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    std::vector<uint8_t> copy(bytes.begin(), bytes.begin() + n);  // exact size: a sanitizer sees any over-read
    try {
      tiedlora::formats::parse_gguf(copy.data(), copy.size(), "truncated");
      EXPECT_GE(n, needed) << "a truncation to " << n << " bytes cuts tensor data but was accepted";
    } catch (const FormatError&) {
      EXPECT_LT(n, needed) << "a truncation to " << n << " bytes keeps all the data but was rejected";
      ++rejected;
    }
  }
  EXPECT_EQ(rejected, needed);
  std::printf("[ info ] %zu truncations rejected, %zu accepted (trailing padding only)\n", rejected,
              bytes.size() - rejected);
}

TEST(GgufMalformed, RandomCorruptionsGiveFormatErrorsOrValidFiles) {
  const std::string original = read_file(reference("all_types.gguf"));
  std::mt19937_64 rng(1234);
  std::size_t rejected = 0, accepted = 0;
  const std::size_t header_end =
      tiedlora::formats::parse_gguf(reinterpret_cast<const uint8_t*>(original.data()), original.size(), "x")
          .data_offset;
  for (int trial = 0; trial < 20000; ++trial) {
    std::vector<uint8_t> bytes(original.begin(), original.end());
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      // Mostly the header, where the parser works; sometimes anywhere.
      const std::size_t limit = rng() % 4 ? header_end : bytes.size();
      const std::size_t at = rng() % limit;
      switch (rng() % 3) {
        case 0: bytes[at] ^= static_cast<uint8_t>(1u << (rng() % 8)); break;
        case 1: bytes[at] = static_cast<uint8_t>(rng()); break;
        default: bytes[at] = (rng() % 2) ? 0xFF : 0x00; break;
      }
    }
    if (rng() % 8 == 0) bytes.resize(rng() % bytes.size());
    try {
      const auto contents = tiedlora::formats::parse_gguf(bytes.data(), bytes.size(), "corrupt");
      // Whatever is accepted must be safe to use: dequantize every tensor that can be.
      for (const auto& t : contents.tensors) {
        if (!tiedlora::formats::ggml_type_info(static_cast<uint32_t>(t.type))->dequantizable || t.numel > (1u << 20))
          continue;
        std::vector<float> out(t.numel);
        tiedlora::formats::dequantize(t.type, bytes.data() + contents.data_offset + t.offset, t.numel, out.data());
      }
      ++accepted;
    } catch (const FormatError&) {
      ++rejected;
    }
  }
  std::printf("[ info ] 20000 corruptions: %zu rejected with FormatError, %zu still valid\n", rejected, accepted);
  EXPECT_GT(rejected, 10000u);
}

}  // namespace
