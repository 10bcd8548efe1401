// activation_checkpoint.h: activation checkpointing of one block of a model (CausalLM's
// set_activation_checkpointing). LibTorch has no torch.utils.checkpoint; this is its recompute-in-backward
// idea as a custom autograd function.
#pragma once

#include <functional>
#include <vector>

#include <ATen/core/Tensor.h>

namespace tiedlora::llm::models::detail {

using BlockFunction = std::function<at::Tensor(const at::Tensor&)>;

/// block(x), keeping only x for the backward pass: there, block(x) runs again with gradients and its
/// gradients flow into x and into `trainable` (every parameter that requires a gradient and that the block
/// may use, shared ones included; unused ones get none). The random state (CPU, and x's CUDA device) is
/// replayed for the recomputation, so adapter dropout draws the same masks and the gradients are those of
/// the plain block. The block must not keep state between calls (no KV cache).
at::Tensor checkpointed(BlockFunction block, const at::Tensor& x, const std::vector<at::Tensor>& trainable);

}  // namespace tiedlora::llm::models::detail
