// Manhattan-decay attention kernels for one ISA (see attention_tile.h): full 2-D and decomposed (rows,
// then columns), forward and backward, on checked inputs (decay.cpp checks them and picks the variant).
//
// Memory is O(N * d): the forward keeps one score tile per thread and saves the log-sum-exp per query;
// the backward recomputes the probabilities tile by tile.
#pragma once

#include "attention_tile.h"

namespace fusionblocks {
namespace cpu {
namespace FUSIONBLOCKS_ISA {

using at::Tensor;

template <typename T>
std::vector<T> gammas(const Tensor& lg) {
  Tensor c = lg.to(c10::CppTypeToScalarType<T>::value).contiguous();
  return std::vector<T>(c.data_ptr<T>(), c.data_ptr<T>() + c.numel());
}

std::tuple<Tensor, Tensor> full_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& lg,
                                    int64_t h, int64_t w, double scale) {
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

// lg[head] * |i - j| of every head as len x len matrices with rows padded to ls: (nh, len, ls)
template <typename T>
std::vector<T> line_bias(const std::vector<T>& g, int64_t len, int64_t ls) {
  const int64_t nh = static_cast<int64_t>(g.size());
  std::vector<T> m(nh * len * ls, T(0));
  for (int64_t head = 0; head < nh; ++head)
    for (int64_t i = 0; i < len; ++i)
      for (int64_t j = 0; j < len; ++j) m[(head * len + i) * ls + j] = g[head] * static_cast<T>(std::abs(i - j));
  return m;
}

// Each line is one tile: gathered into contiguous buffers, scores, softmax and products in one go.
// Saves the log-sum-exp of every query (lse, raster order) or, when `probs` is given, the normalized
// probabilities of every line instead: (B, heads, lines, len, len).
template <typename T>
void lines_fwd(const T* q, const T* k, const T* v, T* out, T* lse, T* probs, const std::vector<T>& g, int64_t b,
               int64_t nh, int64_t n, int64_t d, Lines ln, T scale) {
  const int64_t L = ln.len, ls = padded(L);
  const std::vector<T> bm = line_bias<T>(g, L, ls);
  const TileMM<T> tmm{small_mm_fits(d) && small_mm_fits(L)};
  const int64_t ld = tmm.fast ? padded(d) : d;
  at::parallel_for(0, b * nh * ln.count, 1, [&](int64_t begin, int64_t end) {
    const DenormalsAreZero daz;
    std::vector<T> qw(L * ld, T(0)), kw(L * ld, T(0)), vw(L * ld, T(0)), ow(L * ld, T(0));
    std::vector<T> kt(tmm.fast ? d * ls : 0, T(0)), p(L * ls, T(0)), inv(L, T(1)), lw(L);
    std::vector<int64_t> tok(L);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / ln.count, l = t % ln.count, tok0 = l * ln.line_start, base = bh * n * d;
      for (int64_t i = 0; i < L; ++i) tok[i] = tok0 + i * ln.tok_step;
      gather<T>(q + base, tok.data(), L, d, qw.data(), ld);
      if (tmm.fast) {
        gather_t<T>(k + base, tok.data(), L, d, kt.data(), ls);
      } else {
        gather<T>(k + base, tok.data(), L, d, kw.data(), ld);
      }
      gather<T>(v + base, tok.data(), L, d, vw.data(), ld);
      tmm(L, L, d, scale, qw.data(), ld, 1, tmm.fast ? kt.data() : nullptr, ls, kw.data(), ld, p.data(), ls);
      if (probs) {
        softmax_rows(p.data(), bm.data() + (bh % nh) * L * ls, L, L, ls, nullptr);
        for (int64_t i = 0; i < L; ++i) copy_row(p.data() + i * ls, probs + (t * L + i) * L, L);
      } else {
        softmax_rows(p.data(), bm.data() + (bh % nh) * L * ls, L, L, ls, inv.data(), lw.data());
      }
      tmm(L, d, L, T(1), p.data(), ls, 1, vw.data(), ld, nullptr, 0, ow.data(), ld);
      for (int64_t i = 0; i < L; ++i) {
        const T* src = ow.data() + i * ld;
        T* dst = out + base + tok[i] * d;
        const T r = inv[i];
        for (int64_t c = 0; c < d; ++c) dst[c] = src[c] * r;
        if (!probs) lse[bh * n + tok[i]] = lw[i];
      }
    }
  });
}

// Writes (accumulate = false) or adds (true) dq and dk, writes dv (which may alias dout: a line reads its
// rows of dout before writing them); returns d(log_gamma) per head. The probabilities are the forward's
// (probs, as lines_fwd saves them) or, without them, recomputed from its log-sum-exps of the pass (lse,
// raster order); delta = rowsum(p * dp) (equal to rowsum(out * dout)), so out is not read.
template <typename T>
std::vector<T> lines_bwd(const T* q, const T* k, const T* v, const T* dout, const T* lse, const T* probs, T* dq,
                         T* dk, T* dv, const std::vector<T>& g, int64_t b, int64_t nh, int64_t n, int64_t d, Lines ln,
                         T scale, bool accumulate) {
  const int64_t L = ln.len, ls = padded(L);
  const std::vector<T> bm = line_bias<T>(g, L, ls);
  const TileMM<T> tmm{small_mm_fits(d) && small_mm_fits(L)};
  const int64_t ld = tmm.fast ? padded(d) : d;
  const int64_t nthreads = at::get_num_threads();
  std::vector<T> parts(nthreads * nh * L * ls, T(0));
  at::parallel_for(0, b * nh * ln.count, 1, [&](int64_t begin, int64_t end) {
    const DenormalsAreZero daz;
    std::vector<T> qw(L * ld, T(0)), kw(L * ld, T(0)), vw(L * ld, T(0)), gw(L * ld, T(0));
    std::vector<T> dqw(L * ld, T(0)), dkw(L * ld, T(0)), dvw(L * ld, T(0));
    std::vector<T> kt(tmm.fast && !probs ? d * ls : 0, T(0)), vt(tmm.fast ? d * ls : 0, T(0));
    std::vector<T> p(L * ls, T(0)), dp(L * ls, T(0)), lw(L);
    std::vector<int64_t> tok(L);
    T* part = parts.data() + std::min<int64_t>(at::get_thread_num(), nthreads - 1) * nh * L * ls;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / ln.count, l = t % ln.count, tok0 = l * ln.line_start, base = bh * n * d, head = bh % nh;
      for (int64_t i = 0; i < L; ++i) tok[i] = tok0 + i * ln.tok_step;
      gather<T>(q + base, tok.data(), L, d, qw.data(), ld);
      gather<T>(k + base, tok.data(), L, d, kw.data(), ld);
      gather<T>(dout + base, tok.data(), L, d, gw.data(), ld);
      if (tmm.fast) {
        gather_t<T>(v + base, tok.data(), L, d, vt.data(), ls);
      } else {
        gather<T>(v + base, tok.data(), L, d, vw.data(), ld);
      }
      if (probs) {
        for (int64_t i = 0; i < L; ++i) copy_row(probs + (t * L + i) * L, p.data() + i * ls, L);
      } else {
        for (int64_t i = 0; i < L; ++i) lw[i] = lse[bh * n + tok[i]];
        if (tmm.fast) gather_t<T>(k + base, tok.data(), L, d, kt.data(), ls);
        tmm(L, L, d, scale, qw.data(), ld, 1, tmm.fast ? kt.data() : nullptr, ls, kw.data(), ld, p.data(), ls);
        exp_rows(p.data(), bm.data() + head * L * ls, lw.data(), L, L, ls);
      }
      tmm(L, d, L, T(1), p.data(), 1, ls, gw.data(), ld, nullptr, 0, dvw.data(), ld);
      tmm(L, L, d, T(1), gw.data(), ld, 1, tmm.fast ? vt.data() : nullptr, ls, vw.data(), ld, dp.data(), ls);
      softmax_grad_rows(p.data(), dp.data(), part + head * L * ls, L, L, ls, scale);
      tmm(L, d, L, T(1), dp.data(), ls, 1, kw.data(), ld, nullptr, 0, dqw.data(), ld);
      tmm(L, d, L, T(1), dp.data(), 1, ls, qw.data(), ld, nullptr, 0, dkw.data(), ld);
      if (accumulate) {
        scatter_add<T>(dqw.data(), ld, tok.data(), L, d, dq + base);
        scatter_add<T>(dkw.data(), ld, tok.data(), L, d, dk + base);
      } else {
        scatter<T>(dqw.data(), ld, tok.data(), L, d, dq + base);
        scatter<T>(dkw.data(), ld, tok.data(), L, d, dk + base);
      }
      scatter<T>(dvw.data(), ld, tok.data(), L, d, dv + base);
    }
  });
  std::vector<T> dlg(nh, T(0));
  for (int64_t th = 0; th < nthreads; ++th)
    for (int64_t head = 0; head < nh; ++head) {
      const T* db = parts.data() + (th * nh + head) * L * ls;
      T acc = 0;
      for (int64_t i = 0; i < L; ++i)
        for (int64_t j = 0; j < L; ++j) acc += db[i * ls + j] * static_cast<T>(std::abs(i - j));
      dlg[head] += acc;
    }
  return dlg;
}

// The decomposed forward: the rows pass (q, k, v -> mid), then the columns pass (q, k, mid -> out).
// Returns (out, mid, saved row pass, saved column pass): the log-sum-exps (B, heads, H*W) of each pass or,
// with save_probs, its probabilities, (B, heads, H, W, W) for the rows and (B, heads, W, H, H) for the
// columns.
std::tuple<Tensor, Tensor, Tensor, Tensor> dec_forward(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                                       const Tensor& lg, int64_t h, int64_t w, double scale,
                                                       bool save_probs) {
  Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  Tensor mid = at::empty_like(q), out = at::empty_like(q);
  Tensor row = save_probs ? at::empty({b, nh, h, w, w}, q.options()) : at::empty({b, nh, n}, q.options());
  Tensor col = save_probs ? at::empty({b, nh, w, h, h}, q.options()) : at::empty({b, nh, n}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "decay_dec_fwd", [&] {
    using T = scalar_t;
    const std::vector<T> g = gammas<T>(lg);
    const T s = static_cast<T>(scale);
    T *rp = row.data_ptr<T>(), *cp = col.data_ptr<T>();
    lines_fwd<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), mid.data_ptr<T>(), save_probs ? nullptr : rp,
                 save_probs ? rp : nullptr, g, b, nh, n, d, rows_of(h, w), s);
    lines_fwd<T>(q.data_ptr<T>(), k.data_ptr<T>(), mid.data_ptr<T>(), out.data_ptr<T>(), save_probs ? nullptr : cp,
                 save_probs ? cp : nullptr, g, b, nh, n, d, cols_of(h, w), s);
  });
  return {out, mid, row, col};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dec_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                   const Tensor& lg, int64_t h, int64_t w, double scale) {
  return dec_forward(q, k, v, lg, h, w, scale, false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dec_fwd_train(const Tensor& q, const Tensor& k, const Tensor& v,
                                                         const Tensor& lg, int64_t h, int64_t w, double scale) {
  return dec_forward(q, k, v, lg, h, w, scale, true);
}

// The decomposed backward from what dec_forward saved: log-sum-exps (probs = false) or probabilities.
std::tuple<Tensor, Tensor, Tensor, Tensor> dec_backward(const Tensor& grad_, const Tensor& q_, const Tensor& k_,
                                                        const Tensor& v_, const Tensor& lg, const Tensor& mid_,
                                                        const Tensor& row_, const Tensor& col_, int64_t h, int64_t w,
                                                        double scale, bool probs) {
  Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  // the probabilities are the saved ones or recomputed from q, k, the decay and the log-sum-exps, so out
  // is not read
  Tensor grad = grad_.to(q.scalar_type()).contiguous(), mid = mid_.contiguous();
  Tensor row = row_.to(q.scalar_type()).contiguous(), col = col_.to(q.scalar_type()).contiguous();
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  // Each pass covers every token once: the columns pass writes dq, dk and d(mid), the rows pass adds to
  // dq, dk and overwrites d(mid) with dv line by line (a line reads its d(mid) rows before writing them).
  Tensor dq = at::empty_like(q), dk = at::empty_like(q), dv = at::empty_like(q);
  Tensor dlg = at::empty({nh}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "decay_dec_bwd", [&] {
    using T = scalar_t;
    const std::vector<T> g = gammas<T>(lg);
    const T s = static_cast<T>(scale);
    const T *rp = row.data_ptr<T>(), *cp = col.data_ptr<T>();
    const std::vector<T> dcol = lines_bwd<T>(q.data_ptr<T>(), k.data_ptr<T>(), mid.data_ptr<T>(), grad.data_ptr<T>(),
                                             probs ? nullptr : cp, probs ? cp : nullptr, dq.data_ptr<T>(),
                                             dk.data_ptr<T>(), dv.data_ptr<T>(), g, b, nh, n, d, cols_of(h, w), s, false);
    const std::vector<T> drow = lines_bwd<T>(q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), dv.data_ptr<T>(),
                                             probs ? nullptr : rp, probs ? rp : nullptr, dq.data_ptr<T>(),
                                             dk.data_ptr<T>(), dv.data_ptr<T>(), g, b, nh, n, d, rows_of(h, w), s, true);
    T* dp = dlg.data_ptr<T>();
    for (int64_t head = 0; head < nh; ++head) dp[head] = dcol[head] + drow[head];
  });
  return {dq, dk, dv, dlg};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dec_bwd(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const Tensor& lg, const Tensor& mid,
                                                   const Tensor& lse_row, const Tensor& lse_col, int64_t h, int64_t w,
                                                   double scale) {
  return dec_backward(grad, q, k, v, lg, mid, lse_row, lse_col, h, w, scale, false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dec_bwd_probs(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                         const Tensor& v, const Tensor& lg, const Tensor& mid,
                                                         const Tensor& p_row, const Tensor& p_col, int64_t h,
                                                         int64_t w, double scale) {
  return dec_backward(grad, q, k, v, lg, mid, p_row, p_col, h, w, scale, true);
}

}  // namespace FUSIONBLOCKS_ISA
}  // namespace cpu
}  // namespace fusionblocks
