// Swin (shifted) window attention kernels for one ISA (see attention_tile.h), forward and backward, on
// checked inputs (window.cpp checks them and picks the variant). The cyclic shift, the window partition,
// the relative-position-bias gather and the shift mask are index arithmetic: each task gathers one
// (batch, head, window) straight from the raster-order tensors and scatters its result back.
#pragma once

#include "attention_tile.h"

namespace fusionblocks {
namespace cpu {
namespace FUSIONBLOCKS_ISA {

using at::Tensor;

struct WindowGeometry {
  int64_t h, w, ws, shift, nwx, nwin, len;
  WindowGeometry(int64_t h_, int64_t w_, int64_t ws_, int64_t shift_)
      : h(h_), w(w_), ws(ws_), shift(shift_), nwx(w_ / ws_), nwin((h_ / ws_) * (w_ / ws_)), len(ws_ * ws_) {}
  // raster index (unshifted grid) of local token l of window win
  int64_t token(int64_t win, int64_t l) const {
    const int64_t sy = (win / nwx) * ws + l / ws, sx = (win % nwx) * ws + l % ws;
    return ((sy + shift) % h) * w + (sx + shift) % w;
  }
  // Swin shift region (in the shifted frame) of local token l of window win
  int64_t region(int64_t win, int64_t l) const {
    const int64_t sy = (win / nwx) * ws + l / ws, sx = (win % nwx) * ws + l % ws;
    const int64_t ry = (sy >= h - ws) + (sy >= h - shift), rx = (sx >= w - ws) + (sx >= w - shift);
    return ry * 3 + rx;
  }
  int64_t rel_index(int64_t i, int64_t j) const {
    return (i / ws - j / ws + ws - 1) * (2 * ws - 1) + (i % ws - j % ws + ws - 1);
  }
};

// rel_index(i, j) of every pair of window positions, row-major len x len
std::vector<int32_t> rel_indices(const WindowGeometry& g) {
  std::vector<int32_t> idx(g.len * g.len);
  for (int64_t i = 0; i < g.len; ++i)
    for (int64_t j = 0; j < g.len; ++j) idx[i * g.len + j] = static_cast<int32_t>(g.rel_index(i, j));
  return idx;
}

// The additive bias of a window depends on its head and, with a shift, on whether it sits in the last
// row and/or the last column of windows (only those straddle shift regions): kind = 2 * last_row + last_col.
inline int64_t window_kind(const WindowGeometry& g, int64_t win) {
  if (!g.shift) return 0;
  const int64_t nwy = g.h / g.ws;
  return 2 * (win / g.nwx == nwy - 1) + (win % g.nwx == g.nwx - 1);
}

// bias + mask of every (kind, head) that occurs, as len x len matrices with rows padded to `ls`: matrix
// (slot[kind] * nh + head). Without a shift only kind 0 occurs; on a grid of one window only kind 3.
template <typename T>
struct BiasMatrices {
  std::vector<T> m;
  int64_t slot[4] = {-1, -1, -1, -1};
  int64_t nh = 0, size = 0;
  const T* of(int64_t kind, int64_t head) const { return m.data() + (slot[kind] * nh + head) * size; }
};

template <typename T>
BiasMatrices<T> bias_matrices(const WindowGeometry& g, const std::vector<int32_t>& rel, int64_t nh, const T* table,
                              int64_t ls) {
  const int64_t L = g.len, nwy = g.h / g.ws;
  BiasMatrices<T> bm;
  bm.nh = nh;
  bm.size = L * ls;
  int64_t kinds[4], nk = 0;
  for (int64_t win = 0; win < g.nwin; ++win) {
    const int64_t kind = window_kind(g, win);
    if (bm.slot[kind] < 0) {
      bm.slot[kind] = nk;
      kinds[nk++] = kind;
    }
  }
  bm.m.assign(nk * nh * L * ls, T(0));
  // the shift mask of each kind that occurs (-100 across shift regions), then the table's bias per head
  std::vector<T> mask(nk * L * L, T(0));
  std::vector<int64_t> region(L);
  for (int64_t s = 0; s < nk; ++s) {
    const int64_t kind = kinds[s];
    const int64_t win = ((kind & 2) ? nwy - 1 : 0) * g.nwx + ((kind & 1) ? g.nwx - 1 : 0);
    for (int64_t l = 0; l < L; ++l) region[l] = g.shift ? g.region(win, l) : 0;
    for (int64_t i = 0; i < L; ++i)
      for (int64_t j = 0; j < L; ++j) mask[(s * L + i) * L + j] = region[j] != region[i] ? T(-100) : T(0);
  }
  std::vector<T> bias(L * L, T(0));
  for (int64_t head = 0; head < nh; ++head) {
    if (table)
      for (int64_t ij = 0; ij < L * L; ++ij) bias[ij] = table[rel[ij] * nh + head];
    for (int64_t s = 0; s < nk; ++s) {
      T* mk = bm.m.data() + (s * nh + head) * L * ls;
      const T* ms = mask.data() + s * L * L;
      for (int64_t i = 0; i < L; ++i)
        for (int64_t j = 0; j < L; ++j) mk[i * ls + j] = bias[i * L + j] + ms[i * L + j];
    }
  }
  return bm;
}

// window rows to/from a tile with row stride ld >= d
// Softmax probabilities of one window: p (L x ls) = softmax(scale * q k^T + bias), rows normalized
// unless `inv` is given, in which case they are left unnormalized and inv[i] = 1 / row sum.
template <typename T>
void window_probs(const TileMM<T>& tmm, const T* qw, const T* kw, const T* kt, int64_t ld, const T* bias, int64_t L,
                  int64_t ls, int64_t d, T scale, T* p, T* inv) {
  tmm(L, L, d, scale, qw, ld, 1, kt, ls, kw, ld, p, ls);
  softmax_rows(p, bias, L, L, ls, inv);
}

// raster offsets (in tokens) of the len tokens of every window: (nwin, len)
std::vector<int64_t> window_tokens(const WindowGeometry& g) {
  std::vector<int64_t> tok(g.nwin * g.len);
  for (int64_t win = 0; win < g.nwin; ++win)
    for (int64_t l = 0; l < g.len; ++l) tok[win * g.len + l] = g.token(win, l);
  return tok;
}

// The forward of every window; with save_probs also its softmax probabilities, (B, heads, windows, L, L)
// (what the backward reads instead of recomputing them), else an empty tensor.
std::tuple<Tensor, Tensor> window_forward(const Tensor& q_, const Tensor& k_, const Tensor& v_,
                                          const std::optional<Tensor>& table_, int64_t h, int64_t w, int64_t ws,
                                          int64_t shift, double scale, bool save_probs) {
  Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  Tensor table = table_.has_value() ? table_->to(q.scalar_type()).contiguous() : Tensor();
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  const WindowGeometry g(h, w, ws, shift);
  Tensor out = at::empty_like(q);
  Tensor probs = at::empty({save_probs ? b : 0, nh, g.nwin, g.len, g.len}, q.options());
  const std::vector<int32_t> rel = rel_indices(g);
  const std::vector<int64_t> tok = window_tokens(g);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "window_fwd", [&] {
    using T = scalar_t;
    const int64_t L = g.len, ls = padded(L);
    const BiasMatrices<T> bm = bias_matrices<T>(g, rel, nh, table.defined() ? table.data_ptr<T>() : nullptr, ls);
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    T* op = out.data_ptr<T>();
    T* pp = save_probs ? probs.data_ptr<T>() : nullptr;
    const TileMM<T> tmm{small_mm_fits(d) && small_mm_fits(L)};
    const int64_t ld = tmm.fast ? padded(d) : d;
    at::parallel_for(0, b * nh * g.nwin, 1, [&](int64_t begin, int64_t end) {
      const DenormalsAreZero daz;
      std::vector<T> qw(L * ld, T(0)), kw(L * ld, T(0)), vw(L * ld, T(0)), ow(L * ld, T(0));
      std::vector<T> kt(tmm.fast ? d * ls : 0, T(0)), p(L * ls, T(0)), inv(L, T(1));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / g.nwin, win = t % g.nwin, base = bh * n * d;
        const int64_t* tk = tok.data() + win * L;
        gather<T>(qp + base, tk, L, d, qw.data(), ld);
        if (tmm.fast) {
          gather_t<T>(kp + base, tk, L, d, kt.data(), ls);
        } else {
          gather<T>(kp + base, tk, L, d, kw.data(), ld);
        }
        gather<T>(vp + base, tk, L, d, vw.data(), ld);
        const T* bias = bm.of(window_kind(g, win), bh % nh);
        // saved probabilities are normalized before the product (the backward needs them so); otherwise
        // the rows of the output are scaled instead, L x d multiplications rather than L x L
        window_probs<T>(tmm, qw.data(), kw.data(), tmm.fast ? kt.data() : nullptr, ld, bias, L, ls, d,
                        static_cast<T>(scale), p.data(), pp ? nullptr : inv.data());
        if (pp)
          for (int64_t l = 0; l < L; ++l) copy_row(p.data() + l * ls, pp + (t * L + l) * L, L);
        tmm(L, d, L, T(1), p.data(), ls, 1, vw.data(), ld, nullptr, 0, ow.data(), ld);
        T* o = op + base;
        for (int64_t l = 0; l < L; ++l) {
          const T* src = ow.data() + l * ld;
          T* dst = o + tk[l] * d;
          const T r = inv[l];
          for (int64_t c = 0; c < d; ++c) dst[c] = src[c] * r;
        }
      }
    });
  });
  return {out, probs};
}

Tensor window_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& table, int64_t h,
                  int64_t w, int64_t ws, int64_t shift, double scale) {
  return std::get<0>(window_forward(q, k, v, table, h, w, ws, shift, scale, false));
}

std::tuple<Tensor, Tensor> window_fwd_train(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const std::optional<Tensor>& table, int64_t h, int64_t w, int64_t ws,
                                            int64_t shift, double scale) {
  return window_forward(q, k, v, table, h, w, ws, shift, scale, true);
}

// The backward of every window, from the forward's probabilities when given (probs_, as window_fwd_train
// saves them), else recomputing them from q, k and the bias.
std::tuple<Tensor, Tensor, Tensor, Tensor> window_backward(const Tensor& grad_, const Tensor& q_, const Tensor& k_,
                                                           const Tensor& v_, const Tensor* probs_,
                                                           const std::optional<Tensor>& table_, int64_t h, int64_t w,
                                                           int64_t ws, int64_t shift, double scale) {
  Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  Tensor grad = grad_.to(q.scalar_type()).contiguous();
  Tensor probs = probs_ ? probs_->to(q.scalar_type()).contiguous() : Tensor();
  Tensor table = table_.has_value() ? table_->to(q.scalar_type()).contiguous() : Tensor();
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  const WindowGeometry g(h, w, ws, shift);
  Tensor dq = at::empty_like(q), dk = at::empty_like(q), dv = at::empty_like(q);
  const int64_t tsize = (2 * ws - 1) * (2 * ws - 1), L = g.len, ls = padded(L);
  const int64_t nthreads = at::get_num_threads();
  // d(bias matrix) of every head, summed over the windows a thread handles: (threads, nh, L, ls)
  Tensor parts = at::zeros({table.defined() ? nthreads : 0, nh, L, ls}, q.options());
  Tensor dtable = table.defined() ? at::zeros({tsize, nh}, q.options()) : at::zeros({0}, q.options());
  const std::vector<int32_t> rel = rel_indices(g);
  const std::vector<int64_t> tok = window_tokens(g);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "window_bwd", [&] {
    using T = scalar_t;
    const bool saved = probs.defined();
    const BiasMatrices<T> bm =
        saved ? BiasMatrices<T>{} : bias_matrices<T>(g, rel, nh, table.defined() ? table.data_ptr<T>() : nullptr, ls);
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *gp = grad.data_ptr<T>();
    const T* prp = saved ? probs.data_ptr<T>() : nullptr;
    T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
    T* pp = table.defined() ? parts.data_ptr<T>() : nullptr;
    const T sc = static_cast<T>(scale);
    const TileMM<T> tmm{small_mm_fits(d) && small_mm_fits(L)};
    const int64_t ld = tmm.fast ? padded(d) : d;
    at::parallel_for(0, b * nh * g.nwin, 1, [&](int64_t begin, int64_t end) {
      const DenormalsAreZero daz;
      std::vector<T> qw(L * ld, T(0)), kw(L * ld, T(0)), vw(L * ld, T(0)), gw(L * ld, T(0));
      std::vector<T> dqw(L * ld, T(0)), dkw(L * ld, T(0)), dvw(L * ld, T(0));
      std::vector<T> kt(tmm.fast && !saved ? d * ls : 0, T(0)), vt(tmm.fast ? d * ls : 0, T(0));
      std::vector<T> p(L * ls, T(0)), dp(L * ls, T(0));
      T* part = pp ? pp + std::min<int64_t>(at::get_thread_num(), nthreads - 1) * nh * L * ls : nullptr;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / g.nwin, win = t % g.nwin, head = bh % nh, base = bh * n * d;
        const int64_t* tk = tok.data() + win * L;
        gather<T>(qp + base, tk, L, d, qw.data(), ld);
        gather<T>(kp + base, tk, L, d, kw.data(), ld);
        gather<T>(gp + base, tk, L, d, gw.data(), ld);
        if (tmm.fast) {
          gather_t<T>(vp + base, tk, L, d, vt.data(), ls);
        } else {
          gather<T>(vp + base, tk, L, d, vw.data(), ld);
        }
        if (saved) {
          for (int64_t l = 0; l < L; ++l) copy_row(prp + (t * L + l) * L, p.data() + l * ls, L);
        } else {
          if (tmm.fast) gather_t<T>(kp + base, tk, L, d, kt.data(), ls);
          window_probs<T>(tmm, qw.data(), kw.data(), tmm.fast ? kt.data() : nullptr, ld,
                          bm.of(window_kind(g, win), head), L, ls, d, sc, p.data(), nullptr);
        }
        tmm(L, d, L, T(1), p.data(), 1, ls, gw.data(), ld, nullptr, 0, dvw.data(), ld);
        tmm(L, L, d, T(1), gw.data(), ld, 1, tmm.fast ? vt.data() : nullptr, ls, vw.data(), ld, dp.data(), ls);
        softmax_grad_rows(p.data(), dp.data(), part ? part + head * L * ls : nullptr, L, L, ls, sc);
        tmm(L, d, L, T(1), dp.data(), ls, 1, kw.data(), ld, nullptr, 0, dqw.data(), ld);
        tmm(L, d, L, T(1), dp.data(), 1, ls, qw.data(), ld, nullptr, 0, dkw.data(), ld);
        scatter<T>(dqw.data(), ld, tk, L, d, dqp + base);
        scatter<T>(dkw.data(), ld, tk, L, d, dkp + base);
        scatter<T>(dvw.data(), ld, tk, L, d, dvp + base);
      }
    });
    if (pp) {
      T* dt = dtable.data_ptr<T>();
      for (int64_t th = 0; th < nthreads; ++th)
        for (int64_t head = 0; head < nh; ++head) {
          const T* db = pp + (th * nh + head) * L * ls;
          for (int64_t i = 0; i < L; ++i)
            for (int64_t j = 0; j < L; ++j) dt[rel[i * L + j] * nh + head] += db[i * ls + j];
        }
    }
  });
  return {dq, dk, dv, table.defined() ? dtable.to(table_->scalar_type()) : dtable};  // in the table's own dtype
}

std::tuple<Tensor, Tensor, Tensor, Tensor> window_bwd(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const std::optional<Tensor>& table, int64_t h,
                                                      int64_t w, int64_t ws, int64_t shift, double scale) {
  return window_backward(grad, q, k, v, nullptr, table, h, w, ws, shift, scale);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> window_bwd_probs(const Tensor& grad, const Tensor& q, const Tensor& k,
                                                            const Tensor& v, const Tensor& probs,
                                                            const std::optional<Tensor>& table, int64_t h, int64_t w,
                                                            int64_t ws, int64_t shift, double scale) {
  return window_backward(grad, q, k, v, &probs, table, h, w, ws, shift, scale);
}

}  // namespace FUSIONBLOCKS_ISA
}  // namespace cpu
}  // namespace fusionblocks
