// kernels/lora_merge.cu: W' = W + B_eff A in fp32, rounded once (see lora_merge.cuh). A register-tiled fp32
// kernel: each block owns a 64 x 128 tile of W, runs over the rank in chunks of 32 with the chunk's slices of
// B_eff and A in shared memory, and adds the product to the tile of W it reads once (16 bytes at a time where the rows
// allow, prefetched before the rank loop). Its reference is the ATen path of functional::merge_into
// (src/core/functional.cpp), which test_cuda compares it with. Prediction, not yet measured (docs/cuda.md,
// "Predictions"): memory-bound for small ranks (2 bytes read + 2 written per bf16 element), FFMA-bound from
// about r = 64 on an H100 (r FMAs per element). Built by nvcc for sm_80 and sm_90
// (cmake/TiedloraCuda.cmake); called from src/core/cuda/lora_dispatch.cpp.
#include <cstdint>

#include "element_convert.cuh"
#include "lora_merge.cuh"

namespace tiedlora::kernels {
namespace {

constexpr int kTileRows = 64;   // rows of W (d_out) per block
constexpr int kTileCols = 128;  // columns of W (d_in) per block
constexpr int kRankChunk = 32;  // rank columns staged in shared memory at a time
constexpr int kThreads = 256;   // 16 x 16 threads, each 4 rows x 8 consecutive columns
constexpr int kRowsPerThread = 4;
constexpr int kColsPerThread = 8;
// A's chunk in shared memory has 4 floats of padding after every 32 columns: without it, threads tx and
// tx + 4 of a quarter-warp would read the same banks (their 8-column runs are 32 words apart).
constexpr int kPaddedCols = kTileCols + kTileCols / 32 * 4;
__device__ __forceinline__ int padded(int column) { return column + (column >> 5) * 4; }

// A thread's eight consecutive elements of W travel as raw 16-byte words (one for bf16/fp16, two for fp32),
// loaded before the rank loop so that the memory latency hides behind the arithmetic.
template <typename T>
struct EightElements {
  static constexpr int kWords = sizeof(T) * 8 / 16;
  uint4 words[kWords];

  __device__ __forceinline__ void load(const T* p) {
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = reinterpret_cast<const uint4*>(p)[w];
  }
  __device__ __forceinline__ float get(int i) const { return to_float(reinterpret_cast<const T*>(words)[i]); }
  __device__ __forceinline__ void set(int i, T value) { reinterpret_cast<T*>(words)[i] = value; }
  __device__ __forceinline__ void store(T* p) const {
#pragma unroll
    for (int w = 0; w < kWords; ++w) reinterpret_cast<uint4*>(p)[w] = words[w];
  }
};

__device__ __forceinline__ bool aligned_16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// `weight` and `out` may alias (in place): each element is read and written by the same thread, so they
// carry no __restrict__.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_merge_kernel(const T* weight, long long ld_weight, T* out, long long ld_out, const float* __restrict__ lora_a,
                      long long ld_a, const float* __restrict__ b_eff, long long ld_b, long long d_out, long long d_in,
                      long long rank, int* __restrict__ nonfinite_flag) {
  // a_chunk[j][c] = A[j0 + j, col0 + c]; b_chunk[j][r] = B_eff[row0 + r, j0 + j] (transposed so that a thread's
  // four rows are one 16-byte read).
  __shared__ __align__(16) float a_chunk[kRankChunk][kPaddedCols];
  __shared__ __align__(16) float b_chunk[kRankChunk][kTileRows];

  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const long long row0 = static_cast<long long>(blockIdx.y) * kTileRows;
  const long long col0 = static_cast<long long>(blockIdx.x) * kTileCols;

  // Prefetch this thread's part of the W tile (full, aligned 8-element runs; the ragged edges are read
  // element by element at the end). Safe in place: only this thread writes these elements, afterwards.
  const long long col = col0 + tx * kColsPerThread;
  EightElements<T> w_tile[kRowsPerThread];
  bool vectorized[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const long long row = row0 + ty * kRowsPerThread + i;
    vectorized[i] = row < d_out && col + kColsPerThread <= d_in && aligned_16(weight + row * ld_weight + col) &&
                    aligned_16(out + row * ld_out + col);
    if (vectorized[i]) w_tile[i].load(weight + row * ld_weight + col);
  }

  float acc[kRowsPerThread][kColsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) acc[i][c] = 0.f;
  }

  for (long long j0 = 0; j0 < rank; j0 += kRankChunk) {
    // Stage the chunk; entries past the rank or the matrix edge are zero, so they add nothing.
    for (int idx = tid; idx < kRankChunk * kTileCols; idx += kThreads) {
      const int j = idx / kTileCols, c = idx % kTileCols;  // consecutive threads read consecutive columns of A
      const long long jj = j0 + j, cc = col0 + c;
      a_chunk[j][padded(c)] = (jj < rank && cc < d_in) ? lora_a[jj * ld_a + cc] : 0.f;
    }
    for (int idx = tid; idx < kRankChunk * kTileRows; idx += kThreads) {
      const int r = idx % kTileRows, j = idx / kTileRows;  // conflict-free shared stores; B_eff is small and cached
      const long long rr = row0 + r, jj = j0 + j;
      b_chunk[j][r] = (jj < rank && rr < d_out) ? b_eff[rr * ld_b + jj] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int j = 0; j < kRankChunk; ++j) {
      const float4 b4 = *reinterpret_cast<const float4*>(&b_chunk[j][ty * kRowsPerThread]);
      const float4 a_lo = *reinterpret_cast<const float4*>(&a_chunk[j][padded(tx * kColsPerThread)]);
      const float4 a_hi = *reinterpret_cast<const float4*>(&a_chunk[j][padded(tx * kColsPerThread) + 4]);
      const float b[kRowsPerThread] = {b4.x, b4.y, b4.z, b4.w};
      const float a[kColsPerThread] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
        for (int c = 0; c < kColsPerThread; ++c) acc[i][c] = fmaf(b[i], a[c], acc[i][c]);
      }
    }
    __syncthreads();  // the next chunk overwrites what this one read
  }

  // W' = W + delta, in fp32, rounded once; the flag records any NaN or Inf in the stored value (so an fp16
  // overflow in the rounding counts too).
  bool nonfinite = false;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const long long row = row0 + ty * kRowsPerThread + i;
    if (vectorized[i]) {
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        const T merged = from_float<T>(w_tile[i].get(c) + acc[i][c]);
        nonfinite |= !isfinite(to_float(merged));
        w_tile[i].set(c, merged);
      }
      w_tile[i].store(out + row * ld_out + col);
    } else if (row < d_out) {
      const T* w_row = weight + row * ld_weight + col;
      T* out_row = out + row * ld_out + col;
#pragma unroll
      for (int c = 0; c < kColsPerThread; ++c) {
        if (col + c < d_in) {
          const T merged = from_float<T>(to_float(w_row[c]) + acc[i][c]);
          nonfinite |= !isfinite(to_float(merged));
          out_row[c] = merged;
        }
      }
    }
  }
  if (__any_sync(0xffffffffu, nonfinite) && (tid % 32) == 0) atomicExch(nonfinite_flag, 1);
}

template <typename T>
Status launch_typed(const LoraMergeParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.d_in + kTileCols - 1) / kTileCols),
                  static_cast<unsigned>((p.d_out + kTileRows - 1) / kTileRows));
  lora_merge_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(p.weight), p.ld_weight,
                                                      static_cast<T*>(p.out), p.ld_out, p.lora_a, p.ld_lora_a, p.b_eff,
                                                      p.ld_b_eff, p.d_out, p.d_in, p.rank, p.nonfinite_flag);
  return cuda_status(cudaGetLastError(), "lora_merge: launch");
}

}  // namespace

Status launch_lora_merge(const LoraMergeParams& p, cudaStream_t stream) {
  if (p.d_out < 0 || p.d_in < 0 || p.rank <= 0) return invalid_argument("lora_merge: sizes");
  if (p.d_out == 0 || p.d_in == 0) return {};
  if (!p.weight || !p.out || !p.lora_a || !p.b_eff || !p.nonfinite_flag)
    return invalid_argument("lora_merge: null pointer");
  if (p.ld_weight < p.d_in || p.ld_out < p.d_in || p.ld_lora_a < p.d_in || p.ld_b_eff < p.rank) {
    return invalid_argument("lora_merge: a leading dimension is smaller than its row");
  }
  if (p.out == p.weight && p.ld_out != p.ld_weight) return invalid_argument("lora_merge: in place with two strides");
  if ((p.d_out + kTileRows - 1) / kTileRows > 65535)
    return invalid_argument("lora_merge: d_out too large for the grid");
  switch (p.dtype) {
    case DType::f32: return launch_typed<float>(p, stream);
    case DType::bf16: return launch_typed<__nv_bfloat16>(p, stream);
    case DType::f16: return launch_typed<__half>(p, stream);
  }
  return invalid_argument("lora_merge: dtype");
}

}  // namespace tiedlora::kernels
