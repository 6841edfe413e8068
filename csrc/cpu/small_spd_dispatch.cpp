// Chooses the AVX2+FMA or the baseline build of small_spd_inverse.cpp once, at first use.
#include "fedng/small_spd_inverse.h"

#include <atomic>
#include "fedng/cpu_isa.h"
#include <cstdlib>

#if defined(FEDNG_HAVE_AVX2)
#include <cpuid.h>
#endif

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
FEDNG_DECLARE_ISA(avx512)
#endif

namespace fedng::cpu {
namespace {

#if defined(FEDNG_HAVE_AVX2)
// Whether this CPU and OS run code built with -march=x86-64-v3: AVX, AVX2, FMA, BMI1/2, F16C,
// LZCNT, MOVBE, and the OS saving the YMM state (XCR0). Read with CPUID directly rather than
// __builtin_cpu_supports, whose runtime support (__cpu_indicator_init) is a stub answering
// "no" in some toolchains' compiler-rt (zig's, used for the manylinux wheel).
bool cpu_has_x86_64_v3() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool fma = c & (1u << 12), movbe = c & (1u << 22), osxsave = c & (1u << 27),
             avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(fma && movbe && osxsave && avx && f16c)) return false;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6u) != 0x6u) return false;  // XMM and YMM state enabled by the OS
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool bmi1 = b & (1u << 3), avx2 = b & (1u << 5), bmi2 = b & (1u << 8);
  if (!(bmi1 && avx2 && bmi2)) return false;
  if (!__get_cpuid(0x80000001u, &a, &b, &c, &d)) return false;
  return c & (1u << 5);  // LZCNT (ABM)
}

// x86-64-v4 on top of v3: AVX512F, DQ, CD, BW, VL, and the OS saving the opmask and ZMM state.
bool cpu_has_x86_64_v4() {
  if (!cpu_has_x86_64_v3()) return false;
  unsigned a, b, c, d;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0xe6u) != 0xe6u) return false;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const unsigned need = (1u << 16) | (1u << 17) | (1u << 28) | (1u << 30) | (1u << 31);
  return (b & need) == need;
}
#endif

bool use_avx2() {
#if defined(FEDNG_HAVE_AVX2)
  static const bool yes = cpu_has_x86_64_v3();
  return yes;
#else
  return false;
#endif
}

// The lane kernels only: with 64-byte vectors they do twice the work per instruction (the
// Gauss-Jordan kernel stays on AVX2, where its short rows measured faster).
bool avx512_available() {
#if defined(FEDNG_HAVE_AVX2)
  static const bool yes = cpu_has_x86_64_v4();
  return yes;
#else
  return false;
#endif
}

// Read on every call (one relaxed load): tests switch it to cover both lane widths in-process.
std::atomic<bool> g_avx512{avx512_available() && !std::getenv("FEDNG_NO_AVX512")};

bool use_avx512() { return g_avx512.load(std::memory_order_relaxed); }

}  // namespace

bool cpu_runs_avx2() { return use_avx2(); }
bool cpu_runs_avx512() { return avx512_available(); }

#if defined(FEDNG_HAVE_AVX2)
#define FEDNG_PICK(call) (use_avx2() ? avx2::call : baseline::call)
#define FEDNG_PICK_LANES(call) \
  (use_avx512() ? avx512::call : use_avx2() ? avx2::call : baseline::call)
#else
#define FEDNG_PICK(call) (baseline::call)
#define FEDNG_PICK_LANES(call) (baseline::call)
#endif

int lanes_float() { return use_avx512() ? 16 : 8; }
int lanes_double() { return use_avx512() ? 8 : 4; }

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
  return FEDNG_PICK_LANES(lane_spd_inverse(in, out, lambda, count, n));
}
unsigned lane_spd_inverse(const double* const* in, double* const* out, const double* lambda,
                          int count, int n) {
  return FEDNG_PICK_LANES(lane_spd_inverse(in, out, lambda, count, n));
}

bool set_avx512_lanes(bool on) {
  const bool before = use_avx512();
  g_avx512.store(on && avx512_available(), std::memory_order_relaxed);
  return before;
}

const char* small_kernel_isa() {
  return use_avx512() ? "avx512" : use_avx2() ? "avx2+fma" : "baseline";
}

}  // namespace fedng::cpu
