// A plain update (named float32 / bfloat16 arrays, no curvature) checked and folded in one call:
// its squared norms, the server's norm check, and only then the weighted fold. Compiled without
// FMA contraction (CMakeLists.txt): the fold is torch's `out + w * x` (two roundings), so a
// server folding this way reproduces `mean_delta`'s batch mean bit for bit.
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "fedng/errors.h"
#include "fedng/fold_clones.h"
#include "fedng/packed_fold.h"

namespace fedng::cpu {

namespace {

// acc = w * x (first) or acc + w * x: each product rounded to float32, then added.
template <class T>
FEDNG_CLONES void fold_one(const T* x, float* acc, std::int64_t n, float w, bool first) {
  if (first) {
#pragma omp simd
    for (std::int64_t i = 0; i < n; ++i) {
      float v;
      if constexpr (sizeof(T) == 2) v = bf16_float(x[i]); else v = x[i];
      acc[i] = w * v;
    }
  } else {
#pragma omp simd
    for (std::int64_t i = 0; i < n; ++i) {
      float v;
      if constexpr (sizeof(T) == 2) v = bf16_float(x[i]); else v = x[i];
      const float p = w * v;
      acc[i] = acc[i] + p;
    }
  }
}

}  // namespace

double exact_sum(const double* x, std::size_t n) {
  // Shewchuk's partials with CPython's final half-even correction (math.fsum): the correctly
  // rounded sum of finite inputs.
  std::vector<double> p;
  p.reserve(8);
  for (std::size_t k = 0; k < n; ++k) {
    double v = x[k];
    std::size_t i = 0;
    for (std::size_t j = 0; j < p.size(); ++j) {
      double y = p[j];
      if (std::fabs(v) < std::fabs(y)) std::swap(v, y);
      const double hi = v + y;
      const double lo = y - (hi - v);
      if (lo != 0.0) p[i++] = lo;
      v = hi;
    }
    p.resize(i);
    p.push_back(v);
  }
  std::size_t m = p.size();
  double hi = 0.0;
  if (m > 0) {
    double lo = 0.0;
    hi = p[--m];
    while (m > 0) {
      const double v = hi;
      const double y = p[--m];
      hi = v + y;
      const double yr = hi - v;
      lo = y - yr;
      if (lo != 0.0) break;
    }
    if (m > 0 && ((lo < 0.0 && p[m - 1] < 0.0) || (lo > 0.0 && p[m - 1] > 0.0))) {
      const double y = lo * 2.0;
      const double v = hi + y;
      const double yr = v - hi;
      if (y == yr) hi = v;
    }
  }
  return hi;
}

bool check_fold(const Ptrs& xs, const Ptrs& accs, const Sizes& n, const Sizes& bf16,
                double weight, double bound, bool first, double* sq) {
  const char* op = "check_fold";
  // every count and size before any pointer is read (check_ptrs indexes n)
  check_count(op, "accs", accs.size(), xs.size());
  check_count(op, "n", n.size(), xs.size());
  check_count(op, "bf16", bf16.size(), xs.size());
  check_sizes(op, "n", n);
  check_ptrs(op, "accs", accs, n);
  sum_squares(xs, n, bf16, sq);  // checks xs, n, bf16
  for (std::size_t k = 0; k < xs.size(); ++k)
    if (!std::isfinite(sq[k])) return false;
  const double norm = std::sqrt(exact_sum(sq, xs.size()));
  if (!std::isfinite(norm) || norm > bound) return false;
  const float w = static_cast<float>(weight);
  for (std::size_t k = 0; k < xs.size(); ++k) {
    if (bf16[k] != 0)
      fold_one(as<const std::uint16_t>(xs[k]), as<float>(accs[k]), n[k], w, first);
    else
      fold_one(as<const float>(xs[k]), as<float>(accs[k]), n[k], w, first);
  }
  return true;
}

}  // namespace fedng::cpu
