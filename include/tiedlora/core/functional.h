// tiedlora/core/functional.h: the stateless math of adapted linear layers. Every adapted layer of every model
// goes through lora_linear(): it is the one choke point, and the CUDA path replaces its inside.
//
//   y = x W^T + bias + (x_a A^T) B_eff^T,   B_eff = s diag(v) B diag(u)
//
// with x_a = x, or the dropped-out input when adapter dropout is on. A missing (undefined) u or v means 1.
// Plain LoRA is the case without u and v. Gradients follow docs/method.md: dH = dY B_eff, dB_eff = dY^T h,
// dA = dH^T x_a (autograd sums it over every layer that shares A), dX = dY W + dH A, and
// dB = s v_i u_j dB_eff, du = s sum_i v_i B_ij dB_eff_ij, dv = s sum_j B_ij u_j dB_eff_ij.
// W never gets a gradient: it must be frozen (requires_grad false).
//
// Precision contract (docs/design.md, "Numerics"), on every path (CPU and CUDA ATen, the CUDA kernels; the
// merges, which run once, compute W + dW in fp32 and round once):
//   - the frozen W stays in its storage dtype (fp32, bf16, fp16) and is never converted per call: the
//     base matmul runs in W's dtype with fp32 accumulation inside the GEMM (activations in another dtype
//     are converted to it, not W);
//   - the adapter factors keep their own dtype (fp32 by default, as PEFT keeps them); on the ATen path the
//     low-rank branch h = x_a A^T, B_eff and their products run in fp32 (fp64 for double activations); the
//     CUDA kernels take one operand dtype per GEMM, so there h and B_eff are rounded to the activation dtype
//     (fp32 accumulation inside each GEMM; see Backend below);
//   - bf16 activations with an fp16 weight (or the reverse) are refused outside autocast;
//   - y and dX are returned in the activation dtype; fp32 layers round once, bf16/fp16 layers round the
//     GEMM's x W^T once and the sum with the update once more (at most one extra rounding of y);
//     dA, dB, du, dv are computed in fp32 and rounded once to their parameters' dtypes;
//   - under autocast (CPU or CUDA, bf16 or fp16) the layer returns what torch::nn::Linear returns under
//     the same autocast: input, W and bias go to the autocast dtype through autocast's own cast (a copy
//     only of what is stored in another dtype; store the model in that dtype to avoid it), the function
//     itself runs with autocast off, in forward and backward.
#pragma once

#include <vector>

#include <ATen/core/Tensor.h>

namespace tiedlora::functional {

/// The low-rank update of one layer, dW = scale diag(v) B diag(u) A, by name (so u and v cannot be swapped).
/// Undefined u or v mean 1 (plain LoRA has neither).
struct LowRankUpdate {
  at::Tensor lora_a;  ///< (r, d_in)
  at::Tensor lora_b;  ///< (d_out, r)
  at::Tensor u;       ///< (r) or undefined
  at::Tensor v;       ///< (d_out) or undefined
  double scale = 1.0;

  /// The factors that exist: A, B, and u and v when defined.
  std::vector<at::Tensor> tensors() const {
    std::vector<at::Tensor> out{lora_a, lora_b};
    if (u.defined()) out.push_back(u);
    if (v.defined()) out.push_back(v);
    return out;
  }
};

/// The adapted linear layer. `input`: (..., d_in); `weight`: (d_out, d_in), frozen; `bias`: (d_out) or
/// undefined; `adapter_input`: the input of the low-rank branch when it differs from `input` (dropout),
/// else undefined. Returns (..., d_out) in input's dtype. Checks shapes, dtypes and devices, naming the
/// argument.
at::Tensor lora_linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       const LowRankUpdate& update, const at::Tensor& adapter_input = {});

/// One adapter's part in a forward that serves several adapters (lora_linear_routed).
struct RoutedUpdate {
  LowRankUpdate update;
  /// int64 indices into the first (batch) dimension of the input: the rows this adapter serves, on the
  /// input's device. Undefined: every row (several adapters active at once add up).
  at::Tensor rows;
  /// The branch's input for this adapter's rows (input.index_select(0, rows), or the whole input without
  /// rows) when it differs from the layer's input (this adapter's dropout), else undefined.
  at::Tensor adapter_input;
};

/// The adapted linear layer serving several adapters in one call (mixed-adapter batches):
///   y = x W^T + bias,  then y[rows_k] += (x_a[rows_k] A_k^T) B_eff,k^T  for each adapter k.
/// The frozen GEMM runs once over the whole input; each low-rank branch only on its rows (gathered with
/// index_select, added back with index_add), so a row that names no adapter costs only the GEMM. The
/// precision contract is lora_linear()'s (W in its dtype, the branches in fp32, autocast as Linear), and
/// gradients reach each adapter from its own rows only. Runs on ATen ops on every device (the CUDA kernels
/// serve lora_linear() only). Each update is checked as lora_linear() checks its one.
at::Tensor lora_linear_routed(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                              const std::vector<RoutedUpdate>& updates);

/// Which implementation runs lora_linear() and merged_weight() on CUDA tensors. `aten`: ATen ops (the
/// default). `cuda_kernels`: tiedlora's own kernels (the cuBLASLt passes of kernels/lora_gemm.cu, the merge
/// kernel of kernels/lora_merge.cu), experimental until the GPU checks listed in docs/cuda.md have passed.
/// The kernels take fp32, bf16 and fp16 layers whose input and weight share a dtype; everything else (CPU
/// tensors, double, mixed dtypes, a build without CUDA) keeps the ATen path. On the kernel path h = x A^T
/// and B_eff are rounded to the activation dtype between the matmuls (fp32 accumulation inside each).
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

// ---- merging: the one home of W + dW (LoraLinear::merge_, merge-weights, export-lora, the merge kernel's
// reference). The NaN/Inf policy of every merge: inputs are checked where they are read (adapter files:
// count_non_finite), and no merge ever returns or writes a value that is not finite (all_finite).

/// The number of NaN and Inf entries of `t` (0 for non-floating tensors): the adapter loader refuses
/// tensors that have any, `tiedlora inspect` reports them.
int64_t count_non_finite(const at::Tensor& t);
/// True when `t` holds no NaN or Inf (always for non-floating tensors), without allocating a tensor of
/// flags: min and max propagate NaN and reach +-Inf.
bool all_finite(const at::Tensor& t);

/// B_eff = s diag(v) B diag(u) in the compute dtype, no autograd.
at::Tensor effective_b(const LowRankUpdate& update);

/// dW = B_eff A (d_out x d_in) in the compute dtype, no autograd.
at::Tensor low_rank_delta(const LowRankUpdate& update);

/// The same update as plain LoRA factors with scale 1: A' = diag(u) A and B' = s diag(v) B, in the compute
/// dtype (so B' A' = dW exactly as the merge forms it). export-lora rounds them once to the stored dtypes.
LowRankUpdate folded_into_lora(const LowRankUpdate& update);

/// The weighted sum of updates, sum_k w_k dW_k, as one plain-LoRA update by rank concatenation (PEFT's
/// "cat" combination): A = [w_k s_k diag(u_k) A_k] stacked (sum of ranks x d_in), B = [diag(v_k) B_k] side
/// by side, scale 1, in the compute dtype (fp32; fp64 when a factor is double). B A equals the weighted sum
/// up to the order of the float additions. Also how several active adapters merge with one rounding.
LowRankUpdate concatenated(const std::vector<LowRankUpdate>& updates, const std::vector<double>& weights);

/// Work tensors merge_into() keeps between calls: a merge over a whole checkpoint allocates them once
/// (freeing and reallocating tens of MB per tensor made glibc keep the freed blocks, so RSS grew with the
/// model).
struct MergeWorkspace {
  at::Tensor sum, delta, output;
  /// `output` resized to `shape` in `dtype` on `device`, keeping its storage when it is large enough: a
  /// caller's result buffer, reused the same way (merge_checkpoint writes each tensor before the next).
  at::Tensor& take_output(at::IntArrayRef shape, at::ScalarType dtype, at::Device device);
};

/// What merge_into() measured: max |dW| and the one rounding's max |out - (W + dW)|, both in the compute
/// dtype.
struct MergeStats {
  double max_abs_delta = 0;
  double rounding_error = 0;
};

/// out = W + dW, computed in fp32 (fp64 for double W) and rounded once to out's dtype. `weight` is
/// (d_out, d_in), or (d_in, d_out) with `transposed` (GPT-2's Conv1D: PEFT's fan_in_fan_out); `out` has
/// weight's shape, any floating dtype, on the update's device. Under BackendGuard(cuda_kernels), CUDA
/// tensors with out in W's dtype take the merge kernel (kernels/lora_merge.cu), whose reference this ATen
/// path is. Throws tiedlora::Error naming `what` when the result holds NaN or Inf (checked after the
/// rounding: an fp16/bf16 overflow only appears there). `workspace` and `stats` may be null.
void merge_into(at::Tensor& out, const at::Tensor& weight, const LowRankUpdate& update, bool transposed,
                const char* what, MergeWorkspace* workspace = nullptr, MergeStats* stats = nullptr);

/// merge_into() into a new tensor of W's shape, dtype and device (LoraLinear::merge_).
at::Tensor merged_weight(const at::Tensor& weight, const LowRankUpdate& update, const char* what = "weight");

}  // namespace tiedlora::functional
