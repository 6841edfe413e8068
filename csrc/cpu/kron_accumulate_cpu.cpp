#include "fedng/blas.h"
#include "fedng/dispatch.h"
#include "fedng/mirror.h"
#include "fedng/ops.h"
#include "fedng/parallel.h"

namespace fedng::cpu {

void kron_accumulate(DType dtype, const Ptrs& inputs, const Ptrs& factors, const Sizes& n,
                     const Sizes& k, double decay, const std::vector<double>& scale, int nthreads) {
  const char* op = "kron_accumulate";
  const std::size_t count = factors.size();
  check_count(op, "inputs", inputs.size(), count);
  check_count(op, "n", n.size(), count);
  check_count(op, "k", k.size(), count);
  check_count(op, "scale", scale.size(), count);
  check_sizes(op, "n", n);
  check_sizes(op, "k", k);
  std::vector<double> cost(count);
  Sizes fnumel(count), xnumel(count);
  for (std::size_t i = 0; i < count; ++i) {
    cost[i] = static_cast<double>(n[i]) * n[i] * (k[i] + 1);
    fnumel[i] = n[i] * n[i];
    xnumel[i] = n[i] * k[i];
    blas_int(op, fnumel[i]);
    blas_int(op, xnumel[i]);
  }
  check_ptrs(op, "factors", factors, fnumel);
  check_ptrs(op, "inputs", inputs, xnumel);
  dispatch_float(dtype, [&](auto zero) {
    using T = decltype(zero);
    run_ragged(cost, nthreads, [&](std::int64_t i) {
      const int ni = static_cast<int>(n[i]), ki = static_cast<int>(k[i]);
      if (ni == 0) return;
      T* f = as<T>(factors[i]);
      if (ki == 0) {
        // decay 0 overwrites (as BLAS's beta = 0), so stale NaNs do not survive.
        for (std::int64_t e = 0; e < fnumel[i]; ++e) f[e] = decay == 0.0 ? T(0) : static_cast<T>(decay) * f[e];
        return;
      }
      // SYRK writes the lower triangle (half the flops of GEMM); the upper one is mirrored in
      // groups of rows (mirror.h). The mirror still costs ~40% of the SYRK at n ~ 1000 (cache
      // misses on the strided side); GEMM panels mirrored while cache-hot measured no better.
      blas::syrk_lower_ata(ni, ki, static_cast<T>(scale[i]), as<const T>(inputs[i]),
                           static_cast<T>(decay), f);
      mirror_lower_to_upper_rows(f, ni);
    });
  });
}

}  // namespace fedng::cpu
