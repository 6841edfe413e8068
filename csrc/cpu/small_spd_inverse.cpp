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
#include <memory>

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
// per clone). Packed lower storage: element (i, j) of all lanes is vector i (i + 1) / 2 + j.
// Cholesky, triangular inverse and X^T X are dot products; four partial sums hide the FMA
// latency. n^3 flops per matrix in all, fully vectorized whatever n is, no per-matrix overhead.

template <class T>
struct LaneVec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int kLanes = 32 / sizeof(T);
};

inline std::size_t packed(int i, int j) { return static_cast<std::size_t>(i) * (i + 1) / 2 + j; }

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

template <class T>
inline unsigned lane_inverse(const T* const* in, T* const* out, const double* lambda, int count,
                             int n) {
  using V = typename LaneVec<T>::type;
  constexpr int L = LaneVec<T>::kLanes;
  const std::size_t tri = packed(n, 0);
  V* a = reinterpret_cast<V*>(scratch<T>((2 * tri + n) * L));
  V* x = a + tri;
  V* rinv = x + tri;
  // Interleave the lower triangles; missing lanes get the identity so they stay harmless.
  for (int i = 0; i < n; ++i)
    for (int j = 0; j <= i; ++j) {
      V v;
      for (int l = 0; l < L; ++l)
        v[l] = l < count ? in[l][static_cast<std::size_t>(i) * n + j] : T(i == j);
      if (i == j)
        for (int l = 0; l < count; ++l) v[l] += static_cast<T>(lambda[l]);
      a[packed(i, j)] = v;
    }
  unsigned bad = 0;
  // Cholesky, left-looking by rows: L(i, j) = (A(i, j) - L(i, :j) . L(j, :j)) / L(j, j).
  for (int i = 0; i < n; ++i) {
    V* li = a + packed(i, 0);
    for (int j = 0; j < i; ++j) li[j] = (li[j] - lane_dot(li, 1, a + packed(j, 0), 1, j)) * rinv[j];
    V d = li[i] - lane_dot(li, 1, li, 1, i);
    for (int l = 0; l < L; ++l) {
      const bool ok = d[l] > T(0) && std::isfinite(d[l]);
      if (!ok) bad |= 1u << l;
      d[l] = ok ? std::sqrt(d[l]) : T(1);
    }
    li[i] = d;
    rinv[i] = T(1) / d;
  }
  // X = L^-1: X(i, i) = 1 / L(i, i); X(i, j) = -X(i, i) sum_{p=j}^{i-1} L(i, p) X(p, j).
  // X(p, j) for consecutive p is (p + 1) vectors apart: walk it with a running pointer.
  for (int i = 0; i < n; ++i) {
    const V* li = a + packed(i, 0);
    V* xi = x + packed(i, 0);
    for (int j = 0; j < i; ++j) {
      V s0 = {}, s1 = {};
      const V* xpj = x + packed(j, j);
      int p = j;
      for (; p + 2 <= i; p += 2) {
        s0 += li[p] * xpj[0];
        s1 += li[p + 1] * xpj[p + 1];
        xpj += 2 * p + 3;
      }
      if (p < i) s0 += li[p] * xpj[0];
      xi[j] = -rinv[i] * (s0 + s1);
    }
    xi[i] = rinv[i];
  }
  // A^-1(i, j) = sum_{p >= i} X(p, i) X(p, j), written straight to both triangles of out.
  for (int i = 0; i < n; ++i)
    for (int j = 0; j <= i; ++j) {
      V s0 = {}, s1 = {};
      const V* xp = x + packed(i, 0);  // row p = i
      int p = i;
      for (; p + 2 <= n; p += 2) {
        s0 += xp[i] * xp[j];
        s1 += xp[p + 1 + i] * xp[p + 1 + j];
        xp += 2 * p + 3;
      }
      if (p < n) s0 += xp[i] * xp[j];
      const V v = s0 + s1;
      for (int l = 0; l < count; ++l) {
        if (!std::isfinite(v[l])) bad |= 1u << l;
        out[l][static_cast<std::size_t>(i) * n + j] = v[l];
        out[l][static_cast<std::size_t>(j) * n + i] = v[l];
      }
    }
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
