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

// BLAS takes 32-bit sizes (scipy-openblas32): refuse what would overflow them.
inline int blas_int(const char* op, std::int64_t v) {
  if (v > 0x7fffffffLL) fail(op, "a dimension exceeds the 32-bit BLAS limit");
  return static_cast<int>(v);
}

}  // namespace fedng
