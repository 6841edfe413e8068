// Raw views of the buffers that cross the Python boundary: pointers and sizes, no torch types.
#pragma once
#include <cstdint>
#include <vector>

namespace fedng {

// Dtype codes shared with python/fedng/ops/_validate.py (FLOAT_DTYPES).
enum class DType : int { Float32 = 0, Float64 = 1 };

// One ragged list of C-contiguous (row-major) matrices, given as data addresses.
using Ptrs = std::vector<std::uintptr_t>;
using Sizes = std::vector<std::int64_t>;

template <class T>
inline T* as(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace fedng
