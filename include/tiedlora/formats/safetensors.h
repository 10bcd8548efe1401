// tiedlora/formats/safetensors.h: reading and writing safetensors files and sharded checkpoints.
//
// Reading memory-maps the file (copy-on-write, so a tensor handed out may be modified without touching
// the file) and hands out tensors that alias the mapping when their data is aligned for their dtype;
// otherwise the bytes are copied. Every check of the reference implementation is applied, and each
// failure throws tiedlora::FormatError naming the file and the tensor.
//
// Writing produces the same bytes as the Python `safetensors` package for the same tensors and metadata
// (header JSON layout, tensor order by dtype then name, header padded with spaces to 8 bytes), and is
// atomic: the file is written beside the destination and renamed into place.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "tiedlora/formats/safetensors_format.h"

namespace tiedlora::formats {

/// The torch scalar type of a safetensors dtype (throws for dtypes torch cannot represent).
c10::ScalarType to_scalar_type(SafetensorsDtype dtype);
/// The safetensors dtype of a torch scalar type (throws tiedlora::Error for types safetensors lacks).
SafetensorsDtype from_scalar_type(c10::ScalarType type);
/// The floating-point dtype of a command-line name: "f32", "bf16" or "f16"; anything else throws
/// tiedlora::ConfigError naming `option` (e.g. "--dtype") and the value.
c10::ScalarType float_dtype_from_name(const std::string& name, const std::string& option);

/// A memory-mapped safetensors file. Tensors it hands out keep the mapping alive.
class SafetensorsFile {
 public:
  /// Opens and validates `path`; throws tiedlora::FormatError on anything malformed.
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const;
  const SafetensorsHeader& header() const;
  const std::map<std::string, std::string>& metadata() const { return header().metadata; }
  /// Tensor names in the order their data appears in the file.
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const;
  /// The header entry of `name`; throws tiedlora::FormatError (naming the file) when absent.
  const TensorEntry& entry(const std::string& name) const;
  /// The tensor `name` on the CPU: aliases the mapping when aligned (zero-copy), else a copy.
  at::Tensor tensor(const std::string& name) const;
  /// Lets the kernel drop the memory pages of tensor `name` (madvise DONTNEED): a streaming reader calls it
  /// when done with a tensor, so resident memory stays near one tensor rather than the file. Tensors
  /// handed out for `name` stay valid (pages are read again from the file), but changes made to them
  /// in memory are lost.
  void release_pages(const std::string& name) const;
  /// The raw little-endian bytes of tensor `name`, valid while this object or any tensor from it lives.
  std::pair<const uint8_t*, std::size_t> bytes(const std::string& name) const;

 private:
  struct Mapping;
  std::shared_ptr<const Mapping> mapping_;
  std::map<std::string, std::size_t> index_;
};

/// Every tensor of a safetensors file, by name.
std::map<std::string, at::Tensor> load_safetensors(const std::string& path);

/// Writes `tensors` (any device, contiguous or not) and `metadata` to `path` atomically.
/// Throws tiedlora::Error for duplicate names or dtypes safetensors cannot hold.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

/// A Hugging Face checkpoint: one `model.safetensors`, or shards listed in `model.safetensors.index.json`.
/// Opening checks that every shard exists, that each tensor of the index is in the shard it names, and
/// that no tensor is in two shards.
class Checkpoint {
 public:
  /// `path` is a folder, an index file, or a single .safetensors file.
  static Checkpoint open(const std::string& path);
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const;
  at::Tensor tensor(const std::string& name) const;
  const TensorEntry& entry(const std::string& name) const;
  /// The file that holds `name`.
  const SafetensorsFile& file_of(const std::string& name) const;
  const std::vector<SafetensorsFile>& files() const { return files_; }

 private:
  std::string source_;  ///< the file or index opened, for error messages
  std::vector<SafetensorsFile> files_;
  std::map<std::string, std::size_t> file_of_tensor_;
};

/// Writes `tensors` into `folder` as Hugging Face does: one `model.safetensors` when the total fits in
/// `max_shard_bytes`, else `model-0000i-of-0000n.safetensors` shards (tensors in the given order, a shard
/// closed when the next tensor would overflow it) plus `model.safetensors.index.json`.
/// Returns the names of the files written.
std::vector<std::string> save_sharded_safetensors(const std::string& folder,
                                                  const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                                  uint64_t max_shard_bytes,
                                                  const std::map<std::string, std::string>& metadata = {});

/// A tensor to be written by the streaming writers: its bytes are produced only when its turn comes.
struct TensorSpec {
  std::string name;
  SafetensorsDtype dtype;
  std::vector<int64_t> shape;
  uint64_t nbytes() const;
};

/// Produces the tensor of `spec` (CPU; the spec's dtype and shape; any strides) when the writer needs it.
using TensorProducer = std::function<at::Tensor(const TensorSpec& spec)>;

/// Writes a safetensors file whose header is computed from `specs` first, then asks `produce` for one
/// tensor at a time, in file order (dtype, then name, as save_safetensors), so only one tensor's data needs
/// to exist at a time. The bytes equal save_safetensors() of the same tensors. Atomic: written beside
/// `path` and renamed into place; a producer that throws leaves no file. Throws tiedlora::Error when a
/// produced tensor does not match its spec.
void write_safetensors_streaming(const std::string& path, const std::vector<TensorSpec>& specs,
                                 const TensorProducer& produce,
                                 const std::map<std::string, std::string>& metadata = {});

/// save_sharded_safetensors() with streamed tensors: shards are planned from the specs (in the given
/// order), then each shard is written with write_safetensors_streaming. Returns the names written.
std::vector<std::string> write_sharded_safetensors_streaming(const std::string& folder,
                                                             const std::vector<TensorSpec>& specs,
                                                             const TensorProducer& produce, uint64_t max_shard_bytes,
                                                             const std::map<std::string, std::string>& metadata = {});

}  // namespace tiedlora::formats
