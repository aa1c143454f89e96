// Blocked attention on CPU with an online softmax and an additive bias computed on the fly, for ONE
// instruction set: isa_{default,avx2,avx512}.cpp include this header (after variant_prelude.h and their
// `#pragma GCC target`) with FUSIONBLOCKS_ISA naming the namespace, FUSIONBLOCKS_VEC_BYTES the vector
// width and FUSIONBLOCKS_VEC_REGS the number of vector registers.
//
// Design decision. PyTorch's CPU flash attention (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp)
// compiles one source per CPU capability (DEFAULT, AVX2, AVX512 through DispatchStub), does the
// element-wise work (scaling, exp and row sums fused) with at::vec::Vectorized, and forms each
// (qSplit x kvSplit) score tile and each P V product with at::native::cpublas::gemm/brgemm. We keep the
// first idea (one compilation per ISA, chosen at run time, isa.h) and not the other two:
// - cpublas is not part of torch's public C++ API (not every torch build exports its symbols to
//   extensions), and its per-call cost (argument checks, the MKL/oneDNN dispatch) is what a 49 x 49 x 32
//   Swin window or a 56-token HEMF line cannot afford: those products are 10-300 kFLOP each, thousands per
//   call. They go through the register-blocked tile product below, sized per ISA; only long problems
//   (full decay, head dims above kMaxSmallN) use the BLAS that torch links.
// - at::vec::Vectorized<float> picks its width from CPU_CAPABILITY macros of PyTorch's own build system,
//   which an extension compiled once with `#pragma GCC target` would have to imitate (and whose AVX2
//   header requires compiling the whole translation unit with -mavx2). GCC vector extensions give the
//   same code on any width (4, 8, 16 floats), also on aarch64, with no x86 intrinsics outside the guarded
//   FMA helper.
// The width and the register blocking follow the ISA: a block of RB rows x NV vectors keeps RB * NV
// accumulators, NV vectors of B and one broadcast in registers (16 ymm for AVX2 and SSE, 32 zmm for
// AVX-512). Wider vectors than the registers hold (16-float vectors on AVX2) spill to the stack.
//
// Every routine works on one attention problem: `nq` queries against `nk` keys, rows of head dim `d`
// addressed through a row stride (so rows of a column of a grid, or gathered window buffers, need no
// copy). The bias is a functor with
//   void add(int64_t i, int64_t j0, int64_t nj, T* s) const   // s[c] += bias(i, j0 + c)
//   T grad(int64_t i, int64_t j0, int64_t nj, const T* ds)     // consumes d(score); returns its share of d(param)
// No N x N tensor exists: the forward keeps a (BQ x BK) score tile, the backward recomputes tiles from
// the saved log-sum-exp.
#pragma once

#ifndef FUSIONBLOCKS_ISA
#error "attention_tile.h is included by csrc/cpu/isa_*.cpp, which define FUSIONBLOCKS_ISA"
#endif

namespace fusionblocks {
namespace cpu {
namespace FUSIONBLOCKS_ISA {

constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 512;

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
#else
  DenormalsAreZero() = default;
#endif
  DenormalsAreZero(const DenormalsAreZero&) = delete;
  DenormalsAreZero& operator=(const DenormalsAreZero&) = delete;
};

template <typename T>
inline void blas_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const T* alpha,
                      const T* a, const int* lda, const T* b, const int* ldb, const T* beta, T* c, const int* ldc) {
  if constexpr (std::is_same<T, float>::value) {
    sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}
template <typename T>
inline bool have_blas() {
  if constexpr (std::is_same<T, float>::value) {
    return sgemm_ != nullptr;
  } else {
    return dgemm_ != nullptr;
  }
}

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

// ---------------------------------------------------------------- float vectors of this ISA

constexpr int kVecFloats = FUSIONBLOCKS_VEC_BYTES / static_cast<int>(sizeof(float));
constexpr int kVecRegs = FUSIONBLOCKS_VEC_REGS;

// Rows of float tiles are padded to a multiple of kPad entries, so the float loops below run over whole
// vectors (no scalar remainder); padding entries are written but never counted.
constexpr int64_t kPad = kVecFloats;
inline int64_t padded(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

typedef float vfloat __attribute__((vector_size(FUSIONBLOCKS_VEC_BYTES)));
typedef int32_t vint __attribute__((vector_size(FUSIONBLOCKS_VEC_BYTES)));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }

template <size_t... I>
inline vfloat vsplat_(float x, std::index_sequence<I...>) {
  return vfloat{((void)I, x)...};
}
// every lane x (a broadcast; `vfloat{} + x` would cost an add and a register)
inline vfloat vsplat(float x) { return vsplat_(x, std::make_index_sequence<kVecFloats>()); }

// a * b + c, fused where the ISA has FMA (C++20 mode does not contract a * b + c on its own)
inline vfloat vfma(vfloat a, vfloat b, vfloat c) {
#if defined(FUSIONBLOCKS_ISA_AVX512)
  return (vfloat)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(FUSIONBLOCKS_ISA_AVX2)
  return (vfloat)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

inline vfloat lane_index() {
  vfloat lane;
  for (int c = 0; c < kVecFloats; ++c) lane[c] = static_cast<float>(c);
  return lane;
}

inline float hsum(vfloat v) {
  float t = 0.0f;
  for (int c = 0; c < kVecFloats; ++c) t += v[c];
  return t;
}

inline float hmax(vfloat v) {
  float m = v[0];
  for (int c = 1; c < kVecFloats; ++c) m = std::max(m, v[c]);
  return m;
}

// exp on whole vectors: Cody-Waite range reduction and a degree-6 polynomial (Cephes expf
// coefficients), about 2 ulp; inputs below -87 give exp(-87) instead of a denormal or 0, which no
// softmax row can notice.
inline vfloat vexp(vfloat x) {
  const vfloat lo = vsplat(-87.0f), hi = vsplat(88.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float magic = 12582912.0f;
  const vfloat n = vfma(x, vsplat(1.44269504088896341f), vsplat(magic)) - magic;
  vfloat r = vfma(n, vsplat(-0.693359375f), x);
  r = vfma(n, vsplat(2.12194440e-4f), r);
  vfloat p = vsplat(1.9875691500e-4f);
  p = vfma(p, r, vsplat(1.3981999507e-3f));
  p = vfma(p, r, vsplat(8.3334519073e-3f));
  p = vfma(p, r, vsplat(4.1665795894e-2f));
  p = vfma(p, r, vsplat(1.6666665459e-1f));
  p = vfma(p, r, vsplat(5.0000001201e-1f));
  p = vfma(p * r, r, r + 1.0f);
  const vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// ---------------------------------------------------------------- the register-blocked tile product

// C (m x n, row stride ldc) = alpha * A B for small float tiles, A(r, p) = a[r * ars + p * acs],
// B (k x n, row stride ldb); columns are written up to padded(n), so ldb, ldc and the buffers must
// allow it. No call overhead: the BLAS spends more on argument checks than on the arithmetic of one
// attention window. Columns go in chunks of kChunk vectors, rows in blocks of rows_per_block(NV).
constexpr int kChunk = kVecRegs >= 32 ? 4 : 2;
// 16 registers: chunks of 2 vectors, but an odd count of at least 3 starts with one of 3 (4 rows of 3),
// so that no 1-vector chunk (8 FMAs on 9 loads) is left over
constexpr bool kOddChunk3 = kVecRegs < 32;
constexpr int rows_per_block(int nv) { return std::min(8, (kVecRegs - 1 - nv) / nv); }
constexpr int64_t kMaxSmallN = 128;

template <int NV, int R>
__attribute__((always_inline)) inline void tile_block(int64_t k, const float* a, int64_t ars, int64_t acs,
                                                      const float* b, int64_t ldb, float* c, int64_t ldc) {
  vfloat acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = vfloat{};
  for (int64_t p = 0; p < k; ++p) {
    vfloat bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = vload(b + p * ldb + v * kVecFloats);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const vfloat av = vsplat(a[r * ars + p * acs]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(c + r * ldc + v * kVecFloats, acc[r][v]);
}

// the last `rem` (< R) rows of a chunk
template <int NV, int R>
__attribute__((always_inline)) inline void tile_tail(int64_t rem, int64_t k, const float* a, int64_t ars,
                                                     int64_t acs, const float* b, int64_t ldb, float* c, int64_t ldc) {
  if constexpr (R > 0) {
    if (rem == R) {
      tile_block<NV, R>(k, a, ars, acs, b, ldb, c, ldc);
    } else {
      tile_tail<NV, R - 1>(rem, k, a, ars, acs, b, ldb, c, ldc);
    }
  }
}

template <int NV>
inline void tile_chunk(int64_t m, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
                       float* c, int64_t ldc) {
  constexpr int RB = rows_per_block(NV);
  int64_t r0 = 0;
  for (; r0 + RB <= m; r0 += RB) tile_block<NV, RB>(k, a + r0 * ars, ars, acs, b, ldb, c + r0 * ldc, ldc);
  tile_tail<NV, RB - 1>(m - r0, k, a + r0 * ars, ars, acs, b, ldb, c + r0 * ldc, ldc);
}

inline bool small_mm_fits(int64_t n) { return n > 0 && n <= kMaxSmallN; }

inline void small_mm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t ars, int64_t acs,
                     const float* b, int64_t ldb, float* c, int64_t ldc) {
  const int64_t nv = padded(n) / kPad;
  for (int64_t j = 0; j < nv;) {
    const float* bj = b + j * kVecFloats;
    float* cj = c + j * kVecFloats;
    const int64_t chunk = kOddChunk3 && j == 0 && nv >= 3 && nv % 2 == 1 ? 3 : std::min<int64_t>(kChunk, nv - j);
    switch (chunk) {
      case 1: tile_chunk<1>(m, k, a, ars, acs, bj, ldb, cj, ldc); break;
      case 2: tile_chunk<2>(m, k, a, ars, acs, bj, ldb, cj, ldc); break;
      case 3: tile_chunk<3>(m, k, a, ars, acs, bj, ldb, cj, ldc); break;
#if FUSIONBLOCKS_VEC_REGS >= 32
      case 4: tile_chunk<4>(m, k, a, ars, acs, bj, ldb, cj, ldc); break;
#endif
      default: break;
    }
    j += chunk;
  }
  // alpha after the products: kept out of the blocks, it would take the register of a B vector
  if (alpha != 1.0f)
    for (int64_t r = 0; r < m; ++r)
      for (int64_t c0 = 0; c0 < nv * kPad; c0 += kPad) vstore(c + r * ldc + c0, vload(c + r * ldc + c0) * alpha);
}

// ---------------------------------------------------------------- row-wise softmax pieces

// row[c] = exp(row[c] - m); returns the sum (rows padded to whole vectors)
inline float exp_shift_sum(float* row, int64_t n, float m) {
  vfloat z = vfloat{};
  const vfloat lane = lane_index();
  for (int64_t c = 0; c < n; c += kPad) {
    const vfloat e = vexp(vload(row + c) - m);
    vstore(row + c, e);
    z += lane < static_cast<float>(n - c) ? e : vfloat{};
  }
  return hsum(z);
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

inline float row_max(const float* row, int64_t n, float m) {
  const vfloat lowest = vsplat(-std::numeric_limits<float>::infinity());
  vfloat mv = lowest;
  const vfloat lane = lane_index();
  for (int64_t c = 0; c < n; c += kPad) {
    vfloat v = vload(row + c);
    v = lane < static_cast<float>(n - c) ? v : lowest;
    mv = v > mv ? v : mv;
  }
  return std::max(m, hmax(mv));
}

inline double row_max(const double* row, int64_t n, double m) {
  for (int64_t c = 0; c < n; ++c) m = std::max(m, row[c]);
  return m;
}

// Softmax of each of `rows` rows of p (length n, stride ld, padded to whole vectors) after adding
// bias (same layout, zero padding). Rows are normalized, or left as exp(s - max) with inv[r] = 1 / sum.
inline void softmax_rows(float* p, const float* bias, int64_t rows, int64_t n, int64_t ld, float* inv,
                         float* lse = nullptr) {
  const vfloat lowest = vsplat(-std::numeric_limits<float>::infinity());
  const vfloat lane = lane_index();
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
    const float m = hmax(mv);
    vfloat z = vfloat{};
    for (int64_t c = 0; c < n; c += kPad) {
      const vfloat e = vexp(vload(row + c) - m);
      vstore(row + c, e);
      z += lane < static_cast<float>(n - c) ? e : vfloat{};
    }
    const float total = hsum(z);
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

// Probabilities from saved log-sum-exps: p[r][c] = exp(p[r][c] + bias[r][c] - lse[r]) (rows of stride ld,
// padded to whole vectors; bias in the same layout).
inline void exp_rows(float* p, const float* bias, const float* lse, int64_t rows, int64_t n, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = p + r * ld;
    const float* b = bias + r * ld;
    const vfloat m = vsplat(lse[r]);
    for (int64_t c = 0; c < n; c += kPad) vstore(row + c, vexp(vload(row + c) + vload(b + c) - m));
  }
}

inline void exp_rows(double* p, const double* bias, const double* lse, int64_t rows, int64_t n, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) p[r * ld + c] = std::exp(p[r * ld + c] + bias[r * ld + c] - lse[r]);
}

// d(score) of softmax rows in place: ds = p * (dp - sum(p * dp)) over n entries of each row (stride ld,
// padded to whole vectors), added to dbias (same layout) when given; dp is left holding scale * ds, the
// gradient of the unscaled q k^T, so that the dq and dk products need no scaling pass of their own.
inline void softmax_grad_rows(const float* p, float* dp, float* dbias, int64_t rows, int64_t n, int64_t ld,
                              float scale) {
  const vfloat lane = lane_index();
  const vfloat sv = vsplat(scale);
  for (int64_t r = 0; r < rows; ++r) {
    const float* pr = p + r * ld;
    float* ds = dp + r * ld;
    vfloat acc = vfloat{};
    for (int64_t c = 0; c < n; c += kPad) {
      const vfloat x = vload(pr + c) * vload(ds + c);
      acc += lane < static_cast<float>(n - c) ? x : vfloat{};
    }
    const vfloat delta = vsplat(hsum(acc));
    if (dbias) {
      float* db = dbias + r * ld;
      for (int64_t c = 0; c < n; c += kPad) {
        const vfloat x = vload(pr + c) * (vload(ds + c) - delta);
        vstore(db + c, vload(db + c) + x);
        vstore(ds + c, x * sv);
      }
    } else {
      for (int64_t c = 0; c < n; c += kPad) vstore(ds + c, vload(pr + c) * (vload(ds + c) - delta) * sv);
    }
  }
}

inline void softmax_grad_rows(const double* p, double* dp, double* dbias, int64_t rows, int64_t n, int64_t ld,
                              double scale) {
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
    for (int64_t c = 0; c < n; ++c) ds[c] *= scale;
  }
}

// ---------------------------------------------------------------- gathered tiles

// d floats from s to t: whole vectors, then the rest (a call to memmove costs more than 32 floats)
inline void copy_row(const float* s, float* t, int64_t d) {
  int64_t c = 0;
  for (; c + kPad <= d; c += kPad) vstore(t + c, vload(s + c));
  for (; c < d; ++c) t[c] = s[c];
}
inline void copy_row(const double* s, double* t, int64_t d) { std::copy(s, s + d, t); }

inline void add_row(const float* s, float* t, int64_t d) {
  int64_t c = 0;
  for (; c + kPad <= d; c += kPad) vstore(t + c, vload(t + c) + vload(s + c));
  for (; c < d; ++c) t[c] += s[c];
}
inline void add_row(const double* s, double* t, int64_t d) {
  for (int64_t c = 0; c < d; ++c) t[c] += s[c];
}

// Tiles of `len` token rows of d entries, row l at src + tok[l] * d.
template <typename T>
void gather(const T* src, const int64_t* tok, int64_t len, int64_t d, T* dst, int64_t ld) {
  for (int64_t l = 0; l < len; ++l) copy_row(src + tok[l] * d, dst + l * ld, d);
}

// gathered straight into the transposed tile dst (d x len, stride ld)
template <typename T>
void gather_t(const T* src, const int64_t* tok, int64_t len, int64_t d, T* dst, int64_t ld) {
  for (int64_t l = 0; l < len; ++l) {
    const T* s = src + tok[l] * d;
    for (int64_t c = 0; c < d; ++c) dst[c * ld + l] = s[c];
  }
}

#if defined(FUSIONBLOCKS_ISA_AVX2) || defined(FUSIONBLOCKS_ISA_AVX512)
// dst[c * ld + i] = r[i][c0 + c] for an 8 x 8 block: three rounds of 256-bit shuffles (interleave
// pairs of rows, then pairs of pairs, then the 128-bit halves) instead of 64 scalar stores, each to
// another row of dst. The scalar loop took ~12 % of a decomposed-decay training step at HEMF's 28^2 / D 24
// (perf, AMD EPYC); with the blocks the step is ~4 % faster there, ~7 % at 56^2 / D 12 (A/B, one process).
inline void transpose_8x8(const float* const* r, int64_t c0, float* dst, int64_t ld) {
  __m256 a[8], t[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_loadu_ps(r[i] + c0);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(a[i], a[i + 1]);      // rows i, i+1: columns 0 1 | 4 5
    t[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);  // columns 2 3 | 6 7
  }
  for (int i = 0; i < 8; i += 4) {
    a[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);      // rows i..i+3: column 0 | 4
    a[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);  // column 1 | 5
    a[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);  // column 2 | 6
    a[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);  // column 3 | 7
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * ld, _mm256_permute2f128_ps(a[c], a[c + 4], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * ld, _mm256_permute2f128_ps(a[c], a[c + 4], 0x31));
  }
}

template <>
inline void gather_t<float>(const float* src, const int64_t* tok, int64_t len, int64_t d, float* dst, int64_t ld) {
  int64_t l0 = 0;
  for (; l0 + 8 <= len; l0 += 8) {
    const float* r[8];
    for (int i = 0; i < 8; ++i) r[i] = src + tok[l0 + i] * d;
    int64_t c0 = 0;
    for (; c0 + 8 <= d; c0 += 8) transpose_8x8(r, c0, dst + c0 * ld + l0, ld);
    for (; c0 < d; ++c0)
      for (int i = 0; i < 8; ++i) dst[c0 * ld + l0 + i] = r[i][c0];
  }
  for (int64_t l = l0; l < len; ++l) {
    const float* s = src + tok[l] * d;
    for (int64_t c = 0; c < d; ++c) dst[c * ld + l] = s[c];
  }
}
#endif

template <typename T>
void scatter(const T* src, int64_t ld, const int64_t* tok, int64_t len, int64_t d, T* dst) {
  for (int64_t l = 0; l < len; ++l) copy_row(src + l * ld, dst + tok[l] * d, d);
}

template <typename T>
void scatter_add(const T* src, int64_t ld, const int64_t* tok, int64_t len, int64_t d, T* dst) {
  for (int64_t l = 0; l < len; ++l) add_row(src + l * ld, dst + tok[l] * d, d);
}

// The products of one window or line: float tiles whose sides fit small_mm use it (operands that
// enter transposed as B are passed pre-transposed in bt), the rest go through the BLAS.
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

// ---------------------------------------------------------------- streaming attention (full decay)

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

}  // namespace FUSIONBLOCKS_ISA
}  // namespace cpu
}  // namespace fusionblocks
