// kernels/lora_gemm.cu: the cuBLASLt path of the adapted linear layer (see lora_gemm.cuh): one row-major
// matmul wrapper with cached handles, workspaces and algorithms, and the forward and backward passes built
// from it. Built by nvcc for sm_80 and sm_90 (cmake/TiedloraCuda.cmake) into tiedlora_kernels, linked with
// cuBLASLt; called from src/core/cuda/lora_dispatch.cpp and the CUDA benchmark.
#include <cstdint>
#include <cstdio>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include <cublasLt.h>

#include "element_convert.cuh"
#include "lora_gemm.cuh"

namespace tiedlora::kernels {

const char* describe(const Status& status, char* buffer, int buffer_size) {
  const char* code = "ok";
  const char* library = "";
  switch (status.code) {
    case StatusCode::ok: break;
    case StatusCode::invalid_argument: code = "invalid argument"; break;
    case StatusCode::cuda_error:
      code = "CUDA error";
      library = cudaGetErrorString(static_cast<cudaError_t>(status.detail));
      break;
    case StatusCode::cublas_error:
      code = "cuBLASLt error";
      library = cublasLtGetStatusString(static_cast<cublasStatus_t>(status.detail));
      break;
    case StatusCode::no_algorithm: code = "cuBLASLt offers no algorithm"; break;
  }
  std::snprintf(buffer, static_cast<size_t>(buffer_size), "%s%s%s (at %s)", code, library[0] ? ": " : "", library,
                status.where ? status.where : "?");
  return buffer;
}

namespace {

// ==================================================================================================
// Caches: one cuBLASLt handle per device, one workspace per (device, stream), one algorithm per problem.
// Entries live as long as the process: freeing them from static destructors would race the CUDA runtime's
// own teardown (PyTorch keeps its handles the same way).
// ==================================================================================================

constexpr size_t kWorkspaceBytes = size_t{32} << 20;  // what cuBLAS recommends for Hopper

struct Caches {
  std::mutex mutex;
  std::map<int, cublasLtHandle_t> handles;
  std::map<std::pair<int, cudaStream_t>, void*> workspaces;
  std::map<std::vector<long long>, cublasLtMatmulAlgo_t> algorithms;
};

Caches& caches() {
  static Caches* instance = new Caches();  // never destroyed, see above
  return *instance;
}

Status cublas_status(cublasStatus_t status, const char* where) {
  return status == CUBLAS_STATUS_SUCCESS ? Status{} : Status{StatusCode::cublas_error, static_cast<int>(status), where};
}

Status handle_for_current_device(cublasLtHandle_t* handle, int* device) {
  if (Status s = cuda_status(cudaGetDevice(device), "cudaGetDevice"); !s.ok()) return s;
  Caches& c = caches();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto found = c.handles.find(*device);
  if (found == c.handles.end()) {
    cublasLtHandle_t created = nullptr;
    if (Status s = cublas_status(cublasLtCreate(&created), "cublasLtCreate"); !s.ok()) return s;
    found = c.handles.emplace(*device, created).first;
  }
  *handle = found->second;
  return {};
}

// A workspace is tied to a stream: two streams running matmuls at once must not share one.
Status cached_workspace(int device, cudaStream_t stream, void** workspace) {
  Caches& c = caches();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto found = c.workspaces.find({device, stream});
  if (found == c.workspaces.end()) {
    void* allocated = nullptr;
    if (Status s = cuda_status(cudaMalloc(&allocated, kWorkspaceBytes), "cudaMalloc (cuBLASLt workspace)"); !s.ok()) {
      return s;
    }
    found = c.workspaces.emplace(std::make_pair(device, stream), allocated).first;
  }
  *workspace = found->second;
  return {};
}

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::f32: return CUDA_R_32F;
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
  }
  return CUDA_R_32F;
}

// The largest power of two up to 256 dividing both the address and the row pitch in bytes: cuBLASLt's
// heuristics otherwise assume 256-byte aligned operands, which a row-strided view need not be.
uint32_t alignment_bytes(const void* pointer, long long ld, DType dtype) {
  const auto address = reinterpret_cast<uintptr_t>(pointer);
  const auto pitch = static_cast<uintptr_t>(ld) * static_cast<uintptr_t>(dtype_bytes(dtype));
  uint32_t alignment = 256;
  while (alignment > 1 && ((address | pitch) % alignment) != 0) alignment /= 2;
  return alignment;
}

// RAII owners of the cuBLASLt descriptors of one call.
struct MatmulDescriptors {
  cublasLtMatmulDesc_t operation = nullptr;
  cublasLtMatrixLayout_t first = nullptr, second = nullptr, output = nullptr;
  cublasLtMatmulPreference_t preference = nullptr;
  ~MatmulDescriptors() {
    if (preference) cublasLtMatmulPreferenceDestroy(preference);
    if (output) cublasLtMatrixLayoutDestroy(output);
    if (second) cublasLtMatrixLayoutDestroy(second);
    if (first) cublasLtMatrixLayoutDestroy(first);
    if (operation) cublasLtMatmulDescDestroy(operation);
  }
};

// ==================================================================================================
// Bias fallback: C[i, :] = bias, for the few problems where cuBLASLt has no bias epilogue algorithm.
// ==================================================================================================

template <typename T>
__global__ void broadcast_bias_rows_kernel(const T* __restrict__ bias, T* __restrict__ c, long long rows,
                                           long long cols, long long ldc) {
  const long long total = rows * cols;
  for (long long idx = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long i = idx / cols, j = idx - i * cols;
    c[i * ldc + j] = bias[j];
  }
}

Status broadcast_bias_rows(const MatmulParams& p, cudaStream_t stream) {
  constexpr int threads = 256;
  const long long wanted = (p.m * p.n + threads - 1) / threads;
  const int blocks = static_cast<int>(wanted < 65535 ? wanted : 65535);
  switch (p.output_dtype) {
    case DType::f32:
      broadcast_bias_rows_kernel<<<blocks, threads, 0, stream>>>(static_cast<const float*>(p.bias),
                                                                 static_cast<float*>(p.c), p.m, p.n, p.ldc);
      break;
    case DType::bf16:
      broadcast_bias_rows_kernel<<<blocks, threads, 0, stream>>>(static_cast<const __nv_bfloat16*>(p.bias),
                                                                 static_cast<__nv_bfloat16*>(p.c), p.m, p.n, p.ldc);
      break;
    case DType::f16:
      broadcast_bias_rows_kernel<<<blocks, threads, 0, stream>>>(static_cast<const __half*>(p.bias),
                                                                 static_cast<__half*>(p.c), p.m, p.n, p.ldc);
      break;
  }
  return cuda_status(cudaGetLastError(), "matmul: bias broadcast");
}

// ==================================================================================================
// The matmul. Row-major D (m x n) = op(A) op(B) is column-major D^T (n x m) = op(B)^T op(A)^T, so B is
// cuBLASLt's first operand and A its second; a row-major matrix with leading dimension ld is the
// column-major transpose with the same ld.
// ==================================================================================================

Status matmul_with_epilogue(const MatmulParams& p, bool bias_epilogue, cudaStream_t stream) {
  cublasLtHandle_t handle = nullptr;
  int device = 0;
  if (Status s = handle_for_current_device(&handle, &device); !s.ok()) return s;
  void* workspace = p.workspace;
  size_t workspace_bytes = p.workspace_bytes;
  if (!workspace) {
    if (Status s = cached_workspace(device, stream, &workspace); !s.ok()) return s;
    workspace_bytes = kWorkspaceBytes;
  }

  MatmulDescriptors d;
  const cudaDataType_t in_type = cuda_type(p.input_dtype), out_type = cuda_type(p.output_dtype);
  if (Status s = cublas_status(cublasLtMatmulDescCreate(&d.operation, CUBLAS_COMPUTE_32F, CUDA_R_32F),
                               "cublasLtMatmulDescCreate");
      !s.ok()) {
    return s;
  }
  const int32_t op_first = p.transpose_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const int32_t op_second = p.transpose_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  const uint32_t epilogue = bias_epilogue ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  const int32_t bias_type = out_type;
  cublasStatus_t st =
      cublasLtMatmulDescSetAttribute(d.operation, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first));
  if (st == CUBLAS_STATUS_SUCCESS) {
    st = cublasLtMatmulDescSetAttribute(d.operation, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second));
  }
  if (st == CUBLAS_STATUS_SUCCESS) {
    st = cublasLtMatmulDescSetAttribute(d.operation, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue));
  }
  if (st == CUBLAS_STATUS_SUCCESS && bias_epilogue) {
    st = cublasLtMatmulDescSetAttribute(d.operation, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &p.bias, sizeof(p.bias));
    if (st == CUBLAS_STATUS_SUCCESS) {
      st = cublasLtMatmulDescSetAttribute(d.operation, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                          sizeof(bias_type));
    }
  }
  if (Status s = cublas_status(st, "cublasLtMatmulDescSetAttribute"); !s.ok()) return s;

  // Column-major shapes (rows, cols) of the stored operands, see the banner above.
  const auto m = static_cast<uint64_t>(p.m), n = static_cast<uint64_t>(p.n), k = static_cast<uint64_t>(p.k);
  st = cublasLtMatrixLayoutCreate(&d.first, in_type, p.transpose_b ? k : n, p.transpose_b ? n : k, p.ldb);
  if (st == CUBLAS_STATUS_SUCCESS) {
    st = cublasLtMatrixLayoutCreate(&d.second, in_type, p.transpose_a ? m : k, p.transpose_a ? k : m, p.lda);
  }
  if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatrixLayoutCreate(&d.output, out_type, n, m, p.ldc);
  if (Status s = cublas_status(st, "cublasLtMatrixLayoutCreate"); !s.ok()) return s;

  const uint32_t align_first = alignment_bytes(p.b, p.ldb, p.input_dtype);
  const uint32_t align_second = alignment_bytes(p.a, p.lda, p.input_dtype);
  const uint32_t align_output = alignment_bytes(p.c, p.ldc, p.output_dtype);
  const std::vector<long long> key = {device,
                                      static_cast<long long>(p.input_dtype),
                                      static_cast<long long>(p.output_dtype),
                                      p.m,
                                      p.n,
                                      p.k,
                                      p.lda,
                                      p.ldb,
                                      p.ldc,
                                      p.transpose_a,
                                      p.transpose_b,
                                      bias_epilogue,
                                      p.beta != 0.f,
                                      align_first,
                                      align_second,
                                      align_output,
                                      static_cast<long long>(workspace_bytes)};
  cublasLtMatmulAlgo_t algorithm{};
  bool cached = false;
  {
    Caches& c = caches();
    std::lock_guard<std::mutex> lock(c.mutex);
    auto found = c.algorithms.find(key);
    if (found != c.algorithms.end()) {
      algorithm = found->second;
      cached = true;
    }
  }
  if (!cached) {
    st = cublasLtMatmulPreferenceCreate(&d.preference);
    const uint64_t max_workspace = workspace_bytes;
    if (st == CUBLAS_STATUS_SUCCESS) {
      st = cublasLtMatmulPreferenceSetAttribute(d.preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace,
                                                sizeof(max_workspace));
    }
    const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> alignments[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_first},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_second},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_output},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_output}};
    for (const auto& [attribute, value] : alignments) {
      if (st == CUBLAS_STATUS_SUCCESS)
        st = cublasLtMatmulPreferenceSetAttribute(d.preference, attribute, &value, sizeof(value));
    }
    if (Status s = cublas_status(st, "cublasLtMatmulPreference"); !s.ok()) return s;
    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    st = cublasLtMatmulAlgoGetHeuristic(handle, d.operation, d.first, d.second, d.output, d.output, d.preference, 1,
                                        &result, &returned);
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || (st == CUBLAS_STATUS_SUCCESS && returned == 0)) {
      return {StatusCode::no_algorithm, 0, "cublasLtMatmulAlgoGetHeuristic"};
    }
    if (Status s = cublas_status(st, "cublasLtMatmulAlgoGetHeuristic"); !s.ok()) return s;
    algorithm = result.algo;
    Caches& c = caches();
    std::lock_guard<std::mutex> lock(c.mutex);
    c.algorithms.emplace(key, algorithm);
  }

  // C and D are the same buffer: with beta = 1 the product accumulates into what the output holds.
  return cublas_status(cublasLtMatmul(handle, d.operation, &p.alpha, p.b, d.first, p.a, d.second, &p.beta, p.c,
                                      d.output, p.c, d.output, &algorithm, workspace, workspace_bytes, stream),
                       "cublasLtMatmul");
}

bool aligned_16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

}  // namespace

size_t lt_workspace_bytes() { return kWorkspaceBytes; }

Status matmul(const MatmulParams& p, cudaStream_t stream) {
  if (p.m < 0 || p.n < 0 || p.k < 0) return invalid_argument("matmul: negative size");
  if (p.m == 0 || p.n == 0) return {};
  if (p.k == 0) return invalid_argument("matmul: k = 0");
  if (!p.a || !p.b || !p.c) return invalid_argument("matmul: null operand");
  if (p.output_dtype != p.input_dtype && p.output_dtype != DType::f32) {
    return invalid_argument("matmul: the output dtype must be the input dtype or fp32");
  }
  if (p.lda < (p.transpose_a ? p.m : p.k) || p.ldb < (p.transpose_b ? p.k : p.n) || p.ldc < p.n) {
    return invalid_argument("matmul: a leading dimension is smaller than its row");
  }
  if (p.workspace && p.workspace_bytes == 0) return invalid_argument("matmul: workspace of 0 bytes");
  if (!p.bias) return matmul_with_epilogue(p, false, stream);
  if (aligned_16(p.bias)) {
    const Status fused = matmul_with_epilogue(p, true, stream);
    if (fused.code != StatusCode::no_algorithm) return fused;
  }
  // No bias epilogue for this problem: write the bias into C first, then accumulate the product onto it.
  if (p.beta != 0.f) return invalid_argument("matmul: bias with beta != 0 needs the bias epilogue");
  if (Status s = broadcast_bias_rows(p, stream); !s.ok()) return s;
  MatmulParams accumulate = p;
  accumulate.bias = nullptr;
  accumulate.beta = 1.f;
  return matmul_with_epilogue(accumulate, false, stream);
}

// ==================================================================================================
// The adapted layer's passes.
// ==================================================================================================

namespace {

MatmulParams gemm(DType in, DType out, long long m, long long n, long long k, const void* a, long long lda,
                  bool transpose_a, const void* b, long long ldb, bool transpose_b, void* c, long long ldc, float beta,
                  void* workspace, size_t workspace_bytes) {
  MatmulParams p;
  p.input_dtype = in;
  p.output_dtype = out;
  p.m = m;
  p.n = n;
  p.k = k;
  p.a = a;
  p.lda = lda;
  p.transpose_a = transpose_a;
  p.b = b;
  p.ldb = ldb;
  p.transpose_b = transpose_b;
  p.c = c;
  p.ldc = ldc;
  p.beta = beta;
  p.workspace = workspace;
  p.workspace_bytes = workspace_bytes;
  return p;
}

Status located(Status s, const char* where) {
  if (!s.ok() && s.code != StatusCode::invalid_argument) s.where = where;
  return s;
}

}  // namespace

Status lora_forward(const LoraForwardParams& p, cudaStream_t stream) {
  if (p.m < 0 || p.d_in <= 0 || p.d_out <= 0 || p.rank <= 0) return invalid_argument("lora_forward: sizes");
  if (p.m == 0) return {};  // before the pointer checks: an empty batch may have null data pointers
  if (!p.x || !p.weight || !p.lora_a || !p.b_eff || !p.y || !p.h) return invalid_argument("lora_forward: null pointer");
  const DType t = p.dtype;
  const void* xa = p.adapter_x ? p.adapter_x : p.x;
  const long long ld_xa = p.adapter_x ? p.ld_adapter_x : p.ld_x;

  // h = x_a A^T (m x r), fp32 accumulation, rounded once to the activation dtype.
  Status s = matmul(gemm(t, t, p.m, p.rank, p.d_in, xa, ld_xa, false, p.lora_a, p.ld_lora_a, true, p.h, p.ld_h, 0.f,
                         p.workspace, p.workspace_bytes),
                    stream);
  if (!s.ok()) return located(s, "forward: h = x_a A^T");
  // y = x W^T + bias (the bias in cuBLASLt's epilogue).
  MatmulParams frozen = gemm(t, t, p.m, p.d_out, p.d_in, p.x, p.ld_x, false, p.weight, p.ld_weight, true, p.y, p.ld_y,
                             0.f, p.workspace, p.workspace_bytes);
  frozen.bias = p.bias;
  s = matmul(frozen, stream);
  if (!s.ok()) return located(s, "forward: y = x W^T + bias");
  // y += h B_eff^T into the same output (beta = 1).
  s = matmul(gemm(t, t, p.m, p.d_out, p.rank, p.h, p.ld_h, false, p.b_eff, p.ld_b_eff, true, p.y, p.ld_y, 1.f,
                  p.workspace, p.workspace_bytes),
             stream);
  return located(s, "forward: y += h B_eff^T");
}

Status lora_backward(const LoraBackwardParams& p, cudaStream_t stream) {
  if (p.m < 0 || p.d_in <= 0 || p.d_out <= 0 || p.rank <= 0) return invalid_argument("lora_backward: sizes");
  if (p.m == 0) {  // the fp32 gradients are sums over no rows (the empty row-sized buffers may be null)
    if (p.grad_lora_a) {
      if (Status s = cuda_status(cudaMemset2DAsync(p.grad_lora_a, p.ld_grad_lora_a * sizeof(float), 0,
                                                   p.d_in * sizeof(float), p.rank, stream),
                                 "backward: dA = 0");
          !s.ok()) {
        return s;
      }
    }
    if (p.grad_b_eff) {
      return cuda_status(
          cudaMemset2DAsync(p.grad_b_eff, p.ld_grad_b_eff * sizeof(float), 0, p.rank * sizeof(float), p.d_out, stream),
          "backward: dB_eff = 0");
    }
    return {};
  }
  if (!p.grad_y || !p.weight || !p.lora_a || !p.b_eff || !p.h) return invalid_argument("lora_backward: null input");
  if (p.grad_adapter_x && !p.adapter_x) return invalid_argument("lora_backward: grad_adapter_x without adapter_x");
  const bool need_grad_h = p.grad_x || p.grad_adapter_x || p.grad_lora_a;
  if (need_grad_h && !p.grad_h) return invalid_argument("lora_backward: grad_h scratch missing");
  const DType t = p.dtype;
  void* ws = p.workspace;
  const size_t ws_bytes = p.workspace_bytes;

  Status s;
  if (need_grad_h) {  // dH = dY B_eff (m x r)
    s = matmul(gemm(t, t, p.m, p.rank, p.d_out, p.grad_y, p.ld_grad_y, false, p.b_eff, p.ld_b_eff, false, p.grad_h,
                    p.ld_grad_h, 0.f, ws, ws_bytes),
               stream);
    if (!s.ok()) return located(s, "backward: dH = dY B_eff");
  }
  if (p.grad_b_eff) {  // dB_eff = dY^T h (d_out x r), fp32
    s = matmul(gemm(t, DType::f32, p.d_out, p.rank, p.m, p.grad_y, p.ld_grad_y, true, p.h, p.ld_h, false, p.grad_b_eff,
                    p.ld_grad_b_eff, 0.f, ws, ws_bytes),
               stream);
    if (!s.ok()) return located(s, "backward: dB_eff = dY^T h");
  }
  if (p.grad_x) {  // dX = dY W, then += dH A when x also feeds the low-rank branch
    s = matmul(gemm(t, t, p.m, p.d_in, p.d_out, p.grad_y, p.ld_grad_y, false, p.weight, p.ld_weight, false, p.grad_x,
                    p.ld_grad_x, 0.f, ws, ws_bytes),
               stream);
    if (!s.ok()) return located(s, "backward: dX = dY W");
    if (!p.adapter_x) {
      s = matmul(gemm(t, t, p.m, p.d_in, p.rank, p.grad_h, p.ld_grad_h, false, p.lora_a, p.ld_lora_a, false, p.grad_x,
                      p.ld_grad_x, 1.f, ws, ws_bytes),
                 stream);
      if (!s.ok()) return located(s, "backward: dX += dH A");
    }
  }
  if (p.grad_adapter_x) {  // d x_a = dH A
    s = matmul(gemm(t, t, p.m, p.d_in, p.rank, p.grad_h, p.ld_grad_h, false, p.lora_a, p.ld_lora_a, false,
                    p.grad_adapter_x, p.ld_grad_adapter_x, 0.f, ws, ws_bytes),
               stream);
    if (!s.ok()) return located(s, "backward: d x_a = dH A");
  }
  if (p.grad_lora_a) {  // dA = dH^T x_a (r x d_in), fp32
    const void* xa = p.adapter_x ? p.adapter_x : p.x;
    const long long ld_xa = p.adapter_x ? p.ld_adapter_x : p.ld_x;
    if (!xa) return invalid_argument("lora_backward: dA needs x");
    s = matmul(gemm(t, DType::f32, p.rank, p.d_in, p.m, p.grad_h, p.ld_grad_h, true, xa, ld_xa, false, p.grad_lora_a,
                    p.ld_grad_lora_a, 0.f, ws, ws_bytes),
               stream);
    if (!s.ok()) return located(s, "backward: dA = dH^T x_a");
  }
  return {};
}

}  // namespace tiedlora::kernels
