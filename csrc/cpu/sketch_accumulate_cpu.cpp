// Y <- decay Y + scale J^T (J Omega), without forming J^T J.
// Both products are skinny (B and r are small, d is large), so threaded BLAS parallelizes them
// poorly. A large item is instead split by rows of Y (columns of J) across the threads, each with
// a serial BLAS: T = J Omega is a sum of per-chunk partial products, reduced once, then every
// chunk updates its own rows Y[c] += scale J[:, c]^T T. Small items run whole, one per thread.
#include <algorithm>
#include <vector>

#include "fedng/blas.h"
#include "fedng/dispatch.h"
#include "fedng/ops.h"
#include "fedng/parallel.h"

namespace fedng::cpu {
namespace {

constexpr std::int64_t kSplitMinRows = 8192;  // below this, one thread per item is enough

struct Chunk {
  std::int64_t item, row0, rows;
};

}  // namespace

void sketch_accumulate(DType dtype, const Ptrs& jacobians, const Ptrs& omegas,
                       const Ptrs& sketches, const Sizes& d, const Sizes& r, const Sizes& b,
                       double decay, const std::vector<double>& scale, int nthreads) {
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
  dispatch_float(dtype, [&](auto zero) {
    using T = decltype(zero);
    // Rows [row0, row0 + rows) of item i: T_part = J[:, c] Omega[c, :] (accumulate = false), or
    // Y[c, :] = decay Y[c, :] + scale J[:, c]^T T (the second product).
    auto first_product = [&](const Chunk& c, T* part) {
      const int bi = static_cast<int>(b[c.item]), ri = static_cast<int>(r[c.item]);
      const int di = static_cast<int>(d[c.item]);
      blas::gemm(false, false, bi, ri, static_cast<int>(c.rows), T(1),
                 as<const T>(jacobians[c.item]) + c.row0, di,
                 as<const T>(omegas[c.item]) + c.row0 * ri, ri, T(0), part, ri);
    };
    auto second_product = [&](const Chunk& c, const T* t) {
      const int bi = static_cast<int>(b[c.item]), ri = static_cast<int>(r[c.item]);
      const int di = static_cast<int>(d[c.item]);
      blas::gemm(true, false, static_cast<int>(c.rows), ri, bi, static_cast<T>(scale[c.item]),
                 as<const T>(jacobians[c.item]) + c.row0, di, t, ri, static_cast<T>(decay),
                 as<T>(sketches[c.item]) + c.row0 * ri, ri);
    };
    auto decay_only = [&](std::int64_t i) {
      T* y = as<T>(sketches[i]);
      // decay 0 overwrites (as BLAS's beta = 0), so stale NaNs do not survive.
      for (std::int64_t e = 0; e < dr[i]; ++e)
        y[e] = decay == 0.0 ? T(0) : static_cast<T>(decay) * y[e];
    };
    std::vector<std::int64_t> whole;
    std::vector<Chunk> chunks;
    for (std::size_t i = 0; i < count; ++i) {
      if (dr[i] == 0) continue;
      if (b[i] == 0) {
        decay_only(static_cast<std::int64_t>(i));
      } else if (nthreads > 1 && d[i] >= kSplitMinRows) {
        const std::int64_t step = (d[i] + nthreads - 1) / nthreads;
        for (std::int64_t row0 = 0; row0 < d[i]; row0 += step)
          chunks.push_back({static_cast<std::int64_t>(i), row0, std::min(step, d[i] - row0)});
      } else {
        whole.push_back(static_cast<std::int64_t>(i));
      }
    }
    // Whole items: both products back to back, one item per thread.
    std::vector<double> whole_cost;
    for (std::int64_t i : whole) whole_cost.push_back(cost[i]);
    run_ragged(whole_cost, nthreads, [&](std::int64_t w) {
      const std::int64_t i = whole[w];
      thread_local std::vector<T> t;
      t.resize(static_cast<std::size_t>(b[i] * r[i]));
      const Chunk all{i, 0, d[i]};
      first_product(all, t.data());
      second_product(all, t.data());
    });
    if (chunks.empty()) return;
    // Split items: partial first products, a reduction per item, then the row-chunk updates.
    std::vector<std::vector<T>> parts(chunks.size());
    set_blas_threads(1);
    parallel_for(static_cast<std::int64_t>(chunks.size()), nthreads, [&](std::int64_t c) {
      parts[c].resize(static_cast<std::size_t>(b[chunks[c].item] * r[chunks[c].item]));
      first_product(chunks[c], parts[c].data());
    });
    for (std::size_t c = 1; c < chunks.size(); ++c) {
      std::size_t head = c;
      while (head > 0 && chunks[head - 1].item == chunks[c].item) --head;
      if (head == c) continue;
      for (std::size_t e = 0; e < parts[c].size(); ++e) parts[head][e] += parts[c][e];
    }
    parallel_for(static_cast<std::int64_t>(chunks.size()), nthreads, [&](std::int64_t c) {
      std::size_t head = static_cast<std::size_t>(c);
      while (head > 0 && chunks[head - 1].item == chunks[c].item) --head;
      second_product(chunks[c], parts[head].data());
    });
  });
}

}  // namespace fedng::cpu
