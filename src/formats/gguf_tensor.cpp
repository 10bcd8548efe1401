// src/formats/gguf_tensor.cpp: the torch side of the GGUF reader: dequantized tensors as at::Tensor and the
// Llama Q/K un-permutation on tensors. The format work is in gguf.cpp, which has no torch code.
#include "tiedlora/formats/gguf_tensor.h"

#include <ATen/ATen.h>

#include "tiedlora/core/error.h"

namespace tiedlora::formats {

at::Tensor load_gguf_tensor(const GgufFile& file, const std::string& name, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "load_gguf_tensor: dtype must be float32 or bfloat16, got ", dtype);
  const GgufTensorInfo& info = file.tensor(name);
  at::Tensor out = at::empty(info.shape(), at::TensorOptions().dtype(at::kFloat));
  file.dequantize(name, out.data_ptr<float>());
  return dtype == at::kFloat ? out : out.to(dtype);
}

at::Tensor unpermute_llama_qk_rows(const at::Tensor& weight, int64_t n_head) {
  TORCH_CHECK(weight.dim() == 2, "unpermute_llama_qk_rows: expected a 2-D weight, got shape ", weight.sizes());
  const int64_t rows = weight.size(0), cols = weight.size(1);
  TORCH_CHECK(n_head > 0 && rows % n_head == 0 && (rows / n_head) % 2 == 0, "unpermute_llama_qk_rows: ", rows,
              " rows cannot be split into ", n_head, " heads of an even size");
  // The inverse of llama.cpp's permute(): rows (head, pair i, half s) -> (head, half s, pair i).
  return weight.reshape({n_head, rows / n_head / 2, 2, cols}).transpose(1, 2).reshape({rows, cols}).contiguous();
}

}  // namespace tiedlora::formats
