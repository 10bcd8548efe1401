// src/formats/safetensors_format.cpp: the torch-free half of tiedlora::formats safetensors support, i.e. dtype
// names and sizes, the validating header parser (the fuzz target) and the header serializer that
// reproduces the Python `safetensors` package byte for byte.
//
// The parser runs nlohmann_json in SAX mode with a handler that knows the three levels of a header
// (root object, tensor entry or __metadata__, shape / data_offsets arrays), so no DOM is built, duplicate
// keys are seen as they arrive, and no input can recurse or allocate beyond the header itself.
#include "tiedlora/formats/safetensors_format.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>

#include <nlohmann/json.hpp>

#include "tiedlora/core/error.h"
#include "util/text.h"

namespace tiedlora::formats {

namespace {

constexpr uint64_t kMaxHeaderSize = 100'000'000;  // the reference implementation's limit

struct DtypeInfo {
  SafetensorsDtype dtype;
  const char* name;
  std::size_t size;
};

constexpr DtypeInfo kDtypes[] = {
    {SafetensorsDtype::BOOL, "BOOL", 1},       {SafetensorsDtype::U8, "U8", 1},
    {SafetensorsDtype::I8, "I8", 1},           {SafetensorsDtype::F8_E5M2, "F8_E5M2", 1},
    {SafetensorsDtype::F8_E4M3, "F8_E4M3", 1}, {SafetensorsDtype::I16, "I16", 2},
    {SafetensorsDtype::U16, "U16", 2},         {SafetensorsDtype::F16, "F16", 2},
    {SafetensorsDtype::BF16, "BF16", 2},       {SafetensorsDtype::I32, "I32", 4},
    {SafetensorsDtype::U32, "U32", 4},         {SafetensorsDtype::F32, "F32", 4},
    {SafetensorsDtype::I64, "I64", 8},         {SafetensorsDtype::U64, "U64", 8},
    {SafetensorsDtype::F64, "F64", 8},
};

// Dtypes the reference implementation knows but tiedlora (and torch) cannot hold.
constexpr const char* kForeignDtypes[] = {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "C64"};

const DtypeInfo& info(SafetensorsDtype dtype) {
  for (const auto& d : kDtypes) {
    if (d.dtype == dtype) return d;
  }
  throw Error("tiedlora::formats: invalid SafetensorsDtype value " + std::to_string(static_cast<int>(dtype)));
}

bool dtype_from_name(const std::string& name, SafetensorsDtype* out) {
  for (const auto& d : kDtypes) {
    if (name == d.name) {
      *out = d.dtype;
      return true;
    }
  }
  return false;
}

std::string offsets_string(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

// ---- the SAX handler ------------------------------------------------------------------------------

// What the handler expects next. The header grammar is fixed, so a small state machine suffices.
enum class State {
  kRoot,        // before the root object
  kTopKey,      // inside the root object, expecting a key or its end
  kTopValue,    // after a top-level key, expecting a tensor object or the metadata object
  kMetaKey,     // inside __metadata__, expecting a key or its end
  kMetaValue,   // expecting a metadata string value
  kEntryKey,    // inside a tensor entry, expecting a field name or its end
  kEntryValue,  // expecting the value of a field
  kShape,       // inside "shape": [...]
  kOffsets,     // inside "data_offsets": [...]
  kSkip,        // inside an unknown field's value (ignored, as serde does)
  kDone,        // after the root object
};

enum class Field { kDtype, kShape, kOffsets, kOther };

class HeaderHandler {
 public:
  HeaderHandler(const std::string& source, SafetensorsHeader* header) : source_(source), header_(header) {}

  bool null() {
    switch (state_) {
      case State::kTopValue:
        if (key_ == "__metadata__") {  // serde reads `null` as "no metadata"
          state_ = State::kTopKey;
          return true;
        }
        fail(tensor() + "entry is null, expected an object {\"dtype\", \"shape\", \"data_offsets\"}");
      default: return scalar("null");
    }
  }
  bool boolean(bool) { return scalar("a boolean"); }
  bool number_integer(int64_t v) {
    if (v >= 0) return number_unsigned(static_cast<uint64_t>(v));
    return scalar("the negative integer " + std::to_string(v));
  }
  bool number_unsigned(uint64_t v) {
    if (state_ == State::kShape) {
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        fail(tensor() + "shape dimension " + std::to_string(v) + " is too large");
      }
      entry_.shape.push_back(static_cast<int64_t>(v));
      return true;
    }
    if (state_ == State::kOffsets) {
      if (n_offsets_ == 0) entry_.begin = v;
      if (n_offsets_ == 1) entry_.end = v;
      if (++n_offsets_ > 2) fail(tensor() + "data_offsets has more than 2 entries, expected [begin, end]");
      return true;
    }
    return scalar("the integer " + std::to_string(v));
  }
  bool number_float(double, const std::string& text) {
    return scalar("the number " + text + " (not a non-negative integer)");
  }
  bool string(std::string& s) {
    switch (state_) {
      case State::kMetaValue:
        header_->metadata[key_in_object_] = std::move(s);
        state_ = State::kMetaKey;
        return true;
      case State::kEntryValue:
        if (field_ == Field::kDtype) {
          if (!dtype_from_name(s, &entry_.dtype)) unknown_dtype(s);
          state_ = State::kEntryKey;
          return true;
        }
        return scalar("a string");
      default: return scalar("a string");
    }
  }
  bool binary(nlohmann::json::binary_t&) { return scalar("binary data"); }

  bool start_object(std::size_t) {
    switch (state_) {
      case State::kRoot: state_ = State::kTopKey; return true;
      case State::kTopValue:
        seen_.clear();
        if (key_ == "__metadata__") {
          state_ = State::kMetaKey;
        } else {
          entry_ = TensorEntry{};
          entry_.name = key_;
          has_dtype_ = has_shape_ = has_offsets_ = false;
          state_ = State::kEntryKey;
        }
        return true;
      case State::kEntryValue:
        if (field_ == Field::kOther) return skip();
        return scalar("an object");
      case State::kSkip: ++skip_depth_; return true;
      default: return scalar("an object");
    }
  }
  bool start_array(std::size_t) {
    switch (state_) {
      case State::kEntryValue:
        if (field_ == Field::kShape) {
          state_ = State::kShape;
          return true;
        }
        if (field_ == Field::kOffsets) {
          n_offsets_ = 0;
          state_ = State::kOffsets;
          return true;
        }
        if (field_ == Field::kOther) return skip();
        return scalar("an array");
      case State::kSkip: ++skip_depth_; return true;
      default: return scalar("an array");
    }
  }
  bool end_array() {
    switch (state_) {
      case State::kShape: state_ = State::kEntryKey; return true;
      case State::kOffsets:
        if (n_offsets_ != 2) {
          fail(tensor() + "data_offsets has " + std::to_string(n_offsets_) + " entries, expected [begin, end]");
        }
        state_ = State::kEntryKey;
        return true;
      case State::kSkip: return unskip();
      default: fail("unexpected end of array");  // nlohmann never reports this for well-formed input
    }
  }
  bool key(std::string& k) {
    switch (state_) {
      case State::kTopKey:
        if (!top_keys_.insert(k).second) {
          fail((k == "__metadata__" ? std::string("__metadata__") : "tensor " + util::quote_for_message(k)) +
               " appears twice in the header (hint: duplicate keys are ambiguous; the file is corrupt or "
               "written by a buggy tool)");
        }
        key_ = std::move(k);
        state_ = State::kTopValue;
        return true;
      case State::kMetaKey:
        if (!seen_.insert(k).second) {
          fail("__metadata__ key " + util::quote_for_message(k) +
               " appears twice (hint: duplicate keys are ambiguous)");
        }
        key_in_object_ = std::move(k);
        state_ = State::kMetaValue;
        return true;
      case State::kEntryKey: {
        if (k == "dtype") {
          field_ = Field::kDtype;
        } else if (k == "shape") {
          field_ = Field::kShape;
        } else if (k == "data_offsets") {
          field_ = Field::kOffsets;
        } else {
          field_ = Field::kOther;  // unknown fields are ignored, as the reference does
        }
        if (field_ != Field::kOther) {
          bool& has = field_ == Field::kDtype ? has_dtype_ : field_ == Field::kShape ? has_shape_ : has_offsets_;
          if (has) fail(tensor() + "field \"" + k + "\" appears twice");
          has = true;
        }
        key_in_object_ = std::move(k);
        state_ = State::kEntryValue;
        return true;
      }
      case State::kSkip: return true;
      default: fail("unexpected key " + util::quote_for_message(k));
    }
  }
  bool end_object() {
    switch (state_) {
      case State::kTopKey: state_ = State::kDone; return true;
      case State::kMetaKey: state_ = State::kTopKey; return true;
      case State::kEntryKey:
        if (!has_dtype_ || !has_shape_ || !has_offsets_) {
          fail(tensor() + "missing field \"" +
               std::string(!has_dtype_   ? "dtype"
                           : !has_shape_ ? "shape"
                                         : "data_offsets") +
               "\" (an entry needs \"dtype\", \"shape\" and \"data_offsets\")");
        }
        header_->tensors.push_back(std::move(entry_));
        state_ = State::kTopKey;
        return true;
      case State::kSkip: return unskip();
      default: fail("unexpected end of object");
    }
  }
  bool parse_error(std::size_t position, const std::string& /*token*/, const nlohmann::detail::exception& ex) {
    std::string what = ex.what();
    // Drop nlohmann's "[json.exception.parse_error.101] " prefix; keep its description.
    if (auto p = what.find("] "); what.rfind("[json.exception", 0) == 0 && p != std::string::npos) {
      what = what.substr(p + 2);
    }
    throw FormatError(source_ + ": header is not valid JSON (byte " + std::to_string(position) +
                      " of the header): " + what + " (hint: the file is corrupt or not a safetensors file)");
  }

 private:
  [[noreturn]] void fail(const std::string& what) { throw FormatError(source_ + ": " + what); }

  std::string tensor() const { return "tensor " + util::quote_for_message(entry_.name) + ": "; }

  // A value of the wrong kind, reported with where it was found.
  bool scalar(const std::string& what) {
    switch (state_) {
      case State::kSkip: return true;
      case State::kEntryValue:
        if (field_ == Field::kOther) {
          state_ = State::kEntryKey;
          return true;
        }
        if (field_ == Field::kDtype) fail(tensor() + "dtype is " + what + ", expected a string such as \"F32\"");
        fail(tensor() + "\"" + key_in_object_ + "\" is " + what + ", expected an array of non-negative integers");
      case State::kShape: fail(tensor() + "shape contains " + what + ", expected non-negative integers");
      case State::kOffsets: fail(tensor() + "data_offsets contains " + what + ", expected non-negative integers");
      case State::kMetaValue:
        fail("__metadata__ value of key " + util::quote_for_message(key_in_object_) + " is " + what +
             ", expected a string (hint: safetensors metadata maps strings to strings)");
      case State::kTopValue:
        if (key_ == "__metadata__") {
          fail("__metadata__ is " + what + ", expected an object of strings");
        }
        fail("tensor " + util::quote_for_message(key_) + ": entry is " + what +
             ", expected an object {\"dtype\", \"shape\", \"data_offsets\"}");
      case State::kRoot: fail("header is " + what + ", expected a JSON object");
      default: fail("unexpected " + what + " in the header");
    }
  }

  bool skip() {
    state_ = State::kSkip;
    skip_depth_ = 1;
    return true;
  }
  bool unskip() {
    if (--skip_depth_ == 0) state_ = State::kEntryKey;
    return true;
  }

  [[noreturn]] void unknown_dtype(const std::string& s) {
    for (const char* foreign : kForeignDtypes) {
      if (s == foreign) {
        fail(tensor() + "dtype " + s + " is valid safetensors but not supported by tiedlora (torch has no such type)");
      }
    }
    std::string known;
    for (const auto& d : kDtypes) known += std::string(known.empty() ? "" : " ") + d.name;
    fail(tensor() + "unknown dtype " + util::quote_for_message(s) + " (expected one of " + known + ")");
  }

  const std::string& source_;
  SafetensorsHeader* header_;
  State state_ = State::kRoot;
  std::set<std::string> top_keys_;
  std::set<std::string> seen_;  // keys of the current metadata object
  std::string key_;             // the current top-level key
  std::string key_in_object_;   // the current key inside an entry or the metadata
  Field field_ = Field::kOther;
  TensorEntry entry_;
  bool has_dtype_ = false, has_shape_ = false, has_offsets_ = false;
  int n_offsets_ = 0;
  std::size_t skip_depth_ = 0;
};

// ---- serialization helpers ------------------------------------------------------------------------

bool valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const auto* end = p + s.size();
  while (p < end) {
    unsigned c = *p;
    int n;
    uint32_t cp;
    if (c < 0x80) {
      ++p;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      n = 1, cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2, cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3, cp = c & 0x07;
    } else {
      return false;
    }
    if (end - p <= n) return false;
    for (int i = 1; i <= n; ++i) {
      if ((p[i] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (p[i] & 0x3f);
    }
    static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
    p += n + 1;
  }
  return true;
}

// serde_json's escaping: `"` and `\` escaped, \b \f \n \r \t short, other controls as \u00xx (lower-case
// hex), everything else (DEL and non-ASCII included) written as is.
void append_json_string(std::string& out, const std::string& s, const char* what) {
  if (!valid_utf8(s))
    throw Error("safetensors: " + std::string(what) + " " + util::quote_for_message(s) + " is not valid UTF-8");
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          static const char* kHex = "0123456789abcdef";
          out += "\\u00";
          out += kHex[c >> 4];
          out += kHex[c & 15];
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

}  // namespace

// ---- public functions -----------------------------------------------------------------------------

const char* dtype_name(SafetensorsDtype dtype) { return info(dtype).name; }

std::size_t dtype_size(SafetensorsDtype dtype) { return info(dtype).size; }

int64_t TensorEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsHeader parse_safetensors_header(const uint8_t* bytes, std::size_t available, uint64_t file_size,
                                           const std::string& source) {
  const std::string hint_truncated = " (hint: the file is truncated, e.g. an interrupted download or copy)";
  if (file_size < 8 || available < 8 || bytes == nullptr) {
    throw FormatError(source + ": file is " + std::to_string(file_size) +
                      " bytes, too short for the 8-byte header length of a safetensors file" + hint_truncated);
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];  // little-endian whatever the host
  if (n > kMaxHeaderSize) {
    throw FormatError(source + ": header length " + std::to_string(n) + " exceeds the limit of " +
                      std::to_string(kMaxHeaderSize) + " bytes (hint: not a safetensors file, or corrupt)");
  }
  if (n + 8 > file_size) {
    throw FormatError(source + ": header length " + std::to_string(n) + " runs past the end of the file (" +
                      std::to_string(file_size) + " bytes)" + hint_truncated);
  }
  if (n + 8 > available) {
    throw FormatError(source + ": only " + std::to_string(available) + " bytes of the " + std::to_string(n + 8) +
                      "-byte header could be read" + hint_truncated);
  }
  if (n == 0 || bytes[8] != '{') {
    throw FormatError(source + ": header does not start with '{' (hint: not a safetensors file)");
  }

  SafetensorsHeader header;
  header.data_offset = 8 + n;
  HeaderHandler handler(source, &header);
  const char* first = reinterpret_cast<const char*>(bytes + 8);
  if (!nlohmann::json::sax_parse(first, first + n, &handler)) {
    throw FormatError(source + ": header is not valid JSON");  // the handler throws first; kept for safety
  }

  // Each tensor's byte count must be what its dtype and shape need (overflow-checked).
  for (const TensorEntry& t : header.tensors) {
    const std::string where = source + ": tensor " + util::quote_for_message(t.name) + ": ";
    if (t.end < t.begin) {
      throw FormatError(where + "data_offsets " + offsets_string(t.begin, t.end) +
                        " end before they begin (hint: was the file written by a buggy tool?)");
    }
    uint64_t numel = 1;
    bool overflow = false;
    for (int64_t d : t.shape) overflow |= __builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel);
    uint64_t need = 0;
    overflow |= __builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_size(t.dtype)), &need);
    if (overflow) {
      throw FormatError(where + dtype_name(t.dtype) + " " + util::list_text(t.shape) +
                        " overflows when its size in bytes is computed (hint: corrupt shape)");
    }
    if (t.end - t.begin != need) {
      throw FormatError(where + "data_offsets " + offsets_string(t.begin, t.end) + " hold " +
                        std::to_string(t.end - t.begin) + " bytes but " + dtype_name(t.dtype) + " " +
                        util::list_text(t.shape) + " needs " + std::to_string(need) +
                        " (hint: was the file written by a buggy tool?)");
    }
  }

  // The data must tile the buffer: sorted by offsets, no hole, no overlap, nothing after the last.
  std::sort(header.tensors.begin(), header.tensors.end(), [](const TensorEntry& a, const TensorEntry& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  const uint64_t buffer = file_size - header.data_offset;
  uint64_t at = 0;
  const TensorEntry* previous = nullptr;
  for (const TensorEntry& t : header.tensors) {
    const std::string where =
        source + ": tensor " + util::quote_for_message(t.name) + ": data_offsets " + offsets_string(t.begin, t.end);
    if (t.begin < at) {
      throw FormatError(where + " overlap tensor " + util::quote_for_message(previous->name) + " " +
                        offsets_string(previous->begin, previous->end) +
                        " (hint: was the file written by a buggy tool?)");
    }
    if (t.begin > at) {
      throw FormatError(where + " leave a hole of " + std::to_string(t.begin - at) + " bytes after " +
                        (previous ? "tensor " + util::quote_for_message(previous->name) + " (which ends at " +
                                        std::to_string(at) + ")"
                                  : std::string("the start of the data buffer")) +
                        " (hint: was the file written by a buggy tool?)");
    }
    if (t.end > buffer) {
      throw FormatError(where + " run past the end of the file: the data buffer holds " + std::to_string(buffer) +
                        " bytes" + hint_truncated);
    }
    at = t.end;
    previous = &t;
  }
  if (at != buffer) {
    throw FormatError(
        source + ": " + std::to_string(buffer - at) + " unexpected bytes after the data of the last tensor" +
        (previous ? " (" + util::quote_for_message(previous->name) + ", ending at " + std::to_string(at) + ")"
                  : std::string()) +
        "; the data buffer holds " + std::to_string(buffer) +
        " bytes (hint: the file was appended to or the header is stale)");
  }
  return header;
}

std::string serialize_safetensors_header(const std::vector<TensorEntry>& tensors,
                                         const std::map<std::string, std::string>& metadata) {
  std::string out = "{";
  if (!metadata.empty()) {
    out += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      if (!first) out += ',';
      first = false;
      append_json_string(out, k, "metadata key");
      out += ':';
      append_json_string(out, v, "metadata value");
    }
    out += '}';
  }
  for (const TensorEntry& t : tensors) {
    if (out.size() > 1) out += ',';
    append_json_string(out, t.name, "tensor name");
    out += ":{\"dtype\":\"";
    out += dtype_name(t.dtype);
    out += "\",\"shape\":[";
    for (std::size_t i = 0; i < t.shape.size(); ++i) {
      if (i) out += ',';
      out += std::to_string(t.shape[i]);
    }
    out += "],\"data_offsets\":[" + std::to_string(t.begin) + "," + std::to_string(t.end) + "]}";
  }
  out += '}';
  out.append((8 - out.size() % 8) % 8, ' ');  // the data buffer starts 8-aligned
  return out;
}

}  // namespace tiedlora::formats
