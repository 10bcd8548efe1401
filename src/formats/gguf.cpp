// src/formats/gguf.cpp: the torch-free GGUF reader: the bounds-checked parser (every read checked against the
// end of the buffer, every count checked against the bytes that remain before anything is allocated), the
// memory-mapped GgufFile, metadata getters and dequantization of the common ggml types (the Llama Q/K row
// un-permutation works on tensors: gguf_tensor.cpp). Counts from the file never size a reservation beyond
// a few thousand entries.
#include "tiedlora/formats/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

#include "tiedlora/core/error.h"
#include "util/text.h"

namespace tiedlora::formats {

namespace {

constexpr uint32_t kMaxDims = 4;     // GGML_MAX_DIMS
constexpr int kMaxArrayNesting = 8;  // arrays of arrays deeper than this are refused (bounded recursion)
constexpr uint64_t kDefaultAlignment = 32;

constexpr GgmlTypeInfo kGgmlTypes[] = {
    {GgmlType::F32, "F32", 1, 4, true},
    {GgmlType::F16, "F16", 1, 2, true},
    {GgmlType::Q4_0, "Q4_0", 32, 18, true},
    {GgmlType::Q4_1, "Q4_1", 32, 20, true},
    {GgmlType::Q5_0, "Q5_0", 32, 22, true},
    {GgmlType::Q5_1, "Q5_1", 32, 24, true},
    {GgmlType::Q8_0, "Q8_0", 32, 34, true},
    {GgmlType::Q8_1, "Q8_1", 32, 40, false},
    {GgmlType::Q2_K, "Q2_K", 256, 84, false},
    {GgmlType::Q3_K, "Q3_K", 256, 110, false},
    {GgmlType::Q4_K, "Q4_K", 256, 144, true},
    {GgmlType::Q5_K, "Q5_K", 256, 176, true},
    {GgmlType::Q6_K, "Q6_K", 256, 210, true},
    {GgmlType::Q8_K, "Q8_K", 256, 292, false},
    {GgmlType::IQ2_XXS, "IQ2_XXS", 256, 66, false},
    {GgmlType::IQ2_XS, "IQ2_XS", 256, 74, false},
    {GgmlType::IQ3_XXS, "IQ3_XXS", 256, 98, false},
    {GgmlType::IQ1_S, "IQ1_S", 256, 50, false},
    {GgmlType::IQ4_NL, "IQ4_NL", 32, 18, false},
    {GgmlType::IQ3_S, "IQ3_S", 256, 110, false},
    {GgmlType::IQ2_S, "IQ2_S", 256, 82, false},
    {GgmlType::IQ4_XS, "IQ4_XS", 256, 136, false},
    {GgmlType::I8, "I8", 1, 1, false},
    {GgmlType::I16, "I16", 1, 2, false},
    {GgmlType::I32, "I32", 1, 4, false},
    {GgmlType::I64, "I64", 1, 8, false},
    {GgmlType::F64, "F64", 1, 8, true},
    {GgmlType::IQ1_M, "IQ1_M", 256, 56, false},
    {GgmlType::BF16, "BF16", 1, 2, true},
    {GgmlType::TQ1_0, "TQ1_0", 256, 54, false},
    {GgmlType::TQ2_0, "TQ2_0", 256, 66, false},
    {GgmlType::MXFP4, "MXFP4", 32, 17, false},
};

// Sizes of fixed-size metadata types; 0 for STRING and ARRAY.
uint64_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::UINT8:
    case GgufType::INT8:
    case GgufType::BOOL: return 1;
    case GgufType::UINT16:
    case GgufType::INT16: return 2;
    case GgufType::UINT32:
    case GgufType::INT32:
    case GgufType::FLOAT32: return 4;
    case GgufType::UINT64:
    case GgufType::INT64:
    case GgufType::FLOAT64: return 8;
    default: return 0;
  }
}

bool valid_value_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::FLOAT64); }
bool is_integer_type(GgufType t) {
  return t == GgufType::UINT8 || t == GgufType::INT8 || t == GgufType::UINT16 || t == GgufType::INT16 ||
         t == GgufType::UINT32 || t == GgufType::INT32 || t == GgufType::UINT64 || t == GgufType::INT64;
}
bool is_signed_type(GgufType t) {
  return t == GgufType::INT8 || t == GgufType::INT16 || t == GgufType::INT32 || t == GgufType::INT64;
}

// Sign-extends or zero-extends the little-endian scalar bits of an integer type.
int64_t signed_value(GgufType t, uint64_t bits) {
  switch (t) {
    case GgufType::INT8: return static_cast<int8_t>(bits);
    case GgufType::INT16: return static_cast<int16_t>(bits);
    case GgufType::INT32: return static_cast<int32_t>(bits);
    case GgufType::INT64: return static_cast<int64_t>(bits);
    default: return 0;
  }
}

uint64_t load_le(const uint8_t* p, uint64_t n) {
  uint64_t v = 0;
  for (uint64_t i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

float f32_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

double f64_from_bits(uint64_t bits) {
  double d;
  std::memcpy(&d, &bits, 8);
  return d;
}

// IEEE half to float, exact for every input (subnormals, infinities, NaN payloads).
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1F;
  uint32_t mantissa = h & 0x3FF;
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    exponent = 113;
    while (!(mantissa & 0x400)) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FF) << 13);
  }
  return f32_from_bits(bits);
}

float half_at(const uint8_t* p) { return half_to_float(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

}  // namespace

const GgmlTypeInfo* ggml_type_info(uint32_t type) {
  for (const auto& t : kGgmlTypes) {
    if (static_cast<uint32_t>(t.type) == type) return &t;
  }
  return nullptr;
}

const char* ggml_type_name(GgmlType type) {
  const auto* info = ggml_type_info(static_cast<uint32_t>(type));
  return info ? info->name : "?";
}

const char* gguf_type_name(GgufType type) {
  static const char* const names[] = {"UINT8", "INT8",   "UINT16", "INT16",  "UINT32", "INT32",  "FLOAT32",
                                      "BOOL",  "STRING", "ARRAY",  "UINT64", "INT64",  "FLOAT64"};
  const auto i = static_cast<uint32_t>(type);
  return i < sizeof names / sizeof names[0] ? names[i] : "?";
}

// ---- GgufValue ------------------------------------------------------------------------------------------

namespace {
[[noreturn]] void wrong_type(const GgufValue& v, const char* expected) {
  throw FormatError(std::string("expected ") + expected + ", found " + v.describe());
}
}  // namespace

int64_t GgufValue::as_int() const {
  if (!is_integer_type(type_)) wrong_type(*this, "an integer");
  if (is_signed_type(type_)) return signed_value(type_, bits_);
  if (bits_ > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) wrong_type(*this, "an integer below 2^63");
  return static_cast<int64_t>(bits_);
}

uint64_t GgufValue::as_uint() const {
  if (!is_integer_type(type_)) wrong_type(*this, "a non-negative integer");
  if (is_signed_type(type_)) {
    const int64_t v = signed_value(type_, bits_);
    if (v < 0) wrong_type(*this, "a non-negative integer");
    return static_cast<uint64_t>(v);
  }
  return bits_;
}

double GgufValue::as_double() const {
  if (type_ == GgufType::FLOAT32) return f32_from_bits(static_cast<uint32_t>(bits_));
  if (type_ == GgufType::FLOAT64) return f64_from_bits(bits_);
  if (is_integer_type(type_))
    return is_signed_type(type_) ? static_cast<double>(signed_value(type_, bits_)) : static_cast<double>(bits_);
  wrong_type(*this, "a number");
}

bool GgufValue::as_bool() const {
  if (type_ != GgufType::BOOL) wrong_type(*this, "BOOL");
  return bits_ != 0;
}

const std::string& GgufValue::as_string() const {
  if (type_ != GgufType::STRING) wrong_type(*this, "STRING");
  return string_;
}

const std::vector<std::string>& GgufValue::as_strings() const {
  if (type_ != GgufType::ARRAY || element_type_ != GgufType::STRING) wrong_type(*this, "an array of STRING");
  return strings_;
}

std::vector<int64_t> GgufValue::as_ints() const {
  if (type_ != GgufType::ARRAY || !(is_integer_type(element_type_) || element_type_ == GgufType::BOOL)) {
    wrong_type(*this, "an array of integers");
  }
  const uint64_t size = scalar_size(element_type_);
  std::vector<int64_t> out(count_);
  for (uint64_t i = 0; i < count_; ++i) {
    const uint64_t bits = load_le(raw_.data() + i * size, size);
    if (is_signed_type(element_type_)) {
      out[i] = signed_value(element_type_, bits);
    } else {
      if (bits > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) wrong_type(*this, "integers below 2^63");
      out[i] = static_cast<int64_t>(bits);
    }
  }
  return out;
}

std::vector<double> GgufValue::as_doubles() const {
  if (type_ != GgufType::ARRAY ||
      !(is_integer_type(element_type_) || element_type_ == GgufType::FLOAT32 || element_type_ == GgufType::FLOAT64)) {
    wrong_type(*this, "an array of numbers");
  }
  const uint64_t size = scalar_size(element_type_);
  std::vector<double> out(count_);
  for (uint64_t i = 0; i < count_; ++i) {
    GgufValue scalar;
    scalar.type_ = element_type_;
    scalar.bits_ = load_le(raw_.data() + i * size, size);
    out[i] = scalar.as_double();
  }
  return out;
}

const std::vector<GgufValue>& GgufValue::as_arrays() const {
  if (type_ != GgufType::ARRAY || element_type_ != GgufType::ARRAY) wrong_type(*this, "an array of arrays");
  return arrays_;
}

std::string GgufValue::describe() const {
  switch (type_) {
    case GgufType::STRING: return "STRING " + util::quote_for_message(string_);
    case GgufType::ARRAY: return "ARRAY [" + std::to_string(count_) + " x " + gguf_type_name(element_type_) + "]";
    case GgufType::BOOL: return std::string("BOOL ") + (bits_ ? "true" : "false");
    case GgufType::FLOAT32:
    case GgufType::FLOAT64: {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%s %.9g", gguf_type_name(type_), as_double());
      return buf;
    }
    default:
      return std::string(gguf_type_name(type_)) + " " +
             (is_signed_type(type_) ? std::to_string(signed_value(type_, bits_)) : std::to_string(bits_));
  }
}

std::vector<int64_t> GgufTensorInfo::shape() const { return std::vector<int64_t>(ne.rbegin(), ne.rend()); }

const GgufValue* GgufContents::find(const std::string& key) const {
  auto it = metadata_index.find(key);
  return it == metadata_index.end() ? nullptr : &metadata[it->second].second;
}

const GgufTensorInfo* GgufContents::find_tensor(const std::string& name) const {
  auto it = tensor_index.find(name);
  return it == tensor_index.end() ? nullptr : &tensors[it->second];
}

// ---- the parser -------------------------------------------------------------------------------------------

class GgufParser {
 public:
  GgufParser(const uint8_t* data, std::size_t size, const std::string& source)
      : data_(data), size_(size), source_(source) {}

  GgufContents parse() {
    GgufContents out;
    if (size_ < 4 || std::memcmp(data_, "GGUF", 4) != 0) {
      std::string magic;
      for (std::size_t i = 0; i < std::min<std::size_t>(4, size_); ++i) magic += static_cast<char>(data_[i]);
      fail("not a GGUF file: it starts with " + util::quote_for_message(magic) + ", expected 'GGUF'" +
           (size_ < 4 ? " (the file is only " + std::to_string(size_) + " bytes)" : "") +
           " (hint: is it a safetensors, PyTorch or old GGML file?)");
    }
    pos_ = 4;
    out.version = u32("the version");
    if (out.version == 0x02000000u || out.version == 0x03000000u) {
      fail("big-endian GGUF is not supported (hint: convert the model on a little-endian machine)");
    }
    if (out.version == 1) fail("GGUF version 1 is not supported (hint: re-convert the model with a current llama.cpp)");
    if (out.version != 2 && out.version != 3) {
      fail("unknown GGUF version " + std::to_string(out.version) + " (tiedlora reads versions 2 and 3)");
    }
    const uint64_t tensor_count = u64("the tensor count");
    const uint64_t kv_count = u64("the metadata count");
    // Each entry needs at least: key length (8) + value type (4) + 1 byte; tensor info: name length (8) +
    // n_dims (4) + type (4) + offset (8). Larger counts cannot fit in the file, whatever follows.
    if (kv_count > remaining() / 13) {
      fail("the header claims " + std::to_string(kv_count) + " metadata entries, more than the " +
           std::to_string(remaining()) + " remaining bytes can hold (hint: the file is corrupt)");
    }
    if (tensor_count > remaining() / 24) {
      fail("the header claims " + std::to_string(tensor_count) + " tensors, more than the " +
           std::to_string(remaining()) + " remaining bytes can hold (hint: the file is corrupt)");
    }
    out.metadata.reserve(reservation(kv_count));
    for (uint64_t i = 0; i < kv_count; ++i) {
      const std::size_t entry_offset = pos_;
      std::string key = string("the key of metadata entry " + std::to_string(i));
      context_ = "metadata " + util::quote_for_message(key);
      const uint32_t type = u32("its value type");
      GgufValue value = read_value(type, 0);
      if (out.metadata_index.count(key)) fail("duplicate key (at offset " + std::to_string(entry_offset) + ")");
      out.metadata_index.emplace(key, out.metadata.size());
      out.metadata.emplace_back(std::move(key), std::move(value));
      context_.clear();
    }
    if (const GgufValue* a = out.find("general.alignment")) {
      context_ = "metadata 'general.alignment'";
      if (a->type() != GgufType::UINT32) fail("must be UINT32, found " + a->describe());
      const uint64_t alignment = a->as_uint();
      if (alignment == 0 || (alignment & (alignment - 1)) != 0) {
        fail("must be a power of two, found " + std::to_string(alignment));
      }
      out.alignment = alignment;
      context_.clear();
    }
    out.tensors.reserve(reservation(tensor_count));
    for (uint64_t i = 0; i < tensor_count; ++i) {
      GgufTensorInfo t;
      t.name = string("the name of tensor " + std::to_string(i));
      context_ = "tensor " + util::quote_for_message(t.name);
      if (out.tensor_index.count(t.name)) fail("duplicate tensor name");
      const uint32_t n_dims = u32("its number of dimensions");
      if (n_dims > kMaxDims) fail("has " + std::to_string(n_dims) + " dimensions, ggml allows at most 4");
      t.ne.resize(n_dims);
      uint64_t numel = 1;
      for (uint32_t d = 0; d < n_dims; ++d) {
        t.ne[d] = u64("dimension " + std::to_string(d));
        if (t.ne[d] > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
          fail("dimension " + std::to_string(d) + " is " + std::to_string(t.ne[d]) + ", above 2^63");
        }
        if (t.ne[d] != 0 && numel > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / t.ne[d]) {
          fail("the product of its dimensions " + dims(t.ne, d + 1) + " overflows 64 bits");
        }
        numel *= t.ne[d];
      }
      t.numel = numel;
      const uint32_t type = u32("its type");
      const GgmlTypeInfo* info = ggml_type_info(type);
      if (!info) {
        fail("has unknown type " + std::to_string(type) + " (hint: the file needs a newer reader, or is corrupt)");
      }
      t.type = info->type;
      const uint64_t ne0 = n_dims > 0 ? t.ne[0] : 1;  // a 0-dimensional tensor holds one value
      if (ne0 % info->block_size != 0) {
        fail("ne[0] = " + std::to_string(ne0) + " is not a multiple of the " + info->name + " block size " +
             std::to_string(info->block_size));
      }
      if (numel / info->block_size > std::numeric_limits<uint64_t>::max() / info->type_size) {
        fail("its size in bytes overflows 64 bits");
      }
      t.nbytes = numel / info->block_size * info->type_size;
      t.offset = u64("its data offset");
      out.tensor_index.emplace(t.name, out.tensors.size());
      out.tensors.push_back(std::move(t));
      context_.clear();
    }
    const uint64_t header_end = pos_;
    out.data_offset = (header_end + out.alignment - 1) / out.alignment * out.alignment;
    if (!out.tensors.empty() && out.data_offset > size_) {
      fail("the data section would start at byte " + std::to_string(out.data_offset) + ", past the end of the " +
           std::to_string(size_) + "-byte file (hint: the file is truncated)");
    }
    check_tensor_data(out);
    return out;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw FormatError(source_ + ": " + (context_.empty() ? "" : context_ + ": ") + what);
  }

  std::size_t remaining() const { return size_ - pos_; }

  void need(uint64_t n, const std::string& what) const {
    if (n > remaining()) {
      fail("truncated: " + what + " needs " + std::to_string(n) + " bytes at offset " + std::to_string(pos_) +
           " but the file ends at " + std::to_string(size_) +
           " (hint: the file is incomplete; download or copy it again)");
    }
  }

  uint64_t scalar(uint64_t n, const std::string& what) {
    need(n, what);
    const uint64_t v = load_le(data_ + pos_, n);
    pos_ += n;
    return v;
  }
  uint32_t u32(const std::string& what) { return static_cast<uint32_t>(scalar(4, what)); }
  uint64_t u64(const std::string& what) { return scalar(8, what); }

  std::string string(const std::string& what) {
    const uint64_t length = u64("the length of " + what);
    if (length > remaining()) {
      fail("the length of " + what + " is " + std::to_string(length) + " bytes, past the end of the file (" +
           std::to_string(remaining()) + " bytes remain) (hint: the file is truncated or corrupt)");
    }
    std::string s(reinterpret_cast<const char*>(data_ + pos_), length);
    pos_ += length;
    return s;
  }

  // Capacity reserved for `count` entries read from the file: a few thousand at most, then the vector grows
  // with the entries actually parsed, which each consume bytes of the file. A count is only bounded by the
  // bytes left (13 per metadata entry), while an entry takes ~160 bytes in memory, so reserving the count
  // itself could ask for many times the file's size (std::bad_alloc instead of FormatError).
  static std::size_t reservation(uint64_t count) { return static_cast<std::size_t>(std::min<uint64_t>(count, 4096)); }

  GgufValue read_value(uint32_t type, int depth) {
    if (!valid_value_type(type)) fail("unknown value type " + std::to_string(type) + " (hint: the file is corrupt)");
    GgufValue v;
    v.type_ = static_cast<GgufType>(type);
    if (v.type_ == GgufType::STRING) {
      v.string_ = string("the string value");
    } else if (v.type_ == GgufType::ARRAY) {
      if (depth >= kMaxArrayNesting) fail("arrays nested deeper than " + std::to_string(kMaxArrayNesting) + " levels");
      const uint32_t element = u32("the array element type");
      if (!valid_value_type(element))
        fail("unknown array element type " + std::to_string(element) + " (hint: the file is corrupt)");
      v.element_type_ = static_cast<GgufType>(element);
      v.count_ = u64("the array length");
      const uint64_t min_size = v.element_type_ == GgufType::STRING  ? 8
                                : v.element_type_ == GgufType::ARRAY ? 12
                                                                     : scalar_size(v.element_type_);
      if (v.count_ > remaining() / min_size) {
        fail("array of " + std::to_string(v.count_) + " " + gguf_type_name(v.element_type_) +
             " values cannot fit in the " + std::to_string(remaining()) +
             " remaining bytes (hint: the file is truncated or corrupt)");
      }
      if (v.element_type_ == GgufType::STRING) {
        v.strings_.reserve(reservation(v.count_));
        for (uint64_t i = 0; i < v.count_; ++i) v.strings_.push_back(string("element " + std::to_string(i)));
      } else if (v.element_type_ == GgufType::ARRAY) {
        v.arrays_.reserve(reservation(v.count_));
        for (uint64_t i = 0; i < v.count_; ++i)
          v.arrays_.push_back(read_value(static_cast<uint32_t>(GgufType::ARRAY), depth + 1));
      } else {
        const uint64_t n = v.count_ * min_size;
        need(n, "the array data");
        v.raw_.assign(data_ + pos_, data_ + pos_ + n);
        if (v.element_type_ == GgufType::BOOL) {
          for (uint8_t b : v.raw_) {
            if (b > 1) fail("a BOOL array element is " + std::to_string(b) + ", expected 0 or 1");
          }
        }
        pos_ += n;
      }
    } else {
      v.bits_ = scalar(scalar_size(v.type_), std::string("the ") + gguf_type_name(v.type_) + " value");
      if (v.type_ == GgufType::BOOL && v.bits_ > 1)
        fail("BOOL value is " + std::to_string(v.bits_) + ", expected 0 or 1");
    }
    return v;
  }

  static std::string dims(const std::vector<uint64_t>& ne, std::size_t n) {
    std::string s = "[";
    for (std::size_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
  }

  // Offsets aligned, data inside the file, no two tensors sharing bytes.
  void check_tensor_data(const GgufContents& out) {
    const uint64_t data_size = out.data_offset <= size_ ? size_ - out.data_offset : 0;
    std::vector<std::size_t> order;
    for (std::size_t i = 0; i < out.tensors.size(); ++i) {
      const GgufTensorInfo& t = out.tensors[i];
      context_ = "tensor " + util::quote_for_message(t.name);
      if (t.offset % out.alignment != 0) {
        fail("data offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
             std::to_string(out.alignment) + " (hint: the file is corrupt)");
      }
      if (t.offset > data_size || t.nbytes > data_size - t.offset) {
        fail(std::string(ggml_type_name(t.type)) + " " + dims(t.ne, t.ne.size()) + " needs bytes [" +
             std::to_string(t.offset) + ", " + std::to_string(t.offset) + " + " + std::to_string(t.nbytes) +
             ") of the data section, which has " + std::to_string(data_size) + " bytes (hint: the file is truncated)");
      }
      if (t.nbytes > 0) order.push_back(i);
    }
    std::sort(order.begin(), order.end(),
              [&](std::size_t a, std::size_t b) { return out.tensors[a].offset < out.tensors[b].offset; });
    for (std::size_t k = 1; k < order.size(); ++k) {
      const GgufTensorInfo& prev = out.tensors[order[k - 1]];
      const GgufTensorInfo& t = out.tensors[order[k]];
      if (t.offset < prev.offset + prev.nbytes) {
        context_ = "tensor " + util::quote_for_message(t.name);
        fail("data [" + std::to_string(t.offset) + ", " + std::to_string(t.offset + t.nbytes) + ") overlaps tensor " +
             util::quote_for_message(prev.name) + " [" + std::to_string(prev.offset) + ", " +
             std::to_string(prev.offset + prev.nbytes) + ") (hint: the file is corrupt)");
      }
    }
    context_.clear();
  }

  const uint8_t* data_;
  std::size_t size_;
  std::size_t pos_ = 0;
  const std::string& source_;
  std::string context_;  // the key or tensor being read, for messages
};

GgufContents parse_gguf(const uint8_t* data, std::size_t size, const std::string& source) {
  return GgufParser(data, size, source).parse();
}

// ---- GgufFile ---------------------------------------------------------------------------------------------

struct GgufFile::Mapping {
  std::string path;
  void* address = nullptr;
  std::size_t size = 0;
  GgufContents contents;
  ~Mapping() {
    if (address && address != MAP_FAILED) ::munmap(address, size);
  }
};

GgufFile GgufFile::open(const std::string& path) {
  auto mapping = std::make_shared<Mapping>();
  mapping->path = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FormatError(path + ": cannot open: " + std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    throw FormatError(path + ": cannot stat: " + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FormatError(path + ": not a regular file");
  }
  mapping->size = static_cast<std::size_t>(st.st_size);
  if (mapping->size > 0) {
    mapping->address = ::mmap(nullptr, mapping->size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (mapping->address == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      mapping->address = nullptr;
      throw FormatError(path + ": cannot map the file: " + std::strerror(e));
    }
  }
  ::close(fd);
  static const uint8_t empty = 0;
  const uint8_t* bytes = mapping->address ? static_cast<const uint8_t*>(mapping->address) : &empty;
  mapping->contents = parse_gguf(bytes, mapping->size, path);
  GgufFile file;
  file.mapping_ = std::move(mapping);
  return file;
}

const std::string& GgufFile::path() const { return mapping_->path; }
const GgufContents& GgufFile::contents() const { return mapping_->contents; }

const GgufValue& GgufFile::value(const std::string& key) const {
  const GgufValue* v = contents().find(key);
  if (!v) {
    throw FormatError(path() + ": metadata key " + util::quote_for_message(key) +
                      " is missing (hint: is this a model of the expected "
                      "architecture, converted by a current llama.cpp?)");
  }
  return *v;
}

namespace {
template <typename F>
auto with_key(const GgufFile& file, const std::string& key, F&& get) -> decltype(get(file.value(key))) {
  const GgufValue& v = file.value(key);
  try {
    return get(v);
  } catch (const FormatError& e) {
    throw FormatError(file.path() + ": metadata " + util::quote_for_message(key) + ": " + e.what());
  }
}
}  // namespace

uint64_t GgufFile::get_uint(const std::string& key) const {
  return with_key(*this, key, [](const GgufValue& v) { return v.as_uint(); });
}
int64_t GgufFile::get_int(const std::string& key) const {
  return with_key(*this, key, [](const GgufValue& v) { return v.as_int(); });
}
double GgufFile::get_float(const std::string& key) const {
  return with_key(*this, key, [](const GgufValue& v) { return v.as_double(); });
}
bool GgufFile::get_bool(const std::string& key) const {
  return with_key(*this, key, [](const GgufValue& v) { return v.as_bool(); });
}
const std::string& GgufFile::get_string(const std::string& key) const {
  return with_key(*this, key, [](const GgufValue& v) -> const std::string& { return v.as_string(); });
}
const std::vector<std::string>& GgufFile::get_strings(const std::string& key) const {
  return with_key(*this, key, [](const GgufValue& v) -> const std::vector<std::string>& { return v.as_strings(); });
}
std::vector<int64_t> GgufFile::get_ints(const std::string& key) const {
  return with_key(*this, key, [](const GgufValue& v) { return v.as_ints(); });
}
uint64_t GgufFile::get_uint(const std::string& key, uint64_t fallback) const {
  return has_key(key) ? get_uint(key) : fallback;
}
double GgufFile::get_float(const std::string& key, double fallback) const {
  return has_key(key) ? get_float(key) : fallback;
}
bool GgufFile::get_bool(const std::string& key, bool fallback) const { return has_key(key) ? get_bool(key) : fallback; }
std::string GgufFile::get_string(const std::string& key, const std::string& fallback) const {
  return has_key(key) ? get_string(key) : fallback;
}

const GgufTensorInfo& GgufFile::tensor(const std::string& name) const {
  const GgufTensorInfo* t = contents().find_tensor(name);
  if (!t) {
    std::string some;
    for (std::size_t i = 0; i < tensors().size() && i < 5; ++i)
      some += (i ? ", " : "") + util::quote_for_message(tensors()[i].name);
    throw FormatError(path() + ": tensor " + util::quote_for_message(name) + " does not exist (the file has " +
                      std::to_string(tensors().size()) + " tensors: " + some + (tensors().size() > 5 ? ", ..." : "") +
                      ") (hint: maybe wrong model or architecture?)");
  }
  return *t;
}

const uint8_t* GgufFile::tensor_data(const std::string& name) const {
  const GgufTensorInfo& t = tensor(name);
  return static_cast<const uint8_t*>(mapping_->address) + contents().data_offset + t.offset;
}

void GgufFile::dequantize(const std::string& name, float* out) const {
  const GgufTensorInfo& t = tensor(name);
  const GgmlTypeInfo* info = ggml_type_info(static_cast<uint32_t>(t.type));
  if (!info->dequantizable) {
    throw FormatError(path() + ": tensor " + util::quote_for_message(name) + " has type " + info->name +
                      ", which tiedlora cannot dequantize (hint: supported are F32, F16, BF16, F64, Q4_0, Q4_1, "
                      "Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K; re-quantize the model with one of them)");
  }
  if (t.numel == 0) return;
  formats::dequantize(t.type, tensor_data(name), t.numel, out);
}

std::vector<float> GgufFile::dequantize(const std::string& name) const {
  std::vector<float> out(tensor(name).numel);
  dequantize(name, out.data());
  return out;
}

// ---- dequantization ---------------------------------------------------------------------------------------
// Each block type follows ggml's dequantize_row_* and gguf-py's numpy code, which compute the same float32
// operations in the same order: products of float32 values rounded once each (x86-64 without -mfma has no
// fused multiply-add for the compiler to contract into, so the results are bit-identical).

namespace {

void dequantize_q4_0(const uint8_t* b, uint64_t blocks, float* y) {
  for (uint64_t i = 0; i < blocks; ++i, b += 18, y += 32) {
    const float d = half_at(b);
    const uint8_t* qs = b + 2;
    for (int j = 0; j < 16; ++j) {
      y[j] = static_cast<float>((qs[j] & 0x0F) - 8) * d;
      y[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
    }
  }
}

void dequantize_q4_1(const uint8_t* b, uint64_t blocks, float* y) {
  for (uint64_t i = 0; i < blocks; ++i, b += 20, y += 32) {
    const float d = half_at(b), m = half_at(b + 2);
    const uint8_t* qs = b + 4;
    for (int j = 0; j < 16; ++j) {
      const float lo = d * static_cast<float>(qs[j] & 0x0F);
      const float hi = d * static_cast<float>(qs[j] >> 4);
      y[j] = lo + m;
      y[j + 16] = hi + m;
    }
  }
}

void dequantize_q5_0(const uint8_t* b, uint64_t blocks, float* y) {
  for (uint64_t i = 0; i < blocks; ++i, b += 22, y += 32) {
    const float d = half_at(b);
    const uint32_t qh = static_cast<uint32_t>(load_le(b + 2, 4));
    const uint8_t* qs = b + 6;
    for (int j = 0; j < 16; ++j) {
      const int lo = static_cast<int>((qs[j] & 0x0F) | (((qh >> j) & 1u) << 4)) - 16;
      const int hi = static_cast<int>((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4)) - 16;
      y[j] = d * static_cast<float>(lo);
      y[j + 16] = d * static_cast<float>(hi);
    }
  }
}

void dequantize_q5_1(const uint8_t* b, uint64_t blocks, float* y) {
  for (uint64_t i = 0; i < blocks; ++i, b += 24, y += 32) {
    const float d = half_at(b), m = half_at(b + 2);
    const uint32_t qh = static_cast<uint32_t>(load_le(b + 4, 4));
    const uint8_t* qs = b + 8;
    for (int j = 0; j < 16; ++j) {
      const float lo = d * static_cast<float>((qs[j] & 0x0F) | (((qh >> j) & 1u) << 4));
      const float hi = d * static_cast<float>((qs[j] >> 4) | (((qh >> (j + 16)) & 1u) << 4));
      y[j] = lo + m;
      y[j + 16] = hi + m;
    }
  }
}

void dequantize_q8_0(const uint8_t* b, uint64_t blocks, float* y) {
  for (uint64_t i = 0; i < blocks; ++i, b += 34, y += 32) {
    const float d = half_at(b);
    const auto* qs = reinterpret_cast<const int8_t*>(b + 2);
    for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(qs[j]) * d;
  }
}

// The 6-bit scale and min of sub-block j of a Q4_K / Q5_K super-block (ggml's get_scale_min_k4).
void scale_min_k4(int j, const uint8_t* q, uint8_t* scale, uint8_t* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
    *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

void dequantize_q4_k(const uint8_t* b, uint64_t blocks, float* y) {
  for (uint64_t i = 0; i < blocks; ++i, b += 144) {
    const float d = half_at(b), dmin = half_at(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* q = b + 16;
    for (int j = 0; j < 8; j += 2, q += 32) {
      uint8_t sc, m;
      scale_min_k4(j, scales, &sc, &m);
      const float d1 = d * sc, m1 = dmin * m;
      scale_min_k4(j + 1, scales, &sc, &m);
      const float d2 = d * sc, m2 = dmin * m;
      for (int l = 0; l < 32; ++l) {
        const float a = d1 * static_cast<float>(q[l] & 0x0F);
        y[l] = a - m1;
      }
      for (int l = 0; l < 32; ++l) {
        const float a = d2 * static_cast<float>(q[l] >> 4);
        y[l + 32] = a - m2;
      }
      y += 64;
    }
  }
}

void dequantize_q5_k(const uint8_t* b, uint64_t blocks, float* y) {
  for (uint64_t i = 0; i < blocks; ++i, b += 176) {
    const float d = half_at(b), dmin = half_at(b + 2);
    const uint8_t* scales = b + 4;
    const uint8_t* qh = b + 16;
    const uint8_t* ql = b + 48;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0; j < 8; j += 2, ql += 32, u1 <<= 2, u2 <<= 2) {
      uint8_t sc, m;
      scale_min_k4(j, scales, &sc, &m);
      const float d1 = d * sc, m1 = dmin * m;
      scale_min_k4(j + 1, scales, &sc, &m);
      const float d2 = d * sc, m2 = dmin * m;
      for (int l = 0; l < 32; ++l) {
        const float a = d1 * static_cast<float>((ql[l] & 0x0F) + ((qh[l] & u1) ? 16 : 0));
        y[l] = a - m1;
      }
      for (int l = 0; l < 32; ++l) {
        const float a = d2 * static_cast<float>((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0));
        y[l + 32] = a - m2;
      }
      y += 64;
    }
  }
}

void dequantize_q6_k(const uint8_t* b, uint64_t blocks, float* y) {
  for (uint64_t i = 0; i < blocks; ++i, b += 210) {
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const auto* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = half_at(b + 208);
    for (int n = 0; n < 2; ++n, ql += 64, qh += 32, sc += 8, y += 128) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = static_cast<int>((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = static_cast<int>((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = static_cast<int>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = static_cast<int>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        const float s1 = d * static_cast<float>(sc[is + 0]), s2 = d * static_cast<float>(sc[is + 2]);
        const float s3 = d * static_cast<float>(sc[is + 4]), s4 = d * static_cast<float>(sc[is + 6]);
        y[l + 0] = s1 * static_cast<float>(q1);
        y[l + 32] = s2 * static_cast<float>(q2);
        y[l + 64] = s3 * static_cast<float>(q3);
        y[l + 96] = s4 * static_cast<float>(q4);
      }
    }
  }
}

}  // namespace

void dequantize(GgmlType type, const uint8_t* data, uint64_t count, float* out) {
  const GgmlTypeInfo* info = ggml_type_info(static_cast<uint32_t>(type));
  if (!info || !info->dequantizable) {
    throw Error(std::string("tiedlora::formats::dequantize: type ") +
                (info ? info->name : std::to_string(static_cast<uint32_t>(type)).c_str()) + " cannot be dequantized");
  }
  if (count % info->block_size != 0) {
    throw Error("tiedlora::formats::dequantize: " + std::to_string(count) + " values is not a multiple of the " +
                info->name + " block size " + std::to_string(info->block_size));
  }
  if (count == 0) return;  // `out` may be null then (an empty vector's data())
  const uint64_t blocks = count / info->block_size;
  switch (type) {
    case GgmlType::F32: std::memcpy(out, data, count * 4); return;
    case GgmlType::F16:
      for (uint64_t i = 0; i < count; ++i) out[i] = half_at(data + 2 * i);
      return;
    case GgmlType::BF16:
      for (uint64_t i = 0; i < count; ++i)
        out[i] = f32_from_bits(static_cast<uint32_t>(load_le(data + 2 * i, 2)) << 16);
      return;
    case GgmlType::F64:
      for (uint64_t i = 0; i < count; ++i) out[i] = static_cast<float>(f64_from_bits(load_le(data + 8 * i, 8)));
      return;
    case GgmlType::Q4_0: return dequantize_q4_0(data, blocks, out);
    case GgmlType::Q4_1: return dequantize_q4_1(data, blocks, out);
    case GgmlType::Q5_0: return dequantize_q5_0(data, blocks, out);
    case GgmlType::Q5_1: return dequantize_q5_1(data, blocks, out);
    case GgmlType::Q8_0: return dequantize_q8_0(data, blocks, out);
    case GgmlType::Q4_K: return dequantize_q4_k(data, blocks, out);
    case GgmlType::Q5_K: return dequantize_q5_k(data, blocks, out);
    case GgmlType::Q6_K: return dequantize_q6_k(data, blocks, out);
    default: throw Error(std::string("tiedlora::formats::dequantize: type ") + info->name + " cannot be dequantized");
  }
}

}  // namespace tiedlora::formats
