// Manhattan-decay attention on CPU: full 2-D and decomposed (rows, then columns), forward and backward.
//
// Memory is O(N * d): the forward keeps one score tile per thread and saves the log-sum-exp per query;
// the backward recomputes the probabilities tile by tile.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <tuple>

#include "attention_tile.h"

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

template <typename T>
std::vector<T> gammas(const Tensor& lg) {
  Tensor c = lg.to(c10::CppTypeToScalarType<T>::value).contiguous();
  return std::vector<T>(c.data_ptr<T>(), c.data_ptr<T>() + c.numel());
}

std::tuple<Tensor, Tensor> full_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& lg,
                                    int64_t h, int64_t w, double scale) {
  check_inputs(q_, k_, v_, lg, h, w);
  Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({b, nh, n}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "decay_full_fwd", [&] {
    using T = scalar_t;
    std::vector<T> ys, xs;
    grid_coords<T>(h, w, ys, xs);
    const std::vector<T> g = gammas<T>(lg);
    const int64_t nqb = (n + kBlockQ - 1) / kBlockQ;
    const T* qp = q.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    T* op = out.data_ptr<T>();
    T* lp = lse.data_ptr<T>();
    at::parallel_for(0, b * nh * nqb, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / nqb, i0 = (t % nqb) * kBlockQ, ni = std::min(kBlockQ, n - i0);
        const int64_t base = bh * n * d;
        DecayBias<T> bias{g[bh % nh], w, ys.data(), xs.data()};
        attn_fwd<T>(qp + base + i0 * d, d, kp + base, d, vp + base, d, op + base + i0 * d, d, lp + bh * n + i0, 1, ni,
                    n, d, static_cast<T>(scale), bias, i0);
      }
    });
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> full_bwd(const Tensor& grad_, const Tensor& q_, const Tensor& k_,
                                                    const Tensor& v_, const Tensor& lg, const Tensor& out_,
                                                    const Tensor& lse_, int64_t h, int64_t w, double scale) {
  check_inputs(q_, k_, v_, lg, h, w);
  Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  Tensor grad = grad_.to(q.scalar_type()).contiguous(), out = out_.contiguous(), lse = lse_.contiguous();
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  Tensor dq = at::zeros_like(q), dk = at::zeros_like(q), dv = at::zeros_like(q);
  Tensor dlg_part = at::zeros({b, nh}, q.options());
  const int64_t nthreads = at::get_num_threads();
  const int64_t nkb = (n + kBlockK - 1) / kBlockK;
  // Few (batch, head) pairs for the threads: split the keys too, each thread summing dq in its own buffer.
  const bool split_keys = b * nh < nthreads && nkb > 1;
  Tensor dq_part = split_keys ? at::zeros({nthreads, b, nh, n, d}, q.options()) : Tensor();
  if (split_keys) dlg_part = at::zeros({b, nh, nkb}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "decay_full_bwd", [&] {
    using T = scalar_t;
    std::vector<T> ys, xs;
    grid_coords<T>(h, w, ys, xs);
    const std::vector<T> g = gammas<T>(lg);
    T* part = dlg_part.data_ptr<T>();
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    const T *op = out.data_ptr<T>(), *gp = grad.data_ptr<T>(), *lp = lse.data_ptr<T>();
    T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
    const int64_t tasks = split_keys ? b * nh * nkb : b * nh;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      T* dq_buf = split_keys ? dq_part.data_ptr<T>() + std::min<int64_t>(at::get_thread_num(), nthreads - 1) * b * nh * n * d
                             : dqp;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = split_keys ? t / nkb : t;
        const int64_t j0 = split_keys ? (t % nkb) * kBlockK : 0, nj = split_keys ? std::min(kBlockK, n - j0) : n;
        const int64_t base = bh * n * d, kb = base + j0 * d;
        // keys [j0, j0 + nj) see coordinates shifted by j0
        DecayBias<T> bias{g[bh % nh], w, ys.data() + j0, xs.data() + j0};
        part[t] = attn_bwd<T>(qp + base, d, kp + kb, d, vp + kb, d, op + base, d, gp + base, d, lp + bh * n, 1,
                              dq_buf + base, d, dkp + kb, d, dvp + kb, d, n, nj, d, static_cast<T>(scale), bias);
      }
    });
  });
  if (split_keys) dq = dq_part.sum(0);
  return {dq, dk, dv, dlg_part.reshape({b * nh, -1}).sum(1).reshape({b, nh}).sum(0)};
}

// One pass of the decomposed mode over lines of a (h x w) grid: rows (along w) or columns (along h).
// Line `l` starts at token `l * line_start` and steps `tok_step` tokens per position.
struct Lines {
  int64_t count, len, line_start, tok_step;
};

Lines rows_of(int64_t h, int64_t w) { return {h, w, w, 1}; }
Lines cols_of(int64_t h, int64_t w) { return {w, h, 1, w}; }

template <typename T>
void lines_fwd(const T* q, const T* k, const T* v, T* out, T* lse, const std::vector<T>& g, int64_t b, int64_t nh,
               int64_t n, int64_t d, Lines ln, T scale) {
  std::vector<T> ys(ln.len, T(0)), xs(ln.len);
  for (int64_t i = 0; i < ln.len; ++i) xs[i] = static_cast<T>(i);
  at::parallel_for(0, b * nh * ln.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / ln.count, l = t % ln.count;
      const int64_t tok0 = bh * n + l * ln.line_start, ld = ln.tok_step * d;
      DecayBias<T> bias{g[bh % nh], ln.len, ys.data(), xs.data()};
      attn_fwd<T>(q + tok0 * d, ld, k + tok0 * d, ld, v + tok0 * d, ld, out + tok0 * d, ld, lse + tok0, ln.tok_step,
                  ln.len, ln.len, d, scale, bias);
    }
  });
}

template <typename T>
void lines_bwd(const T* q, const T* k, const T* v, const T* out, const T* dout, const T* lse, T* dq, T* dk, T* dv,
               T* dlg_part, const std::vector<T>& g, int64_t b, int64_t nh, int64_t n, int64_t d, Lines ln, T scale) {
  std::vector<T> ys(ln.len, T(0)), xs(ln.len);
  for (int64_t i = 0; i < ln.len; ++i) xs[i] = static_cast<T>(i);
  at::parallel_for(0, b * nh * ln.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / ln.count, l = t % ln.count;
      const int64_t tok0 = bh * n + l * ln.line_start, ld = ln.tok_step * d, o = tok0 * d;
      DecayBias<T> bias{g[bh % nh], ln.len, ys.data(), xs.data()};
      dlg_part[t] += attn_bwd<T>(q + o, ld, k + o, ld, v + o, ld, out + o, ld, dout + o, ld, lse + tok0, ln.tok_step,
                                 dq + o, ld, dk + o, ld, dv + o, ld, ln.len, ln.len, d, scale, bias);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dec_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                                   const Tensor& lg, int64_t h, int64_t w, double scale) {
  check_inputs(q_, k_, v_, lg, h, w);
  Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  Tensor mid = at::empty_like(q), out = at::empty_like(q);
  Tensor lse_row = at::empty({b, nh, n}, q.options()), lse_col = at::empty({b, nh, n}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "decay_dec_fwd", [&] {
    using T = scalar_t;
    const std::vector<T> g = gammas<T>(lg);
    const T s = static_cast<T>(scale);
    lines_fwd<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), mid.data_ptr<T>(), lse_row.data_ptr<T>(), g, b,
                 nh, n, d, rows_of(h, w), s);
    lines_fwd<T>(q.data_ptr<T>(), k.data_ptr<T>(), mid.data_ptr<T>(), out.data_ptr<T>(), lse_col.data_ptr<T>(), g, b,
                 nh, n, d, cols_of(h, w), s);
  });
  return {out, mid, lse_row, lse_col};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dec_bwd(const Tensor& grad_, const Tensor& q_, const Tensor& k_,
                                                   const Tensor& v_, const Tensor& lg, const Tensor& out_,
                                                   const Tensor& mid_, const Tensor& lse_row_, const Tensor& lse_col_,
                                                   int64_t h, int64_t w, double scale) {
  check_inputs(q_, k_, v_, lg, h, w);
  Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  Tensor grad = grad_.to(q.scalar_type()).contiguous(), out = out_.contiguous(), mid = mid_.contiguous();
  Tensor lse_row = lse_row_.contiguous(), lse_col = lse_col_.contiguous();
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  Tensor dq = at::zeros_like(q), dk = at::zeros_like(q), dv = at::zeros_like(q), dmid = at::zeros_like(q);
  Tensor part_col = at::zeros({b, nh, w}, q.options()), part_row = at::zeros({b, nh, h}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "decay_dec_bwd", [&] {
    using T = scalar_t;
    const std::vector<T> g = gammas<T>(lg);
    const T s = static_cast<T>(scale);
    lines_bwd<T>(q.data_ptr<T>(), k.data_ptr<T>(), mid.data_ptr<T>(), out.data_ptr<T>(), grad.data_ptr<T>(),
                 lse_col.data_ptr<T>(), dq.data_ptr<T>(), dk.data_ptr<T>(), dmid.data_ptr<T>(),
                 part_col.data_ptr<T>(), g, b, nh, n, d, cols_of(h, w), s);
    lines_bwd<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), mid.data_ptr<T>(), dmid.data_ptr<T>(),
                 lse_row.data_ptr<T>(), dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(), part_row.data_ptr<T>(),
                 g, b, nh, n, d, rows_of(h, w), s);
  });
  Tensor dlg = part_col.sum({0, 2}).add(part_row.sum({0, 2}));
  return {dq, dk, dv, dlg};
}

}  // namespace
}  // namespace cpu
}  // namespace fusionblocks

TORCH_LIBRARY_IMPL(fusionblocks_C, CPU, m) {
  m.impl("decay_full_fwd", &fusionblocks::cpu::full_fwd);
  m.impl("decay_full_bwd", &fusionblocks::cpu::full_bwd);
  m.impl("decay_dec_fwd", &fusionblocks::cpu::dec_fwd);
  m.impl("decay_dec_bwd", &fusionblocks::cpu::dec_bwd);
}
