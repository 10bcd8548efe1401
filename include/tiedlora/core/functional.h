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
//     (fp32 accumulation inside each GEMM; see Backend in forward_context.h);
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
#include <c10/util/ArrayRef.h>

#include "tiedlora/core/forward_context.h"

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

/// The rows of the batch (the input's first dimension) one adapter serves.
struct AdapterRows {
  /// -1: every row; otherwise the first row of a consecutive run [begin, end), read in place as a slice.
  int64_t begin = -1, end = -1;
  /// Defined: the rows as int64 indices on the input's device (gathered, scattered back).
  at::Tensor index;

  static AdapterRows all() { return {}; }
  static AdapterRows range(int64_t begin, int64_t end) { return {begin, end, {}}; }
  static AdapterRows indices(at::Tensor index) { return {-1, -1, std::move(index)}; }
  bool every_row() const { return begin < 0 && !index.defined(); }
};

/// One adapter applied by lora_linear(): its update, the rows it serves, and the input of its low-rank
/// branch for those rows when it differs from the layer's input there (adapter dropout), else undefined.
struct AdapterCall {
  LowRankUpdate update;
  AdapterRows rows;
  at::Tensor adapter_input;
};

/// The adapted linear layer, the one choke point of every adapted layer, for any number of adapters:
///
///   y = x W^T + bias,   then for each call k:  y[rows_k] += (x_a,k A_k^T) B_eff,k^T
///
/// The frozen GEMM runs once over every row; each low-rank branch only on its rows (a slice when they are
/// consecutive, else gathered and added back), so a row no adapter serves costs only the GEMM and several
/// adapters on the same rows add up. One autograd Function: dX = dY W + sum_k dH_k A_k on the rows of each
/// call, and every adapter's dA, dB, du, dv from its own rows only. `input`: (..., d_in), with a first (batch)
/// dimension when a call names rows; `weight`: (d_out, d_in), frozen; `bias`: (d_out) or undefined. Returns
/// (..., d_out) in the input's dtype under the precision contract above; no call is torch::nn::Linear's
/// result. Checks shapes, dtypes, devices and rows, naming the argument. With BackendGuard(cuda_kernels),
/// one call on every row of CUDA tensors takes the fused kernels (Backend).
///
/// Without gradients (generation, evaluation), consecutive plain-LoRA calls (no u, v or input of their own) on
/// adjacent row slices of one length, one rank and one scale -- a mixed batch sorted by adapter -- run as one
/// batched GEMM pair (bmm), with no product that a row does not need. Their factors are stacked for it: from
/// `stacked` when given (StackedFactors, which a layer keeps between forwards), else per call.
struct StackedFactors;
at::Tensor lora_linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       c10::ArrayRef<AdapterCall> calls, const StackedFactors* stacked = nullptr);

/// The A and B of N plain-LoRA calls of one rank stacked for the batched GEMMs above (as vLLM keeps
/// `lora_a_stacked` per layer): `lora_a` (N, r, d_in) and `lora_b` (N, d_out, r), in the calls' order and in the
/// dtype of the low-rank branch. lora_linear checks their shapes; their values must be the calls' factors.
struct StackedFactors {
  at::Tensor lora_a, lora_b;
  /// The factors of `calls` stacked in `dtype`, or undefined tensors when the calls cannot be stacked (fewer
  /// than two, a u or v, ranks or devices that differ).
  static StackedFactors of(c10::ArrayRef<AdapterCall> calls, at::ScalarType dtype);
  bool defined() const { return lora_a.defined(); }
};

/// One adapter on every row: `adapter_input` is the branch's input when it differs from `input` (dropout).
inline at::Tensor lora_linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                              const LowRankUpdate& update, const at::Tensor& adapter_input = {}) {
  const AdapterCall call{update, AdapterRows::all(), adapter_input};
  return lora_linear(input, weight, bias, c10::ArrayRef<AdapterCall>(call));
}

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
