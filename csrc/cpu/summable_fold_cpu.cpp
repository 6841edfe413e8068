// A summable FedNG reply checked, then folded, in one call (see fedng/summable_fold.h). Every
// measure comes from the very routines the Python checks call (sum_squares, int8_payload_traces,
// exact_sum = math.fsum) and the fold is fold_update's: the same values, verdicts and sums.
// Compiled without FMA contraction (CMakeLists.txt): the scale products are Python's doubles.
#include "fedng/summable_fold.h"

#include <cmath>

#include "fedng/errors.h"
#include "fedng/packed_fold.h"

namespace fedng::cpu {
namespace {

// Whether the byte ranges [a, a + na) and [b, b + nb) share a byte.
bool overlaps(const void* a, std::int64_t na, const void* b, std::int64_t nb) {
  const auto x = reinterpret_cast<std::uintptr_t>(a), y = reinterpret_cast<std::uintptr_t>(b);
  return na > 0 && nb > 0 && x < y + static_cast<std::uintptr_t>(nb) &&
         y < x + static_cast<std::uintptr_t>(na);
}

// Whether any input (xs, q, side) overlaps any sum (accs, acc8); sizes already checked.
bool inputs_alias_sums(const Ptrs& xs, const Ptrs& accs, const Sizes& n, const Sizes& bf16,
                       const std::int8_t* q, const float* side, const float* acc8,
                       std::int64_t nq, std::int64_t nside, std::int64_t nacc) {
  const std::int64_t acc8_bytes = nacc * static_cast<std::int64_t>(sizeof(float));
  auto hits_a_sum = [&](const void* p, std::int64_t bytes) {
    if (overlaps(p, bytes, acc8, acc8_bytes)) return true;
    for (std::size_t j = 0; j < accs.size(); ++j)
      if (overlaps(p, bytes, reinterpret_cast<const void*>(accs[j]), 4 * n[j])) return true;
    return false;
  };
  for (std::size_t k = 0; k < xs.size(); ++k)
    if (hits_a_sum(reinterpret_cast<const void*>(xs[k]), (bf16[k] ? 2 : 4) * n[k])) return true;
  return hits_a_sum(q, nq) || hits_a_sum(side, nside * static_cast<std::int64_t>(sizeof(float)));
}

}  // namespace

int summable_check_fold(const Ptrs& xs, const Ptrs& accs, const Sizes& n, const Sizes& bf16,
                        std::int64_t ndelta, const std::int8_t* q, const float* side, float* acc8,
                        std::int64_t nq, std::int64_t nside, std::int64_t nacc, const Sizes& segs,
                        std::int64_t chunk, double max_abs, const Sizes& pairs,
                        const std::vector<double>& divs, const std::vector<double>& bounds,
                        double weight, double norm_bound, double* sq, double* traces,
                        double* norm, double* scales) {
  const char* op = "summable_check_fold";
  check_count(op, "accs", accs.size(), xs.size());
  check_count(op, "n", n.size(), xs.size());
  check_count(op, "bf16", bf16.size(), xs.size());
  if (ndelta < 0 || static_cast<std::size_t>(ndelta) > xs.size()) fail(op, "bad 'ndelta'");
  check_count(op, "pairs", pairs.size(), 2 * divs.size());
  check_count(op, "bounds", bounds.size(), divs.size());
  if (segs.empty() || q == nullptr || side == nullptr || acc8 == nullptr)
    fail(op, "an int8 payload is expected");
  const std::size_t nseg = segs.size() / 6;
  for (std::size_t s = 0; s < pairs.size(); ++s)
    if (pairs[s] >= static_cast<std::int64_t>(nseg) || (pairs[s] < 0 && (s % 2 == 0 || pairs[s] != -1)))
      fail(op, "'pairs' names a segment out of range");
  check_sizes(op, "n", n);
  check_ptrs(op, "accs", accs, n);
  if (nq < 0 || nside < 0 || nacc < 0) fail(op, "negative payload sizes");
  if (inputs_alias_sums(xs, accs, n, bf16, q, side, acc8, nq, nside, nacc)) return kAliased;
  sum_squares(xs, n, bf16, sq);  // checks xs, n, bf16
  for (std::size_t k = 0; k < xs.size(); ++k)
    if (!std::isfinite(sq[k])) return kNonFinite;
  // int8_payload_traces checks the segments against nq / nside (fold_update, below, nacc too)
  if (!int8_payload_traces(q, side, nq, nside, segs, chunk, traces)) return kUnsettled;
  for (std::size_t s = 0; s < nseg; ++s)
    if (traces[s] > max_abs) return kUnsettled;
  *norm = std::sqrt(exact_sum(sq, static_cast<std::size_t>(ndelta)));
  if (!std::isfinite(*norm) || *norm > norm_bound) return kNormBound;
  for (std::size_t s = 0; s < divs.size(); ++s) {
    double v = 1.0;
    v *= traces[pairs[2 * s]];
    if (pairs[2 * s + 1] >= 0) v *= traces[pairs[2 * s + 1]];
    v /= divs[s];
    scales[s] = v;
    if (!std::isfinite(v) || v > bounds[s]) return kScaleBound;
  }
  // The arrays last measured are still in cache: fold them first (no input overlaps a sum,
  // checked above, so the sums are independent and the order changes no bit), then the payload.
  const Ptrs rxs(xs.rbegin(), xs.rend()), raccs(accs.rbegin(), accs.rend());
  const Sizes rn(n.rbegin(), n.rend()), rbf16(bf16.rbegin(), bf16.rend());
  fold_update(rxs, raccs, rn, rbf16, weight, q, side, acc8, nq, nside, nacc, segs, chunk);
  return kFolded;
}

}  // namespace fedng::cpu
