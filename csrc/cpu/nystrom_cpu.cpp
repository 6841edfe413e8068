// Stable Nystrom approximation (Tropp, Yurtsever, Udell, Cevher 2017, Alg. 3) from a sketch.
// The automatic shift starts from float64's epsilon whatever the dtype: a float32-epsilon shift
// (~1e-4 of the top eigenvalue for d = 50,000) swamps the smaller of the top-r eigenvalues. When
// float32 rounding makes Omega^T Y_nu indefinite, the shift escalates x10 until it is not, so it
// only ever grows as far as the data's own precision requires. No float64 copies: the d x r
// buffers dominate this op's memory.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "fedng/blas.h"
#include "fedng/dispatch.h"
#include "fedng/ops.h"
#include "fedng/parallel.h"

namespace fedng::cpu {
namespace {

// float64 shifts start near 1e-16 of ||Y||; float32 sketches of rank-deficient matrices can need
// ~1e-7 (their rounding), so the shift may grow x10 per try up to kMaxRelShift (relative to the
// automatic shift's sqrt(d) ||Y||_F), and no further: a larger one would hide a sketch that is
// not of a PSD matrix.
constexpr int kShiftTries = 16;
constexpr double kMaxRelShift = 1e-5;

template <class T>
bool nystrom_one(const T* y, const T* om, T* u, T* s, int d, int r, double shift, double* used) {
  const std::int64_t dr = static_cast<std::int64_t>(d) * r;
  double norm2 = 0.0;
  for (std::int64_t e = 0; e < dr; ++e) {
    if (!std::isfinite(y[e]) || !std::isfinite(om[e])) return false;
    norm2 += static_cast<double>(y[e]) * y[e];
  }
  const double eps = std::numeric_limits<double>::epsilon();
  double nu = shift >= 0.0 ? shift : std::sqrt(static_cast<double>(d)) * eps * std::sqrt(norm2);
  if (nu == 0.0 && norm2 == 0.0) nu = eps;  // a zero sketch: the shift alone keeps C invertible
  const double max_nu = std::max(nu, kMaxRelShift * std::sqrt(static_cast<double>(d) * norm2));
  thread_local std::vector<T> ynu, small, work, ucm;
  ynu.resize(static_cast<std::size_t>(dr));
  small.resize(static_cast<std::size_t>(r) * r);
  for (int t = 0; t < kShiftTries; ++t) {
    for (std::int64_t e = 0; e < dr; ++e) ynu[e] = y[e] + static_cast<T>(nu) * om[e];
    // small = Omega^T Y_nu [r, r], symmetrized against rounding, then L L^T = small.
    blas::gemm(true, false, r, r, d, T(1), om, r, ynu.data(), r, T(0), small.data(), r);
    for (int a = 0; a < r; ++a)
      for (int b = 0; b < a; ++b) {
        const T avg = (small[a * r + b] + small[b * r + a]) / T(2);
        small[a * r + b] = avg;
        small[b * r + a] = avg;
      }
    if (blas::potrf_upper(r, small.data()) == 0) break;  // row-major lower L
    nu = nu > 0.0 ? nu * 10.0 : eps;
    if (t == kShiftTries - 1 || nu > max_nu) return false;
  }
  // B = Y_nu L^-T [d, r]; its left singular vectors and values give U and S.
  blas::trsm_right_lower_trans(d, r, small.data(), ynu.data());
  // Row-major B [d, r] is column-major B^T [r, d]; B^T = W Sig Z^T, so U = Z, i.e. Z^T
  // column-major [r, d] written straight into the row-major [d, r] output.
  ucm.resize(static_cast<std::size_t>(r) * r);
  std::vector<T> sv(static_cast<std::size_t>(r));
  T query = 0;
  blas::gesvd(r, d, ynu.data(), sv.data(), ucm.data(), r, u, r, &query, -1);
  work.resize(static_cast<std::size_t>(query) + 1);
  if (blas::gesvd(r, d, ynu.data(), sv.data(), ucm.data(), r, u, r, work.data(),
                  static_cast<int>(work.size())) != 0)
    return false;
  for (int a = 0; a < r; ++a)
    s[a] = static_cast<T>(std::max(0.0, static_cast<double>(sv[a]) * sv[a] - nu));
  *used = nu;
  return true;
}

}  // namespace

void nystrom(DType dtype, const Ptrs& sketches, const Ptrs& omegas, const Ptrs& U, const Ptrs& S,
             const Sizes& d, const Sizes& r, const std::vector<double>& shift,
             std::int8_t* status, double* shift_used, int nthreads) {
  const char* op = "nystrom";
  const std::size_t count = sketches.size();
  check_count(op, "omegas", omegas.size(), count);
  check_count(op, "U", U.size(), count);
  check_count(op, "S", S.size(), count);
  check_count(op, "d", d.size(), count);
  check_count(op, "r", r.size(), count);
  check_count(op, "shift", shift.size(), count);
  check_sizes(op, "d", d);
  check_sizes(op, "r", r);
  if (count && (!status || !shift_used)) fail(op, "status and shift_used must not be null");
  std::vector<double> cost(count);
  Sizes dr(count);
  for (std::size_t i = 0; i < count; ++i) {
    if (r[i] > d[i]) fail(op, "rank r must not exceed d");
    dr[i] = d[i] * r[i];
    blas_int(op, dr[i]);
    cost[i] = 8.0 * d[i] * r[i] * r[i] + 1.0;
  }
  check_ptrs(op, "sketches", sketches, dr);
  check_ptrs(op, "omegas", omegas, dr);
  check_ptrs(op, "U", U, dr);
  check_ptrs(op, "S", S, r);
  dispatch_float(dtype, [&](auto zero) {
    using T = decltype(zero);
    run_ragged(cost, nthreads, [&](std::int64_t i) {
      status[i] = code(Status::Ok);
      shift_used[i] = 0.0;
      if (dr[i] == 0) return;
      const bool ok = nystrom_one(as<const T>(sketches[i]), as<const T>(omegas[i]), as<T>(U[i]),
                                  as<T>(S[i]), static_cast<int>(d[i]), static_cast<int>(r[i]),
                                  shift[i], &shift_used[i]);
      if (!ok) {
        status[i] = code(Status::Failed);
        shift_used[i] = std::numeric_limits<double>::quiet_NaN();
      }
    });
  });
}

}  // namespace fedng::cpu
