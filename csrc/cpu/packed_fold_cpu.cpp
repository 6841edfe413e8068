// One-pass folds of received payloads into float32 running sums (see fedng/packed_fold.h).
// A streaming server adds every client's curvature and contribution to its sums: done as
// "decode to float32, then add", each int8 update is read once and ~5 float32 temporaries are
// written and read again; here each entry is decoded in registers and added where it lies.
#include "fedng/packed_fold.h"

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "fedng/errors.h"
#include "fedng/fold_clones.h"


namespace fedng::cpu {

namespace {

constexpr double kQmax = 127.0;

// One packed lower triangle, row by row: the row's scale is folded into the weight once.
FEDNG_CLONES void fold_triangle(const std::int8_t* q, const float* side, float* acc, std::int64_t n,
                   float w, float* s) {
  for (std::int64_t i = 0; i < n; ++i)
    s[i] = static_cast<float>(std::sqrt(static_cast<double>(side[i]) / kQmax));
  const float onep = 1.0f + side[n];
  std::int64_t p = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    const float si = s[i];
    const std::int8_t* qi = q + p;
    float* ai = acc + p;
#pragma omp simd
    for (std::int64_t j = 0; j < i; ++j) ai[j] += w * ((si * s[j]) * static_cast<float>(qi[j]));
    ai[i] += w * (side[i] * onep);
    p += i + 1;
  }
}

}  // namespace

void bf16_axpy(const Ptrs& xs, const Ptrs& accs, const Sizes& n, double weight) {
  check_count("bf16_axpy", "accs", accs.size(), xs.size());
  check_count("bf16_axpy", "n", n.size(), xs.size());
  check_sizes("bf16_axpy", "n", n);
  check_ptrs("bf16_axpy", "xs", xs, n);
  check_ptrs("bf16_axpy", "accs", accs, n);
  const float w = static_cast<float>(weight);
  for (std::size_t k = 0; k < xs.size(); ++k) {
    const auto* x = as<const std::uint16_t>(xs[k]);
    float* acc = as<float>(accs[k]);
    const std::int64_t len = n[k];
#pragma omp simd
    for (std::int64_t i = 0; i < len; ++i) {
      const std::uint32_t bits = static_cast<std::uint32_t>(x[i]) << 16;
      float v;
      std::memcpy(&v, &bits, sizeof v);
      acc[i] += w * v;
    }
  }
}

namespace {

constexpr std::int64_t kBlock = 1024;

// Sum of squares of a block (bf16 widened to float32 first: a shift): float32 lanes (`omp simd`
// reduction, vectorized), exact enough for a norm check; a block whose float32 sum is not
// finite is redone in float64, so only NaN/Inf entries give NaN/Inf.
FEDNG_CLONES double block_squares(const float* v, std::int64_t n) {
  float f = 0.0f;
#pragma omp simd reduction(+ : f)
  for (std::int64_t i = 0; i < n; ++i) f += v[i] * v[i];
  if (std::isfinite(f)) return static_cast<double>(f);
  double s = 0.0;
  for (std::int64_t i = 0; i < n; ++i) s += static_cast<double>(v[i]) * static_cast<double>(v[i]);
  return s;
}

double squares_f32(const float* x, std::int64_t n) {
  double s = 0.0;
  for (std::int64_t lo = 0; lo < n; lo += kBlock)
    s += block_squares(x + lo, n - lo < kBlock ? n - lo : kBlock);
  return s;
}

// A bf16 block widened in registers (no staging buffer: one read of the payload); the same
// float32 values and sums as widening first, then `block_squares`.
FEDNG_CLONES double block_squares_bf16(const std::uint16_t* x, std::int64_t n) {
  float f = 0.0f;
#pragma omp simd reduction(+ : f)
  for (std::int64_t i = 0; i < n; ++i) {
    const float v = bf16_float(x[i]);
    f += v * v;
  }
  if (std::isfinite(f)) return static_cast<double>(f);
  double s = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(bf16_float(x[i]));
    s += v * v;
  }
  return s;
}

double squares_bf16(const std::uint16_t* x, std::int64_t n) {
  double s = 0.0;
  for (std::int64_t lo = 0; lo < n; lo += kBlock)
    s += block_squares_bf16(x + lo, n - lo < kBlock ? n - lo : kBlock);
  return s;
}

}  // namespace

void sum_squares(const Ptrs& xs, const Sizes& n, const Sizes& bf16, double* out) {
  check_count("sum_squares", "n", n.size(), xs.size());
  check_count("sum_squares", "bf16", bf16.size(), xs.size());
  check_sizes("sum_squares", "n", n);
  check_ptrs("sum_squares", "xs", xs, n);
  for (std::size_t k = 0; k < xs.size(); ++k)
    out[k] = bf16[k] != 0 ? squares_bf16(as<const std::uint16_t>(xs[k]), n[k])
                          : squares_f32(as<const float>(xs[k]), n[k]);
}

namespace {

constexpr std::int64_t kLane = 64;  // columns of B B^T a row pass keeps in registers

// B~ [n, k] of one low-rank segment, transposed into bt [k, ld] (columns past n zero): the
// receiver's float32 arithmetic of `quantize._lowrank_factor`, `(hi + lo / 254) * scale_c`.
void decode_lowrank(const std::int8_t* q, const float* scale, std::int64_t n, std::int64_t k,
                    std::int64_t ld, float* bt) {
  const std::int8_t* lo = q + n * k;
  for (std::int64_t c = 0; c < k; ++c) {
    float* row = bt + c * ld;
    for (std::int64_t i = 0; i < n; ++i)
      row[i] = (static_cast<float>(q[i * k + c]) +
                static_cast<float>(lo[i * k + c]) / static_cast<float>(2.0 * kQmax)) *
               scale[c];
    for (std::int64_t i = n; i < ld; ++i) row[i] = 0.0f;
  }
}

// acc (packed lower triangle, row by row) += w (B B^T + sigma I), B = bt^T: a block of kRows
// rows i by kLane columns j of B B^T at a time in registers (each column of bt loaded once for
// the kRows rows), the entries j <= i added.
constexpr std::int64_t kRows = 4;

FEDNG_CLONES void fold_lowrank(const float* bt, std::int64_t n, std::int64_t k, std::int64_t ld,
                               float sigma, float w, float* acc) {
  for (std::int64_t i0 = 0; i0 < n; i0 += kRows) {
    const std::int64_t rows = n - i0 < kRows ? n - i0 : kRows;
    for (std::int64_t j0 = 0; j0 < i0 + rows; j0 += kLane) {
      float t[kRows][kLane] = {};
      for (std::int64_t c = 0; c < k; ++c) {
        const float* bc = bt + c * ld;
        for (std::int64_t r = 0; r < kRows; ++r) {
          const float bic = bc[i0 + r];  // ld >= i0 + kRows: padded with zeros
#pragma omp simd
          for (std::int64_t jj = 0; jj < kLane; ++jj) t[r][jj] += bic * bc[j0 + jj];
        }
      }
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t i = i0 + r, len = i + 1 - j0 < kLane ? i + 1 - j0 : kLane;
        float* ai = acc + i * (i + 1) / 2 + j0;
        for (std::int64_t jj = 0; jj < len; ++jj) ai[jj] += w * t[r][jj];
      }
    }
  }
  for (std::int64_t i = 0; i < n; ++i) acc[i * (i + 3) / 2] += w * sigma;
}

}  // namespace

namespace {

enum Form : std::int64_t { kTri = 0, kVec = 1, kLowRank = 2 };

// (form, at, qat, sat, n, k) sextuples: each segment within the float sum, the int8 values and
// the scales.
void check_segments(const char* op, const Sizes& segs, std::int64_t nq, std::int64_t nside,
                    std::int64_t nacc, std::int64_t chunk) {
  if (nq < 0 || nside < 0 || nacc < 0) fail(op, "negative sizes");
  if (chunk <= 0) fail(op, "'chunk' must be positive");
  if (segs.size() % 6 != 0) fail(op, "'segs' must hold (form, at, qat, sat, n, k) sextuples");
  for (std::size_t s = 0; s < segs.size(); s += 6) {
    const std::int64_t form = segs[s], at = segs[s + 1], qat = segs[s + 2], sat = segs[s + 3],
                       n = segs[s + 4], k = segs[s + 5];
    if (at < 0 || qat < 0 || sat < 0 || n < 0 || k < 0 || n > 3037000499)
      fail(op, "'segs' has a negative or huge entry");
    std::int64_t floats = n * (n + 1) / 2, vals = floats, scales = n + 1;
    if (form == kVec) {
      floats = vals = n;
      scales = n / chunk + (n % chunk != 0);  // no n + chunk - 1: chunk may be huge
    } else if (form == kLowRank) {
      if (k > n) fail(op, "'segs' has a rank above its size");
      if (n > 0 && k > (INT64_MAX / 2) / n) fail(op, "'segs' has a negative or huge entry");
      vals = 2 * n * k;
      scales = k + 1;
    } else if (form != kTri) {
      fail(op, "'segs' has an unknown form");
    }
    // Differences, not sums: an offset near INT64_MAX must not wrap around past the check.
    if (at > nacc || floats > nacc - at || qat > nq || vals > nq - qat || sat > nside ||
        scales > nside - sat)
      fail(op, "'segs' runs past the buffers");
  }
}

}  // namespace

void int8_payload_axpy(const std::int8_t* q, const float* side, float* acc, std::int64_t nq,
                       std::int64_t nside, std::int64_t nacc, const Sizes& segs,
                       std::int64_t chunk, double weight) {
  const char* op = "int8_payload_axpy";
  check_segments(op, segs, nq, nside, nacc, chunk);
  const float w = static_cast<float>(weight);
  std::vector<float> buf;
  for (std::size_t s = 0; s < segs.size(); s += 6) {
    const std::int64_t form = segs[s], at = segs[s + 1], qat = segs[s + 2], sat = segs[s + 3],
                       n = segs[s + 4], k = segs[s + 5];
    if (form == kTri) {
      buf.resize(static_cast<std::size_t>(n));
      fold_triangle(q + qat, side + sat, acc + at, n, w, buf.data());
    } else if (form == kVec) {
      for (std::int64_t c = 0; c * chunk < n; ++c) {
        const float sc = side[sat + c];
        const std::int64_t lo = c * chunk, hi = lo + chunk < n ? lo + chunk : n;
#pragma omp simd
        for (std::int64_t p = lo; p < hi; ++p)
          acc[at + p] += w * (static_cast<float>(q[qat + p]) * sc);
      }
    } else {
      const std::int64_t ld = (n + kRows + kLane - 1) / kLane * kLane;
      buf.assign(static_cast<std::size_t>(k * ld), 0.0f);
      decode_lowrank(q + qat, side + sat, n, k, ld, buf.data());
      fold_lowrank(buf.data(), n, k, ld, side[sat + k], w, acc + at);
    }
  }
}

namespace {

FEDNG_CLONES void f32_axpy(const float* x, float* acc, std::int64_t n, float w) {
#pragma omp simd
  for (std::int64_t i = 0; i < n; ++i) acc[i] += w * x[i];
}

FEDNG_CLONES void bf16_axpy_one(const std::uint16_t* x, float* acc, std::int64_t n, float w) {
#pragma omp simd
  for (std::int64_t i = 0; i < n; ++i) acc[i] += w * bf16_float(x[i]);
}

}  // namespace

void fold_update(const Ptrs& xs, const Ptrs& accs, const Sizes& n, const Sizes& bf16,
                 double weight, const std::int8_t* q, const float* side, float* acc,
                 std::int64_t nq, std::int64_t nside, std::int64_t nacc, const Sizes& segs,
                 std::int64_t chunk) {
  const char* op = "fold_update";
  check_count(op, "accs", accs.size(), xs.size());
  check_count(op, "n", n.size(), xs.size());
  check_count(op, "bf16", bf16.size(), xs.size());
  check_sizes(op, "n", n);
  check_ptrs(op, "xs", xs, n);
  check_ptrs(op, "accs", accs, n);
  if (!segs.empty()) {
    check_segments(op, segs, nq, nside, nacc, chunk);
    if (q == nullptr || side == nullptr || acc == nullptr) fail(op, "null int8 buffer");
  }
  const float w = static_cast<float>(weight);
  for (std::size_t k = 0; k < xs.size(); ++k) {
    if (bf16[k] != 0)
      bf16_axpy_one(as<const std::uint16_t>(xs[k]), as<float>(accs[k]), n[k], w);
    else
      f32_axpy(as<const float>(xs[k]), as<float>(accs[k]), n[k], w);
  }
  if (!segs.empty()) int8_payload_axpy(q, side, acc, nq, nside, nacc, segs, chunk, weight);
}

namespace {

// ||B~||_F^2 of a low-rank segment's digits (decode_lowrank's float32 entries, squared and
// summed in float64), read in storage order: no decoded copy.
FEDNG_CLONES double lowrank_squares(const std::int8_t* q, const float* scale, std::int64_t n,
                                    std::int64_t k) {
  const std::int8_t* lo = q + n * k;
  const float inv = static_cast<float>(2.0 * kQmax);
  double s = 0.0;
  for (std::int64_t i = 0; i < n; ++i) {
#pragma omp simd reduction(+ : s)
    for (std::int64_t c = 0; c < k; ++c) {
      const float v = (static_cast<float>(q[i * k + c]) + static_cast<float>(lo[i * k + c]) / inv) *
                      scale[c];
      s += static_cast<double>(v) * static_cast<double>(v);
    }
  }
  return s;
}

}  // namespace

bool int8_payload_traces(const std::int8_t* q, const float* side, std::int64_t nq,
                         std::int64_t nside, const Sizes& segs, std::int64_t chunk,
                         double* traces) {
  const char* op = "int8_payload_traces";
  check_segments(op, segs, nq, nside, INT64_MAX, chunk);
  for (std::size_t s = 0; s < segs.size(); s += 6) {
    const std::int64_t form = segs[s], qat = segs[s + 2], sat = segs[s + 3], n = segs[s + 4],
                       k = segs[s + 5];
    if (form == kVec) return false;  // a vector's entries must be read
    const std::int64_t nscales = form == kTri ? n + 1 : k + 1;
    for (std::int64_t c = 0; c < nscales; ++c)
      if (!(side[sat + c] >= 0.0f) || !std::isfinite(side[sat + c])) return false;
    double tr = 0.0;
    if (form == kTri) {
      const float onep = 1.0f + side[sat + n];
      for (std::int64_t i = 0; i < n; ++i) tr += static_cast<double>(side[sat + i] * onep);
    } else {
      tr = lowrank_squares(q + qat, side + sat, n, k) +
           static_cast<double>(n) * static_cast<double>(side[sat + k]);
    }
    traces[s / 6] = tr;
  }
  return true;
}

namespace {

// One chunk of `int8_quantize_vector`: torch's float64 arithmetic of `quantize._quantize_vec`.
FEDNG_CLONES void quantize_chunk(const float* x, std::int8_t* q, float* scale, std::int64_t n) {
  double big = 0.0;
  bool nan = false;
  for (std::int64_t i = 0; i < n; ++i) {
    const double a = std::fabs(static_cast<double>(x[i]));
    nan = nan || a != a;
    big = a > big ? a : big;
  }
  const float sc = nan ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(big / kQmax);
  *scale = sc;
  const double s = sc > 0.0f ? static_cast<double>(sc) : 1.0;  // NaN, 0: 1 (`_safe`)
  for (std::int64_t i = 0; i < n; ++i) {
    const double r = std::nearbyint(static_cast<double>(x[i]) / s);
    // torch: clamp (NaN stays NaN), then NaN -> 0 in the int8 cast
    q[i] = r != r ? 0 : static_cast<std::int8_t>(r < -kQmax ? -kQmax : (r > kQmax ? kQmax : r));
  }
}

}  // namespace

void int8_quantize_vector(const float* x, std::int8_t* q, float* scale, std::int64_t n,
                          std::int64_t chunk) {
  if (n < 0 || chunk <= 0) fail("int8_quantize_vector", "bad sizes");
  if (n > 0 && (x == nullptr || q == nullptr || scale == nullptr))
    fail("int8_quantize_vector", "null buffer");
  for (std::int64_t lo = 0, c = 0; lo < n; lo += chunk, ++c)
    quantize_chunk(x + lo, q + lo, scale + c, n - lo < chunk ? n - lo : chunk);
}

namespace {

// <x, y> of float32 arrays, products and sums in float64 (4 partial sums, vectorized).
FEDNG_CLONES double dot_f64(const float* x, const float* y, std::int64_t n) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (std::int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * static_cast<double>(y[i]);
  return s;
}

}  // namespace

void dots_f64(const Ptrs& xs, const Ptrs& ys, const Sizes& n, double* out) {
  check_count("dots_f64", "ys", ys.size(), xs.size());
  check_count("dots_f64", "n", n.size(), xs.size());
  check_sizes("dots_f64", "n", n);
  check_ptrs("dots_f64", "xs", xs, n);
  check_ptrs("dots_f64", "ys", ys, n);
  for (std::size_t k = 0; k < xs.size(); ++k)
    out[k] = dot_f64(as<const float>(xs[k]), as<const float>(ys[k]), n[k]);
}

namespace {

// The lower triangle's rows copied in place (contiguous), eight at a time; then their mirror:
// for each earlier row j, the 8 entries j of those rows written side by side into row j (one
// cache line; the reads walk the 8 packed rows in order). 64 x 64 tiles written both ways took
// 6.8x as long at n = 512 and 3.8x at 1024 (a power-of-two row stride maps a tile's mirror rows
// to a few L1 sets); this is as fast or faster at every size measured (float32, 100-1025).
template <typename T>
void unpack_rows(const T* vec, T* out, std::int64_t n) {
  constexpr std::int64_t kRowsAtOnce = 8;
  for (std::int64_t i0 = 0; i0 < n; i0 += kRowsAtOnce) {
    const std::int64_t i1 = i0 + kRowsAtOnce < n ? i0 + kRowsAtOnce : n;
    for (std::int64_t i = i0; i < i1; ++i)
      std::memcpy(out + i * n, vec + i * (i + 1) / 2, static_cast<std::size_t>(i + 1) * sizeof(T));
    for (std::int64_t j = 0; j < i1; ++j) {
      T* oj = out + j * n;
      for (std::int64_t i = j + 1 > i0 ? j + 1 : i0; i < i1; ++i) oj[i] = vec[i * (i + 1) / 2 + j];
    }
  }
}

}  // namespace

void unpack_triangle(DType dtype, std::uintptr_t vec, std::uintptr_t out, std::int64_t n) {
  if (n < 0 || n > 3037000499) fail("unpack_triangle", "bad size");
  if (n > 0 && (vec == 0 || out == 0)) fail("unpack_triangle", "null buffer");
  if (dtype == DType::Float32)
    unpack_rows(as<const float>(vec), as<float>(out), n);
  else
    unpack_rows(as<const double>(vec), as<double>(out), n);
}

}  // namespace fedng::cpu
