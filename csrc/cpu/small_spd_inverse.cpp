// Gauss-Jordan inversion without pivoting on the full symmetric matrix. For SPD input the
// pivots are the squared Cholesky pivots, so "pivot <= 0" detects loss of definiteness exactly as
// Cholesky does. It does 2n^3 flops instead of Cholesky-inverse's n^3, but every inner loop is a
// full row of a padded, aligned copy (a whole number of SIMD vectors, no remainder loop), so for
// n <= 64 it is several times faster than potrf + potri. Compiled for AVX2+FMA and for a
// baseline, picked at load time, so one wheel runs well everywhere. (No AVX-512 build: with
// these short rows it measured 40% slower than AVX2 on Zen 4, being store-bound.)
#include "fedng/small_spd_inverse.h"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// Built twice by CMake: FEDNG_ISA=avx2 with -march=x86-64-v3, FEDNG_ISA=baseline without;
// small_spd_dispatch.cpp picks one at load time.
#ifndef FEDNG_ISA
#error "compile with -DFEDNG_ISA=<name>"
#endif

namespace fedng::cpu::FEDNG_ISA {
namespace {

constexpr int kAlign = 64;  // bytes: one AVX-512 vector, one cache line

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// A per-thread aligned scratch buffer that only grows.
template <class T>
T* scratch(std::size_t count) {
  thread_local std::unique_ptr<T, FreeDeleter> buf;
  thread_local std::size_t cap = 0;
  if (count > cap) {
    std::size_t bytes = (count * sizeof(T) + kAlign - 1) / kAlign * kAlign;
    buf.reset(static_cast<T*>(std::aligned_alloc(kAlign, bytes)));
    if (!buf) throw std::bad_alloc();
    cap = bytes / sizeof(T);
  }
  return buf.get();
}

template <class T>
inline bool gauss_jordan(const T* a, int lda, T* out, int ldout, int n, T lambda, bool full) {
  constexpr int V = kAlign / sizeof(T);  // elements per chunk
  const int ld = (n + V - 1) / V * V;
  T* w = static_cast<T*>(__builtin_assume_aligned(scratch<T>(static_cast<std::size_t>(n) * ld),
                                                  kAlign));
  // Symmetric padded copy from the lower triangle; the zero padding stays zero throughout.
  for (int i = 0; i < n; ++i) {
    T* wi = w + static_cast<std::int64_t>(i) * ld;
    const T* ai = a + static_cast<std::int64_t>(i) * lda;
    for (int j = 0; j <= i; ++j) wi[j] = ai[j];
    for (int j = i + 1; j < n; ++j) wi[j] = a[static_cast<std::int64_t>(j) * lda + i];
    for (int j = n; j < ld; ++j) wi[j] = T(0);
    wi[i] += lambda;
  }
  for (int k = 0; k < n; ++k) {
    T* rk = w + static_cast<std::int64_t>(k) * ld;
    const T piv = rk[k];
    if (!(piv > T(0)) || !std::isfinite(piv)) return false;
    const T inv = T(1) / piv;
    // Scalar stores into a row come after its vector loop: a narrow store followed by a wide
    // load of the same bytes stalls store-to-load forwarding.
    for (int j0 = 0; j0 < ld; j0 += V) {
#pragma omp simd aligned(rk : kAlign)
      for (int j = j0; j < j0 + V; ++j) rk[j] *= inv;
    }
    rk[k] = inv;
    for (int i = 0; i < n; ++i) {
      if (i == k) continue;
      T* ri = w + static_cast<std::int64_t>(i) * ld;
      const T f = ri[k];
      for (int j0 = 0; j0 < ld; j0 += V) {
#pragma omp simd aligned(ri, rk : kAlign)
        for (int j = j0; j < j0 + V; ++j) ri[j] -= f * rk[j];
      }
      ri[k] = -f * inv;
    }
  }
  // Write back the lower triangle (the result is symmetric up to rounding; lower is canonical),
  // mirrored if asked, and check finiteness on the way (x * 0 is NaN exactly when x is not finite).
  T nonfinite = T(0);
  for (int i = 0; i < n; ++i) {
    const T* wi = w + static_cast<std::int64_t>(i) * ld;
    T* oi = out + static_cast<std::int64_t>(i) * ldout;
#pragma omp simd reduction(+ : nonfinite)
    for (int j = 0; j <= i; ++j) {
      oi[j] = wi[j];
      nonfinite += wi[j] * T(0);
    }
    if (full)
      for (int j = 0; j < i; ++j) out[static_cast<std::int64_t>(j) * ldout + i] = wi[j];
  }
  return nonfinite == T(0);
}


// ---- Lane-batched: L matrices of one size, interleaved so lane l of every vector belongs to
// matrix l (L = 8 floats or 4 doubles: one 32-byte GCC vector, lowered to AVX2 or to SSE pairs
// per clone; 16 and 8 in the AVX-512 clone, built with FEDNG_LANE_BYTES=64). Packed lower storage: element (i, j) of all lanes is vector i (i + 1) / 2 + j.
// Cholesky, triangular inverse and X^T X are dot products; four partial sums hide the FMA
// latency. n^3 flops per matrix in all, fully vectorized whatever n is, no per-matrix overhead.

#ifndef FEDNG_LANE_BYTES
#define FEDNG_LANE_BYTES 32
#endif

template <class T>
struct LaneVec {
  typedef T type __attribute__((vector_size(FEDNG_LANE_BYTES)));
  static constexpr int kLanes = FEDNG_LANE_BYTES / sizeof(T);
};

inline std::size_t packed(int i, int j) { return static_cast<std::size_t>(i) * (i + 1) / 2 + j; }
// Start of column j in column-packed lower storage of an n x n matrix (columns of n - j entries).
inline std::size_t col_start(int n, int j) {
  return static_cast<std::size_t>(j) * n - static_cast<std::size_t>(j) * (j - 1) / 2;
}

// sum_p a[p * sa] * b[p * sb] for p in [0, len), lane-wise.
template <class V>
inline V lane_dot(const V* a, std::size_t sa, const V* b, std::size_t sb, int len) {
  V s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int p = 0;
  for (; p + 4 <= len; p += 4) {
    s0 += a[p * sa] * b[p * sb];
    s1 += a[(p + 1) * sa] * b[(p + 1) * sb];
    s2 += a[(p + 2) * sa] * b[(p + 2) * sb];
    s3 += a[(p + 3) * sa] * b[(p + 3) * sb];
  }
  for (; p < len; ++p) s0 += a[p * sa] * b[p * sb];
  return (s0 + s1) + (s2 + s3);
}

// Four dots sharing one operand, out[k] = sum_p a[p] * b_k[p] for p in [0, len): 5 loads per
// 4 FMAs instead of 8. Beyond n ~ 32 the interleaved triangles leave L1 and the single dot is
// bound by L2 bandwidth, not by the FMAs.
template <class V>
inline void lane_dot4(const V* a, const V* b0, const V* b1, const V* b2, const V* b3, int len,
                      V* out) {
  V s0 = {}, s1 = {}, s2 = {}, s3 = {};
  for (int p = 0; p < len; ++p) {
    const V x = a[p];
    s0 += x * b0[p];
    s1 += x * b1[p];
    s2 += x * b2[p];
    s3 += x * b3[p];
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// ---- Lane <-> matrix transposes. Moving data between L matrices and the interleaved storage
// is an L x L transpose per block of L entries; done with scalar moves it cost more than the
// three O(n^3) phases together (n <= 64). Butterfly transpose: log2(L) stages of two-source
// shuffles, after which row i holds what column i held.

// Stage with distance S on rows x = rows[i], y = rows[i + S] (bit S of i clear): entries whose
// row and column differ in bit S swap places with the entry that has both bits flipped.
template <class V, int L, int S, std::size_t... J>
inline void butterfly(V& x, V& y, std::index_sequence<J...>) {
  const V lo = __builtin_shufflevector(x, y, ((J & S) ? L + J - S : J)...);
  const V hi = __builtin_shufflevector(x, y, ((J & S) ? L + J : J + S)...);
  x = lo;
  y = hi;
}

template <class V, int L, int S>
inline void transpose_stage(V* rows) {
  if constexpr (S >= 1) {
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i)
      if (!(i & S)) butterfly<V, L, S>(rows[i], rows[i + S], std::make_index_sequence<L>{});
    transpose_stage<V, L, S / 2>(rows);
  }
}

// rows[i][j] <- rows[j][i] for an L x L block held as L vectors.
template <class V, int L>
inline void transpose_block(V* rows) {
  transpose_stage<V, L, L / 2>(rows);
}

// The first `cnt` (1..L) elements of src, zeros after them (never reads past src + cnt).
template <class V, class T, int L>
inline V load_first(const T* src, int cnt) {
  V v;
  if (cnt == L) {
    std::memcpy(&v, src, sizeof(V));
    return v;
  }
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) {
    const __mmask16 m = static_cast<__mmask16>((1u << cnt) - 1u);
    if constexpr (std::is_same_v<T, float>) {
      const __m512 r = _mm512_maskz_loadu_ps(m, src);
      std::memcpy(&v, &r, sizeof(V));
    } else {
      const __m512d r = _mm512_maskz_loadu_pd(static_cast<__mmask8>(m), src);
      std::memcpy(&v, &r, sizeof(V));
    }
    return v;
  }
#endif
  v = V{};
  for (int k = 0; k < cnt; ++k) v[k] = src[k];
  return v;
}

// Stores the first `cnt` (1..L) elements of v at dst (never writes past dst + cnt).
template <class V, class T, int L>
inline void store_first(T* dst, const V& v, int cnt) {
  if (cnt == L) {
    std::memcpy(dst, &v, sizeof(V));
    return;
  }
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) {
    const __mmask16 m = static_cast<__mmask16>((1u << cnt) - 1u);
    if constexpr (std::is_same_v<T, float>) {
      __m512 r;
      std::memcpy(&r, &v, sizeof(V));
      _mm512_mask_storeu_ps(dst, m, r);
    } else {
      __m512d r;
      std::memcpy(&r, &v, sizeof(V));
      _mm512_mask_storeu_pd(dst, static_cast<__mmask8>(m), r);
    }
    return;
  }
#endif
  for (int k = 0; k < cnt; ++k) dst[k] = v[k];
}

template <class T>
inline unsigned lane_inverse(const T* const* in, T* const* out, const double* lambda, int count,
                             int n) {
  using V = typename LaneVec<T>::type;
  constexpr int L = LaneVec<T>::kLanes;
  const std::size_t tri = packed(n, 0);
  V* a = reinterpret_cast<V*>(scratch<T>((2 * tri + n) * L));
  V* x = a + tri;
  V* rinv = x + tri;
  // Interleave the lower triangles, L columns of a row at a time: lane l's row segment becomes
  // vector l of a block, transposed into one vector per column. Missing lanes get the identity
  // so they stay harmless.
  for (int i = 0; i < n; ++i) {
    for (int j0 = 0; j0 <= i; j0 += L) {
      const int cnt = i + 1 - j0 < L ? i + 1 - j0 : L;
      V blk[L];
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l) {
        if (l < count) {
          blk[l] = load_first<V, T, L>(in[l] + static_cast<std::size_t>(i) * n + j0, cnt);
        } else {
          blk[l] = V{};
          if (i - j0 < L) blk[l][i - j0] = T(1);
        }
      }
      transpose_block<V, L>(blk);
      V* dst = a + packed(i, j0);
      for (int k = 0; k < cnt; ++k) dst[k] = blk[k];
    }
    V d = a[packed(i, i)];
    for (int l = 0; l < count; ++l) d[l] += static_cast<T>(lambda[l]);
    a[packed(i, i)] = d;
  }
  unsigned bad = 0;
  // Cholesky, left-looking by columns: L(j, j) = sqrt(A(j, j) - L(j, :j) . L(j, :j)), then
  // L(i, j) = (A(i, j) - L(i, :j) . L(j, :j)) / L(j, j) for every i > j. The dots of one column
  // are independent of each other (a row-by-row order chains each on the one before: latency-
  // bound at these sizes).
  for (int j = 0; j < n; ++j) {
    V* lj = a + packed(j, 0);
    V d = lj[j] - lane_dot(lj, 1, lj, 1, j);
    for (int l = 0; l < L; ++l) {
      const bool ok = d[l] > T(0) && std::isfinite(d[l]);
      if (!ok) bad |= 1u << l;
      d[l] = ok ? std::sqrt(d[l]) : T(1);
    }
    lj[j] = d;
    const V r = T(1) / d;
    rinv[j] = r;
    int i = j + 1;
    for (; i + 4 <= n; i += 4) {
      V* l0 = a + packed(i, 0);
      V* l1 = a + packed(i + 1, 0);
      V* l2 = a + packed(i + 2, 0);
      V* l3 = a + packed(i + 3, 0);
      V dots[4];
      lane_dot4(lj, l0, l1, l2, l3, j, dots);
      l0[j] = (l0[j] - dots[0]) * r;
      l1[j] = (l1[j] - dots[1]) * r;
      l2[j] = (l2[j] - dots[2]) * r;
      l3[j] = (l3[j] - dots[3]) * r;
    }
    for (; i < n; ++i) {
      V* li = a + packed(i, 0);
      li[j] = (li[j] - lane_dot(li, 1, lj, 1, j)) * r;
    }
  }
  // X = L^-1, stored by columns (column j holds X(j..n-1, j) contiguously), so that both the
  // inverse and the product below are dot products of contiguous vectors (a row-packed X makes
  // them walk a column with a growing stride: one cache line per term once n^2 vectors leave L1).
  // X(j, j) = 1 / L(j, j); X(i, j) = -X(i, i) sum_{p=j}^{i-1} L(i, p) X(p, j), row by row:
  // the dots of one row are independent (they read only rows above it).
  for (int i = 0; i < n; ++i) {
    const V* li = a + packed(i, 0);
    int j = 0;
    for (; j + 4 <= i; j += 4) {
      V* x0 = x + col_start(n, j) - j;  // xk[p] = X(p, j + k) for p >= j + k
      V* x1 = x + col_start(n, j + 1) - (j + 1);
      V* x2 = x + col_start(n, j + 2) - (j + 2);
      V* x3 = x + col_start(n, j + 3) - (j + 3);
      // Terms p < j + 3 that not all four columns have, then the shared range [j + 3, i).
      V s0 = li[j] * x0[j] + li[j + 1] * x0[j + 1] + li[j + 2] * x0[j + 2];
      V s1 = li[j + 1] * x1[j + 1] + li[j + 2] * x1[j + 2];
      V s2 = li[j + 2] * x2[j + 2];
      const int p0 = j + 3;
      V dots[4];
      lane_dot4(li + p0, x0 + p0, x1 + p0, x2 + p0, x3 + p0, i - p0, dots);
      x0[i] = -rinv[i] * (s0 + dots[0]);
      x1[i] = -rinv[i] * (s1 + dots[1]);
      x2[i] = -rinv[i] * (s2 + dots[2]);
      x3[i] = -rinv[i] * dots[3];
    }
    for (; j < i; ++j) {
      V* xj = x + col_start(n, j) - j;  // xj[p] = X(p, j) for p >= j
      xj[i] = -rinv[i] * lane_dot(li + j, 1, xj + j, 1, i - j);
    }
    x[col_start(n, i)] = rinv[i];
  }
  // A^-1(i, j) = sum_{p >= i} X(p, i) X(p, j) (j <= i), written straight to both triangles.
  V nonfinite = {};
  for (int i = 0; i < n; ++i) {
    const V* xi = x + col_start(n, i) - i;
    int j = 0;
    V v[4];
    for (; j <= i; j += 4) {
      const int w = i + 1 - j < 4 ? i + 1 - j : 4;
      if (w == 4) {
        lane_dot4(xi + i, x + col_start(n, j) - j + i, x + col_start(n, j + 1) - (j + 1) + i,
                  x + col_start(n, j + 2) - (j + 2) + i, x + col_start(n, j + 3) - (j + 3) + i,
                  n - i, v);
      } else {
        for (int k = 0; k < w; ++k)
          v[k] = lane_dot(xi + i, 1, x + col_start(n, j + k) - (j + k) + i, 1, n - i);
      }
      for (int k = 0; k < w; ++k) {
        nonfinite += v[k] * T(0);
        a[packed(i, j + k)] = v[k];  // L is no longer needed: its storage takes the result
      }
    }
  }
  // Back to the matrices, L columns of a row at a time: the vectors of entries (i, j0..j0+L-1)
  // (from either triangle) transposed give each lane's row segment, stored contiguously.
  for (int i = 0; i < n; ++i) {
    for (int j0 = 0; j0 < n; j0 += L) {
      const int cnt = n - j0 < L ? n - j0 : L;
      V blk[L];
#pragma GCC unroll 16
      for (int k = 0; k < L; ++k) {
        const int j = j0 + k < n ? j0 + k : n - 1;  // past the end: any valid entry (unused)
        blk[k] = j <= i ? a[packed(i, j)] : a[packed(j, i)];
      }
      transpose_block<V, L>(blk);
      for (int l = 0; l < count; ++l)
        store_first<V, T, L>(out[l] + static_cast<std::size_t>(i) * n + j0, blk[l], cnt);
    }
  }
  for (int l = 0; l < count; ++l)
    if (nonfinite[l] != T(0)) bad |= 1u << l;  // x * 0 is NaN exactly when x is not finite
  return bad & ((1u << count) - 1u);
}

}  // namespace

bool small_spd_inverse(const float* in, int ldin, float* out, int ldout, int n,
                                    float lambda, bool full) {
  return gauss_jordan(in, ldin, out, ldout, n, lambda, full);
}
bool small_spd_inverse(const double* in, int ldin, double* out, int ldout, int n,
                                    double lambda, bool full) {
  return gauss_jordan(in, ldin, out, ldout, n, lambda, full);
}

unsigned lane_spd_inverse(const float* const* in, float* const* out,
                                       const double* lambda, int count, int n) {
  return lane_inverse<float>(in, out, lambda, count, n);
}
unsigned lane_spd_inverse(const double* const* in, double* const* out,
                                       const double* lambda, int count, int n) {
  return lane_inverse<double>(in, out, lambda, count, n);
}

}  // namespace fedng::cpu::FEDNG_ISA
