// Server-side folds of received payloads into float32 running sums, one pass each (no torch).
// Used by python/fedng/curvature/packed_fold.py, which validates every argument first; these
// re-check only what could corrupt memory.
#pragma once
#include <cstddef>
#include <cstdint>

#include "fedng/tensor_ref.h"

namespace fedng::cpu {

// accs[k][i] += weight * float(xs[k][i]) for i < n[k], xs[k] bfloat16 (the upper 16 bits of a
// float32), accs[k] float32.
void bf16_axpy(const Ptrs& xs, const Ptrs& accs, const Sizes& n, double weight);

// out[i] = sum_p x_i[p]^2 (blocks of 1024 summed in float32, redone in float64 if that is not
// finite; the blocks added in float64): NaN/Inf iff an entry is. x_i [n_i] float32
// (bf16[i] == 0) or bfloat16 (bf16[i] != 0).
void sum_squares(const Ptrs& xs, const Sizes& n, const Sizes& bf16, double* out);

// A whole int8 payload (python/fedng/curvature/quantize.py), each segment given as a
// (form, at, qat, sat, n, k) sextuple of `segs` (flattened): its offsets in the float sum, the
// int8 values and the scales. Forms:
// - 0, a packed lower triangle, row by row: with s_i = float(sqrt(double(side[sat + i]) / 127)),
//   v_ij = (s_i s_j) q_ij off the diagonal and v_ii = side[sat + i] (1 + side[sat + n]);
// - 1, a vector: v_p = q_p side[sat + p / chunk];
// - 2, a low-rank factor M^ = B~ B~^T + sigma I: B~ [n, k] =
//   (q[qat + i k + c] + q[qat + n k + i k + c] / 254) side[sat + c] (float32), sigma =
//   side[sat + k].
// int8_payload_axpy: acc[at:] += weight * (the dequantized segment), low-rank ones by float32
// dots (no n x n matrix); q has nq entries, side nside, acc nacc.
// int8_payload_traces: per segment the trace of its dequantized matrix from the scales
// (sum_i D_i (1 + delta), float32 products summed in float64) or, low-rank, the digits
// (||B~||_F^2 + n sigma in float64); false (traces unset) when a segment is a vector or a scale
// is negative, NaN or infinite.
void int8_payload_axpy(const std::int8_t* q, const float* side, float* acc, std::int64_t nq,
                       std::int64_t nside, std::int64_t nacc, const Sizes& segs,
                       std::int64_t chunk, double weight);
bool int8_payload_traces(const std::int8_t* q, const float* side, std::int64_t nq,
                         std::int64_t nside, const Sizes& segs, std::int64_t chunk,
                         double* traces);

// Signed float32 values x [n] as int8 q [n] and one float32 scale per `chunk` entries
// (scale [ceil(n / chunk)]): scale_c = float(max_i |x_i| / 127) over the chunk (float64; NaN if
// an entry is), q_i = round_half_even(x_i / s_c) clamped to +-127 with s_c = scale_c where it
// is positive, else 1 (in float64; NaN gives 0): torch's arithmetic of
// python/fedng/curvature/quantize.py's `_quantize_vec`, bit for bit.
void int8_quantize_vector(const float* x, std::int8_t* q, float* scale, std::int64_t n,
                          std::int64_t chunk);
// One received update folded into its running sums in one call: accs[k][i] += weight * xs[k][i]
// for i < n[k] (xs[k] float32, or bfloat16 where bf16[k] != 0; accs float32), then, unless
// `segs` is empty, `int8_payload_axpy(q, side, acc, nq, nside, nacc, segs, chunk, weight)`.
void fold_update(const Ptrs& xs, const Ptrs& accs, const Sizes& n, const Sizes& bf16,
                 double weight, const std::int8_t* q, const float* side, float* acc,
                 std::int64_t nq, std::int64_t nside, std::int64_t nacc, const Sizes& segs,
                 std::int64_t chunk);
// out[k] = <xs[k], ys[k]> of float32 arrays [n[k]], products and sums in float64 (the float64
// dot of their float64 copies, summed in another order).
void dots_f64(const Ptrs& xs, const Ptrs& ys, const Sizes& n, double* out);

// out [n, n] (row-major) <- the symmetric matrix whose packed lower triangle (row by row) is
// vec [n (n + 1) / 2]: every entry a copy (float32 or float64, `dtype`).
void unpack_triangle(DType dtype, std::uintptr_t vec, std::uintptr_t out, std::int64_t n);

// The correctly rounded sum of n finite doubles (Python's math.fsum, bit for bit).
double exact_sum(const double* x, std::size_t n);

// A plain update checked, then folded (csrc/cpu/check_fold_cpu.cpp): sq[k] = sum_squares of
// xs[k] (float32, or bfloat16 where bf16[k] != 0); if every sq[k] is finite and
// sqrt(exact_sum(sq)) <= bound (NaN bound: no bound), accs[k][i] = w * x (first) or
// accs[k][i] + w * x with w = float(weight), the product rounded to float32 before the add
// (torch's `_foreach_mul` then `_foreach_add_`, bit for bit), and true; else nothing written to
// accs and false.
bool check_fold(const Ptrs& xs, const Ptrs& accs, const Sizes& n, const Sizes& bf16,
                double weight, double bound, bool first, double* sq);

}  // namespace fedng::cpu
