// Chooses the AVX2+FMA or the baseline build of small_spd_inverse.cpp once, at first use.
#include "fedng/small_spd_inverse.h"

#define FEDNG_DECLARE_ISA(ns)                                                                 \
  namespace fedng::cpu::ns {                                                                  \
  bool small_spd_inverse(const float*, int, float*, int, int, float, bool);                  \
  bool small_spd_inverse(const double*, int, double*, int, int, double, bool);               \
  unsigned lane_spd_inverse(const float* const*, float* const*, const double*, int, int);    \
  unsigned lane_spd_inverse(const double* const*, double* const*, const double*, int, int);  \
  }

FEDNG_DECLARE_ISA(baseline)
#if defined(FEDNG_HAVE_AVX2)
FEDNG_DECLARE_ISA(avx2)
#endif

namespace fedng::cpu {
namespace {

bool use_avx2() {
#if defined(FEDNG_HAVE_AVX2)
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

}  // namespace

#if defined(FEDNG_HAVE_AVX2)
#define FEDNG_PICK(call) (use_avx2() ? avx2::call : baseline::call)
#else
#define FEDNG_PICK(call) (baseline::call)
#endif

bool small_spd_inverse(const float* in, int ldin, float* out, int ldout, int n, float lambda,
                       bool full) {
  return FEDNG_PICK(small_spd_inverse(in, ldin, out, ldout, n, lambda, full));
}
bool small_spd_inverse(const double* in, int ldin, double* out, int ldout, int n, double lambda,
                       bool full) {
  return FEDNG_PICK(small_spd_inverse(in, ldin, out, ldout, n, lambda, full));
}
unsigned lane_spd_inverse(const float* const* in, float* const* out, const double* lambda,
                          int count, int n) {
  return FEDNG_PICK(lane_spd_inverse(in, out, lambda, count, n));
}
unsigned lane_spd_inverse(const double* const* in, double* const* out, const double* lambda,
                          int count, int n) {
  return FEDNG_PICK(lane_spd_inverse(in, out, lambda, count, n));
}

const char* small_kernel_isa() { return use_avx2() ? "avx2+fma" : "baseline"; }

}  // namespace fedng::cpu
