// Damped SPD inversion.
// - n <= kBaseCase: in-cache kernels (small_spd_inverse.cpp): same-size matrices together in SIMD
//   lanes, others one by one; LAPACK's per-call overhead dominates at these sizes.
// - larger: Cholesky (OpenBLAS potrf), then the inverse from the factor by a recursion whose
//   O(n^3) work is TRSM/GEMM/GEMMT (LAPACK's potri runs at half of GEMM speed below n ~ 512):
//   with L = [L11 0; L21 L22] and Y = L21 L11^-1,
//     A^-1 = [inv(L11) + Y^T inv(L22) Y,  (-inv(L22) Y)^T;  -inv(L22) Y,  inv(L22)],
//   where inv(Lkk) means (Lkk Lkk^T)^-1. Every step is a triangular solve or a product with
//   already-computed blocks of the inverse, as in potri: no explicit inverse of an unfactored
//   block (that squares the conditioning). 2n^3/3 flops after potrf's n^3/3.
// Failures escalate: float32 -> float64 at the same damping -> damping x jitter_factor.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "fedng/blas.h"
#include "fedng/dispatch.h"
#include "fedng/mirror.h"
#include "fedng/ops.h"
#include "fedng/parallel.h"
#include "fedng/small_spd_inverse.h"

namespace fedng::cpu {
namespace {

constexpr int kBaseCase = 64;

// Row-major B [m, n] <- B L^-1 with L [n, n] lower triangular, by halves of L: X2 = B2 L22^-1,
// B1 -= X2 L21, X1 = B1 L11^-1. The same solve as one TRSM, but most of its flops in a GEMM:
// OpenBLAS's TRSM runs at a third of GEMM speed at n ~ 500 here (mlp1024's factors).
template <class T>
void solve_right_lower(int m, int n, const T* l, int ldl, T* b, int ldb) {
  if (n <= kBaseCase) {
    blas::trsm_right_lower(m, n, l, ldl, b, ldb);
    return;
  }
  const int n1 = ((n / 2) + 7) / 8 * 8;
  const int n2 = n - n1;
  const T* l21 = l + static_cast<std::int64_t>(n1) * ldl;
  solve_right_lower(m, n2, l21 + n1, ldl, b + n1, ldb);
  blas::gemm(false, false, m, n1, n2, T(-1), b + n1, ldb, l21, ldl, T(1), b, ldb);
  solve_right_lower(m, n1, l, ldl, b, ldb);
}

// Lower triangle of (L L^T)^-1 over L (row-major lower, leading dimension lda). `scratch` holds
// at least n * n / 2 elements for this level and the ones below it.
template <class T>
void inverse_from_cholesky(T* a, int n, int lda, T* scratch) {
  if (n <= kBaseCase) {
    blas::potri_upper(n, a, lda);  // cannot fail: L has a positive diagonal
    return;
  }
  const int n1 = ((n / 2) + 7) / 8 * 8;  // keep the leading block a multiple of 8 wide
  const int n2 = n - n1;
  T* a11 = a;
  T* a21 = a + static_cast<std::int64_t>(n1) * lda;  // L21, then Y, then the inverse's block
  T* a22 = a21 + n1;
  T* w = scratch;  // -inv(L22) Y [n2, n1]
  T* deeper = scratch + static_cast<std::int64_t>(n2) * n1;
  solve_right_lower(n2, n1, a11, lda, a21, lda);  // Y = L21 L11^-1
  inverse_from_cholesky(a22, n2, lda, deeper);
  mirror_strided(a22, n2, lda);  // its upper triangle from the lower one
  blas::gemm(false, false, n2, n1, n2, T(-1), a22, lda, a21, lda, T(0), w, n1);
  inverse_from_cholesky(a11, n1, lda, deeper);
  blas::gemmt_lower(true, false, n1, n2, T(-1), a21, lda, w, n1, T(1), a11, lda);
  for (int i = 0; i < n2; ++i)
    std::copy(w + static_cast<std::int64_t>(i) * n1, w + static_cast<std::int64_t>(i + 1) * n1,
              a21 + static_cast<std::int64_t>(i) * lda);
}

// True when every element of the lower triangle is finite (x * 0 is NaN exactly otherwise).
template <class T>
bool lower_finite(const T* a, std::int64_t n) {
  T acc = T(0);
  for (std::int64_t i = 0; i < n; ++i) {
    const T* ai = a + i * n;
#pragma omp simd reduction(+ : acc)
    for (std::int64_t j = 0; j <= i; ++j) acc += ai[j] * T(0);
  }
  return acc == T(0);
}

// out <- (sym(in) + lambda I)^-1 in precision T; false if not positive definite or not finite.
template <class T>
bool try_invert(const T* in, T* out, std::int64_t n, double lambda) {
  const int ni = static_cast<int>(n);
  if (n <= kBaseCase) return small_spd_inverse(in, ni, out, ni, ni, static_cast<T>(lambda), true);
  const std::int64_t nn = n * n;
  for (std::int64_t i = 0; i < nn; ++i) out[i] = in[i];
  for (std::int64_t i = 0; i < n; ++i) out[i * n + i] = static_cast<T>(in[i * n + i] + lambda);
  if (blas::potrf_upper(ni, out) != 0) return false;
  thread_local std::vector<T> scratch;
  scratch.resize(static_cast<std::size_t>(nn / 2 + n + 8));
  inverse_from_cholesky(out, ni, ni, scratch.data());
  if (!lower_finite(out, n)) return false;
  mirror_lower_to_upper_rows(out, n);
  return true;
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
    return lower_finite(out, n);  // finite in float64 may still overflow float32
  }
  return false;
}

template <class T>
double mean_abs_diag(const T* a, std::int64_t n) {
  double sum = 0.0;
  for (std::int64_t i = 0; i < n; ++i) sum += std::fabs(static_cast<double>(a[i * n + i]));
  return n && sum > 0.0 ? sum / n : 1.0;
}

template <class T>
std::int8_t invert_one(const T* in, T* out, std::int64_t n, double lambda, int max_tries,
                       double jitter, double* used) {
  if (lower_finite(in, n)) {
    double lam = lambda;
    for (int t = 0; t < max_tries; ++t) {
      if (try_invert_with_retry(in, out, n, lam)) {
        *used = lam;
        return code(t == 0 ? Status::Ok : Status::Jitter);
      }
      // Zero damping escalates from a scale-aware jitter instead of staying at zero.
      lam = lam > 0.0 ? lam * jitter : 1e-6 * mean_abs_diag(in, n);
    }
  }
  const std::int64_t nn = n * n;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (std::int64_t i = 0; i < nn; ++i) out[i] = nan;
  *used = std::numeric_limits<double>::quiet_NaN();
  return code(Status::Failed);
}

// Matrices of one size n <= kBaseCase are inverted together in SIMD lanes; anything else, and any
// lane that fails, goes through invert_one (with its float64 retry and damping escalation).
template <class T>
void invert_lanes(const Ptrs& mats, const Ptrs& outs, const Sizes& n, const std::vector<double>& damping,
                  int max_tries, double jitter, std::int8_t* status, double* used,
                  const std::int64_t* items, int count) {
  const T* in[kMaxLanes];
  T* out[kMaxLanes];
  double lam[kMaxLanes];
  std::int64_t idx[kMaxLanes];
  int live = 0;
  // No finiteness pre-pass: a NaN or Inf in a lower triangle always reaches a Cholesky pivot
  // (L(i, j) = Inf makes pivot i -Inf, a NaN stays NaN), so that lane fails and invert_one
  // below reports it FAILED with the usual NaN output.
  for (int c = 0; c < count; ++c) {
    const std::int64_t i = items[c];
    in[live] = as<const T>(mats[i]);
    out[live] = as<T>(outs[i]);
    lam[live] = damping[i];
    idx[live++] = i;
  }
  if (!live) return;
  const unsigned bad = lane_spd_inverse(in, out, lam, live, static_cast<int>(n[idx[0]]));
  for (int l = 0; l < live; ++l) {
    const std::int64_t i = idx[l];
    if (bad & (1u << l)) {
      status[i] = invert_one(in[l], out[l], n[i], damping[i], max_tries, jitter, &used[i]);
    } else {
      status[i] = code(Status::Ok);
      used[i] = damping[i];
    }
  }
}

}  // namespace

void damped_cholesky_inverse(DType dtype, const Ptrs& mats, const Ptrs& outs, const Sizes& n,
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
  Sizes numel(count);
  for (std::size_t i = 0; i < count; ++i) {
    numel[i] = n[i] * n[i];
    blas_int(op, numel[i]);
  }
  check_ptrs(op, "mats", mats, numel);
  check_ptrs(op, "outs", outs, numel);
  dispatch_float(dtype, [&](auto zero) {
    using T = decltype(zero);
    const int L = std::is_same_v<T, float> ? lanes_float() : lanes_double();
    // Tasks: runs of up to L same-size small matrices (lane-batched), or one matrix each.
    std::vector<std::int64_t> order(count);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](std::int64_t a, std::int64_t b) { return n[a] < n[b]; });
    std::vector<std::pair<std::size_t, int>> tasks;  // (first position in order, count)
    std::vector<double> cost;
    for (std::size_t p = 0; p < count;) {
      const std::int64_t size = n[order[p]];
      int run = 1;
      if (size >= 1 && size <= kBaseCase)
        while (run < L && p + run < count && n[order[p + run]] == size) ++run;
      tasks.emplace_back(p, run);
      cost.push_back(static_cast<double>(size) * size * size * (run > 1 ? L : 1) + 1.0);
      p += run;
    }
    run_ragged(cost, nthreads, [&](std::int64_t t) {
      const auto [first, run] = tasks[t];
      if (run > 1) {
        invert_lanes<T>(mats, outs, n, damping, max_tries, jitter_factor, status, damping_used,
                        order.data() + first, run);
        return;
      }
      const std::int64_t i = order[first];
      status[i] = invert_one(as<const T>(mats[i]), as<T>(outs[i]), n[i], damping[i], max_tries,
                             jitter_factor, &damping_used[i]);
    });
  });
}

}  // namespace fedng::cpu
