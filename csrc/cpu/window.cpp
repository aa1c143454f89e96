// Swin (shifted) window attention on CPU, forward and backward: the TORCH_LIBRARY kernels check their
// inputs, then run the active ISA variant (isa.h; the kernels are window_kernels.h).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "isa.h"
#include "saved_probs.h"

namespace fusionblocks {
namespace cpu {
namespace {

using at::Tensor;

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& table, int64_t h,
                  int64_t w, int64_t ws, int64_t shift) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "window_attention(cpp): expected q, k, v of one shape (B, heads, H*W, D), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(ws > 0 && h % ws == 0 && w % ws == 0 && q.size(2) == h * w,
              "window_attention(cpp): expected H, W multiples of window_size and H*W tokens, got hw=(", h, ", ", w,
              "), window_size ", ws, ", q ", q.sizes());
  TORCH_CHECK(shift >= 0 && shift < ws, "window_attention(cpp): expected shift in [0, ", ws, "), got ", shift);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "window_attention(cpp): expected float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "window_attention(cpp): expected q, k, v of one dtype");
  if (table.has_value()) {
    TORCH_CHECK(table->dim() == 2 && table->size(0) == (2 * ws - 1) * (2 * ws - 1) && table->size(1) == q.size(1),
                "window_attention(cpp): expected bias_table of shape (", (2 * ws - 1) * (2 * ws - 1), ", ",
                q.size(1), "), got ", table->sizes());
  }
  TORCH_CHECK(q.device().is_cpu(), "window_attention(cpp): expected CPU tensors");
}

Tensor window_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& table, int64_t h,
                  int64_t w, int64_t ws, int64_t shift, double scale) {
  check_inputs(q, k, v, table, h, w, ws, shift);
  return active_kernels().window_fwd(q, k, v, table, h, w, ws, shift, scale);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> window_bwd(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const std::optional<Tensor>& table, int64_t h,
                                                      int64_t w, int64_t ws, int64_t shift, double scale) {
  check_inputs(q, k, v, table, h, w, ws, shift);
  return active_kernels().window_bwd(grad, q, k, v, table, h, w, ws, shift, scale);
}

std::tuple<Tensor, Tensor> window_fwd_train(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const std::optional<Tensor>& table, int64_t h, int64_t w, int64_t ws,
                                            int64_t shift, double scale) {
  check_inputs(q, k, v, table, h, w, ws, shift);
  return active_kernels().window_fwd_train(q, k, v, table, h, w, ws, shift, scale);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> window_bwd_probs(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                            const Tensor& v, const Tensor& probs,
                                                            const std::optional<Tensor>& table, int64_t h, int64_t w,
                                                            int64_t ws, int64_t shift, double scale) {
  check_inputs(q, k, v, table, h, w, ws, shift);
  const int64_t nwin = (h / ws) * (w / ws), len = ws * ws;
  check_saved_probs(probs, q, nwin, len, "window_attention", "probs", "(B, heads, windows, ws*ws, ws*ws)");
  return active_kernels().window_bwd_probs(grad, q, k, v, probs, table, h, w, ws, shift, scale);
}

}  // namespace
}  // namespace cpu
}  // namespace fusionblocks
TORCH_LIBRARY_IMPL(fusionblocks_C, CPU, m) {
  m.impl("window_fwd", &fusionblocks::cpu::window_fwd);
  m.impl("window_bwd", &fusionblocks::cpu::window_bwd);
  m.impl("window_fwd_train", &fusionblocks::cpu::window_fwd_train);
  m.impl("window_bwd_probs", &fusionblocks::cpu::window_bwd_probs);
}
