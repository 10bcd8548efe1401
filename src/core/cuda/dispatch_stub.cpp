// dispatch_stub.cpp: compiled instead of the CUDA dispatch files when tiedlora is built without CUDA.
// Every entry point throws a clear error; the CPU path never calls them.
#include "core/cuda/dispatch.h"
#include "tiedlora/core/error.h"

namespace tiedlora::cuda {
namespace {

[[noreturn]] void built_without_cuda() {
  throw Error(
      "tiedlora was built without CUDA (configure with -DTIEDLORA_CUDA=ON on a machine with nvcc and a "
      "CUDA LibTorch)");
}

}  // namespace

bool available() { return false; }

at::Tensor effective_b(const at::Tensor&, const at::Tensor&, const at::Tensor&, double, at::ScalarType) {
  built_without_cuda();
}

void lora_forward_out(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  built_without_cuda();
}

void lora_backward_out(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&) {
  built_without_cuda();
}

at::Tensor merge_weight_out(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&) {
  built_without_cuda();
}

}  // namespace tiedlora::cuda
