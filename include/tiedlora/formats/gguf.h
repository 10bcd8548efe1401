// tiedlora/formats/gguf.h: reading GGUF files (llama.cpp's model format), torch-free.
//
// GgufFile memory-maps a file, validates all of it up front (header, metadata, tensor table, offsets,
// alignment, sizes) and hands out metadata values, raw tensor bytes, and tensors dequantized to float32.
// Every malformed input is a tiedlora::FormatError naming the file and the key or tensor, with a hint;
// parse_gguf() is the bounds-checked parser a fuzz target can drive on any bytes.
// Torch tensors: tiedlora/formats/gguf_tensor.h. Details and limits: docs/gguf.md.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tiedlora::formats {

/// Metadata value types (gguf_type).
enum class GgufType : uint32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};
const char* gguf_type_name(GgufType type);

/// Tensor data types (ggml_type). Every type listed is parsed (its size is known); dequantize() supports
/// F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K.
enum class GgmlType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,
};

/// Name ("Q4_1"), values per block and bytes per block of a ggml type; nullptr for unknown type numbers.
struct GgmlTypeInfo {
  GgmlType type;
  const char* name;
  uint32_t block_size;
  uint32_t type_size;
  bool dequantizable;
};
const GgmlTypeInfo* ggml_type_info(uint32_t type);
const char* ggml_type_name(GgmlType type);

/// One metadata value: a scalar, a string or an array (of scalars, strings or arrays).
class GgufValue {
 public:
  GgufType type() const { return type_; }
  bool is_array() const { return type_ == GgufType::ARRAY; }
  /// For arrays: the element type and the number of elements.
  GgufType element_type() const { return element_type_; }
  uint64_t size() const { return count_; }

  /// Any integer type as int64 / uint64 (range-checked), floats as double, BOOL, STRING. A value of another
  /// type throws tiedlora::FormatError ("expected ..., found ..."); GgufFile's getters add file and key.
  int64_t as_int() const;
  uint64_t as_uint() const;
  double as_double() const;  ///< FLOAT32, FLOAT64 or any integer type
  bool as_bool() const;
  const std::string& as_string() const;
  /// Arrays: of strings; of integers (any integer type or BOOL); of numbers; of arrays.
  const std::vector<std::string>& as_strings() const;
  std::vector<int64_t> as_ints() const;
  std::vector<double> as_doubles() const;
  const std::vector<GgufValue>& as_arrays() const;
  /// A short human-readable rendering ("3", "'llama'", "[49152 x STRING]").
  std::string describe() const;

 private:
  friend class GgufParser;
  GgufType type_ = GgufType::UINT8;
  GgufType element_type_ = GgufType::UINT8;
  uint64_t count_ = 0;
  uint64_t bits_ = 0;                 // a scalar's little-endian bits
  std::string string_;                // STRING
  std::vector<std::string> strings_;  // ARRAY of STRING
  std::vector<uint8_t> raw_;          // ARRAY of numbers or BOOL: the little-endian bytes
  std::vector<GgufValue> arrays_;     // ARRAY of ARRAY
};

/// One entry of the tensor table.
struct GgufTensorInfo {
  std::string name;
  std::vector<uint64_t> ne;  ///< dimensions, ne[0] innermost (contiguous)
  GgmlType type = GgmlType::F32;
  uint64_t offset = 0;  ///< from the start of the data section (aligned)
  uint64_t nbytes = 0;
  uint64_t numel = 0;
  /// The torch/numpy shape: ne reversed.
  std::vector<int64_t> shape() const;
};

/// Everything before the tensor data, validated.
struct GgufContents {
  uint32_t version = 0;
  uint64_t alignment = 32;
  uint64_t data_offset = 0;                                 ///< where the data section starts in the file
  std::vector<std::pair<std::string, GgufValue>> metadata;  ///< in file order
  std::vector<GgufTensorInfo> tensors;                      ///< in file order
  std::unordered_map<std::string, std::size_t> metadata_index, tensor_index;

  const GgufValue* find(const std::string& key) const;
  const GgufTensorInfo* find_tensor(const std::string& name) const;
};

/// Parses and validates a whole GGUF file held in memory (`size` bytes). `source` names it in errors.
/// Throws tiedlora::FormatError for anything malformed and nothing else for any input (the fuzz target).
GgufContents parse_gguf(const uint8_t* data, std::size_t size, const std::string& source);

/// A memory-mapped, validated GGUF file. Copies share the mapping.
class GgufFile {
 public:
  static GgufFile open(const std::string& path);

  const std::string& path() const;
  const GgufContents& contents() const;
  uint32_t version() const { return contents().version; }

  // ---- metadata ----
  bool has_key(const std::string& key) const { return contents().find(key) != nullptr; }
  /// The value of `key`; a missing key is a FormatError naming the file and the key.
  const GgufValue& value(const std::string& key) const;
  /// Typed getters: a missing key or a value of the wrong type is a FormatError naming file and key.
  uint64_t get_uint(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  const std::string& get_string(const std::string& key) const;
  const std::vector<std::string>& get_strings(const std::string& key) const;
  std::vector<int64_t> get_ints(const std::string& key) const;
  /// The same, with `fallback` when the key is absent (a present key of the wrong type still throws).
  uint64_t get_uint(const std::string& key, uint64_t fallback) const;
  double get_float(const std::string& key, double fallback) const;
  bool get_bool(const std::string& key, bool fallback) const;
  std::string get_string(const std::string& key, const std::string& fallback) const;

  // ---- tensors ----
  const std::vector<GgufTensorInfo>& tensors() const { return contents().tensors; }
  bool has_tensor(const std::string& name) const { return contents().find_tensor(name) != nullptr; }
  /// A missing tensor is a FormatError listing a few names that exist.
  const GgufTensorInfo& tensor(const std::string& name) const;
  /// The raw bytes of a tensor (tensor(name).nbytes of them), valid while any copy of this object lives.
  const uint8_t* tensor_data(const std::string& name) const;
  /// The tensor as float32, numel values in ggml order (ne[0] fastest); throws FormatError naming the
  /// tensor when its type cannot be dequantized.
  std::vector<float> dequantize(const std::string& name) const;
  void dequantize(const std::string& name, float* out) const;

 private:
  struct Mapping;
  std::shared_ptr<const Mapping> mapping_;
};

/// Converts `count` values of `type` stored at `data` into float32 at `out`. `count` must be a multiple of
/// the type's block size; the caller guarantees count / block_size * type_size readable bytes. Results are
/// bit-identical to gguf-py's gguf.quants.dequantize (and to ggml's reference CPU code).
/// Throws tiedlora::Error for types that cannot be dequantized.
void dequantize(GgmlType type, const uint8_t* data, uint64_t count, float* out);

}  // namespace tiedlora::formats
