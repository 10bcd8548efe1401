// merge_checkpoint.cpp: streaming merge of an adapter into a checkpoint (see tiedlora/formats/merge_checkpoint.h).
#include "tiedlora/formats/merge_checkpoint.h"

#include <chrono>
#include <map>
#include <regex>

#include <ATen/ATen.h>

#include "tiedlora/core/error.h"
#include "tiedlora/core/functional.h"
#include "tiedlora/formats/adapter.h"
#include "tiedlora/formats/safetensors.h"
#include "util/files.h"
#include "util/text.h"

namespace tiedlora {
namespace {

// Links among the base folder's extra files are followed only to targets inside this folder: the base folder
// itself, or, for a Hugging Face cache snapshot (`models--ORG--NAME/snapshots/REVISION`, whose files link to
// `../../blobs/`), that model's cache folder.
std::string link_root(const std::string& base) {
  const std::string folder = util::resolve_path(base);
  const std::string snapshots = util::parent_path(folder), repository = util::parent_path(snapshots);
  auto name_of = [](const std::string& path) { return path.substr(path.find_last_of('/') + 1); };
  if (name_of(snapshots) == "snapshots" && name_of(repository).rfind("models--", 0) == 0) return repository;
  return folder;
}

bool is_float_dtype(formats::SafetensorsDtype d) {
  using D = formats::SafetensorsDtype;
  return d == D::F16 || d == D::BF16 || d == D::F32 || d == D::F64;
}

// The base tensor that holds `module`'s weight: "<module>.weight", or the same without the model-class
// prefix ("transformer." for GPT-2, "model." for Llama), as original GPT-2 checkpoints store "h.0...".
std::string weight_name_of(const formats::Checkpoint& base, const std::string& module) {
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

MergeReport merge_checkpoint(const MergeOptions& options) {
  const auto start = std::chrono::steady_clock::now();
  if (options.out.empty()) throw ConfigError("merge-weights: no output folder given");
  util::check_output_apart_from_inputs("merge-weights: --out", options.out,
                                       {{"base model", options.base}, {"adapter folder", options.adapter}});
  // Temporary folders of killed earlier runs first: one may hold the previous output, moved back here.
  MergeReport report;
  report.stale_temporaries = util::clean_stale_temporaries(options.out);
  for (const auto& note : report.stale_temporaries) {
    if (options.on_notice)
      options.on_notice(note);
    else
      TORCH_WARN("tiedlora: ", note);
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

  const formats::Checkpoint base = formats::Checkpoint::open(options.base);
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
    const LinearShape shape =
        transposed ? LinearShape{entry.shape[0], entry.shape[1]} : LinearShape{entry.shape[1], entry.shape[0]};
    adapter.layer(module, shape);  // throws on any mismatch, naming the layer
    if (!is_float_dtype(entry.dtype)) {
      throw FormatError(options.base + ": tensor '" + name + "' is " + formats::dtype_name(entry.dtype) +
                        "; only floating-point weights can be merged");
    }
    if (module_of_tensor.count(name)) {
      throw FormatError(options.adapter + ": layers '" + module_of_tensor.at(name) + "' and '" + module +
                        "' both map to the base tensor '" + name +
                        "' (hint: the adapter names one layer twice, "
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
          entry.name.size() <= suffix.size() || !util::ends_with(entry.name, suffix)) {
        continue;
      }
      const std::string module = entry.name.substr(0, entry.name.size() - suffix.size());
      if (!adapter.config().target_modules.empty() && adapter.config().targets(module)) {
        throw FormatError(options.adapter + ": target_modules " + adapter.config().target_modules_text() +
                          " selects the base layer '" + module +
                          "' but the adapter holds no weights for it "
                          "(hint: adapter_config.json and the weights disagree, or maybe wrong base model?)");
      }
    }
  }

  // Output specs in the input's order (file by file, by data offset).
  std::vector<formats::TensorSpec> specs;
  uint64_t largest = 0;
  for (const auto& file : base.files()) {
    for (const auto& entry : file.header().tensors) {
      formats::SafetensorsDtype dtype = entry.dtype;
      if (options.dtype && is_float_dtype(entry.dtype)) dtype = formats::from_scalar_type(*options.dtype);
      specs.push_back(formats::TensorSpec{entry.name, dtype, entry.shape});
      largest = std::max<uint64_t>(largest, entry.end - entry.begin);
    }
  }

  report.largest_tensor_bytes = largest;
  auto check_stop = [&] {
    if (options.stop_requested && options.stop_requested()) {
      throw Cancelled("merge-weights: stopped before writing " + options.out + "; nothing was written");
    }
  };
  // --device cuda merges on tiedlora's merge kernel (functional::merge_into's kernel path).
  const functional::BackendGuard backend(device.is_cuda() ? functional::Backend::cuda_kernels
                                                          : functional::Backend::aten);
  util::StagedDirectory staging(options.out);
  const std::string& staged = staging.path();
  size_t done = 0;
  // Work and output tensors reused from one tensor to the next (each is written before the next is
  // produced): per-tensor allocations of tens of MB made glibc keep freed blocks and RSS grow.
  functional::MergeWorkspace workspace;
  std::string previous;  // written by now: its input pages can go
  auto produce = [&](const formats::TensorSpec& spec) -> at::Tensor {
    check_stop();
    if (!previous.empty()) base.file_of(previous).release_pages(previous);
    previous = spec.name;
    const auto& entry = base.entry(spec.name);
    report.bytes_read += entry.end - entry.begin;
    const at::ScalarType out_type = formats::to_scalar_type(spec.dtype);
    at::Tensor w = base.tensor(spec.name);
    at::Tensor result;
    auto it = module_of_tensor.find(spec.name);
    if (it == module_of_tensor.end()) {
      result = w.scalar_type() == out_type ? w : workspace.take_output(w.sizes(), out_type, at::kCPU).copy_(w);
      if (!functional::all_finite(result)) {
        throw FormatError(options.base + ": tensor '" + spec.name +
                          "' holds NaN or Inf (a merge writes finite values only)");
      }
    } else {
      const LinearShape shape = transposed ? LinearShape{w.size(0), w.size(1)} : LinearShape{w.size(1), w.size(0)};
      functional::LowRankUpdate update = adapter.layer(it->second, shape);
      for (at::Tensor* t : {&update.lora_a, &update.lora_b, &update.u, &update.v}) {
        if (t->defined()) *t = t->to(device);
      }
      at::Tensor& merged = workspace.take_output(w.sizes(), out_type, device);
      functional::MergeStats stats;
      const std::string what = "'" + spec.name + "' (layer '" + it->second + "')";
      functional::merge_into(merged, w.to(device), update, transposed, what.c_str(), &workspace, &stats);
      result = merged.to(at::kCPU);  // the tensor itself on the CPU
      report.merged.push_back(MergedTensor{spec.name, it->second, stats.max_abs_delta, stats.rounding_error});
    }
    report.bytes_written += spec.nbytes();
    ++done;
    if (options.on_progress) options.on_progress(done, specs.size(), report.bytes_written);
    return result;
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  const auto weights =
      formats::write_sharded_safetensors_streaming(staged, specs, produce, options.max_shard_bytes, metadata);
  report.files_written = weights;
  report.tensors_written = done;
  // The rest of a Hugging Face folder (config, tokenizer, generation config) travels unchanged.
  if (util::is_directory(options.base)) {
    static const std::regex kWeightFile(
        R"(.*\.safetensors|model\.safetensors\.index\.json|.*\.bin|.*\.bin\.index\.json)");
    const std::string allowed = link_root(options.base);
    for (const auto& name : util::list_directory(options.base)) {
      const std::string from = util::join_path(options.base, name);
      if (!util::is_regular_file(from) || std::regex_match(name, kWeightFile)) continue;
      const std::string target = util::is_symbolic_link(from) ? util::resolve_path(from) : "";
      if (!target.empty() && !util::lies_inside(target, allowed)) {
        report.not_copied.push_back(name + ": a link to " + target + ", outside " + allowed + ", not followed");
        if (options.on_notice) options.on_notice("not copied: " + report.not_copied.back());
        continue;
      }
      util::copy_file(from, util::join_path(staged, name));
      report.files_written.push_back(name);
    }
  }
  check_stop();
  staging.publish(options.force);
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return report;
}

}  // namespace tiedlora
