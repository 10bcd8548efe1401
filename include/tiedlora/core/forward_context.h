// tiedlora/core/forward_context.h: the per-thread state an adapted forward depends on besides its arguments.
//
//   Backend + BackendGuard            which implementation runs lora_linear() on CUDA tensors
//   RowAdapters + RowAdaptersScope    the adapter each row of a batch uses (mixed-adapter batches)
//   DropoutGeneratorScope             the generator adapter dropout draws its masks from
//   ForwardContext                    all of the above plus autocast and the dropout generator's state, captured
//                                     at once and replayed (activation checkpointing's recomputation)
//
// Each piece is set for the calling thread by a scope that restores the previous value. Whoever must run a
// forward again as it first ran captures one ForwardContext and replays it, so a new piece of state added
// here cannot be forgotten by a caller.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

namespace tiedlora {

namespace functional {

/// Which implementation runs lora_linear() and merged_weight() on CUDA tensors. `aten`: ATen ops (the
/// default). `cuda_kernels`: tiedlora's own kernels (the cuBLASLt passes of kernels/lora_gemm.cu, the merge
/// kernel of kernels/lora_merge.cu), experimental until the GPU checks listed in docs/cuda.md have passed.
/// The kernels take fp32, bf16 and fp16 layers whose input and weight share a dtype, with one adapter on
/// every row; everything else (CPU tensors, double, mixed dtypes, several adapters or routed rows, a build
/// without CUDA) keeps the ATen path. On the kernel path h = x A^T and B_eff are rounded to the activation
/// dtype between the matmuls (fp32 accumulation inside each).
enum class Backend { aten, cuda_kernels };

/// Chooses the backend for the calling thread while it lives (the previous choice comes back after), so
/// one thread can use the kernels while another stays on ATen. The choice is made at forward time and
/// recorded in the autograd graph: backward takes the path its forward took, on whatever thread it runs.
class BackendGuard {
 public:
  explicit BackendGuard(Backend backend);
  ~BackendGuard();
  BackendGuard(const BackendGuard&) = delete;
  BackendGuard& operator=(const BackendGuard&) = delete;

 private:
  Backend previous_;
};

/// The calling thread's backend.
Backend current_backend();

}  // namespace functional

/// The adapter name used when none is given (PEFT's "default"): PEFT's multi-adapter folders keep it at
/// the top of the folder, the others in subfolders by name.
inline constexpr const char* kDefaultAdapter = "default";

/// Throws tiedlora::ConfigError unless `name` can name an adapter: 1 to 64 letters, digits, '_' or '-' (it
/// becomes a module name and a folder name), and not "__base__" (PEFT's name for "no adapter").
void check_adapter_name(const std::string& name);

/// The adapter each row of a batch uses: row i of every adapted layer's input (its first dimension) gets
/// adapter `adapter_of_row[i]`, or none for "". A layer that does not carry a row's adapter computes that
/// row without one (as PEFT's mixed batches do). The rows of each adapter are found once, when the routing
/// is made (once per batch): an adapter whose rows are consecutive is served from a slice of the batch read
/// in place; others are gathered and scattered back. A batch ordered by adapter (as generation orders its
/// prompts) therefore costs no copies.
class RowAdapters {
 public:
  explicit RowAdapters(std::vector<std::string> adapter_of_row);
  const std::vector<std::string>& adapter_of_row() const { return adapter_of_row_; }
  int64_t rows() const { return static_cast<int64_t>(adapter_of_row_.size()); }
  /// The distinct adapter names the rows use ("" excluded), sorted.
  const std::vector<std::string>& adapters() const { return adapters_; }
  /// The rows naming `adapter` when they are consecutive: [begin, end); nullopt when they are not, or when
  /// no row names it.
  std::optional<std::pair<int64_t, int64_t>> range_of(const std::string& adapter) const;
  /// The rows naming `adapter` as int64 indices on `device` (made once per device); undefined when none.
  at::Tensor rows_of(const std::string& adapter, at::Device device) const;
  /// The routing in force on the calling thread (RowAdaptersScope), or null.
  static std::shared_ptr<const RowAdapters> current();

 private:
  std::vector<std::string> adapter_of_row_;
  std::vector<std::string> adapters_;
  std::map<std::string, at::Tensor> rows_;  // on the CPU
  std::map<std::string, std::pair<int64_t, int64_t>> ranges_;
  mutable std::map<std::pair<std::string, std::string>, at::Tensor> on_device_;
  mutable std::mutex mutex_;
};

/// The calling thread's routing without a reference count (the scope that set it outlives the forward that
/// reads it), or null.
const RowAdapters* current_routing();

/// Routes the forwards that run on this thread while it lives by `routing` (the previous routing comes
/// back after). Use tiedlora::route_rows() to build one checked against a model's adapters.
class RowAdaptersScope {
 public:
  explicit RowAdaptersScope(std::shared_ptr<const RowAdapters> routing);
  ~RowAdaptersScope();
  RowAdaptersScope(const RowAdaptersScope&) = delete;
  RowAdaptersScope& operator=(const RowAdaptersScope&) = delete;

 private:
  std::shared_ptr<const RowAdapters> previous_;
};

/// Adapter dropout on this thread draws its masks from `generator` while the scope lives (a CPU generator
/// for CPU tensors, a CUDA generator for that device's), so a trainer owns its randomness and leaves the
/// global generators alone. Without one, masks come from the device's default generator. A tensor on a
/// device other than the generator's draws from that device's default generator.
class DropoutGeneratorScope {
 public:
  explicit DropoutGeneratorScope(std::vector<at::Generator> generators);
  ~DropoutGeneratorScope();
  DropoutGeneratorScope(const DropoutGeneratorScope&) = delete;
  DropoutGeneratorScope& operator=(const DropoutGeneratorScope&) = delete;

 private:
  std::vector<at::Generator> previous_;
};

/// The generator adapter dropout uses for tensors on `device` on the calling thread.
at::Generator dropout_generator(at::Device device);

/// Inverted dropout of `input` with probability `p` (as at::dropout in training mode on the CPU: a Bernoulli
/// mask scaled by 1 / (1 - p)), drawn from dropout_generator(input.device()).
at::Tensor adapter_dropout(const at::Tensor& input, double p);

/// Everything per-thread that an adapted forward reads: the backend, the routing, the dropout generators,
/// autocast (on/off and dtype for CPU and CUDA, its cache flag), and the state of the generator adapter
/// dropout would draw from next on `device`. Captured at a forward and replayed (ForwardContextReplay)
/// when that forward is computed again, it gives the same values: the same kernels, rows, precision and
/// dropout masks.
struct ForwardContext {
  functional::Backend backend = functional::Backend::aten;
  std::shared_ptr<const RowAdapters> routing;
  std::vector<at::Generator> dropout_generators;
  struct Autocast {
    bool cpu = false, cuda = false, cache = true;
    at::ScalarType cpu_dtype = at::kBFloat16, cuda_dtype = at::kHalf;
  } autocast;
  at::Device device = at::kCPU;
  at::Tensor random_state;  ///< dropout_generator(device)'s state when captured

  /// The calling thread's context, with the dropout generator's state for tensors on `device`.
  static ForwardContext capture(at::Device device);
};

/// Makes `context` the calling thread's while it lives (its dropout generator set to the captured state),
/// and restores everything after, however the scope ends.
class ForwardContextReplay {
 public:
  explicit ForwardContextReplay(const ForwardContext& context);
  ~ForwardContextReplay();
  ForwardContextReplay(const ForwardContextReplay&) = delete;
  ForwardContextReplay& operator=(const ForwardContextReplay&) = delete;

 private:
  ForwardContext previous_;
  at::Generator generator_;  // the generator whose state was replaced, and its state before
};

}  // namespace tiedlora
