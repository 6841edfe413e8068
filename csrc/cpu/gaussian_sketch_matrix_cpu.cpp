#include "fedng/dispatch.h"
#include "fedng/ops.h"
#include "fedng/parallel.h"
#include "fedng/philox.h"

namespace fedng::cpu {

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
  dispatch_float(dtype, [&](auto zero) {
    using T = decltype(zero);
    T* o = as<T>(out);
    parallel_for(tasks, threads, [&](std::int64_t t) {
      const std::int64_t end = std::min(d, (t + 1) * kRowsPerTask);
      for (std::int64_t i = t * kRowsPerTask; i < end; ++i)
        for (std::int64_t j = 0; j < r; ++j)
          o[i * r + j] = static_cast<T>(rng::gaussian_entry(seed, stream_id, i, j));
    });
  });
}

}  // namespace fedng::cpu
