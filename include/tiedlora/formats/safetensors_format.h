// tiedlora/formats/safetensors_format.h: the safetensors header — dtypes, entries, parsing and serialization —
// without torch, so that the fuzz target (tests/fuzz) links without LibTorch. tiedlora/formats/safetensors.h
// adds the memory-mapped reader and the writers on top.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace tiedlora::formats {

/// The dtypes of the safetensors format that tiedlora reads and writes.
enum class SafetensorsDtype { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64 };

/// "F32", "BF16", ...
const char* dtype_name(SafetensorsDtype dtype);
std::size_t dtype_size(SafetensorsDtype dtype);
/// One entry of a safetensors header.
struct TensorEntry {
  std::string name;
  SafetensorsDtype dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  ///< offset in the data buffer, inclusive
  uint64_t end = 0;    ///< offset in the data buffer, exclusive
  int64_t numel() const;
};

/// A parsed and validated safetensors header (no tensor data). Entries are in data-offset order.
struct SafetensorsHeader {
  std::vector<TensorEntry> tensors;
  std::map<std::string, std::string> metadata;  ///< the "__metadata__" object
  uint64_t data_offset = 0;                     ///< where the data buffer starts in the file
};

/// Parses and validates the first bytes of a safetensors file of `file_size` bytes. `bytes` must hold at
/// least the 8-byte length prefix and the header it announces (fewer is reported as truncation).
/// `source` names the file in error messages. Torch-free; this is the function the fuzz target drives.
SafetensorsHeader parse_safetensors_header(const uint8_t* bytes, std::size_t available, uint64_t file_size,
                                           const std::string& source);

/// Serializes a header exactly as the Python package does (without the 8-byte prefix, padded to 8).
std::string serialize_safetensors_header(const std::vector<TensorEntry>& tensors,
                                         const std::map<std::string, std::string>& metadata);

}  // namespace tiedlora::formats
