// One reply of FedNG's summable aggregation checked, then folded, in one call
// (csrc/cpu/summable_fold_cpu.cpp): what the server's Python checks of such a reply decide once
// its structure and metadata are known to match the round's (python/fedng/federated/
// summable_check.py), so that a reply costs one pass of checks and one fold.
#pragma once
#include <cstdint>
#include <vector>

#include "fedng/tensor_ref.h"

namespace fedng::cpu {

// Verdicts of `summable_check_fold`; only kFolded writes anything.
enum SummableStatus : int {
  kFolded = 0,      // checked and folded
  kNonFinite = 1,   // an array holds NaN/Inf
  kUnsettled = 2,   // the int8 payload's scales do not settle its checks (read its entries)
  kNormBound = 3,   // the delta's norm is not finite or above `norm_bound`
  kScaleBound = 4,  // a curvature scale is not finite or above its bound
  kAliased = 5,     // an input overlaps a sum it would be folded into (the caller decides)
};

// xs[k] (float32, or bfloat16 where bf16[k] != 0) [n[k]]: the delta's arrays (the first
// `ndelta`), then the contribution's; accs[k] their float32 sums. q [nq] / side [nside]: an int8
// payload of (form, at, qat, sat, n, k) sextuples `segs` (fedng/packed_fold.h), acc8 [nacc] its
// float32 sum. In order, with nothing written before the last check:
// 0. kAliased if an array or the payload overlaps one of the sums (accs, acc8): the fold's
//    order would then change what it reads;
// 1. sq[k] = sum_squares of xs[k]; kNonFinite if one is not finite;
// 2. traces = int8_payload_traces of the payload; kUnsettled if that fails or one exceeds
//    `max_abs`;
// 3. norm = sqrt(exact_sum(sq[0:ndelta])); kNormBound if not finite or above `norm_bound`;
// 4. per curvature scale s: scales[s] = ((1.0 * traces[a_s]) [* traces[b_s] if b_s >= 0]) /
//    divs[s] (pairs = (a_s, b_s)); kScaleBound if one is not finite or above bounds[s] (NaN: no
//    bound);
// 5. fold_update of the arrays and the payload with `weight`: kFolded.
int summable_check_fold(const Ptrs& xs, const Ptrs& accs, const Sizes& n, const Sizes& bf16,
                        std::int64_t ndelta, const std::int8_t* q, const float* side, float* acc8,
                        std::int64_t nq, std::int64_t nside, std::int64_t nacc, const Sizes& segs,
                        std::int64_t chunk, double max_abs, const Sizes& pairs,
                        const std::vector<double>& divs, const std::vector<double>& bounds,
                        double weight, double norm_bound, double* sq, double* traces,
                        double* norm, double* scales);

}  // namespace fedng::cpu
