#include <vector>

#include "fedng/blas.h"
#include "fedng/dispatch.h"
#include "fedng/ops.h"
#include "fedng/parallel.h"

namespace fedng::cpu {

void sketch_accumulate(DType dt, const Ptrs& sketches, const Ptrs& jacobians, const Ptrs& omegas,
                       const Sizes& d, const Sizes& r, const Sizes& b, double decay,
                       const std::vector<double>& scale, int nthreads) {
  const char* op = "sketch_accumulate";
  const std::size_t count = sketches.size();
  check_count(op, "jacobians", jacobians.size(), count);
  check_count(op, "omegas", omegas.size(), count);
  check_count(op, "d", d.size(), count);
  check_count(op, "r", r.size(), count);
  check_count(op, "b", b.size(), count);
  check_count(op, "scale", scale.size(), count);
  check_sizes(op, "d", d);
  check_sizes(op, "r", r);
  check_sizes(op, "b", b);
  std::vector<double> cost(count);
  Sizes dr(count), bd(count);
  for (std::size_t i = 0; i < count; ++i) {
    dr[i] = d[i] * r[i];
    bd[i] = b[i] * d[i];
    blas_int(op, dr[i]);
    blas_int(op, bd[i]);
    blas_int(op, b[i] * r[i]);
    cost[i] = 4.0 * b[i] * d[i] * r[i] + dr[i];
  }
  check_ptrs(op, "sketches", sketches, dr);
  check_ptrs(op, "omegas", omegas, dr);
  check_ptrs(op, "jacobians", jacobians, bd);
  dispatch_float(dt, [&](auto zero) {
    using T = decltype(zero);
    run_ragged(cost, nthreads, [&](std::int64_t i) {
      const int di = static_cast<int>(d[i]), ri = static_cast<int>(r[i]),
                bi = static_cast<int>(b[i]);
      T* y = as<T>(sketches[i]);
      if (dr[i] == 0) return;
      if (bi == 0) {
        // decay 0 overwrites (as BLAS's beta = 0), so stale NaNs do not survive.
        for (std::int64_t e = 0; e < dr[i]; ++e) y[e] = decay == 0.0 ? T(0) : static_cast<T>(decay) * y[e];
        return;
      }
      // T = J Omega [b, r]; Y = decay Y + scale J^T T. F = J^T J is never formed.
      thread_local std::vector<T> tmp;
      tmp.resize(static_cast<std::size_t>(b[i] * r[i]));
      const T* j = as<const T>(jacobians[i]);
      blas::gemm(false, false, bi, ri, di, T(1), j, di, as<const T>(omegas[i]), ri, T(0),
                 tmp.data(), ri);
      blas::gemm(true, false, di, ri, bi, static_cast<T>(scale[i]), j, di, tmp.data(), ri,
                 static_cast<T>(decay), y, ri);
    });
  });
}

}  // namespace fedng::cpu
