// tiedlora/formats/gguf_tensor.h: GGUF tensors as at::Tensor (the torch side of tiedlora/formats/gguf.h).
#pragma once

#include <string>

#include <ATen/core/Tensor.h>

#include "tiedlora/formats/gguf.h"

namespace tiedlora::io {

/// Tensor `name` of `file`, dequantized to float32 and converted to `dtype` (kFloat or kBFloat16), on the
/// CPU, with shape = ne reversed (GGUF's ne[0] is the innermost dimension). Always a fresh tensor.
at::Tensor load_gguf_tensor(const GgufFile& file, const std::string& name, at::ScalarType dtype = at::kFloat);

/// unpermute_llama_qk_rows() on a [rows, cols] tensor of any floating dtype (returns a new tensor of the
/// same dtype): llama.cpp's Q/K row order back to Hugging Face's rotate_half order. n_head is the number of
/// query heads for Q and of KV heads for K.
at::Tensor unpermute_llama_qk_rows(const at::Tensor& weight, int64_t n_head);

}  // namespace tiedlora::io
