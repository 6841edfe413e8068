// One-pass folds of received payloads into float32 running sums (see fedng/packed_fold.h).
// A streaming server adds every client's curvature and contribution to its sums: done as
// "decode to float32, then add", each int8 update is read once and ~5 float32 temporaries are
// written and read again; here each entry is decoded in registers and added where it lies.
#include "fedng/packed_fold.h"

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fedng/errors.h"

// The hot loops are also compiled for AVX2 + FMA and chosen at load time (the extension is
// built for baseline x86-64).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FEDNG_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FEDNG_CLONES
#endif

namespace fedng::cpu {

namespace {

constexpr double kQmax = 127.0;

void check_triples(const char* op, const char* name, const Sizes& t, bool tri, std::int64_t nq,
                   std::int64_t nside, std::int64_t chunk) {
  if (t.size() % 3 != 0) fail(op, std::string("'") + name + "' must hold (at, sat, n) triples");
  for (std::size_t k = 0; k < t.size(); k += 3) {
    const std::int64_t at = t[k], sat = t[k + 1], n = t[k + 2];
    if (at < 0 || sat < 0 || n < 0) fail(op, std::string("'") + name + "' has a negative entry");
    const std::int64_t size = tri ? n * (n + 1) / 2 : n;
    const std::int64_t ns = tri ? n + 1 : (n + chunk - 1) / chunk;
    if (at + size > nq || sat + ns > nside)
      fail(op, std::string("'") + name + "' runs past the buffers");
  }
}

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

void int8_packed_axpy(const std::int8_t* q, const float* side, float* acc, std::int64_t nq,
                      std::int64_t nside, const Sizes& tris, const Sizes& vecs,
                      std::int64_t chunk, double weight) {
  const char* op = "int8_packed_axpy";
  if (nq < 0 || nside < 0) fail(op, "negative sizes");
  if (chunk <= 0) fail(op, "'chunk' must be positive");
  check_triples(op, "tris", tris, true, nq, nside, chunk);
  check_triples(op, "vecs", vecs, false, nq, nside, chunk);
  if (nq > 0 && (q == nullptr || acc == nullptr)) fail(op, "null buffer");
  if (nside > 0 && side == nullptr) fail(op, "null buffer");
  const float w = static_cast<float>(weight);
  std::int64_t widest = 0;
  for (std::size_t k = 2; k < tris.size(); k += 3) widest = tris[k] > widest ? tris[k] : widest;
  std::vector<float> s(static_cast<std::size_t>(widest));
  for (std::size_t k = 0; k < tris.size(); k += 3)
    fold_triangle(q + tris[k], side + tris[k + 1], acc + tris[k], tris[k + 2], w, s.data());
  for (std::size_t k = 0; k < vecs.size(); k += 3) {
    const std::int64_t at = vecs[k], sat = vecs[k + 1], n = vecs[k + 2];
    for (std::int64_t c = 0; c * chunk < n; ++c) {
      const float sc = side[sat + c];
      const std::int64_t lo = c * chunk, hi = lo + chunk < n ? lo + chunk : n;
#pragma omp simd
      for (std::int64_t p = lo; p < hi; ++p)
        acc[at + p] += w * (static_cast<float>(q[at + p]) * sc);
    }
  }
}

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

bool int8_side_traces(const float* side, std::int64_t nside, const Sizes& tris, double* traces) {
  const char* op = "int8_side_traces";
  if (nside < 0) fail(op, "negative size");
  if (tris.size() % 3 != 0) fail(op, "'tris' must hold (at, sat, n) triples");
  for (std::size_t k = 0; k < tris.size(); k += 3)
    if (tris[k + 1] < 0 || tris[k + 2] < 0 || tris[k + 1] + tris[k + 2] + 1 > nside)
      fail(op, "'tris' runs past the scales");
  for (std::size_t k = 0; k < tris.size(); k += 3) {
    const float* d = side + tris[k + 1];
    const std::int64_t n = tris[k + 2];
    const float delta = d[n];
    if (!(delta >= 0.0f) || !std::isfinite(delta)) return false;
    const float onep = 1.0f + delta;
    double tr = 0.0;
    for (std::int64_t i = 0; i < n; ++i) {
      if (!(d[i] >= 0.0f) || !std::isfinite(d[i])) return false;
      tr += static_cast<double>(d[i] * onep);
    }
    traces[k / 3] = tr;
  }
  return true;
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

inline float bf16_float(std::uint16_t h) {
  const std::uint32_t bits = static_cast<std::uint32_t>(h) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
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

void check_lowrank(const char* op, const Sizes& lrs, std::int64_t nq, std::int64_t nside,
                   std::int64_t nacc) {
  if (nq < 0 || nside < 0 || nacc < 0) fail(op, "negative sizes");
  if (lrs.size() % 5 != 0) fail(op, "'lrs' must hold (at, qat, sat, n, k) quintuples");
  for (std::size_t s = 0; s < lrs.size(); s += 5) {
    const std::int64_t at = lrs[s], qat = lrs[s + 1], sat = lrs[s + 2], n = lrs[s + 3],
                       k = lrs[s + 4];
    if (at < 0 || qat < 0 || sat < 0 || n < 0 || k < 0 || k > n)
      fail(op, "'lrs' has a negative entry or a rank above its size");
    if (at + n * (n + 1) / 2 > nacc || qat + 2 * n * k > nq || sat + k + 1 > nside)
      fail(op, "'lrs' runs past the buffers");
  }
}

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

// acc (packed lower triangle, row by row) += w (B B^T + sigma I), B = bt^T: row i's entries
// j <= i are the dots of B's row i with rows j, kLane columns at a time in registers.
FEDNG_CLONES void fold_lowrank(const float* bt, std::int64_t n, std::int64_t k, std::int64_t ld,
                               float sigma, float w, float* acc) {
  std::int64_t p = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    float* ai = acc + p;
    for (std::int64_t j0 = 0; j0 <= i; j0 += kLane) {
      float t[kLane] = {};
      for (std::int64_t c = 0; c < k; ++c) {
        const float bic = bt[c * ld + i];
        const float* bc = bt + c * ld + j0;
#pragma omp simd
        for (std::int64_t jj = 0; jj < kLane; ++jj) t[jj] += bic * bc[jj];
      }
      const std::int64_t len = i + 1 - j0 < kLane ? i + 1 - j0 : kLane;
      for (std::int64_t jj = 0; jj < len; ++jj) ai[j0 + jj] += w * t[jj];
    }
    ai[i] += w * sigma;
    p += i + 1;
  }
}

}  // namespace

void int8_lowrank_axpy(const std::int8_t* q, const float* side, float* acc, std::int64_t nq,
                       std::int64_t nside, std::int64_t nacc, const Sizes& lrs, double weight) {
  const char* op = "int8_lowrank_axpy";
  check_lowrank(op, lrs, nq, nside, nacc);
  const float w = static_cast<float>(weight);
  std::vector<float> bt;
  for (std::size_t s = 0; s < lrs.size(); s += 5) {
    const std::int64_t at = lrs[s], qat = lrs[s + 1], sat = lrs[s + 2], n = lrs[s + 3],
                       k = lrs[s + 4];
    const std::int64_t ld = (n + kLane - 1) / kLane * kLane;
    bt.assign(static_cast<std::size_t>(k * ld), 0.0f);
    decode_lowrank(q + qat, side + sat, n, k, ld, bt.data());
    fold_lowrank(bt.data(), n, k, ld, side[sat + k], w, acc + at);
  }
}

bool int8_lowrank_traces(const std::int8_t* q, const float* side, std::int64_t nq,
                         std::int64_t nside, const Sizes& lrs, double* traces) {
  const char* op = "int8_lowrank_traces";
  check_lowrank(op, lrs, nq, nside, INT64_MAX);
  std::vector<float> bt;
  for (std::size_t s = 0; s < lrs.size(); s += 5) {
    const std::int64_t qat = lrs[s + 1], sat = lrs[s + 2], n = lrs[s + 3], k = lrs[s + 4];
    for (std::int64_t c = 0; c <= k; ++c)
      if (!(side[sat + c] >= 0.0f) || !std::isfinite(side[sat + c])) return false;
    bt.assign(static_cast<std::size_t>(k * n), 0.0f);
    decode_lowrank(q + qat, side + sat, n, k, n, bt.data());
    double sq = 0.0;
    for (std::int64_t i = 0; i < k * n; ++i)
      sq += static_cast<double>(bt[i]) * static_cast<double>(bt[i]);
    traces[s / 5] = sq + static_cast<double>(n) * static_cast<double>(side[sat + k]);
  }
  return true;
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

}  // namespace fedng::cpu
