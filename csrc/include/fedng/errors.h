// Checks that guard memory safety only; user-facing validation lives in Python (ops/_validate.py).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include "fedng/tensor_ref.h"

namespace fedng {

// Thrown as std::invalid_argument, which pybind11 turns into ValueError.
[[noreturn]] inline void fail(const std::string& op, const std::string& what) {
  throw std::invalid_argument(op + ": " + what);
}

inline void check_count(const std::string& op, const char* name, std::size_t got, std::size_t want) {
  if (got != want)
    fail(op, std::string("'") + name + "' has " + std::to_string(got) + " entries, expected " +
                 std::to_string(want));
}

inline void check_sizes(const std::string& op, const char* name, const Sizes& s) {
  for (std::size_t i = 0; i < s.size(); ++i)
    if (s[i] < 0) fail(op, std::string("'") + name + "[" + std::to_string(i) + "]' is negative");
}

// A null pointer is only acceptable for an empty buffer.
inline void check_ptrs(const std::string& op, const char* name, const Ptrs& p,
                       const std::vector<std::int64_t>& numel) {
  for (std::size_t i = 0; i < p.size(); ++i)
    if (p[i] == 0 && numel[i] > 0)
      fail(op, std::string("'") + name + "[" + std::to_string(i) + "]' is a null pointer");
}

inline void check_dtype(const std::string& op, int code) {
  if (code != 0 && code != 1) fail(op, "dtype code must be 0 (float32) or 1 (float64)");
}

}  // namespace fedng
