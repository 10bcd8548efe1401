// merge.cpp: streaming merge of an adapter into a checkpoint (see tiedlora/merge.h).
#include "tiedlora/merge.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <map>
#include <regex>

#include <ATen/ATen.h>

#include "tiedlora/adapter.h"
#include "tiedlora/error.h"
#include "tiedlora/functional.h"
#include "tiedlora/io/safetensors.h"
#include "util/files.h"
#include "util/signals.h"

namespace tiedlora {
namespace {

std::atomic<int> g_interrupted{0};
extern "C" void on_interrupt(int signal) { g_interrupted = signal; }

// Installs SIGINT/SIGTERM/SIGHUP handlers for the duration of a merge so that an interrupted merge removes its
// temporary folder; the previous handlers come back afterwards.
class InterruptGuard {
 public:
  InterruptGuard() {
    g_interrupted = 0;
    old_int_ = util::install_unless_ignored(SIGINT, on_interrupt);
    old_term_ = util::install_unless_ignored(SIGTERM, on_interrupt);
    old_hup_ = util::install_unless_ignored(SIGHUP, on_interrupt);  // a closed terminal: as Ctrl-C
  }
  ~InterruptGuard() {
    std::signal(SIGINT, old_int_);
    std::signal(SIGTERM, old_term_);
    std::signal(SIGHUP, old_hup_);
  }
  void check() const {
    if (g_interrupted) throw Error("merge interrupted by signal " + std::to_string(g_interrupted.load()));
  }

 private:
  void (*old_int_)(int) = nullptr;
  void (*old_term_)(int) = nullptr;
  void (*old_hup_)(int) = nullptr;
};

// Work tensors reused from one tensor to the next. Allocating and freeing tens of MB per tensor made
// glibc raise its mmap threshold and keep the freed blocks in the heap, so the merge's RSS grew with the
// model (bench_merge: 30x the largest tensor); reused buffers keep it at a few times the largest tensor.
enum ScratchSlot { kConverted, kWeight, kDelta, kRounded, kSlots };
class Scratch {
 public:
  at::Tensor take(ScratchSlot slot, at::IntArrayRef shape, at::ScalarType dtype, at::Device device) {
    at::Tensor& t = slots_[slot];
    if (!t.defined() || t.scalar_type() != dtype || t.device() != device) {
      t = at::empty({0}, at::TensorOptions().dtype(dtype).device(device));
    }
    t.resize_(shape);  // keeps the storage when it is large enough
    return t;
  }

 private:
  at::Tensor slots_[kSlots];
};

// NaN or Inf anywhere, without allocating: max and min propagate NaN and reach +-Inf (a sum in fp64
// would first convert the whole tensor, a tensor of flags costs a byte per element).
bool all_finite(const at::Tensor& t) {
  if (!at::isFloatingType(t.scalar_type()) || t.numel() == 0) return true;
  return std::isfinite(t.max().item<double>()) && std::isfinite(t.min().item<double>());
}

bool is_float_dtype(io::SafetensorsDtype d) {
  using D = io::SafetensorsDtype;
  return d == D::F16 || d == D::BF16 || d == D::F32 || d == D::F64;
}

// The base tensor that holds `module`'s weight: "<module>.weight", or the same without the model-class
// prefix ("transformer." for GPT-2, "model." for Llama), as original GPT-2 checkpoints store "h.0...".
std::string weight_name_of(const io::Checkpoint& base, const std::string& module) {
  const std::string direct = module + ".weight";
  if (base.contains(direct)) return direct;
  const auto dot = module.find('.');
  if (dot != std::string::npos) {
    const std::string stripped = module.substr(dot + 1) + ".weight";
    if (base.contains(stripped)) return stripped;
  }
  return "";
}

}  // namespace

double MergeReport::max_abs_delta() const {
  double m = 0;
  for (const auto& t : merged) m = std::max(m, t.max_abs_delta);
  return m;
}

double MergeReport::max_rounding_error() const {
  double m = 0;
  for (const auto& t : merged) m = std::max(m, t.rounding_error);
  return m;
}

MergeReport merge_weights(const MergeOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (options.out.empty()) throw ConfigError("merge-weights: no output folder given");
  util::check_output_apart_from_inputs("merge-weights: --out", options.out,
                                       {{"base model", options.base}, {"adapter folder", options.adapter}});
  // Temporary folders of killed earlier runs first: one may hold the previous output, moved back here.
  MergeReport report;
  report.stale_temporaries = util::clean_stale_temporaries(options.out);
  for (const auto& note : report.stale_temporaries) {
    if (options.on_notice) options.on_notice(note);
    else TORCH_WARN("tiedlora: ", note);
  }
  if (util::path_exists(options.out) && !options.force) {
    throw Error(options.out + ": already exists (hint: choose another output folder or pass --force)");
  }
  if (options.device != "cpu" && options.device != "cuda") {
    throw ConfigError("merge-weights: --device must be cpu or cuda, got '" + options.device + "'");
  }
  const at::Device device = options.device == "cuda" ? at::Device(at::kCUDA) : at::Device(at::kCPU);
  if (device.is_cuda() && !at::hasCUDA()) {
    throw ConfigError("merge-weights: --device cuda, but no CUDA device is available (hint: use --device cpu)");
  }
  if (options.dtype && *options.dtype != at::kFloat && *options.dtype != at::kBFloat16 && *options.dtype != at::kHalf) {
    throw ConfigError("merge-weights: --dtype must be keep, bf16, f16 or f32");
  }

  const io::Checkpoint base = io::Checkpoint::open(options.base);
  const Adapter adapter = Adapter::read(options.adapter);
  const bool transposed = adapter.config().fan_in_fan_out;

  // Plan: which base tensor each adapted module changes, checked against shapes before any output exists.
  std::map<std::string, std::string> module_of_tensor;
  for (const auto& module : adapter.modules()) {
    const std::string name = weight_name_of(base, module);
    if (name.empty()) {
      throw FormatError(options.adapter + ": layer '" + module + "': tensor '" + module +
                        ".weight' does not exist in the base checkpoint " + options.base +
                        " (hint: maybe wrong base model?)");
    }
    const auto& entry = base.entry(name);
    if (entry.shape.size() != 2) {
      throw FormatError(options.base + ": tensor '" + name + "' is not 2-D, so layer '" + module +
                        "' cannot take a low-rank update (hint: maybe wrong base model?)");
    }
    const LinearShape shape = transposed ? LinearShape{entry.shape[0], entry.shape[1]}
                                         : LinearShape{entry.shape[1], entry.shape[0]};
    adapter.layer(module, shape);  // throws on any mismatch, naming the layer
    if (!is_float_dtype(entry.dtype)) {
      throw FormatError(options.base + ": tensor '" + name + "' is " + io::dtype_name(entry.dtype) +
                        "; only floating-point weights can be merged");
    }
    if (module_of_tensor.count(name)) {
      throw FormatError(options.adapter + ": layers '" + module_of_tensor.at(name) + "' and '" + module +
                        "' both map to the base tensor '" + name + "' (hint: the adapter names one layer twice, "
                        "with and without the model prefix)");
    }
    module_of_tensor[name] = module;
  }
  // The other way round: a base layer that target_modules selects must have weights in the adapter
  // (PEFT would add an adapter there and find none to load).
  for (const auto& file : base.files()) {
    for (const auto& entry : file.header().tensors) {
      const std::string suffix = ".weight";
      if (entry.shape.size() != 2 || !is_float_dtype(entry.dtype) || module_of_tensor.count(entry.name) ||
          entry.name.size() <= suffix.size() ||
          entry.name.compare(entry.name.size() - suffix.size(), suffix.size(), suffix) != 0) {
        continue;
      }
      const std::string module = entry.name.substr(0, entry.name.size() - suffix.size());
      if (!adapter.config().target_modules.empty() && adapter.config().targets(module)) {
        throw FormatError(options.adapter + ": target_modules " + adapter.config().target_modules_text() +
                          " selects the base layer '" + module + "' but the adapter holds no weights for it "
                          "(hint: adapter_config.json and the weights disagree, or maybe wrong base model?)");
      }
    }
  }

  // Output specs in the input's order (file by file, by data offset).
  std::vector<io::TensorSpec> specs;
  uint64_t largest = 0;
  for (const auto& file : base.files()) {
    for (const auto& entry : file.header().tensors) {
      io::SafetensorsDtype dtype = entry.dtype;
      if (options.dtype && is_float_dtype(entry.dtype)) dtype = io::from_scalar_type(*options.dtype);
      specs.push_back(io::TensorSpec{entry.name, dtype, entry.shape});
      largest = std::max<uint64_t>(largest, entry.end - entry.begin);
    }
  }

  report.largest_tensor_bytes = largest;
  InterruptGuard interrupt;
  util::StagedDirectory staging(options.out);
  const std::string& staged = staging.path();
  size_t done = 0;
  Scratch scratch;
  std::string previous;  // written by now: its input pages can go
  auto produce = [&](const io::TensorSpec& spec) -> at::Tensor {
    interrupt.check();
    if (!previous.empty()) base.file_of(previous).release_pages(previous);
    previous = spec.name;
    const auto& entry = base.entry(spec.name);
    report.bytes_read += entry.end - entry.begin;
    const at::ScalarType out_type = io::to_scalar_type(spec.dtype);
    at::Tensor w = base.tensor(spec.name);
    at::Tensor result;
    auto it = module_of_tensor.find(spec.name);
    if (it == module_of_tensor.end()) {
      result = w.scalar_type() == out_type ? w : scratch.take(kConverted, w.sizes(), out_type, at::kCPU).copy_(w);
      if (at::isFloatingType(out_type) && !all_finite(result)) {
        throw FormatError(options.base + ": tensor '" + spec.name + "' holds NaN or Inf");
      }
    } else {
      // W + dW in fp32 (fp64 for double weights), one rounding to the output dtype.
      const auto compute = w.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      at::Tensor w32 = scratch.take(kWeight, w.sizes(), compute, device).copy_(w);
      const LinearShape shape = transposed ? LinearShape{w.size(0), w.size(1)} : LinearShape{w.size(1), w.size(0)};
      LayerFactors f = adapter.layer(it->second, shape);
      f.lora_A = f.lora_A.to(device);
      f.lora_B = f.lora_B.to(device);
      if (f.u.defined()) f.u = f.u.to(device);
      if (f.v.defined()) f.v = f.v.to(device);
      at::Tensor delta = scratch.take(kDelta, {shape.out_features, shape.in_features}, f.compute_type(), device);
      f.delta_into(delta);
      const double max_delta = std::max(delta.max().item<double>(), -delta.min().item<double>());
      w32.add_(transposed ? delta.t() : delta);
      if (device.is_cuda() && out_type == w.scalar_type() && out_type != at::kDouble) {
        // The CUDA merge kernel: W in its storage dtype + B_eff A, fp32 product and sum, rounded once to
        // the same dtype as the ATen sum above, which stays as the reference for the report.
        functional::BackendGuard kernels(functional::Backend::cuda_kernels);
        const at::Tensor w_device = w.to(device);
        const at::Tensor merged = functional::merged_weight(transposed ? w_device.t() : w_device, f.lora_A, f.lora_B,
                                                            f.u, f.v, f.scale, spec.name.c_str());
        result = transposed ? merged.t() : merged;
      } else {
        result = out_type == compute ? w32 : scratch.take(kRounded, w.sizes(), out_type, device).copy_(w32);
      }
      // Checked after rounding: a sum that overflows the output dtype (fp16, bf16) only becomes Inf there.
      if (!all_finite(result)) {
        throw Error("merge of '" + spec.name + "' (layer '" + it->second + "') produced NaN or Inf in " +
                    c10::toString(out_type) + " (hint: the adapter or the base weight holds non-finite values, "
                    "or W + dW overflows the output dtype); nothing was written");
      }
      double rounding = 0;
      if (!result.is_same(w32)) {
        at::Tensor error = scratch.take(kDelta, w.sizes(), compute, device).copy_(result);
        rounding = error.sub_(w32).abs_().max().item<double>();
      }
      if (!result.is_cpu()) result = result.to(at::kCPU);
      report.merged.push_back(MergedTensor{spec.name, it->second, max_delta, rounding});
    }
    report.bytes_written += spec.nbytes();
    ++done;
    if (options.on_progress) options.on_progress(done, specs.size(), report.bytes_written);
    return result;
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  const auto weights = io::write_sharded_safetensors_streaming(staged, specs, produce, options.max_shard_bytes, metadata);
  report.files_written = weights;
  report.tensors_written = done;
  // The rest of a Hugging Face folder (config, tokenizer, generation config) travels unchanged.
  if (util::is_directory(options.base)) {
    static const std::regex kWeightFile(R"(.*\.safetensors|model\.safetensors\.index\.json|.*\.bin|.*\.bin\.index\.json)");
    for (const auto& name : util::list_directory(options.base)) {
      const std::string from = util::join_path(options.base, name);
      if (!util::is_regular_file(from) || std::regex_match(name, kWeightFile)) continue;
      util::copy_file(from, util::join_path(staged, name));
      report.files_written.push_back(name);
    }
  }
  interrupt.check();
  staging.publish(options.force);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace tiedlora
