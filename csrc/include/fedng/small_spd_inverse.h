// In-cache inversion of small symmetric positive-definite matrices (n <= 64 or so).
#pragma once

namespace fedng::cpu {

// out <- (A + lambda I)^-1, where A is the symmetric matrix whose lower triangle `in` holds
// (row-major, leading dimension ldin). Writes the lower triangle of `out` (leading dimension
// ldout), or all of it, exactly symmetric, when `full`. `in` may equal `out`. Returns false when
// a pivot is not positive or the result is not finite (the matrix is not numerically PD).
bool small_spd_inverse(const float* in, int ldin, float* out, int ldout, int n, float lambda,
                       bool full);
bool small_spd_inverse(const double* in, int ldin, double* out, int ldout, int n, double lambda,
                       bool full);

}  // namespace fedng::cpu
