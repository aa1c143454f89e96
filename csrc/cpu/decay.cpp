// Manhattan-decay attention on CPU, full 2-D and decomposed, forward and backward: the TORCH_LIBRARY
// kernels check their inputs, then run the active ISA variant (isa.h; the kernels are decay_kernels.h).
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

#include "isa.h"
#include "saved_probs.h"

namespace fusionblocks {
namespace cpu {
namespace {

using at::Tensor;

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg, int64_t h, int64_t w) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "decay_attention(cpp): expected q, k, v of one shape (B, heads, H*W, D), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.size(2) == h * w, "decay_attention(cpp): expected H*W = ", h * w, " tokens, got ", q.size(2));
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "decay_attention(cpp): expected float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "decay_attention(cpp): expected q, k, v of one dtype");
  TORCH_CHECK(lg.dim() == 1 && lg.size(0) == q.size(1), "decay_attention(cpp): expected log_gamma of shape (",
              q.size(1), ",), got ", lg.sizes());
  TORCH_CHECK(q.device().is_cpu(), "decay_attention(cpp): expected CPU tensors");
}

std::tuple<Tensor, Tensor> full_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg, int64_t h,
                                    int64_t w, double scale) {
  check_inputs(q, k, v, lg, h, w);
  return active_kernels().decay_full_fwd(q, k, v, lg, h, w, scale);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> full_bwd(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const Tensor& lg, const Tensor& out,
                                                    const Tensor& lse, int64_t h, int64_t w, double scale) {
  check_inputs(q, k, v, lg, h, w);
  return active_kernels().decay_full_bwd(grad, q, k, v, lg, out, lse, h, w, scale);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dec_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& lg,
                                                   int64_t h, int64_t w, double scale) {
  check_inputs(q, k, v, lg, h, w);
  return active_kernels().decay_dec_fwd(q, k, v, lg, h, w, scale);
}

void check_lse(const Tensor& lse, const Tensor& q, const char* name) {
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "decay_attention(cpp): expected ", name, " of shape (B, heads, H*W) = ", q.sizes().slice(0, 3),
              ", got ", lse.sizes());
}

// out is in the schema (saved by the forward) but not read: the backward recomputes the probabilities
// from q, k, the decay and the log-sum-exps
std::tuple<Tensor, Tensor, Tensor, Tensor> dec_bwd(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const Tensor& lg, const Tensor& /*out*/,
                                                   const Tensor& mid, const Tensor& lse_row, const Tensor& lse_col,
                                                   int64_t h, int64_t w, double scale) {
  check_inputs(q, k, v, lg, h, w);
  check_lse(lse_row, q, "lse_row");
  check_lse(lse_col, q, "lse_col");
  return active_kernels().decay_dec_bwd(grad, q, k, v, lg, mid, lse_row, lse_col, h, w, scale);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dec_fwd_train(const Tensor& q, const Tensor& k, const Tensor& v,
                                                         const Tensor& lg, int64_t h, int64_t w, double scale) {
  check_inputs(q, k, v, lg, h, w);
  return active_kernels().decay_dec_fwd_train(q, k, v, lg, h, w, scale);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dec_bwd_probs(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                         const Tensor& v, const Tensor& lg, const Tensor& mid,
                                                         const Tensor& p_row, const Tensor& p_col, int64_t h,
                                                         int64_t w, double scale) {
  check_inputs(q, k, v, lg, h, w);
  check_saved_probs(p_row, q, h, w, "decay_attention", "p_row", "(B, heads, H, W, W)");
  check_saved_probs(p_col, q, w, h, "decay_attention", "p_col", "(B, heads, W, H, H)");
  return active_kernels().decay_dec_bwd_probs(grad, q, k, v, lg, mid, p_row, p_col, h, w, scale);
}

}  // namespace
}  // namespace cpu
}  // namespace fusionblocks
TORCH_LIBRARY_IMPL(fusionblocks_C, CPU, m) {
  m.impl("decay_full_fwd", &fusionblocks::cpu::full_fwd);
  m.impl("decay_full_bwd", &fusionblocks::cpu::full_bwd);
  m.impl("decay_dec_fwd", &fusionblocks::cpu::dec_fwd);
  m.impl("decay_dec_bwd", &fusionblocks::cpu::dec_bwd);
  m.impl("decay_dec_fwd_train", &fusionblocks::cpu::dec_fwd_train);
  m.impl("decay_dec_bwd_probs", &fusionblocks::cpu::dec_bwd_probs);
}
