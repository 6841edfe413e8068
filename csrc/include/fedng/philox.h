// Counter-based Gaussian numbers that are bit-identical on every compiler and device:
// Philox-4x32-10 for the bits, Wichura's AS241 for the inverse normal CDF, and a logarithm
// built from +, -, *, / only (libm's log differs across platforms in the last bit). Files
// using this must be compiled without FMA contraction (-ffp-contract=off / nvcc --fmad=false).
// python/fedng/reference.py repeats these operations exactly.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FEDNG_HD __host__ __device__ __forceinline__
#else
#define FEDNG_HD inline
#endif

namespace fedng::rng {

struct U32x4 {
  std::uint32_t v[4];
};

FEDNG_HD U32x4 philox4x32_10(U32x4 c, std::uint32_t k0, std::uint32_t k1) {
  constexpr std::uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr std::uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += W0;
      k1 += W1;
    }
    const std::uint64_t p0 = static_cast<std::uint64_t>(M0) * c.v[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(M1) * c.v[2];
    const U32x4 n = {{static_cast<std::uint32_t>(p1 >> 32) ^ c.v[1] ^ k0,
                      static_cast<std::uint32_t>(p1),
                      static_cast<std::uint32_t>(p0 >> 32) ^ c.v[3] ^ k1,
                      static_cast<std::uint32_t>(p0)}};
    c = n;
  }
  return c;
}

// AS241 (PPND16) coefficients, and the atanh series of det_log: shared with the SIMD rows
// (csrc/cpu/gaussian_sketch_rows.cpp), which must use the very same constants.
namespace as241 {
inline constexpr double A[8] = {3.3871328727963666080e0, 1.3314166789178437745e2,
                                1.9715909503065514427e3, 1.3731693765509461125e4,
                                4.5921953931549871457e4, 6.7265770927008700853e4,
                                3.3430575583588128105e4, 2.5090809287301226727e3};
inline constexpr double B[8] = {1.0,
                                4.2313330701600911252e1, 6.8718700749205790830e2,
                                5.3941960214247511077e3, 2.1213794301586595867e4,
                                3.9307895800092710610e4, 2.8729085735721942674e4,
                                5.2264952788528545610e3};
inline constexpr double C[8] = {1.42343711074968357734e0, 4.63033784615654529590e0,
                                5.76949722146069140550e0, 3.64784832476320460504e0,
                                1.27045825245236838258e0, 2.41780725177450611770e-1,
                                2.27238449892691845833e-2, 7.74545014278341407640e-4};
inline constexpr double D[8] = {1.0,
                                2.05319162663775882187e0, 1.67638483018380384940e0,
                                6.89767334985100004550e-1, 1.48103976427480074590e-1,
                                1.51986665636164571966e-2, 5.47593808499534494600e-4,
                                1.05075007164441684324e-9};
inline constexpr double E[8] = {6.65790464350110377720e0, 5.46378491116411436990e0,
                                1.78482653991729133580e0, 2.96560571828504891230e-1,
                                2.65321895265761230930e-2, 1.24266094738807843860e-3,
                                2.71155556874348757815e-5, 2.01033439929228813265e-7};
inline constexpr double F[8] = {1.0,
                                5.99832206555887937690e-1, 1.36929880922735805310e-1,
                                1.48753612908506148525e-2, 7.86869131145613259100e-4,
                                1.84631831751005468180e-5, 1.42151175831644588870e-7,
                                2.04426310338993978564e-15};
inline constexpr double kLogSeries[12] = {1.0,      1.0 / 3,  1.0 / 5,  1.0 / 7,
                                          1.0 / 9,  1.0 / 11, 1.0 / 13, 1.0 / 15,
                                          1.0 / 17, 1.0 / 19, 1.0 / 21, 1.0 / 23};
}  // namespace as241

template <int N>
FEDNG_HD double horner(const double (&c)[N], double x) {
  double acc = c[N - 1];
  for (int i = N - 2; i >= 0; --i) acc = acc * x + c[i];
  return acc;
}

// log(x) for finite x > 0: x = m 2^e exactly, then 2 atanh((m-1)/(m+1)) as a series.
FEDNG_HD double det_log(double x) {
  constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kSqrtHalf = 0.70710678118654752440;
  int e = 0;
  double m = std::frexp(x, &e);  // m in [0.5, 1)
  if (m < kSqrtHalf) {
    m = m * 2.0;
    e -= 1;
  }
  const double s = (m - 1.0) / (m + 1.0);
  const double ed = static_cast<double>(e);
  return ed * kLn2Hi + (ed * kLn2Lo + 2.0 * s * horner(as241::kLogSeries, s * s));
}

// Inverse standard normal CDF, p in (0, 1) (AS241 PPND16, about 1e-16 relative accuracy).
FEDNG_HD double ndtri(double p) {
  using namespace as241;
  const double q = p - 0.5;
  if (std::fabs(q) <= 0.425) {
    const double r = 0.180625 - q * q;
    return q * horner(A, r) / horner(B, r);
  }
  double r = std::sqrt(-det_log(q < 0 ? p : 1.0 - p));
  const double v = r <= 5.0 ? horner(C, r - 1.6) / horner(D, r - 1.6)
                            : horner(E, r - 5.0) / horner(F, r - 5.0);
  return q < 0 ? -v : v;
}

// Uniform (0, 1) of entry (i, j) for (seed, stream): 52 Philox bits, exactly representable.
// One Philox block serves two columns: counter (i, j / 2, stream) gives words (w0, w1) to the
// even column and (w2, w3) to the odd one.
FEDNG_HD double uniform_entry(std::uint64_t seed, std::uint64_t stream, std::uint64_t i,
                              std::uint64_t j) {
  const U32x4 c = {{static_cast<std::uint32_t>(i), static_cast<std::uint32_t>(j >> 1),
                    static_cast<std::uint32_t>(stream), static_cast<std::uint32_t>(stream >> 32)}};
  const U32x4 w = philox4x32_10(c, static_cast<std::uint32_t>(seed),
                                static_cast<std::uint32_t>(seed >> 32));
  const int h = static_cast<int>(j & 1) * 2;
  const std::uint64_t bits = ((static_cast<std::uint64_t>(w.v[h + 1]) << 32) | w.v[h]) >> 12;
  return (static_cast<double>(bits) + 0.5) * 0x1p-52;  // exact, in (0, 1)
}

// Entry (i, j) of the shared-seed Gaussian matrix for (seed, stream).
FEDNG_HD double gaussian_entry(std::uint64_t seed, std::uint64_t stream, std::uint64_t i,
                               std::uint64_t j) {
  return ndtri(uniform_entry(seed, stream, i, j));
}

}  // namespace fedng::rng
