// What the server's fold kernels share (csrc/cpu/packed_fold_cpu.cpp, check_fold_cpu.cpp): the
// hot loops compiled for AVX-512 and AVX2 + FMA and chosen at load time (the extension is built
// for baseline x86-64), and the bfloat16 -> float32 widening (a shift, exact).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FEDNG_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FEDNG_CLONES
#endif

namespace fedng::cpu {

inline float bf16_float(std::uint16_t h) {
  const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

}  // namespace fedng::cpu
