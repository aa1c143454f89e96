// Swin (shifted) window attention in CUDA: one thread block per (window, head, batch element).
//
// The block reads its ws*ws tokens straight from the raster-order (B, heads, H*W, D) tensors: the cyclic
// shift and the window partition are index arithmetic, so no rolled or partitioned copy exists. q, k, v
// (and dO in the backward) sit in shared memory with the L x L score matrix; the relative-position bias
// is gathered from the table and the -100 shift mask computed from region ids inside the kernel.
// Math runs in float32 (float64 for float64 inputs); float16 / bfloat16 are read and written as such.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "window_attention.h"

namespace fusionblocks {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxWindow = 8;     // L = ws * ws <= 64 tokens
constexpr int kMaxHeadDim = 128;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(typename Acc<T>::type x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

struct Geometry {
  int h, w, ws, shift, nwx;
  __device__ __forceinline__ int token(int win, int l) const {
    const int sy = (win / nwx) * ws + l / ws, sx = (win % nwx) * ws + l % ws;
    return ((sy + shift) % h) * w + (sx + shift) % w;
  }
  __device__ __forceinline__ int region(int win, int l) const {
    const int sy = (win / nwx) * ws + l / ws, sx = (win % nwx) * ws + l % ws;
    return ((sy >= h - ws) + (sy >= h - shift)) * 3 + (sx >= w - ws) + (sx >= w - shift);
  }
  __device__ __forceinline__ int rel_index(int i, int j) const {
    return (i / ws - j / ws + ws - 1) * (2 * ws - 1) + (i % ws - j % ws + ws - 1);
  }
};

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// Loads rows of the window into shared memory; q rows pre-multiplied by scale.
template <typename T, typename A>
__device__ void load_window(const T* src, A* dst, const Geometry& g, int win, int len, int d, A mul) {
  for (int idx = threadIdx.x; idx < len * d; idx += blockDim.x) {
    const int l = idx / d, c = idx - l * d;
    dst[idx] = to_acc(src[static_cast<long>(g.token(win, l)) * d + c]) * mul;
  }
}

// s = (scale q) k^T + bias + mask, then row softmax in place; one warp per row.
template <typename A>
__device__ void scores_softmax(const A* qs, const A* ks, A* s, const A* table, const Geometry& g, int win, int head,
                               int heads, int len, int d) {
  for (int idx = threadIdx.x; idx < len * len; idx += blockDim.x) {
    const int i = idx / len, j = idx - i * len;
    A acc = 0;
    for (int c = 0; c < d; ++c) acc += qs[i * d + c] * ks[j * d + c];
    if (table != nullptr) acc += table[g.rel_index(i, j) * heads + head];
    if (g.shift > 0 && g.region(win, i) != g.region(win, j)) acc += A(-100);
    s[idx] = acc;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  for (int i = warp; i < len; i += nwarps) {
    A* row = s + i * len;
    A m = -1e30;
    for (int j = lane; j < len; j += 32) m = max(m, row[j]);
    m = warp_max(m);
    A z = 0;
    for (int j = lane; j < len; j += 32) {
      const A e = exp_acc(row[j] - m);
      row[j] = e;
      z += e;
    }
    z = warp_sum(z);
    const A inv = A(1) / z;
    for (int j = lane; j < len; j += 32) row[j] *= inv;
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) window_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k,
                                                               const T* __restrict__ v,
                                                               const typename Acc<T>::type* __restrict__ table,
                                                               T* __restrict__ out, WindowProblem p) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int len = p.window * p.window, d = p.head_dim;
  A* qs = smem;
  A* ks = qs + len * d;
  A* vs = ks + len * d;
  A* s = vs + len * d;
  const Geometry g{p.h, p.w, p.window, p.shift, p.w / p.window};
  const int win = blockIdx.x, head = blockIdx.y, b = blockIdx.z;
  const long base = (static_cast<long>(b) * p.heads + head) * static_cast<long>(p.h) * p.w * d;
  load_window(q + base, qs, g, win, len, d, static_cast<A>(p.scale));
  load_window(k + base, ks, g, win, len, d, A(1));
  load_window(v + base, vs, g, win, len, d, A(1));
  __syncthreads();
  scores_softmax(qs, ks, s, table, g, win, head, p.heads, len, d);
  for (int idx = threadIdx.x; idx < len * d; idx += blockDim.x) {
    const int i = idx / d, c = idx - i * d;
    A acc = 0;
    for (int j = 0; j < len; ++j) acc += s[i * len + j] * vs[j * d + c];
    out[base + static_cast<long>(g.token(win, i)) * d + c] = from_acc<T>(acc);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    window_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ q, const T* __restrict__ k,
                      const T* __restrict__ v, const typename Acc<T>::type* __restrict__ table, T* __restrict__ dq,
                      T* __restrict__ dk, T* __restrict__ dv, typename Acc<T>::type* __restrict__ dpair,
                      WindowProblem p) {
  using A = typename Acc<T>::type;
  extern __shared__ unsigned char smem_raw[];
  A* smem = reinterpret_cast<A*>(smem_raw);
  const int len = p.window * p.window, d = p.head_dim;
  A* qs = smem;
  A* ks = qs + len * d;
  A* vs = ks + len * d;
  A* gs = vs + len * d;
  A* s = gs + len * d;
  A* ds = s + len * len;
  const Geometry g{p.h, p.w, p.window, p.shift, p.w / p.window};
  const int win = blockIdx.x, head = blockIdx.y, b = blockIdx.z;
  const long base = (static_cast<long>(b) * p.heads + head) * static_cast<long>(p.h) * p.w * d;
  const A scale = static_cast<A>(p.scale);
  load_window(q + base, qs, g, win, len, d, scale);
  load_window(k + base, ks, g, win, len, d, A(1));
  load_window(v + base, vs, g, win, len, d, A(1));
  load_window(grad + base, gs, g, win, len, d, A(1));
  __syncthreads();
  scores_softmax(qs, ks, s, table, g, win, head, p.heads, len, d);
  // dP = dO V^T
  for (int idx = threadIdx.x; idx < len * len; idx += blockDim.x) {
    const int i = idx / len, j = idx - i * len;
    A acc = 0;
    for (int c = 0; c < d; ++c) acc += gs[i * d + c] * vs[j * d + c];
    ds[idx] = acc;
  }
  __syncthreads();
  // dS = P * (dP - rowsum(P * dP)); this window's dS goes to its own slice of dpair (no atomics: the host
  // reduces the slices in a fixed order, so the bias gradient is deterministic)
  A* dpair_win = dpair == nullptr ? nullptr
                                  : dpair + ((static_cast<long>(b) * gridDim.x + win) * p.heads + head) * len * len;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  for (int i = warp; i < len; i += nwarps) {
    A delta = 0;
    for (int j = lane; j < len; j += 32) delta += s[i * len + j] * ds[i * len + j];
    delta = warp_sum(delta);
    for (int j = lane; j < len; j += 32) {
      const A val = s[i * len + j] * (ds[i * len + j] - delta);
      ds[i * len + j] = val;
      if (dpair_win != nullptr) dpair_win[i * len + j] = val;
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < len * d; idx += blockDim.x) {
    const int i = idx / d, c = idx - i * d;
    A aq = 0, ak = 0, av = 0;
    for (int j = 0; j < len; ++j) {
      aq += ds[i * len + j] * ks[j * d + c];
      ak += ds[j * len + i] * qs[j * d + c];  // q rows already carry the scale
      av += s[j * len + i] * gs[j * d + c];
    }
    const long o = base + static_cast<long>(g.token(win, i)) * d + c;
    dq[o] = from_acc<T>(aq * scale);
    dk[o] = from_acc<T>(ak);
    dv[o] = from_acc<T>(av);
  }
}

long elem_bytes(DType dtype) { return dtype == DType::kFloat64 ? 8 : 4; }

template <typename T>
cudaError_t fwd_typed(const WindowProblem& p, const void* q, const void* k, const void* v, const void* table,
                      void* out, long smem, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  auto kernel = window_fwd_kernel<T>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid((p.h / p.window) * (p.w / p.window), p.heads, p.batch);
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                           static_cast<const T*>(v), static_cast<const A*>(table),
                                           static_cast<T*>(out), p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const WindowProblem& p, const void* grad, const void* q, const void* k, const void* v,
                      const void* table, void* dq, void* dk, void* dv, void* dpair, long smem, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  auto kernel = window_bwd_kernel<T>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const dim3 grid((p.h / p.window) * (p.w / p.window), p.heads, p.batch);
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(grad), static_cast<const T*>(q),
                                           static_cast<const T*>(k), static_cast<const T*>(v),
                                           static_cast<const A*>(table), static_cast<T*>(dq), static_cast<T*>(dk),
                                           static_cast<T*>(dv), static_cast<A*>(dpair), p);
  return cudaGetLastError();
}

}  // namespace

long window_smem_bytes(DType dtype, const WindowProblem& p, bool backward) {
  if (p.window < 1 || p.window > kMaxWindow || p.head_dim < 1 || p.head_dim > kMaxHeadDim) return -1;
  const long len = static_cast<long>(p.window) * p.window;
  const long words = backward ? 4 * len * p.head_dim + 2 * len * len : 3 * len * p.head_dim + len * len;
  return words * elem_bytes(dtype);
}

cudaError_t window_fwd_launch(DType dtype, const WindowProblem& p, const void* q, const void* k, const void* v,
                              const void* table, void* out, cudaStream_t stream) {
  const long smem = window_smem_bytes(dtype, p, false);
  if (smem < 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return fwd_typed<float>(p, q, k, v, table, out, smem, stream);
    case DType::kFloat64:
      return fwd_typed<double>(p, q, k, v, table, out, smem, stream);
    case DType::kFloat16:
      return fwd_typed<__half>(p, q, k, v, table, out, smem, stream);
    case DType::kBFloat16:
      return fwd_typed<__nv_bfloat16>(p, q, k, v, table, out, smem, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t window_bwd_launch(DType dtype, const WindowProblem& p, const void* grad, const void* q, const void* k,
                              const void* v, const void* table, void* dq, void* dk, void* dv, void* dpair,
                              cudaStream_t stream) {
  const long smem = window_smem_bytes(dtype, p, true);
  if (smem < 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case DType::kFloat32:
      return bwd_typed<float>(p, grad, q, k, v, table, dq, dk, dv, dpair, smem, stream);
    case DType::kFloat64:
      return bwd_typed<double>(p, grad, q, k, v, table, dq, dk, dv, dpair, smem, stream);
    case DType::kFloat16:
      return bwd_typed<__half>(p, grad, q, k, v, table, dq, dk, dv, dpair, smem, stream);
    case DType::kBFloat16:
      return bwd_typed<__nv_bfloat16>(p, grad, q, k, v, table, dq, dk, dv, dpair, smem, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fusionblocks
