#include <algorithm>

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
      // Entry by entry this is ndtri(uniform_entry(...)) = gaussian_entry; done in two passes
      // over a block (the integer Philox rounds, then the branchy inverse CDF) so that each loop
      // pipelines on its own: clang was 1.7x slower on the fused loop, GCC gains 15%. Same bits.
      constexpr std::int64_t kBlock = 64;
      double u[kBlock];
      const std::int64_t end = std::min(d, (t + 1) * kRowsPerTask);
      for (std::int64_t i = t * kRowsPerTask; i < end; ++i)
        for (std::int64_t j0 = 0; j0 < r; j0 += kBlock) {
          const std::int64_t n = std::min(kBlock, r - j0);
          for (std::int64_t b = 0; b < n; ++b)
            u[b] = rng::uniform_entry(seed, stream_id, i, j0 + b);
          for (std::int64_t b = 0; b < n; ++b) o[i * r + j0 + b] = static_cast<T>(rng::ndtri(u[b]));
        }
    });
  });
}

}  // namespace fedng::cpu
