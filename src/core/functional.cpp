// functional.cpp: lora_linear() and its autograd Function (the formulas of docs/method.md), merged_weight().
// The CPU path, and by default the CUDA path, runs on ATen ops under the precision contract of
// functional.h. Inside a BackendGuard(Backend::cuda_kernels) (experimental until the GPU checks of
// docs/cuda.md pass) CUDA tensors go through src/core/cuda/dispatch.h.
#include "tiedlora/core/functional.h"

#include <cmath>
#include <optional>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include "core/cuda/dispatch.h"
#include "tiedlora/core/error.h"

namespace tiedlora::functional {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// fp32 for every storage dtype but double, which stays double so that gradcheck runs in fp64.
at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
at::Tensor as(const at::Tensor& t, at::ScalarType type) { return t.scalar_type() == type ? t : t.to(type); }

// The fp32 (fp64 for double factors) dtype in which an update is applied.
at::ScalarType update_compute_type(const LowRankUpdate& update) { return compute_type(update.lora_b.scalar_type()); }

at::Tensor effective_b_as(const at::Tensor& b, const at::Tensor& u, const at::Tensor& v, double scale,
                          at::ScalarType type) {
  at::Tensor out = as(b, type) * scale;  // always a new tensor, so the in-place products below are safe
  if (u.defined()) out.mul_(as(u, type).unsqueeze(0));
  if (v.defined()) out.mul_(as(v, type).unsqueeze(1));
  return out;
}

// ---- the choice of tiedlora's CUDA kernels: per thread, scoped -------------------------------------------

thread_local Backend t_backend = Backend::aten;

bool kernel_dtype_ok(const at::Tensor& t) {
  if (!t.defined()) return true;
  const auto type = t.scalar_type();
  return type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
}

// Whether this call takes the CUDA kernels: switched on, built with CUDA, CUDA tensors, and dtypes the
// kernels take (activations and W in one of fp32/bf16/fp16; the small factors are converted per call).
bool use_cuda_kernels(const at::Tensor& x, const at::Tensor& adapter_x, const at::Tensor& weight,
                      const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b, const at::Tensor& u,
                      const at::Tensor& v) {
  if (!TIEDLORA_WITH_CUDA || t_backend != Backend::cuda_kernels || !x.is_cuda()) return false;
  const auto type = x.scalar_type();
  if (!kernel_dtype_ok(x) || weight.scalar_type() != type) return false;
  if (adapter_x.defined() && adapter_x.scalar_type() != type) return false;
  return kernel_dtype_ok(bias) && kernel_dtype_ok(a) && kernel_dtype_ok(b) && kernel_dtype_ok(u) && kernel_dtype_ok(v);
}

// `t` (2-D) itself when the kernels can read it in place (unit column stride, row stride >= row length),
// else a contiguous copy.
at::Tensor row_strided(const at::Tensor& t) {
  const bool unit_columns = t.size(1) <= 1 || t.stride(1) == 1;
  const bool rows_apart = t.size(0) <= 1 || t.stride(0) >= t.size(1);
  return unit_columns && rows_apart ? t : t.contiguous();
}

// dB, du, dv from dB_eff (docs/method.md), each rounded once to its parameter's dtype; shared by both paths.
void factor_grads(const at::Tensor& db_eff, const at::Tensor& b, const at::Tensor& u, const at::Tensor& v,
                  double scale, at::ScalarType type, bool need_b, bool need_u, bool need_v, at::Tensor& grad_b,
                  at::Tensor& grad_u, at::Tensor& grad_v) {
  const at::Tensor u_row = u.defined() ? as(u, type).unsqueeze(0) : at::Tensor();
  const at::Tensor v_col = v.defined() ? as(v, type).unsqueeze(1) : at::Tensor();
  if (need_b) {
    at::Tensor db = db_eff * scale;
    if (u_row.defined()) db.mul_(u_row);
    if (v_col.defined()) db.mul_(v_col);
    grad_b = as(db, b.scalar_type());
  }
  const at::Tensor b_c = as(b, type);
  if (need_u) {  // du_j = s sum_i v_i B_ij dB_eff_ij
    at::Tensor t = db_eff * b_c;
    if (v_col.defined()) t.mul_(v_col);
    grad_u = as(t.sum(0).mul_(scale), u.scalar_type());
  }
  if (need_v) {  // dv_i = s sum_j B_ij u_j dB_eff_ij
    at::Tensor t = db_eff * b_c;
    if (u_row.defined()) t.mul_(u_row);
    grad_v = as(t.sum(1).mul_(scale), v.scalar_type());
  }
}

// Positions of the forward arguments; absent optional tensors are not autograd inputs, so the edge index
// used by needs_input_grad() is computed per call and kept in saved_data["edges"].
enum Input : size_t { kX, kAdapterX, kWeight, kBias, kA, kB, kU, kV, kInputs };

struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const std::optional<at::Tensor>& adapter_x_opt,
                            const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt, const at::Tensor& a,
                            const at::Tensor& b, const std::optional<at::Tensor>& u_opt,
                            const std::optional<at::Tensor>& v_opt, double scale) {
    const at::Tensor adapter_x = adapter_x_opt.value_or(at::Tensor()), bias = bias_opt.value_or(at::Tensor());
    const at::Tensor u = u_opt.value_or(at::Tensor()), v = v_opt.value_or(at::Tensor());
    std::vector<int64_t> edges(kInputs, -1);
    int64_t next = 0;
    const at::Tensor* inputs[kInputs] = {&x, &adapter_x, &weight, &bias, &a, &b, &u, &v};
    for (size_t i = 0; i < kInputs; ++i) {
      if (inputs[i]->defined()) edges[i] = next++;
    }
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["edges"] = edges;
    ctx->saved_data["bias_type"] = bias.defined() ? bias.scalar_type() : weight.scalar_type();
    const int64_t in = weight.size(1), out = weight.size(0);
    auto out_shape = x.sizes().vec();
    out_shape.back() = out;

    const bool kernels = use_cuda_kernels(x, adapter_x, weight, bias, a, b, u, v);
    ctx->saved_data["cuda_kernels"] = kernels;
    if (kernels) {  // cuBLASLt: y = x W^T + bias, then y += h B_eff^T in x's dtype; h kept in x's dtype
      const auto dtype = x.scalar_type();
      const at::Tensor x2 = row_strided(x.reshape({-1, in}));
      const at::Tensor xa2 = adapter_x.defined() ? row_strided(adapter_x.reshape({-1, in})) : at::Tensor();
      at::Tensor y = at::empty({x2.size(0), out}, x.options());
      at::Tensor h = at::empty({x2.size(0), a.size(0)}, x.options());
      cuda::lora_forward_out(y, h, x2, xa2, row_strided(weight), bias.defined() ? as(bias, dtype).contiguous() : bias,
                             row_strided(as(a, dtype)), cuda::effective_b(b, u, v, scale, dtype));
      ctx->save_for_backward({x, adapter_x, weight, a, b, u, v, h});
      return y.reshape(out_shape);
    }

    // The frozen matmul in W's storage dtype (fp32 accumulation inside the GEMM); W is never converted,
    // the activations are when they differ. The low-rank branch in fp32 (fp64 for double activations).
    const auto type = compute_type(x.scalar_type());
    const auto gemm = weight.scalar_type();
    const at::Tensor x2 = x.reshape({-1, in});
    const at::Tensor xa2 = as(adapter_x.defined() ? adapter_x.reshape({-1, in}) : x2, type);
    const at::Tensor h = xa2.mm(as(a, type).t());  // (M, r), kept for dB_eff in backward
    const at::Tensor xg = as(x2, gemm);
    at::Tensor y = bias.defined() ? at::addmm(as(bias, gemm), xg, weight.t()) : xg.mm(weight.t());
    // fp32 weights: one accumulator, one rounding. bf16/fp16 weights: the GEMM's rounding of x W^T, then
    // the update added in fp32 and rounded once more (PEFT rounds as often).
    y = as(y, type);
    y.addmm_(h, effective_b_as(b, u, v, scale, type).t());
    ctx->save_for_backward({x, adapter_x, weight, a, b, u, v, h});
    return as(y, x.scalar_type()).reshape(out_shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // Dtypes are chosen here explicitly; autocast (if the caller's backward runs under it) must not recast.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &adapter_x = saved[1], &weight = saved[2], &a = saved[3], &b = saved[4],
                     &u = saved[5], &v = saved[6], &h = saved[7];
    const double scale = ctx->saved_data["scale"].toDouble();
    const auto edges = ctx->saved_data["edges"].toIntVector();
    auto needs = [&](Input i) { return edges[i] >= 0 && ctx->needs_input_grad(static_cast<size_t>(edges[i])); };
    const auto type = compute_type(x.scalar_type());
    const int64_t in = weight.size(1), out = weight.size(0);
    variable_list grads(9);
    const at::Tensor& grad_y = grad_outputs[0];
    if (!grad_y.defined()) return grads;
    const bool need_b = needs(kB), need_u = needs(kU), need_v = needs(kV);

    if (ctx->saved_data["cuda_kernels"].toBool()) {  // the forward pass took the kernels: h is in x's dtype
      const auto dtype = x.scalar_type();
      const at::Tensor dy = row_strided(as(grad_y, dtype).reshape({-1, out}));
      const int64_t m = dy.size(0), r = a.size(0);
      const at::Tensor x2 = row_strided(x.reshape({-1, in}));
      const at::Tensor xa2 = adapter_x.defined() ? row_strided(adapter_x.reshape({-1, in})) : at::Tensor();
      const at::TensorOptions fp32 = dy.options().dtype(at::kFloat);
      const at::Tensor dx = needs(kX) ? at::empty({m, in}, dy.options()) : at::Tensor();
      const at::Tensor dxa = adapter_x.defined() && needs(kAdapterX) ? at::empty({m, in}, dy.options()) : at::Tensor();
      const at::Tensor da = needs(kA) ? at::empty({r, in}, fp32) : at::Tensor();
      const at::Tensor db_eff = need_b || need_u || need_v ? at::empty({out, r}, fp32) : at::Tensor();
      cuda::lora_backward_out(dx, dxa, da, db_eff, dy, x2, xa2, row_strided(weight), row_strided(as(a, dtype)),
                              cuda::effective_b(b, u, v, scale, dtype), h);
      if (dx.defined()) grads[kX] = dx.reshape(x.sizes());
      if (dxa.defined()) grads[kAdapterX] = dxa.reshape(adapter_x.sizes());
      if (needs(kBias)) grads[kBias] = as(at::sum(dy, {0}, /*keepdim=*/false, at::kFloat), ctx->saved_data["bias_type"].toScalarType());
      if (da.defined()) grads[kA] = as(da, a.scalar_type());
      if (db_eff.defined()) {
        factor_grads(db_eff, b, u, v, scale, at::kFloat, need_b, need_u, need_v, grads[kB], grads[kU], grads[kV]);
      }
      return grads;
    }

    const at::Tensor dy_act = grad_y.reshape({-1, out});
    const at::Tensor dy = as(dy_act, type);
    const at::Tensor a_c = as(a, type);
    const at::Tensor b_eff = effective_b_as(b, u, v, scale, type);
    const at::Tensor dh = dy.mm(b_eff);  // (M, r)

    if (needs(kX)) {
      // dY W in W's storage dtype (W never converted), then + dH A in fp32, rounded once to x's dtype.
      at::Tensor dx = as(dy_act, weight.scalar_type()).mm(weight);
      if (!adapter_x.defined()) dx = as(dx, type).addmm_(dh, a_c);  // dX = dY W + dH A
      grads[kX] = as(dx, x.scalar_type()).reshape(x.sizes());
    }
    if (adapter_x.defined() && needs(kAdapterX)) {
      grads[kAdapterX] = as(dh.mm(a_c), adapter_x.scalar_type()).reshape(adapter_x.sizes());
    }
    if (needs(kBias)) grads[kBias] = as(dy.sum(0), ctx->saved_data["bias_type"].toScalarType());
    if (needs(kA)) {
      const at::Tensor xa2 = as((adapter_x.defined() ? adapter_x : x).reshape({-1, in}), type);
      grads[kA] = as(dh.t().mm(xa2), a.scalar_type());
    }
    if (need_b || need_u || need_v) {
      const at::Tensor db_eff = dy.t().mm(h);  // (d_out, r)
      factor_grads(db_eff, b, u, v, scale, type, need_b, need_u, need_v, grads[kB], grads[kU], grads[kV]);
    }
    return grads;  // W never gets a gradient (checked frozen in lora_linear); scale is not a tensor
  }
};

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "lora_linear: ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

void check_same_device(const at::Tensor& t, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(t.device() == weight.device(), "lora_linear: ", name, " is on ", t.device(), " but weight is on ",
              weight.device());
}

}  // namespace

BackendGuard::BackendGuard(Backend backend) : previous_(t_backend) { t_backend = backend; }
BackendGuard::~BackendGuard() { t_backend = previous_; }
Backend current_backend() { return t_backend; }

namespace {

// Shapes, dtypes and devices of one adapted layer's arguments, each refusal naming the argument.
void check_arguments(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                     const LowRankUpdate& update, const at::Tensor& adapter_input) {
  const at::Tensor &lora_a = update.lora_a, &lora_b = update.lora_b, &u = update.u, &v = update.v;
  TORCH_CHECK(weight.defined() && weight.dim() == 2, "lora_linear: weight must be 2-D (d_out, d_in), got ",
              weight.defined() ? weight.sizes() : at::IntArrayRef{});
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(input.defined() && input.dim() >= 1 && input.size(-1) == in, "lora_linear: input's last dimension must be d_in = ",
              in, ", got input of shape ", input.defined() ? input.sizes() : at::IntArrayRef{});
  TORCH_CHECK(lora_a.defined() && lora_a.dim() == 2 && lora_a.size(1) == in,
              "lora_linear: lora_a must be (r, d_in = ", in, "), got ", lora_a.defined() ? lora_a.sizes() : at::IntArrayRef{});
  const int64_t r = lora_a.size(0);
  TORCH_CHECK(r > 0, "lora_linear: rank must be positive");
  TORCH_CHECK(lora_b.defined() && lora_b.dim() == 2 && lora_b.size(0) == out && lora_b.size(1) == r,
              "lora_linear: lora_b must be (d_out = ", out, ", r = ", r, "), got ", lora_b.defined() ? lora_b.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == out), "lora_linear: bias must be (d_out = ", out,
              "), got ", bias.defined() ? bias.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!u.defined() || (u.dim() == 1 && u.size(0) == r), "lora_linear: u must be (r = ", r, "), got ",
              u.defined() ? u.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!v.defined() || (v.dim() == 1 && v.size(0) == out), "lora_linear: v must be (d_out = ", out, "), got ",
              v.defined() ? v.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!adapter_input.defined() || adapter_input.sizes() == input.sizes(),
              "lora_linear: adapter_input must have input's shape ", input.sizes(), ", got ",
              adapter_input.defined() ? adapter_input.sizes() : at::IntArrayRef{});
  TORCH_CHECK(!weight.requires_grad(),
              "lora_linear: weight requires grad, but the base weight of an adapted layer is frozen and gets no "
              "gradient (call weight.requires_grad_(false))");
  check_floating(input, "input");
  check_floating(weight, "weight");
  check_floating(lora_a, "lora_a");
  check_floating(lora_b, "lora_b");
  check_same_device(input, weight, "input");
  check_same_device(lora_a, weight, "lora_a");
  check_same_device(lora_b, weight, "lora_b");
  if (bias.defined()) check_same_device(bias, weight, "bias");
  if (u.defined()) check_same_device(u, weight, "u");
  if (v.defined()) check_same_device(v, weight, "v");
  if (adapter_input.defined()) check_same_device(adapter_input, weight, "adapter_input");
}

// autocast's dtype when it is on for `input`'s device.
std::optional<at::ScalarType> autocast_dtype(const at::Tensor& input) {
  const auto device_type = input.device().type();
  if ((device_type == at::kCPU || device_type == at::kCUDA) && at::autocast::is_autocast_enabled(device_type)) {
    return at::autocast::get_autocast_dtype(device_type);
  }
  return std::nullopt;
}

void check_16bit_pair(const at::Tensor& input, const at::Tensor& weight) {
  const auto reduced = [](at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; };
  TORCH_CHECK(!(reduced(input.scalar_type()) && reduced(weight.scalar_type()) && input.scalar_type() != weight.scalar_type()),
              "lora_linear: input is ", input.scalar_type(), " but weight is ", weight.scalar_type(),
              "; the frozen matmul runs in the weight's dtype, and converting one 16-bit format into the other can "
              "overflow or lose precision (hint: load the model in the activations' dtype, or use autocast)");
}

}  // namespace

at::Tensor lora_linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       const LowRankUpdate& update, const at::Tensor& adapter_input) {
  const at::Tensor &lora_a = update.lora_a, &lora_b = update.lora_b, &u = update.u, &v = update.v;
  const double scale = update.scale;
  check_arguments(input, weight, bias, update, adapter_input);
  auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  // Autocast: the layer does what torch::nn::Linear does under the same autocast (PyTorch's
  // custom_fwd(cast_inputs=...)): the input, the weight and the bias go to the autocast dtype (autocast's
  // own cast, which copies only what is stored in another dtype), the function runs with autocast off, and
  // returns the autocast dtype. The adapter factors keep their dtype (fp32), as PEFT keeps them.
  const std::optional<at::ScalarType> autocast = autocast_dtype(input);
  if (!autocast) {
    check_16bit_pair(input, weight);
    return LoraLinearFunction::apply(input, optional(adapter_input), weight, optional(bias), lora_a, lora_b,
                                     optional(u), optional(v), scale);
  }
  // As autocast itself: only fp32/fp16/bf16 tensors are cast (a double layer stays double).
  auto cast = [&](const at::Tensor& t) { return t.defined() && t.scalar_type() != at::kDouble ? as(t, *autocast) : t; };
  const at::Tensor x = cast(input), xa = cast(adapter_input), w = cast(weight), b0 = cast(bias);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return LoraLinearFunction::apply(x, optional(xa), w, optional(b0), lora_a, lora_b, optional(u), optional(v), scale);
}

at::Tensor lora_linear_routed(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                              const std::vector<RoutedUpdate>& updates) {
  for (const RoutedUpdate& routed : updates) {
    check_arguments(input, weight, bias, routed.update, {});
    if (routed.adapter_input.defined()) {
      auto rows_shape = input.sizes().vec();
      if (routed.rows.defined() && !rows_shape.empty()) rows_shape[0] = routed.rows.numel();
      TORCH_CHECK(routed.adapter_input.sizes() == at::IntArrayRef(rows_shape),
                  "lora_linear_routed: adapter_input must have the shape of the adapter's rows of the input ",
                  at::IntArrayRef(rows_shape), ", got ", routed.adapter_input.sizes());
      TORCH_CHECK(routed.adapter_input.device() == input.device(), "lora_linear_routed: adapter_input is on ",
                  routed.adapter_input.device(), " but input is on ", input.device());
      check_floating(routed.adapter_input, "adapter_input");
    }
    if (!routed.rows.defined()) continue;
    TORCH_CHECK(input.dim() >= 2, "lora_linear_routed: input must have a batch dimension to route rows, got shape ",
                input.sizes());
    TORCH_CHECK(routed.rows.dim() == 1 && routed.rows.scalar_type() == at::kLong && routed.rows.device() == input.device(),
                "lora_linear_routed: rows must be a 1-D int64 tensor on the input's device, got ", routed.rows.sizes(), " ",
                routed.rows.scalar_type(), " on ", routed.rows.device());
  }
  // Autocast as lora_linear(): input, W and bias in autocast's dtype, the rest with autocast off.
  const std::optional<at::ScalarType> autocast = autocast_dtype(input);
  if (!autocast) check_16bit_pair(input, weight);
  auto cast = [&](const at::Tensor& t) {
    return autocast && t.defined() && t.scalar_type() != at::kDouble ? as(t, *autocast) : t;
  };
  const at::Tensor x = cast(input), w = cast(weight), b0 = cast(bias);
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);

  // The frozen GEMM once over every row, in W's dtype (W never converted), as lora_linear() runs it.
  const int64_t in = w.size(1), out = w.size(0);
  const auto type = compute_type(x.scalar_type());
  auto out_shape = x.sizes().vec();
  out_shape.back() = out;
  const at::Tensor xg = as(x.reshape({-1, in}), w.scalar_type());
  at::Tensor y = b0.defined() ? at::addmm(as(b0, w.scalar_type()), xg, w.t()) : xg.mm(w.t());
  // A tensor of its own, not a view of the 2-D product (nothing else holds that), so the in-place additions
  // below cost no CopySlices copies of the output gradient in backward.
  y = at::_unsafe_view(as(y, type), out_shape);
  // Each adapter's branch on its rows only (gathered, computed in fp32, added back where they came from):
  // rows that name no adapter cost nothing. Plain autograd ops, so gradients reach each adapter from its
  // rows alone; y is this function's own fresh tensor, so the additions are in place (no copy of the
  // output per adapter).
  for (const RoutedUpdate& routed : updates) {
    const LowRankUpdate& update = routed.update;
    const at::Tensor rows_in = routed.adapter_input.defined() ? cast(routed.adapter_input)
                               : routed.rows.defined()       ? x.index_select(0, routed.rows)
                                                             : x;
    if (rows_in.numel() == 0) continue;
    at::Tensor b_eff = as(update.lora_b, type) * update.scale;  // out of place: autograd keeps B, u, v
    if (update.u.defined()) b_eff = b_eff * as(update.u, type).unsqueeze(0);
    if (update.v.defined()) b_eff = b_eff * as(update.v, type).unsqueeze(1);
    auto delta_shape = rows_in.sizes().vec();
    delta_shape.back() = out;
    const at::Tensor delta = as(rows_in.reshape({-1, in}), type).mm(as(update.lora_a, type).t()).mm(b_eff.t());
    if (routed.rows.defined()) y.index_add_(0, routed.rows, delta.reshape(delta_shape));
    else y.add_(delta.reshape(delta_shape));
  }
  return as(y, x.scalar_type());
}

LowRankUpdate concatenated(const std::vector<LowRankUpdate>& updates, const std::vector<double>& weights) {
  TORCH_CHECK(!updates.empty() && updates.size() == weights.size(),
              "concatenated: needs one weight per update and at least one update, got ", updates.size(), " updates and ",
              weights.size(), " weights");
  at::ScalarType type = at::kFloat;
  for (const auto& update : updates) {
    if (update_compute_type(update) == at::kDouble) type = at::kDouble;
  }
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> a, b;
  for (size_t i = 0; i < updates.size(); ++i) {
    TORCH_CHECK(std::isfinite(weights[i]), "concatenated: weight ", i, " is not finite");
    TORCH_CHECK(updates[i].lora_a.size(1) == updates[0].lora_a.size(1) && updates[i].lora_b.size(0) == updates[0].lora_b.size(0),
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
  const int64_t d_out = transposed ? weight.size(1) : weight.size(0), d_in = transposed ? weight.size(0) : weight.size(1);
  TORCH_CHECK(a.size(1) == d_in && b.size(0) == d_out && b.size(1) == a.size(0),
              "merge of ", what, ": weight ", weight.sizes(), (transposed ? " (stored transposed)" : ""), ", lora_a ",
              a.sizes(), " and lora_b ", b.sizes(), " do not fit W + B A");
  TORCH_CHECK(out.sizes() == weight.sizes() && at::isFloatingType(out.scalar_type()) && out.device() == a.device(),
              "merge of ", what, ": the output must be a floating tensor of the weight's shape on the adapter's device");
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
                      use_cuda_kernels(weight, {}, weight, {}, a, b, update.u, update.v);
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
