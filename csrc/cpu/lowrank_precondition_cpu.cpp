#include <vector>

#include "fedng/blas.h"
#include "fedng/dispatch.h"
#include "fedng/ops.h"
#include "fedng/parallel.h"

namespace fedng::cpu {

void lowrank_precondition(DType dtype, const Ptrs& U, const Ptrs& S, const Ptrs& V,
                          const Ptrs& outs, const Sizes& d, const Sizes& r, const Sizes& c,
                          const std::vector<double>& damping, int nthreads) {
  const char* op = "lowrank_precondition";
  const std::size_t count = U.size();
  check_count(op, "S", S.size(), count);
  check_count(op, "V", V.size(), count);
  check_count(op, "outs", outs.size(), count);
  check_count(op, "d", d.size(), count);
  check_count(op, "r", r.size(), count);
  check_count(op, "c", c.size(), count);
  check_count(op, "damping", damping.size(), count);
  check_sizes(op, "d", d);
  check_sizes(op, "r", r);
  check_sizes(op, "c", c);
  std::vector<double> cost(count);
  Sizes dr(count), dc(count), rs(count);
  for (std::size_t i = 0; i < count; ++i) {
    if (!(damping[i] > 0.0)) fail(op, "damping must be > 0");
    dr[i] = d[i] * r[i];
    dc[i] = d[i] * c[i];
    rs[i] = r[i];
    blas_int(op, dr[i]);
    blas_int(op, dc[i]);
    cost[i] = 4.0 * d[i] * r[i] * c[i] + 2.0 * dc[i];
  }
  check_ptrs(op, "U", U, dr);
  check_ptrs(op, "S", S, rs);
  check_ptrs(op, "V", V, dc);
  check_ptrs(op, "outs", outs, dc);
  dispatch_float(dtype, [&](auto zero) {
    using T = decltype(zero);
    run_ragged(cost, nthreads, [&](std::int64_t i) {
      const int di = static_cast<int>(d[i]), ri = static_cast<int>(r[i]),
                ci = static_cast<int>(c[i]);
      if (dc[i] == 0) return;
      const T* u = as<const T>(U[i]);
      const T* s = as<const T>(S[i]);
      const T* v = as<const T>(V[i]);
      T* out = as<T>(outs[i]);
      const T inv_lam = static_cast<T>(1.0 / damping[i]);
      for (std::int64_t e = 0; e < dc[i]; ++e) out[e] = inv_lam * v[e];
      if (ri == 0) return;
      // W = U^T V [r, c], scaled row-wise by s/(s+lambda)/lambda; out -= U W (Woodbury).
      thread_local std::vector<T> w;
      w.resize(static_cast<std::size_t>(r[i] * c[i]));
      // One vector (the usual case): GEMV, which OpenBLAS runs faster than a GEMM of width 1.
      if (ci == 1)
        blas::gemv(true, di, ri, T(1), u, ri, v, T(0), w.data());
      else
        blas::gemm(true, false, ri, ci, di, T(1), u, ri, v, ci, T(0), w.data(), ci);
      for (int a = 0; a < ri; ++a) {
        const double sa = static_cast<double>(s[a]);
        const T f = static_cast<T>(sa / (sa + damping[i]) / damping[i]);
        for (int col = 0; col < ci; ++col) w[static_cast<std::size_t>(a) * ci + col] *= f;
      }
      if (ci == 1)
        blas::gemv(false, di, ri, T(-1), u, ri, w.data(), T(1), out);
      else
        blas::gemm(false, false, di, ci, ri, T(-1), u, ri, w.data(), ci, T(1), out, ci);
    });
  });
}

}  // namespace fedng::cpu
