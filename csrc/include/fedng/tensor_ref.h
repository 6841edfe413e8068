// Raw views of the buffers that cross the Python boundary: pointers and sizes, no torch types.
#pragma once
#include <cstdint>
#include <vector>

namespace fedng {

// Dtype codes shared with python/fedng/ops/_validate.py (FLOAT_DTYPES); exported as
// _C.dtype_codes so a test can hold the two sides together.
enum class DType : int { Float32 = 0, Float64 = 1 };

// Per-matrix status codes written to every op's int8 `status` report; the same values as
// fedng.ops.CholeskyStatus (exported as _C.status_codes for the same test).
enum class Status : std::int8_t { Ok = 0, Jitter = 1, Failed = 2 };

inline std::int8_t code(Status s) { return static_cast<std::int8_t>(s); }

// One ragged list of C-contiguous (row-major) matrices, given as data addresses.
using Ptrs = std::vector<std::uintptr_t>;
using Sizes = std::vector<std::int64_t>;

template <class T>
inline T* as(std::uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace fedng
