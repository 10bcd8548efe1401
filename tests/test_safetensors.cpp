// tests/test_safetensors.cpp: tiedlora::formats safetensors reading and writing against the Python package.
//
// Reference files come from tests/reference/make_safetensors_reference.py (the real `safetensors` 0.8.0
// and huggingface_hub), found in $TIEDLORA_REFERENCE_DIR/safetensors. Each comes with a JSON of raw bytes
// and values, so reading is checked without trusting any safetensors parser. Files this test writes go
// to $TIEDLORA_SAFETENSORS_OUT, where tests/reference/check_safetensors_written.py then reads them back
// with Python. Malformed inputs are made here, in a scratch folder beside it.
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "tiedlora/core/error.h"
#include "tiedlora/formats/safetensors.h"

using nlohmann::json;
using tiedlora::formats::Checkpoint;
using tiedlora::formats::SafetensorsFile;

namespace {

// ---- helpers ----------------------------------------------------------------------------------------
// Files and folders are handled with POSIX calls: the LibTorch wheels export GCC 13 builds of
// std::filesystem operations that override the system's, and remove_all crashes with GCC 12's libstdc++.

bool exists(const std::string& path) {
  struct stat st{};
  return ::stat(path.c_str(), &st) == 0;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d)) {
      const std::string n = e->d_name;
      if (n != "." && n != "..") names.push_back(n);
    }
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  return names;
}

void make_dirs(const std::string& path) {
  for (std::size_t i = 1; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') ::mkdir(path.substr(0, i).c_str(), 0755);
  }
}

void remove_tree(const std::string& path) {
  struct stat st{};
  if (::lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    for (const auto& n : list_dir(path)) remove_tree(path + "/" + n);
    ::rmdir(path.c_str());
  } else {
    ::unlink(path.c_str());
  }
}

std::string read_bytes(const std::string& path);
void write_bytes(const std::string& path, const std::string& bytes);

// Copies a flat folder (a checkpoint has no subfolders).
void copy_dir(const std::string& from, const std::string& to) {
  make_dirs(to);
  for (const auto& n : list_dir(from)) write_bytes(to + "/" + n, read_bytes(from + "/" + n));
}

std::string reference_dir() {
  const char* dir = std::getenv("TIEDLORA_REFERENCE_DIR");
  if (dir == nullptr) return {};
  return std::string(dir) + "/safetensors";
}

// Where files for the Python check go (the CTest fixture sets it; standalone runs use a temporary folder).
std::string out_dir() {
  const char* dir = std::getenv("TIEDLORA_SAFETENSORS_OUT");
  const char* tmp = std::getenv("TMPDIR");
  std::string d = dir ? dir : std::string(tmp ? tmp : "/tmp") + "/tiedlora_safetensors_out";
  make_dirs(d);
  return d;
}

// Scratch space for malformed files and experiments, which the Python check must not see.
std::string scratch_dir(const std::string& name) {
  const std::string d = out_dir() + "_scratch/" + name;
  remove_tree(d);
  make_dirs(d);
  return d;
}

#define REQUIRE_REFERENCE()                                                                 \
  if (reference_dir().empty() || !exists(reference_dir() + "/dtypes.json")) {               \
    GTEST_SKIP() << "no reference data: run through ctest (fixture reference_safetensors)"; \
  }

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

std::string hex(const uint8_t* p, std::size_t n) {
  static const char* kHex = "0123456789abcdef";
  std::string s;
  for (std::size_t i = 0; i < n; ++i) {
    s += kHex[p[i] >> 4];
    s += kHex[p[i] & 15];
  }
  return s;
}

// A safetensors file from a header string and `data_bytes` bytes of data (no padding unless in `header`).
std::string st_bytes(const std::string& header, std::size_t data_bytes, char fill = 0x11) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(n >> (8 * i));
  return out + header + std::string(data_bytes, fill);
}

// Runs `fn`, which must throw tiedlora::FormatError whose message starts with `prefix` and contains every
// string of `parts`.
void expect_format_error(const std::function<void()>& fn, const std::string& prefix,
                         const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected a FormatError containing " << ::testing::PrintToString(parts);
  } catch (const tiedlora::FormatError& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(prefix, 0), 0u) << "message does not start with " << prefix << ": " << msg;
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

// The torch dtype each safetensors dtype must map to (written out independently of the library).
at::ScalarType expected_scalar_type(const std::string& dtype) {
  static const std::map<std::string, at::ScalarType> kMap = {{"BOOL", at::kBool},
                                                             {"U8", at::kByte},
                                                             {"I8", at::kChar},
                                                             {"F8_E5M2", at::kFloat8_e5m2},
                                                             {"F8_E4M3", at::kFloat8_e4m3fn},
                                                             {"I16", at::kShort},
                                                             {"U16", at::kUInt16},
                                                             {"F16", at::kHalf},
                                                             {"BF16", at::kBFloat16},
                                                             {"I32", at::kInt},
                                                             {"U32", at::kUInt32},
                                                             {"F32", at::kFloat},
                                                             {"I64", at::kLong},
                                                             {"U64", at::kUInt64},
                                                             {"F64", at::kDouble}};
  return kMap.at(dtype);
}

// Checks the values of `t` against the reference list (floats as float64, integers exact).
void check_values(const at::Tensor& t, const std::string& dtype, const json& values, const std::string& what) {
  ASSERT_EQ(t.numel(), static_cast<int64_t>(values.size())) << what;
  if (t.numel() == 0) return;
  const bool is_float = t.is_floating_point();
  if (is_float) {
    at::Tensor d = t.to(at::kDouble).contiguous();
    const double* p = d.data_ptr<double>();
    for (std::size_t i = 0; i < values.size(); ++i) EXPECT_EQ(p[i], values[i].get<double>()) << what << "[" << i << "]";
    return;
  }
  at::Tensor c = t.contiguous();
  const auto* raw = static_cast<const uint8_t*>(c.data_ptr());
  const std::size_t size = c.element_size();
  const bool is_signed = dtype[0] == 'I';
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (dtype == "BOOL") {
      EXPECT_EQ(raw[i] != 0, values[i].get<bool>()) << what << "[" << i << "]";
    } else if (is_signed) {
      int64_t v = 0;
      if (size == 1) v = static_cast<int8_t>(raw[i]);
      if (size == 2) {
        int16_t x;
        std::memcpy(&x, raw + 2 * i, 2);
        v = x;
      }
      if (size == 4) {
        int32_t x;
        std::memcpy(&x, raw + 4 * i, 4);
        v = x;
      }
      if (size == 8) std::memcpy(&v, raw + 8 * i, 8);
      EXPECT_EQ(v, values[i].get<int64_t>()) << what << "[" << i << "]";
    } else {
      uint64_t v = 0;
      std::memcpy(&v, raw + size * i, size);  // little-endian host
      EXPECT_EQ(v, values[i].get<uint64_t>()) << what << "[" << i << "]";
    }
  }
  // Torch itself must see the same integers (catches a wrong signedness in the dtype mapping).
  if (dtype != "BOOL" && dtype != "U64") {
    at::Tensor l = t.to(at::kLong).contiguous();
    for (std::size_t i = 0; i < values.size(); ++i) {
      EXPECT_EQ(l.data_ptr<int64_t>()[i], values[i].get<int64_t>()) << what << "[" << i << "] via torch";
    }
  }
}

const std::vector<std::string> kCases = {"dtypes", "meta_one", "meta_many", "meta_empty", "names", "no_tensors"};

// ---- (a) reading what Python wrote ------------------------------------------------------------------

TEST(SafetensorsReference, ReadsEveryDtypeShapeValueAndMetadata) {
  REQUIRE_REFERENCE();
  for (const auto& c : kCases) {
    SCOPED_TRACE(c);
    const std::string path = reference_dir() + "/" + c + ".safetensors";
    const json ref = read_json(reference_dir() + "/" + c + ".json");
    const SafetensorsFile file = SafetensorsFile::open(path);
    EXPECT_EQ(file.names().size(), ref["tensors"].size());

    std::map<std::string, std::string> metadata;
    if (!ref["metadata"].is_null()) metadata = ref["metadata"].get<std::map<std::string, std::string>>();
    EXPECT_EQ(file.metadata(), metadata);

    const auto all = tiedlora::formats::load_safetensors(path);
    EXPECT_EQ(all.size(), ref["tensors"].size());
    for (const auto& [name, r] : ref["tensors"].items()) {
      SCOPED_TRACE(name);
      ASSERT_TRUE(file.contains(name));
      const auto& e = file.entry(name);
      const std::string dtype = r["dtype"];
      EXPECT_EQ(tiedlora::formats::dtype_name(e.dtype), dtype);
      EXPECT_EQ(e.shape, r["shape"].get<std::vector<int64_t>>());
      auto [p, n] = file.bytes(name);
      EXPECT_EQ(hex(p, n), r["hex"].get<std::string>());

      const at::Tensor t = file.tensor(name);
      EXPECT_EQ(t.scalar_type(), expected_scalar_type(dtype));
      EXPECT_EQ(t.sizes().vec(), r["shape"].get<std::vector<int64_t>>());
      EXPECT_TRUE(t.device().is_cpu());
      check_values(t, dtype, r["values"], name);
      const at::Tensor& loaded = all.at(name);
      ASSERT_EQ(loaded.nbytes(), n);
      EXPECT_EQ(n == 0 ? 0 : std::memcmp(loaded.data_ptr(), p, n), 0);
    }
  }
}

TEST(SafetensorsReference, NamesAreInDataOrder) {
  REQUIRE_REFERENCE();
  const SafetensorsFile file = SafetensorsFile::open(reference_dir() + "/dtypes.safetensors");
  uint64_t at = 0;
  for (const auto& name : file.names()) {
    EXPECT_EQ(file.entry(name).begin, at) << name;
    at = file.entry(name).end;
  }
  EXPECT_EQ(file.header().data_offset % 8, 0u);
}

// ---- (b) writing the same bytes as Python -----------------------------------------------------------

TEST(SafetensorsReference, RewriteIsByteIdentical) {
  REQUIRE_REFERENCE();
  for (const auto& c : kCases) {
    SCOPED_TRACE(c);
    const std::string ref_path = reference_dir() + "/" + c + ".safetensors";
    const std::string our_path = out_dir() + "/" + c + ".safetensors";
    {
      const SafetensorsFile file = SafetensorsFile::open(ref_path);
      // Handed to the writer in reverse data order: it must sort as the Python package does.
      std::vector<std::pair<std::string, at::Tensor>> tensors;
      auto names = file.names();
      for (auto it = names.rbegin(); it != names.rend(); ++it) tensors.emplace_back(*it, file.tensor(*it));
      tiedlora::formats::save_safetensors(our_path, tensors, file.metadata());
    }
    const std::string ref = read_bytes(ref_path), ours = read_bytes(our_path);
    if (c == "meta_many" || c == "meta_empty") {
      // Python orders several metadata keys at random (a Rust HashMap) and writes an empty metadata object,
      // which a std::map cannot tell from none: compare meaning, and data bytes exactly.
      const SafetensorsFile a = SafetensorsFile::open(ref_path), b = SafetensorsFile::open(our_path);
      EXPECT_EQ(a.metadata(), b.metadata());
      EXPECT_EQ(a.names(), b.names());
      for (const auto& name : a.names()) {
        EXPECT_EQ(a.entry(name).begin, b.entry(name).begin);
        EXPECT_EQ(a.entry(name).end, b.entry(name).end);
      }
      EXPECT_EQ(ref.substr(a.header().data_offset), ours.substr(b.header().data_offset));
      if (c == "meta_many") {
        EXPECT_EQ(ref.size(), ours.size());
      }
    } else {
      EXPECT_EQ(ref, ours) << "bytes differ from the Python package's";
    }
  }
}

TEST(SafetensorsReference, NonContiguousTensorIsWrittenLikePython) {
  REQUIRE_REFERENCE();
  const at::Tensor f32 = SafetensorsFile::open(reference_dir() + "/dtypes.safetensors").tensor("f32");
  ASSERT_FALSE(f32.t().is_contiguous());
  const std::string path = out_dir() + "/transposed.safetensors";
  tiedlora::formats::save_safetensors(path, std::map<std::string, at::Tensor>{{"f32_t", f32.t()}});
  EXPECT_EQ(read_bytes(path), read_bytes(reference_dir() + "/transposed.safetensors"));
}

TEST(SafetensorsReference, ShardedCheckpointMatchesHuggingFace) {
  REQUIRE_REFERENCE();
  for (const std::string c : {"sharded", "single"}) {
    SCOPED_TRACE(c);
    const std::string ref_dir = reference_dir() + "/" + c;
    const json spec = read_json(ref_dir + "/checkpoint.json");
    const Checkpoint ref = Checkpoint::open(ref_dir);
    std::vector<std::pair<std::string, at::Tensor>> tensors;
    uint64_t total = 0;
    for (const auto& j : spec["order"]) {
      const std::string name = j.get<std::string>();
      tensors.emplace_back(name, ref.tensor(name));
      total += tensors.back().second.nbytes();
    }
    EXPECT_EQ(ref.names().size(), tensors.size());

    const std::string dir = out_dir() + "/" + c;
    remove_tree(dir);
    // A stale file from an earlier save must go away.
    make_dirs(dir);
    write_bytes(dir + "/model-00009-of-00009.safetensors", "stale");
    auto files =
        tiedlora::formats::save_sharded_safetensors(dir, tensors, spec["max_shard_size"].get<uint64_t>(),
                                                    spec["metadata"].get<std::map<std::string, std::string>>());
    std::sort(files.begin(), files.end());
    EXPECT_EQ(files, spec["files"].get<std::vector<std::string>>());
    EXPECT_FALSE(exists(dir + "/model-00009-of-00009.safetensors"));
    for (const auto& f : files) EXPECT_EQ(read_bytes(dir + "/" + f), read_bytes(ref_dir + "/" + f)) << f;
    if (c == "sharded") {
      EXPECT_EQ(read_json(dir + "/model.safetensors.index.json")["metadata"]["total_size"].get<uint64_t>(), total);
    }

    const Checkpoint ours = Checkpoint::open(dir);
    EXPECT_EQ(ours.names(), ref.names());
    for (const auto& [name, t] : tensors) EXPECT_TRUE(ours.tensor(name).equal(t)) << name;
    EXPECT_EQ(ours.files().size(), c == std::string("sharded") ? 4u : 1u);
  }
}

// ---- (c) malformed inputs ---------------------------------------------------------------------------

TEST(SafetensorsMalformed, EveryDefectIsAFormatErrorNamingFileAndTensor) {
  const std::string dir = scratch_dir("malformed");
  const std::string x4 = R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})";
  struct Case {
    std::string name;
    std::string bytes;
    std::vector<std::string> parts;
  };
  std::string huge(8, '\0');
  uint64_t big = 100'000'001;
  for (int i = 0; i < 8; ++i) huge[i] = static_cast<char>(big >> (8 * i));
  huge += "{}";
  std::string past_end = st_bytes("{}", 0);
  past_end[0] = 100;  // announces 100 header bytes, file has 2
  const std::vector<Case> cases = {
      {"empty_file", "", {"0 bytes", "too short", "truncated"}},
      {"header_lt_8", std::string("\x08\0\0", 3), {"3 bytes", "too short"}},
      {"header_past_end", past_end, {"header length 100", "past the end"}},
      {"huge_header", huge, {"100000001", "exceeds the limit"}},
      {"not_brace", st_bytes(" " + x4, 4), {"does not start with '{'"}},
      {"bad_json", st_bytes(R"({"x":{"dtype":)", 0), {"not valid JSON"}},
      {"trailing_json", st_bytes(x4 + "x", 4), {"not valid JSON"}},
      {"bad_utf8",
       st_bytes("{\"\xff\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4),
       {"not valid JSON"}},
      {"truncated", st_bytes(x4, 3), {"'x'", "run past the end", "truncated"}},
      {"out_of_range",
       st_bytes(R"({"x":{"dtype":"F32","shape":[250],"data_offsets":[0,1000]}})", 8),
       {"'x'", "[0, 1000]", "past the end"}},
      {"trailing_bytes", st_bytes(x4, 5), {"1 unexpected bytes", "'x'"}},
      {"overlap",
       st_bytes(
           R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"y":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
           6),
       {"'y'", "overlap", "'x'"}},
      {"hole",
       st_bytes(
           R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"y":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
           12),
       {"'y'", "hole of 4 bytes", "'x'"}},
      {"hole_at_start",
       st_bytes(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8),
       {"'x'", "hole", "start"}},
      {"size_mismatch",
       st_bytes(R"({"h.0.attn.c_attn.weight":{"dtype":"BF16","shape":[4,6],"data_offsets":[0,96]}})", 96),
       {"tensor 'h.0.attn.c_attn.weight': data_offsets [0, 96] hold 96 bytes but BF16 [4, 6] needs 48", "hint"}},
      {"duplicate_name",
       st_bytes(
           R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
           8),
       {"'x'", "appears twice"}},
      {"duplicate_metadata_key", st_bytes(R"({"__metadata__":{"a":"1","a":"2"}})", 0), {"'a'", "appears twice"}},
      {"duplicate_field",
       st_bytes(R"({"x":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4),
       {"'x'", "\"dtype\" appears twice"}},
      {"unknown_dtype",
       st_bytes(R"({"x":{"dtype":"F31","shape":[1],"data_offsets":[0,4]}})", 4),
       {"'x'", "unknown dtype 'F31'", "BF16"}},
      {"foreign_dtype",
       st_bytes(R"({"x":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", 8),
       {"'x'", "C64", "not supported"}},
      {"dtype_not_string", st_bytes(R"({"x":{"dtype":1,"shape":[1],"data_offsets":[0,4]}})", 4), {"'x'", "dtype"}},
      {"negative_shape",
       st_bytes(R"({"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4),
       {"'x'", "shape", "-1"}},
      {"float_shape",
       st_bytes(R"({"x":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}})", 4),
       {"'x'", "shape", "1.0"}},
      {"shape_not_array",
       st_bytes(R"({"x":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", 4),
       {"'x'", "\"shape\" is a string"}},
      {"shape_overflow",
       st_bytes(R"({"x":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0),
       {"'x'", "overflows"}},
      {"shape_too_big",
       st_bytes(R"({"x":{"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,0]}})", 0),
       {"'x'", "too large"}},
      {"negative_offset",
       st_bytes(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[-4,0]}})", 4),
       {"'x'", "data_offsets", "-4"}},
      {"three_offsets",
       st_bytes(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}})", 4),
       {"'x'", "more than 2"}},
      {"one_offset", st_bytes(R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[0]}})", 0), {"'x'", "1 entries"}},
      {"reversed_offsets",
       st_bytes(R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}})", 4),
       {"'x'", "end before"}},
      {"missing_field",
       st_bytes(R"({"x":{"dtype":"F32","data_offsets":[0,4]}})", 4),
       {"'x'", "missing field \"shape\""}},
      {"entry_not_object", st_bytes(R"({"x":1})", 0), {"'x'", "expected an object"}},
      {"metadata_not_strings",
       st_bytes(R"({"__metadata__":{"a":1}})", 0),
       {"__metadata__", "'a'", "expected a string"}},
      {"metadata_nested",
       st_bytes(R"({"__metadata__":{"a":{"b":"c"}}})", 0),
       {"__metadata__", "'a'", "expected a string"}},
      {"metadata_not_object", st_bytes(R"({"__metadata__":"a"})", 0), {"__metadata__", "expected an object"}},
      {"metadata_twice", st_bytes(R"({"__metadata__":{},"__metadata__":{}})", 0), {"__metadata__ appears twice"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    const std::string path = dir + "/" + c.name + ".safetensors";
    write_bytes(path, c.bytes);
    expect_format_error([&] { SafetensorsFile::open(path); }, path + ": ", c.parts);
    expect_format_error([&] { tiedlora::formats::load_safetensors(path); }, path + ": ", c.parts);
  }
  // A caller that read less than the announced header gets a truncation error, not an out-of-bounds read.
  const std::string ok = st_bytes(x4, 4);
  expect_format_error(
      [&] {
        tiedlora::formats::parse_safetensors_header(reinterpret_cast<const uint8_t*>(ok.data()), 20, ok.size(),
                                                    "part.st");
      },
      "part.st: ", {"only 20 bytes"});
  // An absent tensor is reported with the file name.
  write_bytes(dir + "/ok.safetensors", ok);
  expect_format_error([&] { SafetensorsFile::open(dir + "/ok.safetensors").tensor("nope"); },
                      dir + "/ok.safetensors: ", {"no tensor 'nope'"});
}

TEST(SafetensorsMalformed, AcceptsWhatTheReferenceAccepts) {
  const std::string dir = scratch_dir("accepted");
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"unsorted_entries",
       st_bytes(
           R"({"y":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
           8)},
      {"extra_field",
       st_bytes(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"foo":[1,{"a":[null]}],"bar":true}})", 4)},
      {"null_metadata", st_bytes(R"({"__metadata__":null,"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4)},
      {"zero_size_first",
       st_bytes(
           R"({"e":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
           4)},
      {"tab_padding", st_bytes("{}\t\t \n", 0)},
      {"escaped_name", st_bytes(R"({"\u0078":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 4)},
      {"deeply_nested_unknown_field", st_bytes(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"deep":)" +
                                                   std::string(100000, '[') + std::string(100000, ']') + "}}",
                                               4)},
  };
  for (const auto& [name, bytes] : cases) {
    SCOPED_TRACE(name);
    const std::string path = dir + "/" + name + ".safetensors";
    write_bytes(path, bytes);
    const SafetensorsFile f = SafetensorsFile::open(path);
    for (const auto& n : f.names()) EXPECT_NO_THROW(f.tensor(n));
  }
  EXPECT_EQ(SafetensorsFile::open(dir + "/unsorted_entries.safetensors").names(), (std::vector<std::string>{"x", "y"}));
  EXPECT_TRUE(SafetensorsFile::open(dir + "/escaped_name.safetensors").contains("x"));
}

TEST(SafetensorsMalformed, EveryTruncationAndRandomCorruptionIsCaught) {
  std::string good;
  {
    const std::string dir = scratch_dir("fuzz");
    std::vector<std::pair<std::string, at::Tensor>> tensors = {
        {"a", at::arange(10, at::kFloat)}, {"b", at::ones({3, 2}, at::kBFloat16)}, {"c", at::ones({5}, at::kBool)}};
    tiedlora::formats::save_safetensors(dir + "/good.safetensors", tensors);
    good = read_bytes(dir + "/good.safetensors");
  }
  const auto* p = reinterpret_cast<const uint8_t*>(good.data());
  EXPECT_NO_THROW(tiedlora::formats::parse_safetensors_header(p, good.size(), good.size(), "good"));
  for (std::size_t len = 0; len < good.size(); ++len) {
    EXPECT_THROW(tiedlora::formats::parse_safetensors_header(p, len, len, "t"), tiedlora::FormatError) << len;
  }
  std::mt19937_64 rng(42);
  int rejected = 0;
  for (int i = 0; i < 20000; ++i) {
    std::string m = good;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < edits; ++k) {
      std::size_t at = rng() % std::min<std::size_t>(m.size(), 8 + 200);
      m[at] = static_cast<char>(rng() % 4 == 0 ? "{}[],:\"0-9e. "[rng() % 14] : static_cast<char>(rng()));
    }
    if (rng() % 8 == 0) m.resize(rng() % m.size());
    const auto* q = reinterpret_cast<const uint8_t*>(m.data());
    try {
      tiedlora::formats::parse_safetensors_header(q, m.size(), m.size(), "fuzz");
    } catch (const tiedlora::FormatError&) {
      ++rejected;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "not a FormatError: " << e.what();
    }
  }
  EXPECT_GT(rejected, 10000);
}

// ---- (d) checkpoints --------------------------------------------------------------------------------

TEST(SafetensorsCheckpoint, ShardedRoundTripAndMalformedIndex) {
  const std::string dir = scratch_dir("checkpoint");
  at::manual_seed(0);
  std::vector<std::pair<std::string, at::Tensor>> tensors = {{"a", at::randn({4, 4})},
                                                             {"b", at::randn({8}, at::kBFloat16)},
                                                             {"c", at::randn({4, 4})},
                                                             {"d", at::randint(0, 9, {5}, at::kLong)}};
  const std::string good = dir + "/good";
  const auto files = tiedlora::formats::save_sharded_safetensors(good, tensors, 80, {{"format", "pt"}});
  ASSERT_EQ(files.size(), 4u);  // a 64 + b 16 | c 64 | d 40: three shards and the index
  EXPECT_EQ(files.back(), "model.safetensors.index.json");
  EXPECT_EQ(files.front(), "model-00001-of-00003.safetensors");
  const Checkpoint ckpt = Checkpoint::open(good);
  EXPECT_EQ(ckpt.names(), (std::vector<std::string>{"a", "b", "c", "d"}));
  for (const auto& [name, t] : tensors) EXPECT_TRUE(ckpt.tensor(name).equal(t)) << name;
  EXPECT_EQ(ckpt.file_of("c").path(), good + "/model-00002-of-00003.safetensors");
  EXPECT_EQ(ckpt.entry("d").dtype, tiedlora::formats::SafetensorsDtype::I64);
  EXPECT_EQ(ckpt.file_of("a").metadata().at("format"), "pt");
  // Opening through the index file itself and through a single shard.
  EXPECT_EQ(Checkpoint::open(good + "/model.safetensors.index.json").names().size(), 4u);
  EXPECT_EQ(Checkpoint::open(good + "/model-00003-of-00003.safetensors").names(), (std::vector<std::string>{"d"}));
  // A second save into the same folder, now small enough for one file, leaves no stale shard or index.
  tiedlora::formats::save_sharded_safetensors(good + "_resaved", tensors, 80);
  EXPECT_EQ(tiedlora::formats::save_sharded_safetensors(good + "_resaved", tensors, 1 << 20),
            (std::vector<std::string>{"model.safetensors"}));
  EXPECT_EQ(list_dir(good + "_resaved"), (std::vector<std::string>{"model.safetensors"}));
  expect_format_error([&] { ckpt.tensor("zz"); }, good + "/model.safetensors.index.json: ", {"no tensor 'zz'"});

  const json index = read_json(good + "/model.safetensors.index.json");
  // Each case: a copy of the good checkpoint, broken one way.
  auto broken = [&](const std::string& name, const std::function<void(const std::string&, json&)>& edit) {
    const std::string d = dir + "/" + name;
    copy_dir(good, d);
    json j = index;
    edit(d, j);
    if (!j.is_null()) write_bytes(d + "/model.safetensors.index.json", j.dump(2));
    return d + "/model.safetensors.index.json";
  };
  std::string idx = broken("missing_shard", [](const std::string& d, json&) {
    ::unlink((d + "/model-00002-of-00003.safetensors").c_str());
  });
  expect_format_error([&] { Checkpoint::open(dir + "/missing_shard"); }, idx + ": ",
                      {"model-00002-of-00003.safetensors", "'c'", "does not exist"});
  idx = broken("wrong_shard",
               [](const std::string&, json& j) { j["weight_map"]["a"] = "model-00002-of-00003.safetensors"; });
  expect_format_error([&] { Checkpoint::open(idx); }, idx + ": ",
                      {"'a'", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"});
  idx = broken("missing_from_index", [](const std::string&, json& j) { j["weight_map"].erase("b"); });
  expect_format_error([&] { Checkpoint::open(idx); }, idx + ": ", {"'b'", "missing from the index"});
  idx = broken("listed_not_present",
               [](const std::string&, json& j) { j["weight_map"]["ghost"] = "model-00001-of-00003.safetensors"; });
  expect_format_error([&] { Checkpoint::open(idx); }, idx + ": ", {"'ghost'", "does not hold it"});
  idx = broken("no_weight_map", [](const std::string&, json& j) { j.erase("weight_map"); });
  expect_format_error([&] { Checkpoint::open(idx); }, idx + ": ", {"weight_map"});
  idx = broken("listed_twice", [](const std::string& d, json& j) {
    std::string text = j.dump();
    text.insert(text.find("\"weight_map\":{") + 14, R"("a":"model-00001-of-00003.safetensors",)");
    write_bytes(d + "/model.safetensors.index.json", text);
    j = nullptr;
  });
  expect_format_error([&] { Checkpoint::open(idx); }, idx + ": ", {"'a'", "twice"});
  idx = broken("path_in_index",
               [](const std::string&, json& j) { j["weight_map"]["a"] = "../good/model-00001-of-00003.safetensors"; });
  expect_format_error([&] { Checkpoint::open(idx); }, idx + ": ", {"'a'", "not a file name"});
  idx = broken("bad_json", [](const std::string& d, json& j) {
    write_bytes(d + "/model.safetensors.index.json", "{\"weight_map\": ");
    j = nullptr;
  });
  expect_format_error([&] { Checkpoint::open(idx); }, idx + ": ", {"not valid JSON"});
  idx = broken("in_two_shards", [&](const std::string& d, json&) {
    tiedlora::formats::save_safetensors(
        d + "/model-00003-of-00003.safetensors",
        std::vector<std::pair<std::string, at::Tensor>>{{"d", tensors[3].second}, {"a", tensors[0].second}});
  });
  expect_format_error([&] { Checkpoint::open(idx); }, idx + ": ", {"'a'", "two shards"});
  idx = broken("corrupt_shard", [](const std::string& d, json&) {
    write_bytes(d + "/model-00001-of-00003.safetensors", "garbage!garbage!");
  });
  const std::string shard = dir + "/corrupt_shard/model-00001-of-00003.safetensors";
  expect_format_error([&] { Checkpoint::open(idx); }, shard + ": ", {"exceeds the limit"});
  make_dirs(dir + "/empty");
  expect_format_error([&] { Checkpoint::open(dir + "/empty"); }, dir + "/empty: ", {"model.safetensors"});
}

// ---- (e) zero-copy and copy-on-write -----------------------------------------------------------------

TEST(SafetensorsZeroCopy, TensorsAliasAPrivateMapping) {
  const std::string dir = scratch_dir("zero_copy");
  const std::string path = dir + "/w.safetensors";
  const at::Tensor w = at::arange(12, at::kFloat).reshape({3, 4});
  tiedlora::formats::save_safetensors(
      path, std::vector<std::pair<std::string, at::Tensor>>{{"w", w}, {"z", at::empty({0, 4})}});
  const std::string on_disk = read_bytes(path);

  at::Tensor kept;
  {
    const SafetensorsFile file = SafetensorsFile::open(path);
    at::Tensor a = file.tensor("w"), b = file.tensor("w");
    EXPECT_EQ(a.data_ptr(), b.data_ptr());                                     // both alias the mapping ...
    EXPECT_EQ(a.data_ptr(), static_cast<const void*>(file.bytes("w").first));  // ... at the tensor's bytes
    a.mul_(-1);                                                                // copy-on-write: the process sees it ...
    EXPECT_EQ(b[1][1].item<float>(), -5.0f);
    kept = b;
    const at::Tensor z = file.tensor("z");
    EXPECT_EQ(z.sizes().vec(), (std::vector<int64_t>{0, 4}));
  }
  EXPECT_EQ(read_bytes(path), on_disk);  // ... the file does not
  EXPECT_TRUE(kept.equal(-w));           // the tensor outlives the SafetensorsFile
  EXPECT_TRUE(SafetensorsFile::open(path).tensor("w").equal(w));
}

TEST(SafetensorsZeroCopy, MisalignedDataIsCopied) {
  const std::string dir = scratch_dir("misaligned");
  // A 57-byte header (no padding) puts the data at byte 65: not aligned for F32.
  std::string header = R"({"x":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}})";
  header.append(57 - header.size(), ' ');
  std::string bytes = st_bytes(header, 0);
  const float values[3] = {1.5f, -2.0f, 3.25f};
  bytes.append(reinterpret_cast<const char*>(values), sizeof values);
  write_bytes(dir + "/m.safetensors", bytes);
  const SafetensorsFile file = SafetensorsFile::open(dir + "/m.safetensors");
  ASSERT_EQ(file.header().data_offset, 65u);
  const at::Tensor t = file.tensor("x");
  EXPECT_NE(t.data_ptr(), static_cast<const void*>(file.bytes("x").first));
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 4, 0u);
  EXPECT_TRUE(t.equal(at::tensor({1.5f, -2.0f, 3.25f})));
}

// ---- writer errors and atomicity ---------------------------------------------------------------------

TEST(SafetensorsWriter, RejectsBadInputAndNeverLeavesPartialFiles) {
  const std::string dir = scratch_dir("writer");
  const std::string path = dir + "/out.safetensors";
  auto no_temporaries = [&] {
    for (const auto& n : list_dir(dir)) EXPECT_EQ(n.find(".tmp."), std::string::npos) << n;
  };
  using Tensors = std::vector<std::pair<std::string, at::Tensor>>;
  try {
    tiedlora::formats::save_safetensors(path, Tensors{{"a", at::ones({2})}, {"a", at::ones({3})}});
    ADD_FAILURE() << "duplicate accepted";
  } catch (const tiedlora::Error& e) {
    EXPECT_NE(std::string(e.what()).find("'a'"), std::string::npos) << e.what();
  }
  try {
    tiedlora::formats::save_safetensors(path, Tensors{{"c", at::ones({2}, at::kComplexFloat)}});
    ADD_FAILURE() << "complex accepted";
  } catch (const tiedlora::Error& e) {
    EXPECT_NE(std::string(e.what()).find("'c'"), std::string::npos) << e.what();
  }
  EXPECT_THROW(tiedlora::formats::save_safetensors(path, Tensors{{"u", at::Tensor()}}), tiedlora::Error);
  EXPECT_THROW(tiedlora::formats::save_safetensors(path, Tensors{{"bad\xff", at::ones({1})}}), tiedlora::Error);
  EXPECT_THROW(tiedlora::formats::save_safetensors(dir + "/no/such/dir/x.safetensors", Tensors{{"a", at::ones({1})}}),
               tiedlora::Error);
  EXPECT_FALSE(exists(path));

  // A failure in the middle of writing (a meta tensor has no data) leaves the old file untouched.
  tiedlora::formats::save_safetensors(path, Tensors{{"old", at::ones({2})}});
  const std::string before = read_bytes(path);
  EXPECT_ANY_THROW(tiedlora::formats::save_safetensors(
      path, Tensors{{"a", at::ones({2})}, {"b", at::empty({4}, at::TensorOptions().device(at::kMeta))}}));
  EXPECT_EQ(read_bytes(path), before);
  no_temporaries();

  // Metadata with one key: the exact bytes of the package's header.
  tiedlora::formats::save_safetensors(path, std::map<std::string, at::Tensor>{{"x", at::zeros({1})}},
                                      {{"format", "pt"}});
  const std::string bytes = read_bytes(path);
  EXPECT_EQ(bytes.substr(8, bytes.size() - 12),
            R"({"__metadata__":{"format":"pt"},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}   )");
  no_temporaries();
}

TEST(SafetensorsWriter, HeaderSerializationDetails) {
  using tiedlora::formats::SafetensorsDtype;
  using tiedlora::formats::TensorEntry;
  EXPECT_EQ(tiedlora::formats::serialize_safetensors_header({}, {}), "{}      ");
  TensorEntry e;
  e.name = "q\"\\\n\x01\x7f\xc3\xa9";
  e.dtype = SafetensorsDtype::BF16;
  e.shape = {};
  e.begin = 0;
  e.end = 2;
  const std::string h = tiedlora::formats::serialize_safetensors_header({e}, {});
  EXPECT_EQ(
      h,
      "{\"q\\\"\\\\\\n\\u0001\x7f\xc3\xa9\":{\"dtype\":\"BF16\",\"shape\":[],\"data_offsets\":[0,2]}}   ");  // as
                                                                                                             // Python
                                                                                                             // writes
                                                                                                             // it
  EXPECT_EQ(h.size() % 8, 0u);
  for (int d = 0; d <= static_cast<int>(SafetensorsDtype::F64); ++d) {
    const auto dtype = static_cast<SafetensorsDtype>(d);
    EXPECT_EQ(tiedlora::formats::from_scalar_type(tiedlora::formats::to_scalar_type(dtype)), dtype);
    EXPECT_EQ(tiedlora::formats::dtype_size(dtype), c10::elementSize(tiedlora::formats::to_scalar_type(dtype)));
  }
}

}  // namespace
