// merge.cpp: the one home of W + dW (functional::merge_into and its relatives: effective_b, low_rank_delta,
// folded_into_lora, concatenated; StackedFactors::of, which stacks several updates' factors) and of the merges'
// NaN/Inf policy (see tiedlora/core/functional.h). The ATen path is the reference; under
// BackendGuard(Backend::cuda_kernels) CUDA tensors take the merge kernel.
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include "core/cuda/dispatch.h"
#include "core/precision.h"
#include "tiedlora/core/error.h"
#include "tiedlora/core/functional.h"

namespace tiedlora::functional {

using namespace detail;

LowRankUpdate concatenated(const std::vector<LowRankUpdate>& updates, const std::vector<double>& weights) {
  TORCH_CHECK(!updates.empty() && updates.size() == weights.size(),
              "concatenated: needs one weight per update and at least one update, got ", updates.size(),
              " updates and ", weights.size(), " weights");
  at::ScalarType type = at::kFloat;
  for (const auto& update : updates) {
    if (update_compute_type(update) == at::kDouble) type = at::kDouble;
  }
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> a, b;
  for (size_t i = 0; i < updates.size(); ++i) {
    TORCH_CHECK(std::isfinite(weights[i]), "concatenated: weight ", i, " is not finite");
    TORCH_CHECK(updates[i].lora_a.size(1) == updates[0].lora_a.size(1) &&
                    updates[i].lora_b.size(0) == updates[0].lora_b.size(0),
                "concatenated: update ", i, " is ", updates[i].lora_a.size(1), " -> ", updates[i].lora_b.size(0),
                " but update 0 is ", updates[0].lora_a.size(1), " -> ", updates[0].lora_b.size(0));
    // PEFT's "cat" layout: the weight and the scale on A (A * w * s, in PEFT's order), v on B.
    const LowRankUpdate& update = updates[i];
    at::Tensor a_i = as(update.lora_a, type);
    if (update.u.defined()) a_i = a_i * as(update.u, type).unsqueeze(1);
    a.push_back(a_i.mul(weights[i]).mul(update.scale));
    b.push_back(effective_b_as(update.lora_b, {}, update.v, 1.0, type));
  }
  return {at::cat(a, 0), at::cat(b, 1), {}, {}, 1.0};
}

StackedFactors StackedFactors::of(c10::ArrayRef<AdapterCall> calls, at::ScalarType dtype) {
  if (calls.size() < 2) return {};
  std::vector<at::Tensor> a, b;
  for (const AdapterCall& call : calls) {
    const LowRankUpdate& u = call.update;
    if (u.u.defined() || u.v.defined() || !u.lora_a.sizes().equals(calls[0].update.lora_a.sizes()) ||
        !u.lora_b.sizes().equals(calls[0].update.lora_b.sizes()) ||
        u.lora_a.device() != calls[0].update.lora_a.device())
      return {};
    a.push_back(as(u.lora_a.detach(), dtype));
    b.push_back(as(u.lora_b.detach(), dtype));
  }
  return {at::stack(a), at::stack(b)};
}

int64_t count_non_finite(const at::Tensor& t) {
  if (!at::isFloatingType(t.scalar_type())) return 0;
  return t.numel() - at::isfinite(t).sum().item<int64_t>();
}

bool all_finite(const at::Tensor& t) {
  if (!at::isFloatingType(t.scalar_type()) || t.numel() == 0) return true;
  return std::isfinite(t.max().item<double>()) && std::isfinite(t.min().item<double>());
}

at::Tensor effective_b(const LowRankUpdate& update) {
  at::NoGradGuard no_grad;
  return effective_b_as(update.lora_b, update.u, update.v, update.scale, update_compute_type(update));
}

at::Tensor low_rank_delta(const LowRankUpdate& update) {
  at::NoGradGuard no_grad;
  const at::Tensor b_eff = effective_b(update);
  return at::mm(b_eff, as(update.lora_a, b_eff.scalar_type()));
}

LowRankUpdate folded_into_lora(const LowRankUpdate& update) {
  const auto type = update_compute_type(update);
  at::NoGradGuard no_grad;
  at::Tensor a = as(update.lora_a, type);
  if (update.u.defined()) a = a * as(update.u, type).unsqueeze(1);
  return {a, effective_b_as(update.lora_b, {}, update.v, update.scale, type), {}, {}, 1.0};
}

namespace {

// `slot` resized to `shape` in `dtype` on `device`, keeping its storage when it is large enough.
at::Tensor& reuse(at::Tensor& slot, at::IntArrayRef shape, at::ScalarType dtype, at::Device device) {
  if (!slot.defined() || slot.scalar_type() != dtype || slot.device() != device) {
    slot = at::empty({0}, at::TensorOptions().dtype(dtype).device(device));
  }
  slot.resize_(shape);
  return slot;
}

}  // namespace

at::Tensor& MergeWorkspace::take_output(at::IntArrayRef shape, at::ScalarType dtype, at::Device device) {
  return reuse(output, shape, dtype, device);
}

void merge_into(at::Tensor& out, const at::Tensor& weight, const LowRankUpdate& update, bool transposed,
                const char* what, MergeWorkspace* workspace, MergeStats* stats) {
  const at::Tensor &a = update.lora_a, &b = update.lora_b;
  TORCH_CHECK(weight.dim() == 2 && a.dim() == 2 && b.dim() == 2, "merge of ", what, ": weight ", weight.sizes(),
              ", lora_a ", a.sizes(), " and lora_b ", b.sizes(), " must be 2-D");
  const int64_t d_out = transposed ? weight.size(1) : weight.size(0),
                d_in = transposed ? weight.size(0) : weight.size(1);
  TORCH_CHECK(a.size(1) == d_in && b.size(0) == d_out && b.size(1) == a.size(0), "merge of ", what, ": weight ",
              weight.sizes(), (transposed ? " (stored transposed)" : ""), ", lora_a ", a.sizes(), " and lora_b ",
              b.sizes(), " do not fit W + B A");
  TORCH_CHECK(out.sizes() == weight.sizes() && at::isFloatingType(out.scalar_type()) && out.device() == a.device(),
              "merge of ", what,
              ": the output must be a floating tensor of the weight's shape on the adapter's device");
  at::NoGradGuard no_grad;
  const auto nonfinite = [&] {
    return Error(std::string("merge of ") + what + " produced NaN or Inf in " + c10::toString(out.scalar_type()) +
                 " (hint: the adapter or the base weight holds non-finite values, or W + dW overflows the output "
                 "dtype); nothing was written");
  };
  MergeWorkspace local;
  MergeWorkspace& ws = workspace ? *workspace : local;
  const auto type = compute_type(weight.scalar_type());
  const at::Device device = a.device();
  const at::Tensor b_eff = effective_b_as(b, update.u, update.v, update.scale, type);
  const bool kernel = !transposed && out.scalar_type() == weight.scalar_type() && weight.device() == device &&
                      use_cuda_kernels(weight, {}, weight, {}, update);
  if (kernel) {
    // The merge kernel: fp32 product and sum, rounded once; it flags NaN/Inf in the rounded result.
    const at::Tensor flag = cuda::merge_weight_out(out, row_strided(weight), row_strided(as(a, at::kFloat)),
                                                   cuda::effective_b(b, update.u, update.v, update.scale, at::kFloat));
    if (flag.item<int>() != 0) throw nonfinite();
    if (!stats) return;  // the statistics come from the reference sum below
  }
  // The sum in the compute dtype, in `out` itself when out is in that dtype (no second weight-sized buffer).
  const bool sum_in_out = !kernel && out.scalar_type() == type;
  at::Tensor& sum = sum_in_out ? out : reuse(ws.sum, weight.sizes(), type, device);
  sum.copy_(weight);
  at::Tensor& delta = reuse(ws.delta, {d_out, d_in}, type, device);
  at::mm_out(delta, b_eff, as(a, type));
  if (stats) stats->max_abs_delta = std::max(delta.max().item<double>(), -delta.min().item<double>());
  sum.add_(transposed ? delta.t() : delta);
  if (!kernel && !sum_in_out) out.copy_(sum);  // the one rounding
  if (!kernel && !all_finite(out)) throw nonfinite();
  if (stats && !sum_in_out) {
    at::Tensor& error = reuse(ws.delta, weight.sizes(), type, device);
    error.copy_(out);
    stats->rounding_error = error.sub_(sum).abs_().max().item<double>();
  }
}

at::Tensor merged_weight(const at::Tensor& weight, const LowRankUpdate& update, const char* what) {
  at::Tensor out = at::empty(weight.sizes(), weight.options());
  merge_into(out, weight, update, /*transposed=*/false, what);
  return out;
}

}  // namespace tiedlora::functional
