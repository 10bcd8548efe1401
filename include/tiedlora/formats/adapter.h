// tiedlora/formats/adapter.h: adapters on disk. A folder holds adapter_config.json and adapter_model.safetensors:
//   - LoRA in PEFT's exact layout: `base_model.model.<module>.lora_A.weight` (r x in) and `.lora_B.weight`
//     (out x r), so PEFT loads what tiedlora writes and tiedlora loads what PEFT writes;
//   - Tied-LoRA in tiedlora's own type (docs/adapter-format.md): `tiedlora_groups.<key>.lora_A` / `.lora_B`
//     once per tie group, `base_model.model.<module>.lora_u` / `.lora_v` per layer;
//   - PEFT VeRA (read only): shared frozen `base_model.vera_A` / `vera_B` sliced per layer, per-layer
//     `vera_lambda_d` (= u) and `vera_lambda_b` (= v); it is the tied-uv configuration with s = 1.
// Module names are the model's (Hugging Face) names, e.g. "model.layers.0.self_attn.q_proj".
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include "tiedlora/core/functional.h"
#include "tiedlora/core/method.h"
#include "tiedlora/core/modules.h"
#include "tiedlora/formats/adapter_config.h"

namespace tiedlora {

/// An adapter folder read without a model: its config and its tensors (memory-mapped).
class Adapter {
 public:
  struct ReadOptions {
    /// Accept tensors holding NaN or Inf (for inspection); by default they are refused, naming the tensor.
    bool allow_non_finite = false;
  };
  /// Reads and validates `folder` (config, tensor names, shapes, ranks, target_modules against the layers
  /// the tensors hold, finite values); throws tiedlora::FormatError naming the folder, file and tensor,
  /// with a hint.
  static Adapter read(const std::string& folder, const ReadOptions& options);
  static Adapter read(const std::string& folder) { return read(folder, ReadOptions{}); }

  const AdapterConfig& config() const { return config_; }
  const std::string& source() const { return source_; }
  /// The adapted modules, sorted.
  const std::vector<std::string>& modules() const { return modules_; }
  bool contains(const std::string& module) const;
  /// The factors of `module` applied to a base layer of `base` shape (VeRA slices its shared A/B to it).
  /// Throws tiedlora::FormatError when the adapter does not fit that shape (hint: wrong base model?).
  /// (dW = scale * diag(v) B diag(u) A, u and v undefined = 1, on the CPU: the mapped tensors.)
  functional::LowRankUpdate layer(const std::string& module, LinearShape base) const;
  /// The layer's shape as the adapter itself records it (LoRA, TIEDLORA); nullopt for VeRA, whose shared
  /// projections are sliced to the base layer's shape.
  std::optional<LinearShape> stored_shape(const std::string& module) const;
  /// The tensors as stored.
  const std::map<std::string, at::Tensor>& tensors() const { return tensors_; }

 private:
  AdapterConfig config_;
  std::string source_;
  std::map<std::string, at::Tensor> tensors_;
  std::map<std::string, std::string> group_key_of_;  // TIEDLORA: module -> group key
  std::vector<std::string> modules_;                 // sorted; derived once from the tensors or groups
};

/// Writes an adapter folder atomically (a temporary folder beside `folder`, renamed at the end); refuses an
/// existing `folder` unless `overwrite`. Tensor names and config are written as given.
void write_adapter_folder(const std::string& folder, const AdapterConfig& config,
                          const std::vector<std::pair<std::string, at::Tensor>>& tensors, bool overwrite = false);

/// The exact per-layer LoRA equivalent of a Tied-LoRA (or LoRA) adapter, in PEFT's layout:
/// A_l = diag(u_l) A, B_l = s diag(v_l) B, lora_alpha = r (so PEFT's scale is 1). VeRA needs the base
/// model's shapes, so it is refused (merge it with merge-weights instead).
struct ExportLoraOptions {
  bool overwrite = false;  ///< replace an existing output folder
};
void export_lora(const Adapter& adapter, const std::string& out_folder, const ExportLoraOptions& options = {});

struct SaveAdapterOptions {
  std::string base_model_name_or_path;
  /// The model stores these layers' weights as (in, out) on disk (GPT-2's Conv1D): PEFT's fan_in_fan_out.
  bool fan_in_fan_out = false;
  bool overwrite = false;
  /// The adapter save_adapter() writes (save_adapters() writes them all).
  std::string adapter_name = kDefaultAdapter;
};

/// Saves the adapter `options.adapter_name` of `model` (inject_adapters) to `folder`: PEFT LoRA when every
/// adapted layer is plain LoRA, else the TIEDLORA type. Every layer must share one method, rank, alpha and
/// rsLoRA.
void save_adapter(const torch::nn::Module& model, const std::string& folder, const SaveAdapterOptions& options = {});

/// Saves every adapter of `model` in PEFT's multi-adapter layout: the adapter "default" at the top of
/// `folder`, each other one in the subfolder of its name (each a complete adapter folder). Atomic.
void save_adapters(const torch::nn::Module& model, const std::string& folder, const SaveAdapterOptions& options = {});

/// Reads the adapter in `folder` and attaches it to `model` under `adapter_name` (which the model must not
/// carry yet): every module is checked to exist, be linear and have the adapter's shape before anything
/// changes; then the adapter is injected and its values copied. Throws tiedlora::FormatError / ConfigError
/// with the module or tensor name and a hint (e.g. "maybe wrong base model?"); the model is unchanged when
/// it throws. A model's first adapter becomes its active one.
void load_adapter(torch::nn::Module& model, const std::string& folder,
                  const std::string& adapter_name = kDefaultAdapter);

/// The adapters a PEFT multi-adapter folder holds: "default" when `folder` itself holds an adapter, then
/// every subfolder holding adapter_config.json, by name, sorted. Throws tiedlora::FormatError when there
/// is none.
std::vector<std::string> adapter_folders(const std::string& folder);

/// Loads every adapter of a PEFT multi-adapter folder (adapter_folders) under its name; all or nothing.
/// Returns the names loaded.
std::vector<std::string> load_adapters(torch::nn::Module& model, const std::string& folder);

}  // namespace tiedlora
