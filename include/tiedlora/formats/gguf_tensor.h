// tiedlora/formats/gguf_tensor.h: GGUF tensors as at::Tensor (the torch side of tiedlora/formats/gguf.h).
#pragma once

#include <string>

#include <ATen/core/Tensor.h>

#include "tiedlora/formats/gguf.h"

namespace tiedlora::formats {

/// Tensor `name` of `file`, dequantized to float32 and converted to `dtype` (kFloat or kBFloat16), on the
/// CPU, with shape = ne reversed (GGUF's ne[0] is the innermost dimension). Always a fresh tensor.
at::Tensor load_gguf_tensor(const GgufFile& file, const std::string& name, at::ScalarType dtype = at::kFloat);

/// Undoes llama.cpp's converter permutation of Llama Q and K projection rows (it interleaves the two RoPE
/// halves of each head; Hugging Face's rotate_half keeps them apart) on a [rows, cols] tensor of any
/// floating dtype, returning a new tensor of that dtype. rows = n_head * head_dim with head_dim even;
/// n_head is the number of query heads for Q and of KV heads for K.
at::Tensor unpermute_llama_qk_rows(const at::Tensor& weight, int64_t n_head);

}  // namespace tiedlora::formats
