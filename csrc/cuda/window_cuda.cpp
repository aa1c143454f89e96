// CUDA implementations of fusionblocks_C::window_fwd / window_bwd (built only with FUSIONBLOCKS_CUDA=1).
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "window_attention.h"

namespace fusionblocks {
namespace cuda {
namespace {

using at::Tensor;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "window_attention(cuda): expected float32/float64/float16/bfloat16, got ", t.scalar_type());
  }
}

WindowProblem problem(const Tensor& q, int64_t h, int64_t w, int64_t ws, int64_t shift, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == h * w && ws > 0 && h % ws == 0 && w % ws == 0,
              "window_attention(cuda): expected q (B, heads, H*W, D) with H, W multiples of window_size, got ",
              q.sizes(), " hw=(", h, ", ", w, ") window_size ", ws);
  TORCH_CHECK(shift >= 0 && shift < ws, "window_attention(cuda): expected shift in [0, ", ws, "), got ", shift);
  return WindowProblem{static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(h),
                       static_cast<int>(w),         static_cast<int>(ws),        static_cast<int>(shift),
                       static_cast<int>(q.size(3)), static_cast<float>(scale)};
}

// (windows, heads, L, L) per-window dS -> ((2ws-1)^2, heads) table gradient, deterministically: the windows
// summed by a reduction, then each table row gathers the (i, j) pairs that read it (padded to L with a zero
// row) and sums them in a fixed order. No index_add_ / atomics (non-deterministic on CUDA).
Tensor table_grad(const Tensor& dpair, int64_t ws) {
  const int64_t len = ws * ws, rows = (2 * ws - 1) * (2 * ws - 1), heads = dpair.size(1);
  std::vector<int64_t> seg(rows * len, len * len), fill(rows, 0);
  for (int64_t i = 0; i < len; ++i) {
    for (int64_t j = 0; j < len; ++j) {
      const int64_t row = (i / ws - j / ws + ws - 1) * (2 * ws - 1) + (i % ws - j % ws + ws - 1);
      seg[row * len + fill[row]++] = i * len + j;
    }
  }
  const Tensor index = at::from_blob(seg.data(), {rows * len}, at::kLong).to(dpair.device());
  const Tensor pairs = dpair.sum(0).reshape({heads, len * len}).t();  // (L*L, heads)
  const Tensor padded = at::cat({pairs, at::zeros({1, heads}, dpair.options())}, 0);
  return padded.index_select(0, index).reshape({rows, len, heads}).sum(1);
}

at::ScalarType acc_type(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

Tensor window_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_, const std::optional<Tensor>& table_,
                  int64_t h, int64_t w, int64_t ws, int64_t shift, double scale) {
  const c10::cuda::CUDAGuard guard(q_.device());
  Tensor q = q_.contiguous(), k = k_.to(q.scalar_type()).contiguous(), v = v_.to(q.scalar_type()).contiguous();
  Tensor table = table_.has_value() ? table_->to(acc_type(q)).contiguous() : Tensor();
  const WindowProblem p = problem(q, h, w, ws, shift, scale);
  TORCH_CHECK(window_smem_bytes(dtype_of(q), p, false) >= 0,
              "window_attention(cuda): window_size <= 8 and head dim <= 128 supported");
  Tensor out = at::empty_like(q);
  const cudaError_t err = window_fwd_launch(dtype_of(q), p, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                            table.defined() ? table.data_ptr() : nullptr, out.data_ptr(),
                                            c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "window_attention(cuda) forward launch failed: ", cudaGetErrorString(err));
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> window_bwd(const Tensor& grad_, const Tensor& q_, const Tensor& k_,
                                                      const Tensor& v_, const std::optional<Tensor>& table_, int64_t h,
                                                      int64_t w, int64_t ws, int64_t shift, double scale) {
  const c10::cuda::CUDAGuard guard(q_.device());
  Tensor q = q_.contiguous(), k = k_.to(q.scalar_type()).contiguous(), v = v_.to(q.scalar_type()).contiguous();
  Tensor grad = grad_.to(q.scalar_type()).contiguous();
  Tensor table = table_.has_value() ? table_->to(acc_type(q)).contiguous() : Tensor();
  const WindowProblem p = problem(q, h, w, ws, shift, scale);
  TORCH_CHECK(window_smem_bytes(dtype_of(q), p, true) >= 0,
              "window_attention(cuda): window_size <= 8 and head dim <= 128 supported");
  Tensor dq = at::empty_like(q), dk = at::empty_like(q), dv = at::empty_like(q);
  const int64_t len = ws * ws, windows = q.size(0) * (h / ws) * (w / ws);
  Tensor dpair = table.defined() ? at::empty({windows, q.size(1), len, len}, table.options()) : Tensor();
  const cudaError_t err = window_bwd_launch(
      dtype_of(q), p, grad.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
      table.defined() ? table.data_ptr() : nullptr, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
      dpair.defined() ? dpair.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "window_attention(cuda) backward launch failed: ", cudaGetErrorString(err));
  // the table's own dtype: a float32 table beside bfloat16 q, k, v (autocast) keeps its float32 sums
  Tensor dt = dpair.defined() ? table_grad(dpair, ws).to(table_->scalar_type()) : at::zeros({0}, q.options());
  return {dq, dk, dv, dt};
}

}  // namespace
}  // namespace cuda
}  // namespace fusionblocks

TORCH_LIBRARY_IMPL(fusionblocks_C, CUDA, m) {
  m.impl("window_fwd", &fusionblocks::cuda::window_fwd);
  m.impl("window_bwd", &fusionblocks::cuda::window_bwd);
}
