// Dtype dispatch and small helpers shared by the CPU kernels.
#pragma once
#include <algorithm>
#include <cstdint>
#include <utility>

#include "fedng/errors.h"
#include "fedng/tensor_ref.h"

namespace fedng {

// Calls f(T{}) with T = float or double according to the dtype code.
template <class F>
decltype(auto) dispatch_float(DType dt, F&& f) {
  if (dt == DType::Float64) return std::forward<F>(f)(double{});
  return std::forward<F>(f)(float{});
}

// Copies the upper triangle of a row-major n x n matrix onto its lower triangle.
template <class T>
void mirror_upper_to_lower(T* a, std::int64_t n) {
  // In 32 x 32 tiles: a plain column walk reads a new cache line (and, past 1024 floats, a new
  // page) per entry, which cost as much as the SYRK that produced the triangle (n ~ 1000).
  constexpr std::int64_t kTile = 32;
  for (std::int64_t i0 = 0; i0 < n; i0 += kTile)
    for (std::int64_t j0 = 0; j0 <= i0; j0 += kTile) {
      const std::int64_t i1 = std::min(n, i0 + kTile), j1 = std::min(n, j0 + kTile);
      for (std::int64_t i = i0; i < i1; ++i)
        for (std::int64_t j = j0; j < std::min(j1, i); ++j) a[i * n + j] = a[j * n + i];
    }
}

// Copies the lower triangle onto the upper one.
template <class T>
void mirror_lower_to_upper(T* a, std::int64_t n) {
  constexpr std::int64_t kTile = 32;  // tiles, as in mirror_upper_to_lower
  for (std::int64_t i0 = 0; i0 < n; i0 += kTile)
    for (std::int64_t j0 = 0; j0 <= i0; j0 += kTile) {
      const std::int64_t i1 = std::min(n, i0 + kTile), j1 = std::min(n, j0 + kTile);
      for (std::int64_t i = i0; i < i1; ++i)
        for (std::int64_t j = j0; j < std::min(j1, i); ++j) a[j * n + i] = a[i * n + j];
    }
}

// BLAS takes 32-bit sizes (scipy-openblas32): refuse what would overflow them.
inline int blas_int(const char* op, std::int64_t v) {
  if (v > 0x7fffffffLL) fail(op, "a dimension exceeds the 32-bit BLAS limit");
  return static_cast<int>(v);
}

}  // namespace fedng
