// Blocked attention on CPU with an online softmax and an additive bias computed on the fly.
//
// Every routine works on one attention problem: `nq` queries against `nk` keys, rows of head dim `d`
// addressed through a row stride (so rows of a column of a grid, or gathered window buffers, need no
// copy). The bias is a functor with
//   void add(int64_t i, int64_t j0, int64_t nj, T* s) const   // s[c] += bias(i, j0 + c)
//   T grad(int64_t i, int64_t j0, int64_t nj, const T* ds)     // consumes d(score); returns its share of d(param)
// Matrix products go through the BLAS that torch links (sgemm_/dgemm_, resolved weakly; a plain loop
// stands in where torch exports none), so no N x N tensor exists:
// the forward keeps a (BQ x BK) score tile, the backward recomputes tiles from the saved log-sum-exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(__SSE__)
#include <xmmintrin.h>
#define FUSIONBLOCKS_HAVE_MXCSR 1
#endif

namespace fusionblocks {
namespace cpu {

constexpr int64_t kBlockQ = 64;

// Flushes denormals to zero on this thread while alive. Masked scores (-100, and exp clamped at
// exp(-87)) make probabilities whose products are denormal floats, which the BLAS and the vector
// loops process orders of magnitude slower; values below 1e-38 cannot change any softmax result.
class DenormalsAreZero {
 public:
#ifdef FUSIONBLOCKS_HAVE_MXCSR
  DenormalsAreZero() : csr_(_mm_getcsr()) { _mm_setcsr(csr_ | 0x8040u); }
  ~DenormalsAreZero() { _mm_setcsr(csr_); }

 private:
  unsigned csr_;
#endif
  DenormalsAreZero(const DenormalsAreZero&) = delete;
  DenormalsAreZero& operator=(const DenormalsAreZero&) = delete;
};
constexpr int64_t kBlockK = 512;

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

template <typename T>
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const T* alpha,
                      const T* a, const int* lda, const T* b, const int* ldb, const T* beta, T* c, const int* ldc);
template <>
inline void blas_gemm<float>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                             const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                             const float* beta, float* c, const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <>
inline void blas_gemm<double>(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                              const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                              const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <typename T>
inline bool have_blas();
template <>
inline bool have_blas<float>() { return sgemm_ != nullptr; }
template <>
inline bool have_blas<double>() { return dgemm_ != nullptr; }

// Row-major C(m x n) = alpha * op(A) op(B) + beta * C, with leading dimensions of the row-major storage.
template <typename T>
inline void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (have_blas<T>()) {
    // column-major view: C^T = op(B)^T op(A)^T
    const char tb_c = tb ? 'T' : 'N', ta_c = ta ? 'T' : 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    blas_gemm<T>(&tb_c, &ta_c, &mi, &ni, &ki, &alpha, b, &la, a, &lb, &beta, c, &lc);
    return;
  }
  for (int64_t i = 0; i < m; ++i) {
    T* cr = c + i * ldc;
    if (beta == T(0)) {
      std::fill(cr, cr + n, T(0));
    } else if (beta != T(1)) {
      for (int64_t j = 0; j < n; ++j) cr[j] *= beta;
    }
    for (int64_t p = 0; p < k; ++p) {
      const T av = alpha * (ta ? a[p * lda + i] : a[i * lda + p]);
      if (tb) {
        for (int64_t j = 0; j < n; ++j) cr[j] += av * b[j * ldb + p];
      } else {
        const T* br = b + p * ldb;
        for (int64_t j = 0; j < n; ++j) cr[j] += av * br[j];
      }
    }
  }
}

// row[c] = exp(row[c] - m); returns the sum. The float version is compiled for AVX-512, AVX2 and
// the baseline ISA and picked at load time.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define FUSIONBLOCKS_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FUSIONBLOCKS_MULTIVERSION
#endif

// Rows of score tiles are padded to a multiple of kPad entries, so the float loops below run over whole
// vectors (no scalar remainder); padding entries are written but never counted.
constexpr int64_t kPad = 16;
inline int64_t padded(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

typedef float vfloat __attribute__((vector_size(kPad * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kPad * sizeof(int32_t))));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

// exp on kPad float lanes at once (GCC vector extensions, lowered to the ISA of each clone below):
// Cody-Waite range reduction and a degree-6 polynomial (Cephes expf coefficients), about 2 ulp;
// inputs below -87 give exp(-87) instead of a denormal or 0, which no softmax row can notice.
inline vfloat vexp(vfloat x) {
  const vfloat lo = vfloat{} - 87.0f, hi = vfloat{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float magic = 12582912.0f;
  const vfloat n = (x * 1.44269504088896341f + magic) - magic;
  vfloat r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vfloat p = vfloat{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

FUSIONBLOCKS_MULTIVERSION inline float exp_shift_sum(float* row, int64_t n, float m) {
  vfloat z = vfloat{};
  vfloat lane;
  for (int64_t c = 0; c < kPad; ++c) lane[c] = static_cast<float>(c);
  for (int64_t c = 0; c < n; c += kPad) {
    const vfloat e = vexp(vload(row + c) - m);
    vstore(row + c, e);
    z += lane < static_cast<float>(n - c) ? e : vfloat{};
  }
  float total = 0.0f;
  for (int64_t c = 0; c < kPad; ++c) total += z[c];
  return total;
}

// C (m x 16*NV, row stride ldc) = alpha * A B for small float tiles, A(r, p) = a[r * ars + p * acs],
// B (k x 16*NV, row stride ldb): register-blocked over several rows of C, no call overhead (the BLAS spends
// more on argument checks than on the arithmetic of one attention window).
template <int NV, int RB>
__attribute__((always_inline)) inline void small_mm_rows(int64_t r0, float alpha, int64_t k, const float* a,
                                                         int64_t ars, int64_t acs, const float* b, int64_t ldb,
                                                         float* c, int64_t ldc) {
  vfloat acc[RB][NV] = {};
  for (int64_t p = 0; p < k; ++p) {
    vfloat bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + p * ldb + v * kPad);
    for (int r = 0; r < RB; ++r) {
      const float av = a[(r0 + r) * ars + p * acs];
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) vstore(c + (r0 + r) * ldc + v * kPad, acc[r][v] * alpha);
}

// RB rows of C at a time (RB * NV accumulators), the remainder one row at a time
template <int NV>
__attribute__((always_inline)) inline void small_mm_body(int64_t m, int64_t k, float alpha, const float* a,
                                                         int64_t ars, int64_t acs, const float* b, int64_t ldb,
                                                         float* c, int64_t ldc) {
  constexpr int RB = NV <= 2 ? 8 : (NV == 3 ? 6 : 5);
  int64_t r0 = 0;
  for (; r0 + RB <= m; r0 += RB) small_mm_rows<NV, RB>(r0, alpha, k, a, ars, acs, b, ldb, c, ldc);
  for (; r0 < m; ++r0) small_mm_rows<NV, 1>(r0, alpha, k, a, ars, acs, b, ldb, c, ldc);
}

#define FUSIONBLOCKS_SMALL_MM(NV)                                                                              \
  FUSIONBLOCKS_MULTIVERSION inline void small_mm_##NV(int64_t m, int64_t k, float alpha, const float* a,       \
                                                      int64_t ars, int64_t acs, const float* b, int64_t ldb,   \
                                                      float* c, int64_t ldc) {                                 \
    small_mm_body<NV>(m, k, alpha, a, ars, acs, b, ldb, c, ldc);                                                 \
  }
FUSIONBLOCKS_SMALL_MM(1)
FUSIONBLOCKS_SMALL_MM(2)
FUSIONBLOCKS_SMALL_MM(3)
FUSIONBLOCKS_SMALL_MM(4)
#undef FUSIONBLOCKS_SMALL_MM

// small_mm for n <= 4 * kPad columns (written up to padded(n), so ldb, ldc and the buffers must allow it).
inline bool small_mm_fits(int64_t n) { return n > 0 && n <= 4 * kPad; }
inline void small_mm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t ars, int64_t acs,
                     const float* b, int64_t ldb, float* c, int64_t ldc) {
  switch (padded(n) / kPad) {
    case 1: small_mm_1(m, k, alpha, a, ars, acs, b, ldb, c, ldc); break;
    case 2: small_mm_2(m, k, alpha, a, ars, acs, b, ldb, c, ldc); break;
    case 3: small_mm_3(m, k, alpha, a, ars, acs, b, ldb, c, ldc); break;
    default: small_mm_4(m, k, alpha, a, ars, acs, b, ldb, c, ldc); break;
  }
}

inline double exp_shift_sum(double* row, int64_t n, double m) {
  double z = 0.0;
  for (int64_t c = 0; c < n; ++c) {
    const double e = std::exp(row[c] - m);
    row[c] = e;
    z += e;
  }
  return z;
}

FUSIONBLOCKS_MULTIVERSION inline float row_max(const float* row, int64_t n, float m) {
  const vfloat lowest = vfloat{} - std::numeric_limits<float>::infinity();
  vfloat mv = lowest + 0.0f;
  vfloat lane;
  for (int64_t c = 0; c < kPad; ++c) lane[c] = static_cast<float>(c);
  for (int64_t c = 0; c < n; c += kPad) {
    vfloat v = vload(row + c);
    v = lane < static_cast<float>(n - c) ? v : lowest;
    mv = v > mv ? v : mv;
  }
  for (int64_t c = 0; c < kPad; ++c) m = std::max(m, mv[c]);
  return m;
}

inline double row_max(const double* row, int64_t n, double m) {
  for (int64_t c = 0; c < n; ++c) m = std::max(m, row[c]);
  return m;
}

// Softmax of each of `rows` rows of p (length n, stride ld, padded to whole vectors) after adding
// bias (same layout, zero padding). Rows are normalized, or left as exp(s - max) with inv[r] = 1 / sum.
FUSIONBLOCKS_MULTIVERSION inline void softmax_rows(float* p, const float* bias, int64_t rows, int64_t n, int64_t ld,
                                                   float* inv, float* lse = nullptr) {
  const vfloat lowest = vfloat{} - std::numeric_limits<float>::infinity();
  vfloat lane;
  for (int64_t c = 0; c < kPad; ++c) lane[c] = static_cast<float>(c);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = p + r * ld;
    const float* b = bias + r * ld;
    vfloat mv = lowest;
    for (int64_t c = 0; c < n; c += kPad) {
      const vfloat x = vload(row + c) + vload(b + c);
      vstore(row + c, x);
      const vfloat xm = lane < static_cast<float>(n - c) ? x : lowest;
      mv = xm > mv ? xm : mv;
    }
    float m = mv[0];
    for (int64_t c = 1; c < kPad; ++c) m = std::max(m, mv[c]);
    vfloat z = vfloat{};
    for (int64_t c = 0; c < n; c += kPad) {
      const vfloat e = vexp(vload(row + c) - m);
      vstore(row + c, e);
      z += lane < static_cast<float>(n - c) ? e : vfloat{};
    }
    float total = 0.0f;
    for (int64_t c = 0; c < kPad; ++c) total += z[c];
    const float rs = 1.0f / total;
    if (lse) lse[r] = m + std::log(total);
    if (inv) {
      inv[r] = rs;
    } else {
      for (int64_t c = 0; c < n; c += kPad) vstore(row + c, vload(row + c) * rs);
    }
  }
}

inline void softmax_rows(double* p, const double* bias, int64_t rows, int64_t n, int64_t ld, double* inv,
                         double* lse = nullptr) {
  for (int64_t r = 0; r < rows; ++r) {
    double* row = p + r * ld;
    const double* b = bias + r * ld;
    for (int64_t c = 0; c < n; ++c) row[c] += b[c];
    const double m = row_max(row, n, -std::numeric_limits<double>::infinity());
    const double total = exp_shift_sum(row, n, m);
    const double rs = 1.0 / total;
    if (lse) lse[r] = m + std::log(total);
    if (inv) {
      inv[r] = rs;
    } else {
      for (int64_t c = 0; c < n; ++c) row[c] *= rs;
    }
  }
}

// d(score) of softmax rows in place: dp <- p * (dp - sum(p * dp)) over n entries of each row (stride ld,
// padded to whole vectors); adds the result to dbias (same layout) when given.
FUSIONBLOCKS_MULTIVERSION inline void softmax_grad_rows(const float* p, float* dp, float* dbias, int64_t rows,
                                                        int64_t n, int64_t ld) {
  vfloat lane;
  for (int64_t c = 0; c < kPad; ++c) lane[c] = static_cast<float>(c);
  for (int64_t r = 0; r < rows; ++r) {
    const float* pr = p + r * ld;
    float* ds = dp + r * ld;
    vfloat acc = vfloat{};
    for (int64_t c = 0; c < n; c += kPad) {
      const vfloat x = vload(pr + c) * vload(ds + c);
      acc += lane < static_cast<float>(n - c) ? x : vfloat{};
    }
    float delta = 0.0f;
    for (int64_t c = 0; c < kPad; ++c) delta += acc[c];
    for (int64_t c = 0; c < n; c += kPad) vstore(ds + c, vload(pr + c) * (vload(ds + c) - delta));
    if (dbias) {
      float* db = dbias + r * ld;
      for (int64_t c = 0; c < n; c += kPad) vstore(db + c, vload(db + c) + vload(ds + c));
    }
  }
}

inline void softmax_grad_rows(const double* p, double* dp, double* dbias, int64_t rows, int64_t n, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const double* pr = p + r * ld;
    double* ds = dp + r * ld;
    double delta = 0;
    for (int64_t c = 0; c < n; ++c) delta += pr[c] * ds[c];
    for (int64_t c = 0; c < n; ++c) ds[c] = pr[c] * (ds[c] - delta);
    if (dbias) {
      double* db = dbias + r * ld;
      for (int64_t c = 0; c < n; ++c) db[c] += ds[c];
    }
  }
}

// Tiles of `len` token rows of d entries, row l at src + tok[l] * d.
template <typename T>
void gather(const T* src, const int64_t* tok, int64_t len, int64_t d, T* dst, int64_t ld) {
  for (int64_t l = 0; l < len; ++l) {
    const T* s = src + tok[l] * d;
    std::copy(s, s + d, dst + l * ld);
  }
}

// gathered straight into the transposed tile dst (d x len, stride ld)
template <typename T>
void gather_t(const T* src, const int64_t* tok, int64_t len, int64_t d, T* dst, int64_t ld) {
  for (int64_t l = 0; l < len; ++l) {
    const T* s = src + tok[l] * d;
    for (int64_t c = 0; c < d; ++c) dst[c * ld + l] = s[c];
  }
}

template <typename T>
void scatter(const T* src, int64_t ld, const int64_t* tok, int64_t len, int64_t d, T* dst) {
  for (int64_t l = 0; l < len; ++l) std::copy(src + l * ld, src + l * ld + d, dst + tok[l] * d);
}

template <typename T>
void scatter_add(const T* src, int64_t ld, const int64_t* tok, int64_t len, int64_t d, T* dst) {
  for (int64_t l = 0; l < len; ++l) {
    const T* s = src + l * ld;
    T* o = dst + tok[l] * d;
    for (int64_t c = 0; c < d; ++c) o[c] += s[c];
  }
}

// The products of one window: float tiles whose sides fit small_mm use it (operands that enter
// transposed as B are passed pre-transposed in bt), the rest go through the BLAS.
// C (m x n) = alpha * op(A) B with A(r, p) = a[r * ars + p * acs]; B given as b (k x n) or bt (n x k).
template <typename T>
struct TileMM {
  bool fast;
  void operator()(int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t ars, int64_t acs, const T* b,
                  int64_t ldb, const T* bt, int64_t ldbt, T* c, int64_t ldc) const {
    if constexpr (std::is_same<T, float>::value) {
      if (fast) {
        small_mm(m, n, k, alpha, a, ars, acs, b, ldb, c, ldc);
        return;
      }
    }
    const bool ta = acs != 1;
    if (b) {
      mm<T>(ta, false, m, n, k, alpha, a, ta ? acs : ars, b, ldb, T(0), c, ldc);
    } else {
      mm<T>(ta, true, m, n, k, alpha, a, ta ? acs : ars, bt, ldbt, T(0), c, ldc);
    }
  }
};

// Decay bias lg * (|yi - yj| + |xi - xj|) on a (rows x cols) raster grid; a line of n tokens is a 1 x n grid.
template <typename T>
struct DecayBias {
  T lg;
  int64_t cols;
  const T* ys;  // row of every key token
  const T* xs;  // column of every key token
  void add(int64_t i, int64_t j0, int64_t nj, T* s) const {
    const T yi = static_cast<T>(i / cols), xi = static_cast<T>(i % cols);
    const T* y = ys + j0;
    const T* x = xs + j0;
    for (int64_t c = 0; c < nj; ++c) s[c] += lg * (std::abs(yi - y[c]) + std::abs(xi - x[c]));
  }
  // d(score) . distance: the share of d(lg) of this row
  T grad(int64_t i, int64_t j0, int64_t nj, const T* ds) const {
    const T yi = static_cast<T>(i / cols), xi = static_cast<T>(i % cols);
    T acc = 0;
    for (int64_t c = 0; c < nj; ++c) acc += ds[c] * (std::abs(yi - ys[j0 + c]) + std::abs(xi - xs[j0 + c]));
    return acc;
  }
};

// Coordinates of a rows x cols raster grid, one entry per token.
template <typename T>
inline void grid_coords(int64_t rows, int64_t cols, std::vector<T>& ys, std::vector<T>& xs) {
  ys.resize(rows * cols);
  xs.resize(rows * cols);
  for (int64_t n = 0; n < rows * cols; ++n) {
    ys[n] = static_cast<T>(n / cols);
    xs[n] = static_cast<T>(n % cols);
  }
}

// Forward of queries [0, nq) against keys [0, nk): out (nq x d, stride ldo) and lse (stride ldl).
// Query i has bias row index q_offset + i.
template <typename T, typename Bias>
void attn_fwd(const T* q, int64_t ldq, const T* k, int64_t ldk, const T* v, int64_t ldv, T* out, int64_t ldo, T* lse,
              int64_t ldl, int64_t nq, int64_t nk, int64_t d, T scale, const Bias& bias, int64_t q_offset = 0) {
  const int64_t bq = std::min(kBlockQ, nq), bk = std::min(kBlockK, nk), ls = padded(bk);
  std::vector<T> s(bq * ls), acc(bq * d), mx(bq), sum(bq);
  for (int64_t i0 = 0; i0 < nq; i0 += bq) {
    const int64_t ni = std::min(bq, nq - i0);
    std::fill(acc.begin(), acc.end(), T(0));
    std::fill(mx.begin(), mx.end(), -std::numeric_limits<T>::infinity());
    std::fill(sum.begin(), sum.end(), T(0));
    for (int64_t j0 = 0; j0 < nk; j0 += bk) {
      const int64_t nj = std::min(bk, nk - j0);
      mm<T>(false, true, ni, nj, d, scale, q + i0 * ldq, ldq, k + j0 * ldk, ldk, T(0), s.data(), ls);
      for (int64_t r = 0; r < ni; ++r) {
        T* row = s.data() + r * ls;
        bias.add(q_offset + i0 + r, j0, nj, row);
        const T m = row_max(row, nj, mx[r]);
        const T corr = std::exp(mx[r] - m);
        sum[r] = sum[r] * corr + exp_shift_sum(row, nj, m);
        mx[r] = m;
        if (corr != T(1)) {
          T* a = acc.data() + r * d;
          for (int64_t c = 0; c < d; ++c) a[c] *= corr;
        }
      }
      mm<T>(false, false, ni, d, nj, T(1), s.data(), ls, v + j0 * ldv, ldv, T(1), acc.data(), d);
    }
    for (int64_t r = 0; r < ni; ++r) {
      const T inv = T(1) / sum[r];
      const T* a = acc.data() + r * d;
      T* o = out + (i0 + r) * ldo;
      for (int64_t c = 0; c < d; ++c) o[c] = a[c] * inv;
      lse[(i0 + r) * ldl] = mx[r] + std::log(sum[r]);
    }
  }
}

// Backward of one problem: accumulates (+=) into dq, dk, dv; returns the summed Bias::grad.
template <typename T, typename Bias>
T attn_bwd(const T* q, int64_t ldq, const T* k, int64_t ldk, const T* v, int64_t ldv, const T* out, int64_t ldo,
           const T* dout, int64_t lddo, const T* lse, int64_t ldl, T* dq, int64_t lddq, T* dk, int64_t lddk, T* dv,
           int64_t lddv, int64_t nq, int64_t nk, int64_t d, T scale, Bias& bias) {
  const int64_t bq = std::min(kBlockQ, nq), bk = std::min(kBlockK, nk), ls = padded(bk);
  std::vector<T> p(bq * ls), dp(bq * ls), delta(nq);
  for (int64_t i = 0; i < nq; ++i) {
    const T* o = out + i * ldo;
    const T* g = dout + i * lddo;
    T acc = 0;
    for (int64_t c = 0; c < d; ++c) acc += o[c] * g[c];
    delta[i] = acc;
  }
  T dparam = 0;
  for (int64_t j0 = 0; j0 < nk; j0 += bk) {
    const int64_t nj = std::min(bk, nk - j0);
    for (int64_t i0 = 0; i0 < nq; i0 += bq) {
      const int64_t ni = std::min(bq, nq - i0);
      mm<T>(false, true, ni, nj, d, scale, q + i0 * ldq, ldq, k + j0 * ldk, ldk, T(0), p.data(), ls);
      for (int64_t r = 0; r < ni; ++r) {
        T* row = p.data() + r * ls;
        bias.add(i0 + r, j0, nj, row);
        exp_shift_sum(row, nj, lse[(i0 + r) * ldl]);
      }
      mm<T>(true, false, nj, d, ni, T(1), p.data(), ls, dout + i0 * lddo, lddo, T(1), dv + j0 * lddv, lddv);
      mm<T>(false, true, ni, nj, d, T(1), dout + i0 * lddo, lddo, v + j0 * ldv, ldv, T(0), dp.data(), ls);
      for (int64_t r = 0; r < ni; ++r) {
        T* ds = dp.data() + r * ls;
        const T* pr = p.data() + r * ls;
        const T dl = delta[i0 + r];
        for (int64_t c = 0; c < nj; ++c) ds[c] = pr[c] * (ds[c] - dl);
        dparam += bias.grad(i0 + r, j0, nj, ds);
      }
      mm<T>(false, false, ni, d, nj, scale, dp.data(), ls, k + j0 * ldk, ldk, T(1), dq + i0 * lddq, lddq);
      mm<T>(true, false, nj, d, ni, scale, dp.data(), ls, q + i0 * ldq, ldq, T(1), dk + j0 * lddk, lddk);
    }
  }
  return dparam;
}

}  // namespace cpu
}  // namespace fusionblocks
