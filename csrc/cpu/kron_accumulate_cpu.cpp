#include <cstdlib>
#include <vector>

#include "fedng/blas.h"
#include "fedng/dispatch.h"
#include "fedng/mirror.h"
#include "fedng/ops.h"
#include "fedng/parallel.h"

namespace fedng::cpu {
namespace {

// TUNING KNOBS (temporary, env): panel width and the smallest n that uses panels.
int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : dflt;
}

// One unit of work: factor i whole (panel width 0), or its lower panel [j, n) x [j, j + w).
struct Task {
  std::int64_t i, j, w;
};

}  // namespace

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
  const std::int64_t kPanel = env_int("FEDNG_KRON_PANEL", 128);
  const std::int64_t kPanelMinN = env_int("FEDNG_KRON_PANEL_MIN_N", 512);
  std::vector<Task> tasks;
  std::vector<double> cost;
  Sizes fnumel(count), xnumel(count);
  for (std::size_t i = 0; i < count; ++i) {
    fnumel[i] = n[i] * n[i];
    xnumel[i] = n[i] * k[i];
    blas_int(op, fnumel[i]);
    blas_int(op, xnumel[i]);
    const std::int64_t ni = n[i], ki = k[i];
    if (ni == 0) continue;
    if (ki == 0 || kPanel <= 0 || ni < kPanelMinN) {
      tasks.push_back({static_cast<std::int64_t>(i), 0, 0});
      cost.push_back(static_cast<double>(ni) * ni * (ki + 1));
      continue;
    }
    for (std::int64_t j = 0; j < ni; j += kPanel) {
      const std::int64_t w = std::min(kPanel, ni - j);
      tasks.push_back({static_cast<std::int64_t>(i), j, w});
      cost.push_back(static_cast<double>(ni - j) * w * (ki + 1));
    }
  }
  check_ptrs(op, "factors", factors, fnumel);
  check_ptrs(op, "inputs", inputs, xnumel);
  dispatch_float(dtype, [&](auto zero) {
    using T = decltype(zero);
    run_ragged(cost, nthreads, [&](std::int64_t t) {
      const Task& task = tasks[t];
      const std::int64_t i = task.i;
      const int ni = static_cast<int>(n[i]), ki = static_cast<int>(k[i]);
      T* f = as<T>(factors[i]);
      const T* x = as<const T>(inputs[i]);
      if (ki == 0) {
        // decay 0 overwrites (as BLAS's beta = 0), so stale NaNs do not survive.
        for (std::int64_t e = 0; e < fnumel[i]; ++e) f[e] = decay == 0.0 ? T(0) : static_cast<T>(decay) * f[e];
        return;
      }
      if (task.w == 0) {
        // SYRK writes the upper triangle (half the flops of GEMM); the lower one is mirrored.
        const int mm = env_int("FEDNG_KRON_NOMIRROR", 0);
        if (mm == 3) {
          blas::syrk_lower_ata(ni, ki, static_cast<T>(scale[i]), x, static_cast<T>(decay), f);
          mirror_strided<false>(f, ni, ni);
          return;
        }
        blas::syrk_upper_ata(ni, ki, static_cast<T>(scale[i]), x, static_cast<T>(decay), f);
        if (mm == 0) mirror_upper_to_lower(f, ni);
        if (mm == 2) mirror_strided<true>(f, ni, ni);
        return;
      }
      // Lower panel C[j:, j:j+w] by one GEMM (rows below the diagonal block only), then its
      // mirror onto C[j:j+w, j:] while the panel is cache-hot: SYRK + a whole-matrix mirror
      // streamed the 4 MB factor from memory twice.
      const int j = static_cast<int>(task.j), w = static_cast<int>(task.w);
      T* cj = f + static_cast<std::int64_t>(j) * ni + j;
      const T s = static_cast<T>(scale[i]), b = static_cast<T>(decay);
      if (env_int("FEDNG_KRON_DIAG_SYRK", 1)) {
        blas::syrk_lower_ata(w, ki, s, x + j, b, cj, ni, ni);
        if (ni - j - w > 0)
          blas::gemm(true, false, ni - j - w, w, ki, s, x + j + w, ni, x + j, ni, b,
                     cj + static_cast<std::int64_t>(w) * ni, ni);
      } else {
        blas::gemm(true, false, ni - j, w, ki, s, x + j, ni, x + j, ni, b, cj, ni);
      }
      if (env_int("FEDNG_KRON_NOMIRROR", 0) != 1) mirror_panel_lower_to_upper(f, ni, j, w);
    });
  });
}

}  // namespace fedng::cpu
