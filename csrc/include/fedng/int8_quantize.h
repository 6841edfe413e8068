// Int8 quantization of packed symmetric triangles with a certified bound on the rounding error's
// spectral norm (python/fedng/curvature/quantize.py). No torch; python/fedng/curvature/
// packed_fold.py validates the arguments first, this re-checks only what could corrupt memory.
#pragma once
#include <cstdint>

#include "fedng/tensor_ref.h"

namespace fedng::cpu {

// Per triangle (at, sat, n) of `tris` (flattened triples): the packed lower triangle (row by row)
// of a symmetric n x n M at vals[at:] (float32), D = diag(M), C = D^-1/2 M D^-1/2 (0 where
// D_i <= 0). Writes q[at:] = round(127 C) off the diagonal (0 on it; half to even, clamped to
// +-127), side[sat:sat+n] = D, and side[sat+n] = delta >= ||E||_2 for E = q / 127 - C, certified
// by Cholesky factorizations of delta I +- E (plus 1e-6 relative and 8 n 2^-24 absolute headroom
// for the receiver's float32 arithmetic). vals has nvals entries, q nvals, side nside.
void int8_quantize_triangles(const float* vals, std::int8_t* q, float* side, std::int64_t nvals,
                             std::int64_t nside, const Sizes& tris);

}  // namespace fedng::cpu
