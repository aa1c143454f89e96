// Swin (shifted) window attention on CPU, forward and backward, with the cyclic shift, the window
// partition, the relative-position-bias gather and the shift mask done as index arithmetic: each task
// gathers one (batch, head, window) straight from the raster-order tensors and scatters its result back.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "attention_tile.h"

namespace fusionblocks {
namespace cpu {
namespace {

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

template <typename T>
struct MatrixBias {
  const T* m;
  T* dm;
  int64_t len;
  void add(int64_t i, int64_t j0, int64_t nj, T* s) const {
    const T* r = m + i * len + j0;
    for (int64_t c = 0; c < nj; ++c) s[c] += r[c];
  }
  T grad(int64_t i, int64_t j0, int64_t nj, const T* ds) {
    if (dm != nullptr) {
      T* r = dm + i * len + j0;
      for (int64_t c = 0; c < nj; ++c) r[c] += ds[c];
    }
    return T(0);
  }
};

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

// rel_index(i, j) of every pair of window positions, row-major len x len
std::vector<int32_t> rel_indices(const WindowGeometry& g) {
  std::vector<int32_t> idx(g.len * g.len);
  for (int64_t i = 0; i < g.len; ++i)
    for (int64_t j = 0; j < g.len; ++j) idx[i * g.len + j] = static_cast<int32_t>(g.rel_index(i, j));
  return idx;
}

// bias + mask of one (window, head) as a len x len matrix
template <typename T>
void fill_bias(const WindowGeometry& g, const int32_t* rel, int64_t win, int64_t head, int64_t nh, const T* table,
               int64_t* region, T* m) {
  const int64_t L = g.len;
  if (g.shift)
    for (int64_t l = 0; l < L; ++l) region[l] = g.region(win, l);
  for (int64_t i = 0; i < L; ++i) {
    T* row = m + i * L;
    const int32_t* ri = rel + i * L;
    if (table) {
      for (int64_t j = 0; j < L; ++j) row[j] = table[ri[j] * nh + head];
    } else {
      std::fill(row, row + L, T(0));
    }
    if (g.shift)
      for (int64_t j = 0; j < L; ++j) row[j] += region[j] != region[i] ? T(-100) : T(0);
  }
}

template <typename T>
void gather(const T* src, const WindowGeometry& g, int64_t win, int64_t d, T* dst) {
  for (int64_t l = 0; l < g.len; ++l) {
    const T* s = src + g.token(win, l) * d;
    std::copy(s, s + d, dst + l * d);
  }
}

template <typename T>
void scatter(const T* src, const WindowGeometry& g, int64_t win, int64_t d, T* dst) {
  for (int64_t l = 0; l < g.len; ++l) std::copy(src + l * d, src + (l + 1) * d, dst + g.token(win, l) * d);
}

Tensor window_fwd(const Tensor& q_, const Tensor& k_, const Tensor& v_, const std::optional<Tensor>& table_,
                  int64_t h, int64_t w, int64_t ws, int64_t shift, double scale) {
  check_inputs(q_, k_, v_, table_, h, w, ws, shift);
  Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  Tensor table = table_.has_value() ? table_->to(q.scalar_type()).contiguous() : Tensor();
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  const WindowGeometry g(h, w, ws, shift);
  Tensor out = at::empty_like(q);
  const std::vector<int32_t> rel = rel_indices(g);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "window_fwd", [&] {
    using T = scalar_t;
    const T* tp = table.defined() ? table.data_ptr<T>() : nullptr;
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, b * nh * g.nwin, 1, [&](int64_t begin, int64_t end) {
      const int64_t L = g.len;
      std::vector<T> qw(L * d), kw(L * d), vw(L * d), ow(L * d), lse(L), bm(L * L);
      std::vector<int64_t> region(L);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / g.nwin, win = t % g.nwin, base = bh * n * d;
        fill_bias<T>(g, rel.data(), win, bh % nh, nh, tp, region.data(), bm.data());
        gather<T>(qp + base, g, win, d, qw.data());
        gather<T>(kp + base, g, win, d, kw.data());
        gather<T>(vp + base, g, win, d, vw.data());
        MatrixBias<T> bias{bm.data(), nullptr, L};
        attn_fwd<T>(qw.data(), d, kw.data(), d, vw.data(), d, ow.data(), d, lse.data(), 1, L, L, d,
                    static_cast<T>(scale), bias);
        scatter<T>(ow.data(), g, win, d, op + base);
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> window_bwd(const Tensor& grad_, const Tensor& q_, const Tensor& k_,
                                                      const Tensor& v_, const std::optional<Tensor>& table_, int64_t h,
                                                      int64_t w, int64_t ws, int64_t shift, double scale) {
  check_inputs(q_, k_, v_, table_, h, w, ws, shift);
  Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  Tensor grad = grad_.to(q.scalar_type()).contiguous();
  Tensor table = table_.has_value() ? table_->to(q.scalar_type()).contiguous() : Tensor();
  const int64_t b = q.size(0), nh = q.size(1), n = q.size(2), d = q.size(3);
  const WindowGeometry g(h, w, ws, shift);
  Tensor dq = at::empty_like(q), dk = at::empty_like(q), dv = at::empty_like(q);
  const int64_t tsize = (2 * ws - 1) * (2 * ws - 1);
  const int64_t nthreads = at::get_num_threads();
  Tensor parts = at::zeros({table.defined() ? nthreads : 0, tsize, nh}, q.options());
  const std::vector<int32_t> rel = rel_indices(g);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "window_bwd", [&] {
    using T = scalar_t;
    const T* tp = table.defined() ? table.data_ptr<T>() : nullptr;
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *gp = grad.data_ptr<T>();
    T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
    T* pp = table.defined() ? parts.data_ptr<T>() : nullptr;
    at::parallel_for(0, b * nh * g.nwin, 1, [&](int64_t begin, int64_t end) {
      const int64_t L = g.len;
      std::vector<T> qw(L * d), kw(L * d), vw(L * d), ow(L * d), gw(L * d), dqw(L * d), dkw(L * d), dvw(L * d);
      std::vector<T> lse(L), bm(L * L), dbm(L * L);
      std::vector<int64_t> region(L);
      T* part = pp ? pp + std::min<int64_t>(at::get_thread_num(), nthreads - 1) * tsize * nh : nullptr;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t bh = t / g.nwin, win = t % g.nwin, head = bh % nh, base = bh * n * d;
        fill_bias<T>(g, rel.data(), win, head, nh, tp, region.data(), bm.data());
        gather<T>(qp + base, g, win, d, qw.data());
        gather<T>(kp + base, g, win, d, kw.data());
        gather<T>(vp + base, g, win, d, vw.data());
        gather<T>(gp + base, g, win, d, gw.data());
        MatrixBias<T> bias{bm.data(), part ? dbm.data() : nullptr, L};
        attn_fwd<T>(qw.data(), d, kw.data(), d, vw.data(), d, ow.data(), d, lse.data(), 1, L, L, d,
                    static_cast<T>(scale), bias);
        std::fill(dqw.begin(), dqw.end(), T(0));
        std::fill(dkw.begin(), dkw.end(), T(0));
        std::fill(dvw.begin(), dvw.end(), T(0));
        std::fill(dbm.begin(), dbm.end(), T(0));
        attn_bwd<T>(qw.data(), d, kw.data(), d, vw.data(), d, ow.data(), d, gw.data(), d, lse.data(), 1, dqw.data(), d,
                    dkw.data(), d, dvw.data(), d, L, L, d, static_cast<T>(scale), bias);
        scatter<T>(dqw.data(), g, win, d, dqp + base);
        scatter<T>(dkw.data(), g, win, d, dkp + base);
        scatter<T>(dvw.data(), g, win, d, dvp + base);
        if (part) {
          for (int64_t i = 0; i < L; ++i)
            for (int64_t j = 0; j < L; ++j) part[rel[i * L + j] * nh + head] += dbm[i * L + j];
        }
      }
    });
  });
  Tensor dtable = table.defined() ? parts.sum(0) : at::zeros({0}, q.options());
  return {dq, dk, dv, dtable};
}

}  // namespace
}  // namespace cpu
}  // namespace fusionblocks

TORCH_LIBRARY_IMPL(fusionblocks_C, CPU, m) {
  m.impl("window_fwd", &fusionblocks::cpu::window_fwd);
  m.impl("window_bwd", &fusionblocks::cpu::window_bwd);
}
