// What the CPU running this process can execute, read once by CPUID (small_spd_dispatch.cpp).
#pragma once

namespace fedng::cpu {

// Code built with -march=x86-64-v3 (AVX2, FMA, ...) runs here.
bool cpu_runs_avx2();
// Code built with -march=x86-64-v4 (AVX-512 F/DQ/CD/BW/VL) runs here.
bool cpu_runs_avx512();

}  // namespace fedng::cpu
