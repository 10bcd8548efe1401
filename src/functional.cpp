// functional.cpp: lora_linear() and its autograd Function (the formulas of method.md), merged_weight().
// The CPU path (and, until the fused kernels land, the CUDA path) runs on ATen ops in fp32.
#include "tiedlora/functional.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "tiedlora/error.h"

namespace tiedlora::functional {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// fp32 for every storage dtype but double, which stays double so that gradcheck runs in fp64.
at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }
at::Tensor as(const at::Tensor& t, at::ScalarType type) { return t.scalar_type() == type ? t : t.to(type); }
at::Tensor rounded(const at::Tensor& t, at::ScalarType type) { return as(t, type); }

at::Tensor effective_b_as(const at::Tensor& b, const at::Tensor& u, const at::Tensor& v, double scale,
                          at::ScalarType type) {
  at::Tensor out = as(b, type) * scale;  // always a new tensor, so the in-place products below are safe
  if (u.defined()) out.mul_(as(u, type).unsqueeze(0));
  if (v.defined()) out.mul_(as(v, type).unsqueeze(1));
  return out;
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
    const auto type = compute_type(x.scalar_type());
    const int64_t in = weight.size(1), out = weight.size(0);
    const at::Tensor x2 = as(x.reshape({-1, in}), type);
    const at::Tensor xa2 = adapter_x.defined() ? as(adapter_x.reshape({-1, in}), type) : x2;
    const at::Tensor w = as(weight, type);
    const at::Tensor h = xa2.mm(as(a, type).t());  // (M, r), kept for dB_eff in backward
    at::Tensor y = bias.defined() ? at::addmm(as(bias, type), x2, w.t()) : x2.mm(w.t());
    y.addmm_(h, effective_b_as(b, u, v, scale, type).t());  // one accumulator, rounded once below

    std::vector<int64_t> edges(kInputs, -1);
    int64_t next = 0;
    const at::Tensor* inputs[kInputs] = {&x, &adapter_x, &weight, &bias, &a, &b, &u, &v};
    for (size_t i = 0; i < kInputs; ++i) {
      if (inputs[i]->defined()) edges[i] = next++;
    }
    ctx->save_for_backward({x, adapter_x, weight, a, b, u, v, h});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["edges"] = edges;
    auto out_shape = x.sizes().vec();
    out_shape.back() = out;
    return rounded(y, x.scalar_type()).reshape(out_shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
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

    const at::Tensor dy = as(grad_y.reshape({-1, out}), type);
    const at::Tensor a_c = as(a, type);
    const at::Tensor b_eff = effective_b_as(b, u, v, scale, type);
    const at::Tensor dh = dy.mm(b_eff);  // (M, r)

    if (needs(kX)) {
      at::Tensor dx = dy.mm(as(weight, type));
      if (!adapter_x.defined()) dx.addmm_(dh, a_c);  // dX = dY W + dH A, one accumulator
      grads[kX] = rounded(dx, x.scalar_type()).reshape(x.sizes());
    }
    if (adapter_x.defined() && needs(kAdapterX)) {
      grads[kAdapterX] = rounded(dh.mm(a_c), adapter_x.scalar_type()).reshape(adapter_x.sizes());
    }
    if (needs(kBias)) grads[kBias] = rounded(dy.sum(0), weight.scalar_type());
    if (needs(kA)) {
      const at::Tensor xa2 = as((adapter_x.defined() ? adapter_x : x).reshape({-1, in}), type);
      grads[kA] = rounded(dh.t().mm(xa2), a.scalar_type());
    }
    const bool need_b = needs(kB), need_u = needs(kU),
               need_v = needs(kV);
    if (need_b || need_u || need_v) {
      const at::Tensor db_eff = dy.t().mm(h);  // (d_out, r)
      const at::Tensor u_row = u.defined() ? as(u, type).unsqueeze(0) : at::Tensor();
      const at::Tensor v_col = v.defined() ? as(v, type).unsqueeze(1) : at::Tensor();
      if (need_b) {
        at::Tensor db = db_eff * scale;
        if (u_row.defined()) db.mul_(u_row);
        if (v_col.defined()) db.mul_(v_col);
        grads[kB] = rounded(db, b.scalar_type());
      }
      const at::Tensor b_c = as(b, type);
      if (need_u) {  // du_j = s sum_i v_i B_ij dB_eff_ij
        at::Tensor t = db_eff * b_c;
        if (v_col.defined()) t.mul_(v_col);
        grads[kU] = rounded(t.sum(0).mul_(scale), u.scalar_type());
      }
      if (need_v) {  // dv_i = s sum_j B_ij u_j dB_eff_ij
        at::Tensor t = db_eff * b_c;
        if (u_row.defined()) t.mul_(u_row);
        grads[kV] = rounded(t.sum(1).mul_(scale), v.scalar_type());
      }
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

at::Tensor lora_linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                       const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& u,
                       const at::Tensor& v, double scale, const at::Tensor& adapter_input) {
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
  auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  return LoraLinearFunction::apply(input, optional(adapter_input), weight, optional(bias), lora_a, lora_b,
                                   optional(u), optional(v), scale);
}

at::Tensor effective_b(const at::Tensor& lora_b, const at::Tensor& u, const at::Tensor& v, double scale) {
  return effective_b_as(lora_b, u, v, scale, compute_type(lora_b.scalar_type()));
}

at::Tensor merged_weight(const at::Tensor& weight, const at::Tensor& lora_a, const at::Tensor& lora_b,
                         const at::Tensor& u, const at::Tensor& v, double scale, const char* what) {
  TORCH_CHECK(weight.dim() == 2 && lora_a.dim() == 2 && lora_b.dim() == 2 && lora_a.size(1) == weight.size(1) &&
                  lora_b.size(0) == weight.size(0) && lora_b.size(1) == lora_a.size(0),
              "merged_weight(", what, "): weight ", weight.sizes(), ", lora_a ", lora_a.sizes(), " and lora_b ",
              lora_b.sizes(), " do not fit W + B A");
  at::NoGradGuard no_grad;
  const auto type = compute_type(weight.scalar_type());
  at::Tensor merged = at::addmm(as(weight, type), effective_b_as(lora_b, u, v, scale, type), as(lora_a, type));
  if (!at::isfinite(merged).all().item<bool>()) {
    throw Error(std::string("merge of ") + what + " produced NaN or Inf (hint: the adapter or the base weight holds "
                "non-finite values, or the update overflows the weight's dtype)");
  }
  return rounded(merged, weight.scalar_type());
}

}  // namespace tiedlora::functional
