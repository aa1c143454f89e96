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
  // dlg_part is (b, nh) or, split, (b, nh, nkb): sum the key blocks, then the batch (no reshape with -1, which an
  // empty batch makes ambiguous; b = 0 gives a zero log_gamma gradient)
  return {dq, dk, dv, (split_keys ? dlg_part.sum(-1) : dlg_part).sum(0)};
}

// One pass of the decomposed mode over lines of a (h x w) grid: rows (along w) or columns (along h).
// Line `l` starts at token `l * line_start` and steps `tok_step` tokens per position.
struct Lines {
  int64_t count, len, line_start, tok_step;
  int64_t token(int64_t l, int64_t i) const { return l * line_start + i * tok_step; }
};

Lines rows_of(int64_t h, int64_t w) { return {h, w, w, 1}; }
Lines cols_of(int64_t h, int64_t w) { return {w, h, 1, w}; }

// What every line of one pass shares: the geometry, lg[head] * |i - j| of every head as len x len
// matrices with rows padded to ls (nh, len, ls), and the tile layout.
template <typename T>
struct LinePass {
  Lines ln;
  int64_t n, d, nh, L, ls, ld;
  T scale;
  TileMM<T> tmm;
  std::vector<T> bias;
  LinePass(Lines ln_, const std::vector<T>& g, int64_t n_, int64_t d_, T scale_)
      : ln(ln_), n(n_), d(d_), nh(static_cast<int64_t>(g.size())), L(ln_.len), ls(padded(ln_.len)), scale(scale_),
        tmm{small_mm_fits(d_) && small_mm_fits(ln_.len)} {
    ld = tmm.fast ? padded(d) : d;
    bias.assign(nh * L * ls, T(0));
    for (int64_t head = 0; head < nh; ++head)
      for (int64_t i = 0; i < L; ++i)
        for (int64_t j = 0; j < L; ++j) bias[(head * L + i) * ls + j] = g[head] * static_cast<T>(std::abs(i - j));
  }
  const T* bias_of(int64_t head) const { return bias.data() + head * L * ls; }
  // whether the tile products use the token rows in place (line_fwd): rows of whole vectors, since the
  // float tile product reads and writes B and C rows up to padded(n)
  bool direct() const { return d % kPad == 0; }
};

// One thread's tiles for the lines of one pass.
template <typename T>
struct LineTiles {
  std::vector<T> qw, kw, vw, gw, ow, dkw, dvw, kt, vt, p, dp, inv, lw;
  std::vector<int64_t> tok;
  explicit LineTiles(const LinePass<T>& ps) {
    const int64_t L = ps.L, ls = ps.ls, ld = ps.ld, d = ps.d, td = ps.tmm.fast ? d * ls : 0;
    for (auto* t : {&qw, &kw, &vw, &gw, &ow, &dkw, &dvw}) t->assign(L * ld, T(0));
    kt.assign(td, T(0));
    vt.assign(td, T(0));
    p.assign(L * ls, T(0));
    dp.assign(L * ls, T(0));
    inv.assign(L, T(1));
    lw.assign(L, T(0));
    tok.resize(L);
  }
  int64_t base = 0, first = 0, la = 0;  // of the current line: its slice, its first token's row, row stride

  // Starts line l of (batch, head) bh: its tokens, and the row stride of its operands (see line_fwd).
  void start(const LinePass<T>& ps, int64_t bh, int64_t l) {
    for (int64_t i = 0; i < ps.L; ++i) tok[i] = ps.ln.token(l, i);
    base = bh * ps.n * ps.d;
    first = base + tok[0] * ps.d;
    la = ps.direct() ? ps.ln.tok_step * ps.d : ps.ld;
  }
  // The line's rows of src (token-major, d per token) as a tile-product operand of row stride la: in
  // place, or gathered into tile.
  const T* rows(const LinePass<T>& ps, const T* src, std::vector<T>& tile) const {
    if (ps.direct()) return src + first;
    gather<T>(src + base, tok.data(), ps.L, ps.d, tile.data(), ps.ld);
    return tile.data();
  }
};

// The forward of line l of (batch, head) bh: scores, softmax and products in one tile. Saves the
// log-sum-exp of every query (lse, raster order) or, when `probs` is given, the normalized probabilities
// instead: (B, heads, lines, len, len).
//
// A line's tokens are evenly spaced (a row: next to each other; a column: one grid row apart), so when
// the head dim fills whole vectors (d % kPad == 0) the products read q, k, v and write the output in
// place, at a row stride of tok_step * d: no gathered copies. Otherwise (e.g. HEMF's D = 12 on AVX2) the
// rows are gathered into padded tiles. Only K^T is always built (gather_t), the tile product's B operand.
template <typename T>
void line_fwd(const LinePass<T>& ps, LineTiles<T>& s, int64_t bh, int64_t l, const T* q, const T* k, const T* v,
              T* out, T* lse, T* probs) {
  const int64_t L = ps.L, ls = ps.ls, ld = ps.ld, d = ps.d, t = bh * ps.ln.count + l;
  const TileMM<T>& tmm = ps.tmm;
  s.start(ps, bh, l);
  const int64_t* tok = s.tok.data();
  const int64_t base = s.base, la = s.la;
  const bool direct = ps.direct();
  const T* qa = s.rows(ps, q, s.qw);
  const T* va = s.rows(ps, v, s.vw);
  const T* ka = tmm.fast ? nullptr : s.rows(ps, k, s.kw);  // the fast product takes K^T instead
  if (tmm.fast) gather_t<T>(k + base, tok, L, d, s.kt.data(), ls);
  T* oa = direct ? out + s.first : s.ow.data();
  tmm(L, L, d, ps.scale, qa, la, 1, tmm.fast ? s.kt.data() : nullptr, ls, ka, la, s.p.data(), ls);
  // rows normalized before the product when the output is written in place or the probabilities saved;
  // otherwise each output row is scaled by 1 / sum as it is scattered
  const bool normalize = direct || probs;
  softmax_rows(s.p.data(), ps.bias_of(bh % ps.nh), L, L, ls, normalize ? nullptr : s.inv.data(),
               probs ? nullptr : s.lw.data());
  if (probs)
    for (int64_t i = 0; i < L; ++i) copy_row(s.p.data() + i * ls, probs + (t * L + i) * L, L);
  tmm(L, d, L, T(1), s.p.data(), ls, 1, va, la, nullptr, 0, oa, la);
  if (!probs)
    for (int64_t i = 0; i < L; ++i) lse[bh * ps.n + tok[i]] = s.lw[i];
  if (!direct)
    for (int64_t i = 0; i < L; ++i) {
      const T* src = s.ow.data() + i * ld;
      T* dst = out + base + tok[i] * d;
      const T r = normalize ? T(1) : s.inv[i];
      for (int64_t c = 0; c < d; ++c) dst[c] = src[c] * r;
    }
}

// The backward of line l of bh: writes (accumulate = false) or adds (true) dq and dk, writes dv (which
// may alias dout: a line reads its rows of dout before writing them), adds d(score) to the thread's
// d(bias) (part, (nh, len, ls)). The probabilities are the forward's (probs, as line_fwd saves them) or,
// without them, recomputed from its log-sum-exps (lse, raster order); delta = rowsum(p * dp) (equal to
// rowsum(out * dout)), so out is not read. Operands in place as in line_fwd; results too, except what is
// added (dq, dk of the second pass) and a dv that overwrites dout (through the tile dvw).
template <typename T>
void line_bwd(const LinePass<T>& ps, LineTiles<T>& s, int64_t bh, int64_t l, const T* q, const T* k, const T* v,
              const T* dout, const T* lse, const T* probs, T* dq, T* dk, T* dv, bool accumulate, T* part) {
  const int64_t L = ps.L, ls = ps.ls, ld = ps.ld, d = ps.d, t = bh * ps.ln.count + l;
  const int64_t head = bh % ps.nh;
  const TileMM<T>& tmm = ps.tmm;
  s.start(ps, bh, l);
  const int64_t* tok = s.tok.data();
  const int64_t base = s.base, la = s.la;
  const bool direct = ps.direct();
  const T* qa = s.rows(ps, q, s.qw);
  const T* ka = s.rows(ps, k, s.kw);
  const T* ga = s.rows(ps, dout, s.gw);
  const T* va = tmm.fast ? nullptr : s.rows(ps, v, s.vw);  // the fast product takes V^T instead
  if (tmm.fast) gather_t<T>(v + base, tok, L, d, s.vt.data(), ls);
  const bool dqk_direct = direct && !accumulate, dv_direct = direct && dv != dout;
  T* dqa = dqk_direct ? dq + s.first : s.ow.data();  // ow is free in the backward
  T* dka = dqk_direct ? dk + s.first : s.dkw.data();
  T* dva = dv_direct ? dv + s.first : s.dvw.data();
  const int64_t lqk = dqk_direct ? la : ld, lv = dv_direct ? la : ld;
  if (probs) {
    for (int64_t i = 0; i < L; ++i) copy_row(probs + (t * L + i) * L, s.p.data() + i * ls, L);
  } else {
    for (int64_t i = 0; i < L; ++i) s.lw[i] = lse[bh * ps.n + tok[i]];
    if (tmm.fast) gather_t<T>(k + base, tok, L, d, s.kt.data(), ls);
    tmm(L, L, d, ps.scale, qa, la, 1, tmm.fast ? s.kt.data() : nullptr, ls, ka, la, s.p.data(), ls);
    exp_rows(s.p.data(), ps.bias_of(head), s.lw.data(), L, L, ls);
  }
  tmm(L, L, d, T(1), ga, la, 1, tmm.fast ? s.vt.data() : nullptr, ls, va, la, s.dp.data(), ls);
  tmm(L, d, L, T(1), s.p.data(), 1, ls, ga, la, nullptr, 0, dva, lv);
  softmax_grad_rows(s.p.data(), s.dp.data(), part + head * L * ls, L, L, ls, ps.scale);
  tmm(L, d, L, T(1), s.dp.data(), ls, 1, ka, la, nullptr, 0, dqa, lqk);
  tmm(L, d, L, T(1), s.dp.data(), 1, ls, qa, la, nullptr, 0, dka, lqk);
  if (accumulate) {
    scatter_add<T>(s.ow.data(), ld, tok, L, d, dq + base);
    scatter_add<T>(s.dkw.data(), ld, tok, L, d, dk + base);
  } else if (!dqk_direct) {
    scatter<T>(s.ow.data(), ld, tok, L, d, dq + base);
    scatter<T>(s.dkw.data(), ld, tok, L, d, dk + base);
  }
  if (!dv_direct) scatter<T>(s.dvw.data(), ld, tok, L, d, dv + base);
}

// d(log_gamma) per head from the threads' d(bias) sums of one pass: sum of d(score) * |i - j|.
template <typename T>
void add_dlg(const LinePass<T>& ps, const std::vector<T>& parts, int64_t nthreads, std::vector<T>& dlg) {
  const int64_t L = ps.L, ls = ps.ls;
  for (int64_t th = 0; th < nthreads; ++th)
    for (int64_t head = 0; head < ps.nh; ++head) {
      const T* db = parts.data() + (th * ps.nh + head) * L * ls;
      T acc = 0;
      for (int64_t i = 0; i < L; ++i)
        for (int64_t j = 0; j < L; ++j) acc += db[i * ls + j] * static_cast<T>(std::abs(i - j));
      dlg[head] += acc;
    }
}

// Whether each thread takes whole (batch, head) slices, both passes of a slice in a row while its rows
// are still in cache (the columns pass re-reads what the rows pass read or wrote), or the lines of each
// pass are spread over the threads: slices unless that leaves the threads more than 20 % idle.
inline bool slices_per_thread(int64_t slices, int64_t nthreads) {
  const int64_t per = (slices + nthreads - 1) / nthreads;
  return per * nthreads * 5 <= slices * 6;
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
    const LinePass<T> rows(rows_of(h, w), g, n, d, static_cast<T>(scale)), cols(cols_of(h, w), g, n, d, static_cast<T>(scale));
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    T *mp = mid.data_ptr<T>(), *op = out.data_ptr<T>(), *rp = row.data_ptr<T>(), *cp = col.data_ptr<T>();
    T *rl = save_probs ? nullptr : rp, *rpr = save_probs ? rp : nullptr;
    T *cl = save_probs ? nullptr : cp, *cpr = save_probs ? cp : nullptr;
    if (slices_per_thread(b * nh, at::get_num_threads())) {
      at::parallel_for(0, b * nh, 1, [&](int64_t begin, int64_t end) {
        const DenormalsAreZero daz;
        LineTiles<T> sr(rows), sc(cols);
        for (int64_t bh = begin; bh < end; ++bh) {
          for (int64_t l = 0; l < rows.ln.count; ++l) line_fwd<T>(rows, sr, bh, l, qp, kp, vp, mp, rl, rpr);
          for (int64_t l = 0; l < cols.ln.count; ++l) line_fwd<T>(cols, sc, bh, l, qp, kp, mp, op, cl, cpr);
        }
      });
      return;
    }
    for (const bool second : {false, true}) {
      const LinePass<T>& ps = second ? cols : rows;
      at::parallel_for(0, b * nh * ps.ln.count, 1, [&](int64_t begin, int64_t end) {
        const DenormalsAreZero daz;
        LineTiles<T> s(ps);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t bh = t / ps.ln.count, l = t % ps.ln.count;
          if (second) {
            line_fwd<T>(ps, s, bh, l, qp, kp, mp, op, cl, cpr);
          } else {
            line_fwd<T>(ps, s, bh, l, qp, kp, vp, mp, rl, rpr);
          }
        }
      });
    }
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
// The columns pass writes dq, dk and d(mid) (into dv), the rows pass adds to dq, dk and overwrites
// d(mid) with dv line by line (a line reads its d(mid) rows before writing them).
std::tuple<Tensor, Tensor, Tensor, Tensor> dec_backward(const Tensor& grad_, const Tensor& q_, const Tensor& k_,
                                                        const Tensor& v_, const Tensor& lg, const Tensor& mid_,
                                                        const Tensor& row_, const Tensor& col_, int64_t h, int64_t w,
                                                        double scale, bool probs) {
  Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  Tensor grad = grad_.to(q.scalar_type()).contiguous(), mid = mid_.contiguous();
  Tensor row = row_.to(q.scalar_type()).contiguous(), col = col_.to(q.scalar_type()).contiguous();
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  Tensor dq = at::empty_like(q), dk = at::empty_like(q), dv = at::empty_like(q);
  Tensor dlg = at::empty({nh}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "decay_dec_bwd", [&] {
    using T = scalar_t;
    const std::vector<T> g = gammas<T>(lg);
    const LinePass<T> rows(rows_of(h, w), g, n, d, static_cast<T>(scale)), cols(cols_of(h, w), g, n, d, static_cast<T>(scale));
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *mp = mid.data_ptr<T>();
    const T *gp = grad.data_ptr<T>(), *rp = row.data_ptr<T>(), *cp = col.data_ptr<T>();
    const T *rl = probs ? nullptr : rp, *rpr = probs ? rp : nullptr, *cl = probs ? nullptr : cp, *cpr = probs ? cp : nullptr;
    T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
    const int64_t nthreads = at::get_num_threads();
    // d(bias) of every head summed over the lines a thread handles, per pass: (threads, nh, len, ls)
    std::vector<T> rparts(nthreads * nh * rows.L * rows.ls, T(0)), cparts(nthreads * nh * cols.L * cols.ls, T(0));
    auto part_of = [&](std::vector<T>& parts, const LinePass<T>& ps) {
      return parts.data() + std::min<int64_t>(at::get_thread_num(), nthreads - 1) * nh * ps.L * ps.ls;
    };
    if (slices_per_thread(b * nh, nthreads)) {
      at::parallel_for(0, b * nh, 1, [&](int64_t begin, int64_t end) {
        const DenormalsAreZero daz;
        LineTiles<T> sr(rows), sc(cols);
        T *rpart = part_of(rparts, rows), *cpart = part_of(cparts, cols);
        for (int64_t bh = begin; bh < end; ++bh) {
          for (int64_t l = 0; l < cols.ln.count; ++l)
            line_bwd<T>(cols, sc, bh, l, qp, kp, mp, gp, cl, cpr, dqp, dkp, dvp, false, cpart);
          for (int64_t l = 0; l < rows.ln.count; ++l)
            line_bwd<T>(rows, sr, bh, l, qp, kp, vp, dvp, rl, rpr, dqp, dkp, dvp, true, rpart);
        }
      });
    } else {
      for (const bool second : {false, true}) {
        const LinePass<T>& ps = second ? rows : cols;
        at::parallel_for(0, b * nh * ps.ln.count, 1, [&](int64_t begin, int64_t end) {
          const DenormalsAreZero daz;
          LineTiles<T> s(ps);
          T* part = part_of(second ? rparts : cparts, ps);
          for (int64_t t = begin; t < end; ++t) {
            const int64_t bh = t / ps.ln.count, l = t % ps.ln.count;
            if (second) {
              line_bwd<T>(ps, s, bh, l, qp, kp, vp, dvp, rl, rpr, dqp, dkp, dvp, true, part);
            } else {
              line_bwd<T>(ps, s, bh, l, qp, kp, mp, gp, cl, cpr, dqp, dkp, dvp, false, part);
            }
          }
        });
      }
    }
    std::vector<T> acc(nh, T(0));
    add_dlg<T>(cols, cparts, nthreads, acc);
    add_dlg<T>(rows, rparts, nthreads, acc);
    std::copy(acc.begin(), acc.end(), dlg.data_ptr<T>());
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
