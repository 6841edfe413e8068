// Damped SPD inversion: Cholesky, then the inverse from the factor. Small matrices use an
// in-cache kernel (LAPACK's call overhead dominates below ~100); larger ones potrf + potri.
// Failures escalate: float32 -> float64 at the same damping -> damping x jitter_factor.
#include <cmath>
#include <limits>
#include <vector>

#include "fedng/blas.h"
#include "fedng/dispatch.h"
#include "fedng/ops.h"
#include "fedng/parallel.h"

namespace fedng::cpu {
namespace {

constexpr std::int64_t kSmallKernelMax = 96;

// In place on a row-major n x n buffer holding A (lower triangle used): A^-1, full and
// symmetric. Returns false if A is not numerically positive definite.
template <class T>
bool small_spd_inverse(T* a, std::int64_t n) {
  // Cholesky A = L L^T, row by row (L in the lower triangle).
  for (std::int64_t i = 0; i < n; ++i) {
    T* li = a + i * n;
    for (std::int64_t j = 0; j <= i; ++j) {
      const T* lj = a + j * n;
      T s = li[j];
#pragma omp simd reduction(- : s)
      for (std::int64_t p = 0; p < j; ++p) s -= li[p] * lj[p];
      if (j < i) {
        li[j] = s / lj[j];
      } else {
        if (!(s > T(0)) || !std::isfinite(s)) return false;
        li[i] = std::sqrt(s);
      }
    }
  }
  // X = L^-1 (lower), row i: X[i,:] = (e_i - sum_{p<i} L[i,p] X[p,:]) / L[i,i], in the upper
  // triangle's storage transposed: keep X in a separate scratch to avoid aliasing L.
  thread_local std::vector<T> xbuf;
  xbuf.assign(static_cast<std::size_t>(n * n), T(0));
  T* x = xbuf.data();
  for (std::int64_t i = 0; i < n; ++i) {
    const T* li = a + i * n;
    T* xi = x + i * n;
    for (std::int64_t p = 0; p < i; ++p) {
      const T c = li[p];
      const T* xp = x + p * n;
#pragma omp simd
      for (std::int64_t q = 0; q <= p; ++q) xi[q] -= c * xp[q];
    }
    const T inv = T(1) / li[i];
#pragma omp simd
    for (std::int64_t q = 0; q < i; ++q) xi[q] *= inv;
    xi[i] = inv;
  }
  // A^-1 = X^T X: accumulate rank-1 updates row by row into the lower triangle.
  for (std::int64_t i = 0; i < n * n; ++i) a[i] = T(0);
  for (std::int64_t p = 0; p < n; ++p) {
    const T* xp = x + p * n;
    for (std::int64_t r = 0; r <= p; ++r) {
      const T c = xp[r];
      T* ar = a + r * n;
#pragma omp simd
      for (std::int64_t q = 0; q <= r; ++q) ar[q] += c * xp[q];
    }
  }
  mirror_lower_to_upper(a, n);
  return true;
}

template <class T>
bool all_finite(const T* a, std::int64_t count) {
  for (std::int64_t i = 0; i < count; ++i)
    if (!std::isfinite(a[i])) return false;
  return true;
}

// out <- (sym(in) + lambda I)^-1 in precision T; false if not positive definite or not finite.
template <class T>
bool try_invert(const T* in, T* out, std::int64_t n, double lambda) {
  const std::int64_t nn = n * n;
  for (std::int64_t i = 0; i < nn; ++i) out[i] = in[i];
  for (std::int64_t i = 0; i < n; ++i) out[i * n + i] = static_cast<T>(in[i * n + i] + lambda);
  if (n <= kSmallKernelMax) {
    if (!small_spd_inverse(out, n)) return false;
  } else {
    // Row-major lower == column-major upper.
    const int ni = static_cast<int>(n);
    if (blas::potrf_upper(ni, out) != 0) return false;
    if (blas::potri_upper(ni, out) != 0) return false;
    mirror_lower_to_upper(out, n);
  }
  return all_finite(out, nn);
}

// The float32 path retries in float64 before escalating the damping.
template <class T>
bool try_invert_with_retry(const T* in, T* out, std::int64_t n, double lambda) {
  if (try_invert(in, out, n, lambda)) return true;
  if constexpr (std::is_same_v<T, float>) {
    thread_local std::vector<double> din, dout;
    const std::size_t nn = static_cast<std::size_t>(n * n);
    din.assign(in, in + nn);
    dout.resize(nn);
    if (!try_invert(din.data(), dout.data(), n, lambda)) return false;
    for (std::size_t i = 0; i < nn; ++i) out[i] = static_cast<float>(dout[i]);
    return all_finite(out, static_cast<std::int64_t>(nn));
  }
  return false;
}

template <class T>
std::int8_t invert_one(const T* in, T* out, std::int64_t n, double lambda, int max_tries,
                       double jitter, double* used) {
  const std::int64_t nn = n * n;
  bool finite = true;
  double mean_diag = 0.0;
  for (std::int64_t i = 0; i < n && finite; ++i) {
    for (std::int64_t j = 0; j <= i; ++j) finite = finite && std::isfinite(in[i * n + j]);
    mean_diag += std::fabs(static_cast<double>(in[i * n + i]));
  }
  if (finite) {
    mean_diag = n ? mean_diag / n : 0.0;
    double lam = lambda;
    for (int t = 0; t < max_tries; ++t) {
      if (try_invert_with_retry(in, out, n, lam)) {
        *used = lam;
        return t == 0 ? 0 : 1;
      }
      // Zero damping escalates from a scale-aware jitter instead of staying at zero.
      lam = lam > 0.0 ? lam * jitter : 1e-6 * (mean_diag > 0.0 ? mean_diag : 1.0);
    }
  }
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (std::int64_t i = 0; i < nn; ++i) out[i] = nan;
  *used = std::numeric_limits<double>::quiet_NaN();
  return 2;
}

}  // namespace

void damped_cholesky_inverse(DType dt, const Ptrs& mats, const Ptrs& outs, const Sizes& n,
                             const std::vector<double>& damping, int max_tries,
                             double jitter_factor, std::int8_t* status, double* damping_used,
                             int nthreads) {
  const char* op = "damped_cholesky_inverse";
  const std::size_t count = mats.size();
  check_count(op, "outs", outs.size(), count);
  check_count(op, "n", n.size(), count);
  check_count(op, "damping", damping.size(), count);
  check_sizes(op, "n", n);
  if (max_tries < 1) fail(op, "max_tries must be >= 1");
  if (count && (!status || !damping_used)) fail(op, "status and damping_used must not be null");
  std::vector<double> cost(count);
  Sizes numel(count);
  for (std::size_t i = 0; i < count; ++i) {
    numel[i] = n[i] * n[i];
    blas_int(op, numel[i]);
    cost[i] = static_cast<double>(n[i]) * n[i] * n[i] + 1.0;
  }
  check_ptrs(op, "mats", mats, numel);
  check_ptrs(op, "outs", outs, numel);
  dispatch_float(dt, [&](auto zero) {
    using T = decltype(zero);
    run_ragged(cost, nthreads, [&](std::int64_t i) {
      status[i] = invert_one(as<const T>(mats[i]), as<T>(outs[i]), n[i], damping[i], max_tries,
                             jitter_factor, &damping_used[i]);
    });
  });
}

}  // namespace fedng::cpu
