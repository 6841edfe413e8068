#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "fedng/cpu_isa.h"
#include "fedng/dispatch.h"
#include "fedng/ops.h"
#include "fedng/parallel.h"

#define FEDNG_DECLARE_GAUSSIAN_ROWS(ns)                                                         \
  namespace fedng::cpu::ns {                                                                    \
  void gaussian_rows(float*, std::int64_t, std::int64_t, std::int64_t, std::uint64_t,          \
                     std::uint64_t);                                                            \
  void gaussian_rows(double*, std::int64_t, std::int64_t, std::int64_t, std::uint64_t,         \
                     std::uint64_t);                                                            \
  }
FEDNG_DECLARE_GAUSSIAN_ROWS(baseline)
#if defined(FEDNG_HAVE_AVX2)
FEDNG_DECLARE_GAUSSIAN_ROWS(avx2)
FEDNG_DECLARE_GAUSSIAN_ROWS(avx512)
#endif

namespace fedng::cpu {
namespace {

constexpr const char* kIsaNames[3] = {"baseline", "avx2", "avx512"};

int best_gaussian_isa() {
  if (cpu_runs_avx512() && !std::getenv("FEDNG_NO_AVX512")) return 2;
  return cpu_runs_avx2() ? 1 : 0;
}

// Read on every call (one relaxed load): tests switch it to compare every build's bits.
std::atomic<int> g_isa{best_gaussian_isa()};

template <class T>
void rows(int isa, T* out, std::int64_t i0, std::int64_t i1, std::int64_t r, std::uint64_t seed,
          std::uint64_t stream) {
#if defined(FEDNG_HAVE_AVX2)
  if (isa == 2) return avx512::gaussian_rows(out, i0, i1, r, seed, stream);
  if (isa == 1) return avx2::gaussian_rows(out, i0, i1, r, seed, stream);
#endif
  (void)isa;
  baseline::gaussian_rows(out, i0, i1, r, seed, stream);
}

}  // namespace

const char* gaussian_isa() { return kIsaNames[g_isa.load(std::memory_order_relaxed)]; }

const char* set_gaussian_isa(const char* name) {
  const char* before = gaussian_isa();
  int want = -1;
  for (int k = 0; k < 3; ++k)
    if (!std::strcmp(name, kIsaNames[k])) want = k;
  if (want < 0) fail("set_gaussian_isa", "isa must be 'baseline', 'avx2' or 'avx512'");
  if ((want == 1 && !cpu_runs_avx2()) || (want == 2 && !cpu_runs_avx512()))
    fail("set_gaussian_isa", "this CPU does not run that build");
  g_isa.store(want, std::memory_order_relaxed);
  return before;
}

void gaussian_sketch_matrix(DType dtype, std::uintptr_t out, std::int64_t d, std::int64_t r,
                            std::uint64_t seed, std::uint64_t stream_id, int nthreads) {
  const char* op = "gaussian_sketch_matrix";
  if (d < 0 || r < 0) fail(op, "d and r must be >= 0");
  if (d > 0xffffffffLL || r > 0xffffffffLL) fail(op, "d and r must fit in 32 bits");
  if (d * r == 0) return;
  if (!out) fail(op, "out is a null pointer");
  // Each entry depends only on (seed, stream_id, i, j), so any split over threads gives equal bits.
  constexpr std::int64_t kRowsPerTask = 256;
  const std::int64_t tasks = (d + kRowsPerTask - 1) / kRowsPerTask;
  const int threads = d * r < 65536 ? 1 : nthreads;
  const int isa = g_isa.load(std::memory_order_relaxed);
  dispatch_float(dtype, [&](auto zero) {
    using T = decltype(zero);
    T* o = as<T>(out);
    if (tasks == 1) return rows(isa, o, 0, d, r, seed, stream_id);
    parallel_for(tasks, threads, [&](std::int64_t t) {
      const std::int64_t i0 = t * kRowsPerTask, i1 = std::min(d, i0 + kRowsPerTask);
      rows(isa, o + i0 * r, i0, i1, r, seed, stream_id);
    });
  });
}

}  // namespace fedng::cpu
