// lora_linear_checks.h (private to core): the argument checks of functional::lora_linear, each refusal
// naming the argument, and the autocast facts it reads.
#pragma once

#include <optional>
#include <vector>

#include <ATen/ATen.h>

#include "tiedlora/core/functional.h"

namespace tiedlora::functional::detail {

/// Input, weight and bias: shapes, floating dtypes, one device, W frozen.
void check_layer(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias);
/// One call: its factors' shapes, dtypes and devices, its rows against the input, its branch input's shape.
void check_call(const at::Tensor& input, const at::Tensor& weight, const AdapterCall& call);
/// Stacked factors against the calls: (N, r, d_in) and (N, d_out, r) with every call's shapes, on their device.
void check_stacked(const StackedFactors& stacked, c10::ArrayRef<AdapterCall> calls);
/// bf16 activations with an fp16 weight (or the reverse) outside autocast are refused.
void check_16bit_pair(const at::Tensor& input, const at::Tensor& weight);
/// autocast's dtype when it is on for `input`'s device.
std::optional<at::ScalarType> autocast_dtype(const at::Tensor& input);

}  // namespace tiedlora::functional::detail
