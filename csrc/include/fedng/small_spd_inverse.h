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

namespace fedng::cpu {

// Matrices inverted together, one per SIMD lane (same n), by lane_spd_inverse: 8 floats or 4
// doubles (32-byte vectors), or 16 and 8 where the AVX-512 build runs (64-byte vectors).
constexpr int kMaxLanes = 16;
int lanes_float();
int lanes_double();

// Inverts `count` <= kLanes* SPD matrices of the same size n in SIMD lanes: out[l] <- full,
// exactly symmetric (sym(in[l]) + lambda[l] I)^-1 (lower triangles read, row-major, contiguous).
// Returns a bit mask of the lanes that failed (not PD, or not finite); their outputs are garbage
// and the caller redoes them one by one.
unsigned lane_spd_inverse(const float* const* in, float* const* out, const double* lambda,
                          int count, int n);
unsigned lane_spd_inverse(const double* const* in, double* const* out, const double* lambda,
                          int count, int n);

}  // namespace fedng::cpu

namespace fedng::cpu {

// "avx512", "avx2+fma" or "baseline": which build of the small-matrix kernels this CPU runs
// ("avx512" means the lane kernels use 64-byte vectors; the other kernels stay on AVX2).
const char* small_kernel_isa();

// Whether the lane kernels use their AVX-512 build (where the CPU has it; off also with the
// environment variable FEDNG_NO_AVX512=1 at load). Returns the previous setting. For tests: not
// thread-safe against a running call.
bool set_avx512_lanes(bool on);

}  // namespace fedng::cpu
