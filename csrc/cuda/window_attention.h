// Launchers of the CUDA window-attention kernels. Plain CUDA types only, so the kernels compile (and are
// compile-checked in CI) with nvcc alone; the torch glue lives in window_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

namespace fusionblocks {
namespace cuda {

enum class DType { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct WindowProblem {
  int batch, heads, h, w, window, shift, head_dim;
  float scale;
};

// Largest dynamic shared memory one block needs for this problem (bytes), or -1 if unsupported.
long window_smem_bytes(DType dtype, const WindowProblem& p, bool backward);

// q, k, v, out: (B, heads, H*W, D) contiguous in `dtype`. table: ((2ws-1)^2, heads) contiguous in float32
// (float64 when dtype is float64), or nullptr.
cudaError_t window_fwd_launch(DType dtype, const WindowProblem& p, const void* q, const void* k, const void* v,
                              const void* table, void* out, cudaStream_t stream);

// grad, dq, dk, dv like q. dpair: (B * windows, heads, L, L) in float32 (float64 when dtype is float64), or
// nullptr: every window's bias gradient dS, written (no atomics); the caller reduces it into the table in a
// fixed order, so the bias gradient is deterministic.
cudaError_t window_bwd_launch(DType dtype, const WindowProblem& p, const void* grad, const void* q, const void* k,
                              const void* v, const void* table, void* dq, void* dk, void* dv, void* dpair,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace fusionblocks
