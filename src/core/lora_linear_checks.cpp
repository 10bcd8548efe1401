// lora_linear_checks.cpp: the argument checks of functional::lora_linear (lora_linear_checks.h).
#include "core/lora_linear_checks.h"

#include <string>
#include <utility>

#include <ATen/autocast_mode.h>

namespace tiedlora::functional::detail {
namespace {

c10::IntArrayRef sizes_of(const at::Tensor& t) { return t.defined() ? t.sizes() : at::IntArrayRef{}; }

void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "lora_linear: ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

void check_same_device(const at::Tensor& t, const at::Tensor& weight, const char* name) {
  TORCH_CHECK(t.device() == weight.device(), "lora_linear: ", name, " is on ", t.device(), " but weight is on ",
              weight.device());
}

// The shape of the input's rows that `rows` selects.

std::vector<int64_t> rows_shape(const at::Tensor& input, const AdapterRows& rows) {
  auto shape = input.sizes().vec();
  if (rows.index.defined())
    shape[0] = rows.index.numel();
  else if (rows.begin >= 0)
    shape[0] = rows.end - rows.begin;
  return shape;
}

}  // namespace

void check_layer(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(weight.defined() && weight.dim() == 2, "lora_linear: weight must be 2-D (d_out, d_in), got ",
              sizes_of(weight));
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(input.defined() && input.dim() >= 1 && input.size(-1) == in,
              "lora_linear: input's last dimension must be d_in = ", in, ", got input of shape ", sizes_of(input));
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == out), "lora_linear: bias must be (d_out = ", out,
              "), got ", sizes_of(bias));
  TORCH_CHECK(!weight.requires_grad(),
              "lora_linear: weight requires grad, but the base weight of an adapted layer is frozen and gets no "
              "gradient (call weight.requires_grad_(false))");
  check_floating(input, "input");
  check_floating(weight, "weight");
  check_same_device(input, weight, "input");
  if (bias.defined()) check_same_device(bias, weight, "bias");
}

void check_call(const at::Tensor& input, const at::Tensor& weight, const AdapterCall& call) {
  const LowRankUpdate& update = call.update;
  const at::Tensor &lora_a = update.lora_a, &lora_b = update.lora_b, &u = update.u, &v = update.v;
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(lora_a.defined() && lora_a.dim() == 2 && lora_a.size(1) == in,
              "lora_linear: lora_a must be (r, d_in = ", in, "), got ", sizes_of(lora_a));
  const int64_t r = lora_a.size(0);
  TORCH_CHECK(r > 0, "lora_linear: rank must be positive");
  TORCH_CHECK(lora_b.defined() && lora_b.dim() == 2 && lora_b.size(0) == out && lora_b.size(1) == r,
              "lora_linear: lora_b must be (d_out = ", out, ", r = ", r, "), got ", sizes_of(lora_b));
  TORCH_CHECK(!u.defined() || (u.dim() == 1 && u.size(0) == r), "lora_linear: u must be (r = ", r, "), got ",
              sizes_of(u));
  TORCH_CHECK(!v.defined() || (v.dim() == 1 && v.size(0) == out), "lora_linear: v must be (d_out = ", out, "), got ",
              sizes_of(v));
  check_floating(lora_a, "lora_a");
  check_floating(lora_b, "lora_b");
  check_same_device(lora_a, weight, "lora_a");
  check_same_device(lora_b, weight, "lora_b");
  if (u.defined()) check_same_device(u, weight, "u");
  if (v.defined()) check_same_device(v, weight, "v");
  const AdapterRows& rows = call.rows;
  if (!rows.every_row()) {
    TORCH_CHECK(input.dim() >= 2, "lora_linear: input must have a batch dimension to route rows, got shape ",
                input.sizes());
  }
  if (rows.index.defined()) {
    TORCH_CHECK(rows.index.dim() == 1 && rows.index.scalar_type() == at::kLong && rows.index.device() == input.device(),
                "lora_linear: rows must be a 1-D int64 tensor on the input's device, got ", rows.index.sizes(), " ",
                rows.index.scalar_type(), " on ", rows.index.device());
  } else if (rows.begin >= 0) {
    TORCH_CHECK(rows.begin < rows.end && rows.end <= input.size(0), "lora_linear: rows [", rows.begin, ", ", rows.end,
                ") are not a non-empty range of the input's ", input.size(0), " rows");
  }
  if (call.adapter_input.defined()) {
    const auto expected = rows_shape(input, rows);
    TORCH_CHECK(call.adapter_input.sizes() == at::IntArrayRef(expected),
                "lora_linear: adapter_input must have the shape ", at::IntArrayRef(expected),
                " of the input's rows it replaces, got ", call.adapter_input.sizes());
    check_floating(call.adapter_input, "adapter_input");
    check_same_device(call.adapter_input, weight, "adapter_input");
  }
}

// autocast's dtype when it is on for `input`'s device.

std::optional<at::ScalarType> autocast_dtype(const at::Tensor& input) {
  const auto device_type = input.device().type();
  if ((device_type == at::kCPU || device_type == at::kCUDA) && at::autocast::is_autocast_enabled(device_type)) {
    return at::autocast::get_autocast_dtype(device_type);
  }
  return std::nullopt;
}

void check_stacked(const StackedFactors& stacked, c10::ArrayRef<AdapterCall> calls) {
  const auto n = static_cast<int64_t>(calls.size());
  for (const auto& [stack, name] : {std::pair{&stacked.lora_a, "lora_a"}, std::pair{&stacked.lora_b, "lora_b"}}) {
    TORCH_CHECK(stack->defined() && stack->dim() == 3 && stack->size(0) == n, "lora_linear: stacked.", name,
                " must hold the factors of the ", n, " calls (", n, ", ...), got shape ", sizes_of(*stack),
                " (hint: StackedFactors::of(calls, dtype))");
    for (int64_t k = 0; k < n; ++k) {
      const at::Tensor& factor = std::string(name) == "lora_a" ? calls[k].update.lora_a : calls[k].update.lora_b;
      TORCH_CHECK(stack->sizes().slice(1).equals(factor.sizes()) && stack->device() == factor.device(),
                  "lora_linear: stacked.", name, "[", k, "] is ", stack->sizes().slice(1), " on ", stack->device(),
                  " but call ", k, "'s ", name, " is ", factor.sizes(), " on ", factor.device(),
                  " (hint: StackedFactors::of(calls, dtype))");
    }
  }
}

void check_16bit_pair(const at::Tensor& input, const at::Tensor& weight) {
  const auto reduced = [](at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; };
  TORCH_CHECK(
      !(reduced(input.scalar_type()) && reduced(weight.scalar_type()) && input.scalar_type() != weight.scalar_type()),
      "lora_linear: input is ", input.scalar_type(), " but weight is ", weight.scalar_type(),
      "; the frozen matmul runs in the weight's dtype, and converting one 16-bit format into the other can "
      "overflow or lose precision (hint: load the model in the activations' dtype, or use autocast)");
}

}  // namespace tiedlora::functional::detail
