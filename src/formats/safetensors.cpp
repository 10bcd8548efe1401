// src/formats/safetensors.cpp: the torch half of tiedlora::formats safetensors support, i.e. dtype mapping,
// memory-mapped reading (zero-copy, copy-on-write), atomic writing in the Python package's byte layout,
// and Hugging Face checkpoints (single file or index + shards).
#include "tiedlora/formats/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <regex>
#include <set>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <nlohmann/json.hpp>

#include "tiedlora/core/error.h"
#include "util/files.h"
#include "util/text.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data is little-endian: big-endian hosts need byte swapping");

namespace tiedlora::formats {

namespace {

std::string errno_text() { return std::strerror(errno); }

std::string file_name_of(const std::string& path) { return path.substr(path.find_last_of('/') + 1); }

// The order of the reference implementation's Dtype enum (safetensors 0.8.0: BOOL, F4, F6_E2M3, F6_E3M2,
// U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64). The writer
// sorts by this rank, descending, then by name bytes: that is the order of the data and the header.
int writer_rank(SafetensorsDtype d) {
  switch (d) {
    case SafetensorsDtype::BOOL: return 0;
    case SafetensorsDtype::U8: return 4;
    case SafetensorsDtype::I8: return 5;
    case SafetensorsDtype::F8_E5M2: return 6;
    case SafetensorsDtype::F8_E4M3: return 7;
    case SafetensorsDtype::I16: return 9;
    case SafetensorsDtype::U16: return 10;
    case SafetensorsDtype::F16: return 11;
    case SafetensorsDtype::BF16: return 12;
    case SafetensorsDtype::I32: return 13;
    case SafetensorsDtype::U32: return 14;
    case SafetensorsDtype::F32: return 15;
    case SafetensorsDtype::F64: return 17;
    case SafetensorsDtype::I64: return 18;
    case SafetensorsDtype::U64: return 19;
  }
  return -1;
}

// Validates the names and computes the layout (order and offsets) the Python package would use: by dtype
// rank descending, then by name bytes. Returns entries in file order.
std::vector<TensorEntry> layout(const std::string& path, const std::vector<TensorSpec>& specs) {
  std::set<std::string> names;
  std::vector<const TensorSpec*> sorted;
  sorted.reserve(specs.size());
  for (const auto& spec : specs) {
    if (!names.insert(spec.name).second) {
      throw Error(path + ": tensor " + util::quote_for_message(spec.name) +
                  " is given twice (names in a safetensors file are unique)");
    }
    if (spec.name == "__metadata__") throw Error(path + ": \"__metadata__\" is reserved and cannot name a tensor");
    sorted.push_back(&spec);
  }
  std::sort(sorted.begin(), sorted.end(), [](const TensorSpec* a, const TensorSpec* b) {
    int ra = writer_rank(a->dtype), rb = writer_rank(b->dtype);
    if (ra != rb) return ra > rb;
    return a->name < b->name;  // byte-wise, as Rust compares strings
  });
  std::vector<TensorEntry> entries;
  entries.reserve(sorted.size());
  uint64_t offset = 0;
  for (const TensorSpec* spec : sorted) {
    TensorEntry e;
    e.name = spec->name;
    e.dtype = spec->dtype;
    e.shape = spec->shape;
    e.begin = offset;
    offset += spec->nbytes();
    e.end = offset;
    entries.push_back(std::move(e));
  }
  return entries;
}

// Specs of in-memory tensors, checking that safetensors can hold each.
std::vector<TensorSpec> specs_of(const std::string& path,
                                 const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const auto& [name, t] : tensors) {
    if (!t.defined()) throw Error(path + ": tensor " + util::quote_for_message(name) + " is undefined");
    if (t.layout() != c10::kStrided) {
      throw Error(path + ": tensor " + util::quote_for_message(name) +
                  " is not a dense (strided) tensor; convert it with to_dense()");
    }
    SafetensorsDtype dtype;
    try {
      dtype = from_scalar_type(t.scalar_type());
    } catch (const Error& e) {
      throw Error(path + ": tensor " + util::quote_for_message(name) + ": " + e.what());
    }
    specs.push_back(TensorSpec{name, dtype, t.sizes().vec()});
  }
  return specs;
}

// A producer handing out in-memory tensors by name.
TensorProducer producer_of(const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  auto by_name = std::make_shared<std::map<std::string, const at::Tensor*>>();
  for (const auto& [name, t] : tensors) (*by_name)[name] = &t;
  return [by_name](const TensorSpec& spec) { return *by_name->at(spec.name); };
}

}  // namespace

// ---- dtypes ---------------------------------------------------------------------------------------

c10::ScalarType to_scalar_type(SafetensorsDtype dtype) {
  switch (dtype) {
    case SafetensorsDtype::BOOL: return at::kBool;
    case SafetensorsDtype::U8: return at::kByte;
    case SafetensorsDtype::I8: return at::kChar;
    case SafetensorsDtype::F8_E5M2: return at::kFloat8_e5m2;
    case SafetensorsDtype::F8_E4M3: return at::kFloat8_e4m3fn;
    case SafetensorsDtype::I16: return at::kShort;
    case SafetensorsDtype::U16: return at::kUInt16;
    case SafetensorsDtype::F16: return at::kHalf;
    case SafetensorsDtype::BF16: return at::kBFloat16;
    case SafetensorsDtype::I32: return at::kInt;
    case SafetensorsDtype::U32: return at::kUInt32;
    case SafetensorsDtype::F32: return at::kFloat;
    case SafetensorsDtype::I64: return at::kLong;
    case SafetensorsDtype::U64: return at::kUInt64;
    case SafetensorsDtype::F64: return at::kDouble;
  }
  throw Error("tiedlora::formats: invalid SafetensorsDtype value " + std::to_string(static_cast<int>(dtype)));
}

c10::ScalarType float_dtype_from_name(const std::string& name, const std::string& option) {
  if (name == "f32") return at::kFloat;
  if (name == "bf16") return at::kBFloat16;
  if (name == "f16") return at::kHalf;
  throw ConfigError(option + " must be f32, bf16 or f16, got " + util::quote_for_message(name));
}

SafetensorsDtype from_scalar_type(c10::ScalarType type) {
  switch (type) {
    case at::kBool: return SafetensorsDtype::BOOL;
    case at::kByte: return SafetensorsDtype::U8;
    case at::kChar: return SafetensorsDtype::I8;
    case at::kFloat8_e5m2: return SafetensorsDtype::F8_E5M2;
    case at::kFloat8_e4m3fn: return SafetensorsDtype::F8_E4M3;
    case at::kShort: return SafetensorsDtype::I16;
    case at::kUInt16: return SafetensorsDtype::U16;
    case at::kHalf: return SafetensorsDtype::F16;
    case at::kBFloat16: return SafetensorsDtype::BF16;
    case at::kInt: return SafetensorsDtype::I32;
    case at::kUInt32: return SafetensorsDtype::U32;
    case at::kFloat: return SafetensorsDtype::F32;
    case at::kLong: return SafetensorsDtype::I64;
    case at::kUInt64: return SafetensorsDtype::U64;
    case at::kDouble: return SafetensorsDtype::F64;
    default: throw Error(std::string("dtype ") + c10::toString(type) + " cannot be stored in a safetensors file");
  }
}

// ---- SafetensorsFile ------------------------------------------------------------------------------

struct SafetensorsFile::Mapping {
  std::string path;
  uint8_t* base = nullptr;  // MAP_PRIVATE, PROT_READ | PROT_WRITE: writes stay in this process
  std::size_t size = 0;
  SafetensorsHeader header;

  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (base != nullptr) ::munmap(base, size);
  }
};

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  auto mapping = std::make_shared<Mapping>();
  mapping->path = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(path + ": cannot open: " + errno_text());
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    int saved = errno;
    ::close(fd);
    throw Error(path + ": cannot stat: " + std::strerror(saved));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path + ": not a regular file");
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    parse_safetensors_header(nullptr, 0, size, path);  // throws the truncation error
  }
  // MAP_NORESERVE: a private writable mapping would otherwise be charged in full against the commit limit.
  void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
  int saved = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (base == MAP_FAILED) throw Error(path + ": cannot map: " + std::strerror(saved));
  mapping->base = static_cast<uint8_t*>(base);
  mapping->size = size;
  mapping->header = parse_safetensors_header(mapping->base, size, size, path);

  SafetensorsFile file;
  for (std::size_t i = 0; i < mapping->header.tensors.size(); ++i) file.index_[mapping->header.tensors[i].name] = i;
  file.mapping_ = std::move(mapping);
  return file;
}

const std::string& SafetensorsFile::path() const { return mapping_->path; }

const SafetensorsHeader& SafetensorsFile::header() const { return mapping_->header; }

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> names;
  names.reserve(mapping_->header.tensors.size());
  for (const auto& t : mapping_->header.tensors) names.push_back(t.name);
  return names;
}

bool SafetensorsFile::contains(const std::string& name) const { return index_.count(name) != 0; }

const TensorEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    throw FormatError(path() + ": no tensor " + util::quote_for_message(name) + " (the file holds " +
                      std::to_string(index_.size()) + " tensors)");
  }
  return mapping_->header.tensors[it->second];
}

std::pair<const uint8_t*, std::size_t> SafetensorsFile::bytes(const std::string& name) const {
  const TensorEntry& e = entry(name);
  return {mapping_->base + mapping_->header.data_offset + e.begin, static_cast<std::size_t>(e.end - e.begin)};
}

void SafetensorsFile::release_pages(const std::string& name) const {
  const auto [data, size] = bytes(name);
  // Only whole pages inside the tensor's bytes: neighbours' pages may still be in use.
  const auto page = static_cast<std::uintptr_t>(::sysconf(_SC_PAGESIZE));
  const std::uintptr_t begin = (reinterpret_cast<std::uintptr_t>(data) + page - 1) / page * page;
  const std::uintptr_t end = (reinterpret_cast<std::uintptr_t>(data) + size) / page * page;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const TensorEntry& e = entry(name);
  const auto options = at::TensorOptions().dtype(to_scalar_type(e.dtype));
  auto [data, size] = bytes(name);
  if (size == 0) return at::empty(e.shape, options);
  auto* ptr = const_cast<uint8_t*>(data);  // the mapping is private and writable
  if (reinterpret_cast<std::uintptr_t>(ptr) % dtype_size(e.dtype) == 0) {
    std::shared_ptr<const Mapping> keep = mapping_;
    return at::from_blob(ptr, e.shape, [keep](void*) {}, options);
  }
  at::Tensor copy = at::empty(e.shape, options);  // misaligned (a header not padded to 8): copy
  std::memcpy(copy.data_ptr(), data, size);
  return copy;
}

std::map<std::string, at::Tensor> load_safetensors(const std::string& path) {
  SafetensorsFile file = SafetensorsFile::open(path);
  std::map<std::string, at::Tensor> tensors;
  for (const auto& e : file.header().tensors) tensors.emplace(e.name, file.tensor(e.name));
  return tensors;
}

// ---- writing --------------------------------------------------------------------------------------

uint64_t TensorSpec::nbytes() const {
  uint64_t n = dtype_size(dtype);
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

void write_safetensors_streaming(const std::string& path, const std::vector<TensorSpec>& specs,
                                 const TensorProducer& produce, const std::map<std::string, std::string>& metadata) {
  const std::vector<TensorEntry> entries = layout(path, specs);
  std::map<std::string, const TensorSpec*> spec_of;
  for (const auto& spec : specs) spec_of[spec.name] = &spec;
  const std::string header = serialize_safetensors_header(entries, metadata);
  util::write_file_atomically(path, [&](const util::ByteWriter& write_bytes) {
    uint8_t prefix[8];
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) prefix[i] = static_cast<uint8_t>(n >> (8 * i));
    write_bytes(prefix, 8);
    write_bytes(header.data(), header.size());
    // One tensor at a time on the CPU, so a GPU model is never copied whole.
    for (const auto& entry : entries) {
      const TensorSpec& spec = *spec_of.at(entry.name);
      at::Tensor t = produce(spec);
      if (!t.defined() || t.sizes().vec() != spec.shape || from_scalar_type(t.scalar_type()) != spec.dtype) {
        throw Error(path + ": tensor " + util::quote_for_message(spec.name) + " was produced with " +
                    (t.defined() ? std::string(c10::toString(t.scalar_type())) : "no data") +
                    " data of another shape or dtype than announced in the header");
      }
      if (entry.end == entry.begin) continue;
      t = t.to(at::kCPU).contiguous();
      write_bytes(t.data_ptr(), entry.end - entry.begin);
    }
  });
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  write_safetensors_streaming(path, specs_of(path, tensors), producer_of(tensors), metadata);
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  save_safetensors(path, std::vector<std::pair<std::string, at::Tensor>>(tensors.begin(), tensors.end()), metadata);
}

// ---- Hugging Face checkpoints ---------------------------------------------------------------------

namespace {

constexpr const char* kSingleName = "model.safetensors";
constexpr const char* kIndexName = "model.safetensors.index.json";

}  // namespace

Checkpoint Checkpoint::open(const std::string& path) {
  std::string source = path;
  if (util::is_directory(path)) {
    // transformers' preference: a single model.safetensors first, then the index.
    if (util::is_regular_file(util::join_path(path, kSingleName))) {
      source = util::join_path(path, kSingleName);
    } else if (util::is_regular_file(util::join_path(path, kIndexName))) {
      source = util::join_path(path, kIndexName);
    } else {
      throw FormatError(path + ": folder holds neither " + kSingleName + " nor " + kIndexName +
                        " (hint: is this a Hugging Face checkpoint saved with safetensors?)");
    }
  }
  Checkpoint ckpt;
  ckpt.source_ = source;
  if (!util::ends_with(source, ".json")) {
    ckpt.files_.push_back(SafetensorsFile::open(source));
    for (const auto& name : ckpt.files_[0].names()) ckpt.file_of_tensor_[name] = 0;
    return ckpt;
  }

  const nlohmann::json index = util::parse_json_strict(util::read_text_file(source), source);
  if (!index.is_object()) throw FormatError(source + ": the index is not a JSON object");
  auto wm = index.find("weight_map");
  if (wm == index.end()) {
    throw FormatError(source + ": no \"weight_map\" (hint: a sharded checkpoint index maps each tensor to its shard)");
  }
  if (!wm->is_object()) throw FormatError(source + ": \"weight_map\" is not an object");
  std::map<std::string, std::string> shard_of;  // tensor -> shard file name, from the index
  std::map<std::string, std::size_t> file_index;
  for (const auto& [tensor, shard] : wm->items()) {
    if (!shard.is_string()) {
      throw FormatError(source + ": tensor " + util::quote_for_message(tensor) +
                        ": weight_map value is not a file name string");
    }
    const std::string name = shard.get<std::string>();
    if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos) {
      throw FormatError(source + ": tensor " + util::quote_for_message(tensor) + ": shard " +
                        util::quote_for_message(name) + " is not a file name in the index's folder");
    }
    shard_of[tensor] = name;
    if (!file_index.count(name)) file_index.emplace(name, 0);
  }
  const std::string folder = util::parent_path(source);
  std::size_t i = 0;
  for (auto& [name, idx] : file_index) {
    const std::string shard_path = util::join_path(folder, name);
    if (!util::path_exists(shard_path)) {
      std::string example;
      for (const auto& [t, s] : shard_of) {
        if (s == name) {
          example = t;
          break;
        }
      }
      throw FormatError(source + ": shard " + util::quote_for_message(name) + " (listed for tensor " +
                        util::quote_for_message(example) + ") does not exist (hint: an incomplete download?)");
    }
    ckpt.files_.push_back(SafetensorsFile::open(shard_path));
    idx = i++;
  }
  // Every tensor of a shard must be in the index, under that shard, and in no other shard.
  for (std::size_t f = 0; f < ckpt.files_.size(); ++f) {
    const SafetensorsFile& file = ckpt.files_[f];
    const std::string shard_name = file_name_of(file.path());
    for (const auto& tensor : file.names()) {
      auto listed = shard_of.find(tensor);
      if (listed == shard_of.end()) {
        throw FormatError(source + ": tensor " + util::quote_for_message(tensor) + " is in shard " +
                          util::quote_for_message(shard_name) +
                          " but missing from the index (hint: the index is stale or incomplete)");
      }
      if (auto [it, fresh] = ckpt.file_of_tensor_.emplace(tensor, f); !fresh) {
        throw FormatError(source + ": tensor " + util::quote_for_message(tensor) + " is in two shards, " +
                          util::quote_for_message(file_name_of(ckpt.files_[it->second].path())) + " and " +
                          util::quote_for_message(shard_name));
      }
      if (listed->second != shard_name) {
        throw FormatError(source + ": tensor " + util::quote_for_message(tensor) + " is listed in shard " +
                          util::quote_for_message(listed->second) + " but found in shard " +
                          util::quote_for_message(shard_name) + " (hint: the index is stale)");
      }
    }
  }
  for (const auto& [tensor, shard] : shard_of) {
    if (!ckpt.file_of_tensor_.count(tensor)) {
      throw FormatError(source + ": tensor " + util::quote_for_message(tensor) + " is listed in shard " +
                        util::quote_for_message(shard) +
                        " but that shard does not hold it (hint: the index is stale or the shard is wrong)");
    }
  }
  return ckpt;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> names;
  names.reserve(file_of_tensor_.size());
  for (const auto& [name, f] : file_of_tensor_) names.push_back(name);
  return names;
}

bool Checkpoint::contains(const std::string& name) const { return file_of_tensor_.count(name) != 0; }

const SafetensorsFile& Checkpoint::file_of(const std::string& name) const {
  auto it = file_of_tensor_.find(name);
  if (it == file_of_tensor_.end()) {
    throw FormatError(source_ + ": no tensor " + util::quote_for_message(name) + " in the checkpoint (" +
                      std::to_string(file_of_tensor_.size()) + " tensors)");
  }
  return files_[it->second];
}

at::Tensor Checkpoint::tensor(const std::string& name) const { return file_of(name).tensor(name); }

const TensorEntry& Checkpoint::entry(const std::string& name) const { return file_of(name).entry(name); }

std::vector<std::string> save_sharded_safetensors(const std::string& folder,
                                                  const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                                                  uint64_t max_shard_bytes,
                                                  const std::map<std::string, std::string>& metadata) {
  return write_sharded_safetensors_streaming(folder, specs_of(folder, tensors), producer_of(tensors), max_shard_bytes,
                                             metadata);
}

std::vector<std::string> write_sharded_safetensors_streaming(const std::string& folder,
                                                             const std::vector<TensorSpec>& specs,
                                                             const TensorProducer& produce, uint64_t max_shard_bytes,
                                                             const std::map<std::string, std::string>& metadata) {
  // Validate everything (names) before touching the folder.
  layout(folder, specs);
  util::make_directories(folder);

  // huggingface_hub's split: in order, a shard closed when the next tensor would overflow it. (It puts a
  // tensor larger than the limit in a shard of its own ahead of the open one; here it simply closes it.)
  std::vector<std::vector<TensorSpec>> shards(1);
  uint64_t shard_bytes = 0, total_size = 0;
  for (const auto& spec : specs) {
    const uint64_t size = spec.nbytes();
    if (!shards.back().empty() && shard_bytes + size > max_shard_bytes) {
      shards.emplace_back();
      shard_bytes = 0;
    }
    shards.back().push_back(spec);
    shard_bytes += size;
    total_size += size;
  }

  std::vector<std::string> written;
  std::set<std::string> keep;
  if (shards.size() == 1) {
    write_safetensors_streaming(util::join_path(folder, kSingleName), shards[0], produce, metadata);
    written.push_back(kSingleName);
  } else {
    nlohmann::json weight_map = nlohmann::json::object();
    for (std::size_t i = 0; i < shards.size(); ++i) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
      write_safetensors_streaming(util::join_path(folder, name), shards[i], produce, metadata);
      for (const auto& spec : shards[i]) weight_map[spec.name] = name;
      written.push_back(name);
    }
    // transformers' layout: json.dumps(index, indent=2, sort_keys=True) + "\n" (ASCII-escaped).
    nlohmann::json index = {{"metadata", {{"total_size", total_size}}}, {"weight_map", weight_map}};
    const std::string text = index.dump(2, ' ', true) + "\n";
    util::write_file_atomically(util::join_path(folder, kIndexName),
                                [&](const util::ByteWriter& write_bytes) { write_bytes(text.data(), text.size()); });
    written.push_back(kIndexName);
  }
  // Remove what a previous save left that would shadow or confuse this one.
  keep.insert(written.begin(), written.end());
  static const std::regex kShard(R"(model-\d{5}-of-\d{5}\.safetensors)");
  for (const auto& name : util::list_directory(folder)) {
    if (keep.count(name)) continue;
    if (name == kSingleName || name == kIndexName || std::regex_match(name, kShard)) {
      ::unlink(util::join_path(folder, name).c_str());
    }
  }
  return written;
}

}  // namespace tiedlora::formats
