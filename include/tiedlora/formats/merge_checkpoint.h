// tiedlora/formats/merge_checkpoint.h: merging an adapter into a base checkpoint on disk, one tensor at a time
// (`tiedlora merge-weights`). Works on files alone: no model is built. The math of each tensor is
// functional::merge_into (tiedlora/core/functional.h), the same as LoraLinear::merge_'s.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/ScalarType.h>

namespace tiedlora {

struct MergeOptions {
  std::string base;     ///< Hugging Face folder (model.safetensors or shards + index) or one .safetensors file
  std::string adapter;  ///< adapter folder: PEFT LoRA, PEFT VeRA or TIEDLORA
  std::string out;      ///< output folder
  /// dtype of every floating-point tensor written; nullopt keeps each tensor's dtype.
  std::optional<c10::ScalarType> dtype;
  std::string device = "cpu";  ///< "cpu" or "cuda": where W + dW is computed
  bool force = false;          ///< replace an existing output folder
  uint64_t max_shard_bytes = uint64_t{5} << 30;
  /// Called after each tensor is written (index from 1, count, bytes written so far), for progress bars.
  std::function<void(size_t, size_t, uint64_t)> on_progress;
  /// Called with one line per stale temporary folder removed or restored; unset: a LibTorch warning.
  std::function<void(const std::string&)> on_notice;
  /// Asked before each tensor and before publishing: true abandons the merge (tiedlora::Cancelled), its
  /// temporary folder removed. The library installs no signal handler; `tiedlora merge-weights` sets a flag
  /// on SIGINT/SIGTERM/SIGHUP and returns it here.
  std::function<bool()> stop_requested;
};

struct MergedTensor {
  std::string name;
  std::string module;
  double max_abs_delta = 0;   ///< max |dW|
  double rounding_error = 0;  ///< max |written - (W + dW in fp32)|, the one rounding to the output dtype
};

struct MergeReport {
  std::vector<MergedTensor> merged;
  size_t tensors_written = 0;
  uint64_t bytes_read = 0;
  uint64_t bytes_written = 0;
  uint64_t largest_tensor_bytes = 0;
  std::vector<std::string> files_written;  ///< weight files, index, and copied non-weight files
  /// Extra files of the base folder left out, one line each: symbolic links that lead outside it (outside the
  /// model's cache folder for a Hugging Face cache snapshot), which are never followed.
  std::vector<std::string> not_copied;
  /// Temporary folders of dead earlier runs for the same output, removed (or restored) first; one line each.
  std::vector<std::string> stale_temporaries;
  double seconds = 0;
  double max_abs_delta() const;
  double max_rounding_error() const;
};

/// Merges (see tiedlora merge-weights in docs/cli.md): checks everything it can up front (adapter against
/// the checkpoint's tensor names and shapes, output folder), then streams each tensor from the memory-mapped
/// input, computes W + dW in fp32 (GPT-2 Conv1D weights, fan_in_fan_out, get dW^T), rounds once to the
/// output dtype and writes; no tensor it writes holds NaN or Inf (refused, naming the tensor). Output goes
/// to a temporary folder beside `out`, renamed at the end; a failure (or stop_requested) removes it, so no
/// half-written output is ever left at `out`, and temporary folders that killed runs left for the same `out`
/// are removed first. `out` must not be, contain or lie inside `base` or `adapter` (refused before anything
/// is touched). Merges into different outputs may run concurrently.
MergeReport merge_checkpoint(const MergeOptions& options);

}  // namespace tiedlora
