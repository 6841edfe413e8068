// Int8 quantization of packed symmetric triangles (see fedng/int8_quantize.h).
//
// The receiver rebuilds M^ = D^1/2 (C~ + delta I) D^1/2, which is PSD whenever M is only if
// delta >= lambda_max(-E), E = C~ - C; the stated guarantee M <= M^ <= M + 2 delta D needs
// delta >= ||E||_2. An eigensolver gives ||E||_2 in ~4/3 n^3 flops; here a Cholesky
// factorization of t I + s E (s = +-1, n^3 / 3 flops each) that runs to completion proves
// lambda_min(t I + s E) >= -gamma n t with gamma = (n + 1) u / (1 - (n + 1) u) (Higham, Accuracy
// and Stability, Thm 10.3: R^T R = A + dA, |dA| <= gamma |R^T| |R|, so ||dA||_2 <= gamma ||R||_F^2
// = gamma tr(A + dA)); hence ||E||_2 <= t (1 + 2 (n + 1) n u). t starts at the semicircle
// estimate 2 ||E||_F / sqrt(n) of a matrix of independent rounding errors (within ~2% of
// ||E||_2 on K-FAC factors) and grows by 5% until both factorizations succeed; small matrices
// then shrink it by 3% steps (up to 8) while they still do. Gershgorin's max row sum of |E| caps t (a
// bound that needs no proof).
#include "fedng/int8_quantize.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "fedng/blas.h"
#include "fedng/errors.h"

namespace fedng::cpu {

namespace {

constexpr double kQmax = 127.0;
constexpr double kUnit = 1.1102230246251565e-16;  // 2^-53
constexpr std::int64_t kShrinkBelow = 256;        // sizes whose factorizations are cheap

// Whether t I + s E is positive definite by a completed Cholesky factorization. `e` holds E's
// lower triangle row-major (= its upper triangle column-major, which LAPACK reads).
bool cholesky_ok(const std::vector<double>& e, std::vector<double>& a, std::int64_t n, double s,
                 double t) {
  for (std::int64_t i = 0; i < n; ++i) {
    const double* ei = e.data() + i * n;
    double* ai = a.data() + i * n;
    for (std::int64_t j = 0; j < i; ++j) ai[j] = s * ei[j];
    ai[i] = t;
  }
  const int ni = static_cast<int>(n);
  int info = 0;
  scipy_dpotrf_("U", &ni, a.data(), &ni, &info, 1);
  return info == 0;
}

bool both_ok(const std::vector<double>& e, std::vector<double>& a, std::int64_t n, double t) {
  return cholesky_ok(e, a, n, 1.0, t) && cholesky_ok(e, a, n, -1.0, t);
}

// A certified upper bound on ||E||_2 (see the file comment).
double norm_bound(const std::vector<double>& e, std::vector<double>& a, std::int64_t n,
                  double fro, double gersh) {
  if (!(fro > 0.0)) return fro;  // 0, or NaN for a non-finite input
  double t = std::min(gersh, 1.02 * 2.0 * fro / std::sqrt(static_cast<double>(n)));
  while (t < gersh && !cholesky_ok(e, a, n, 1.0, t)) t = std::min(gersh, 1.05 * t);
  while (t < gersh && !cholesky_ok(e, a, n, -1.0, t)) t = std::min(gersh, 1.05 * t);
  if (t >= gersh) return gersh;
  if (n <= kShrinkBelow)
    for (int k = 0; k < 8 && both_ok(e, a, n, t / 1.03); ++k) t /= 1.03;
  const double nn = static_cast<double>(n);
  return t * (1.0 + 2.0 * (nn + 1.0) * nn * kUnit);
}

// round(x) half to even for the finite |x| <= 128 it is applied to: adding 1.5 2^52 leaves no
// fraction bits (default rounding mode), as `std::nearbyint` (a library call on baseline x86-64)
// would round; the sign of a zero may differ, which no caller can see.
inline double round_small(double x) {
  constexpr double kMagic = 0x1.8p52;
  volatile double shifted = x + kMagic;  // volatile: the sum must be rounded, not folded away
  return shifted - kMagic;
}

// `q / 127 - c` of one entry, `q = clamp(round(127 c), +-127)` (NaN c: q = -127, as std::max
// orders NaN; +-Inf: +-127).
inline double quantize_entry(double c, std::int8_t* q) {
  const double x = c * kQmax;
  double r;
  if (x != x) {
    r = -kQmax;
  } else {
    r = round_small(x < -128.0 ? -128.0 : (x > 128.0 ? 128.0 : x));
    r = r < -kQmax ? -kQmax : (r > kQmax ? kQmax : r);
  }
  *q = static_cast<std::int8_t>(r);
  return r / kQmax - c;
}

void quantize_triangle(const float* m, std::int8_t* q, float* side, std::int64_t n,
                       std::vector<double>& e, std::vector<double>& a) {
  std::vector<double> d(static_cast<std::size_t>(n)), inv(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    d[i] = static_cast<double>(m[i * (i + 3) / 2]);
    const double root = std::sqrt(std::max(d[i], 0.0));
    inv[i] = root > 0.0 ? 1.0 / root : 0.0;
  }
  // E's strict lower triangle only (all the Cholesky passes read); buffers kept between calls
  // (a fresh n x n allocation costs page faults comparable to the entries' own work)
  if (e.size() < static_cast<std::size_t>(n * n)) e.resize(static_cast<std::size_t>(n * n));
  std::vector<double> rows(static_cast<std::size_t>(n), 0.0);  // Gershgorin row sums of |E|
  double fro2 = 0.0;
  std::int64_t p = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    double* ei = e.data() + i * n;
    const double di = inv[i];
    for (std::int64_t j = 0; j < i; ++j)
      ei[j] = quantize_entry(static_cast<double>(m[p + j]) * di * inv[j], q + p + j);
    // the sums in the order they always had (the certificate starts from them)
    for (std::int64_t j = 0; j < i; ++j) {
      const double err = ei[j];
      fro2 += 2.0 * err * err;
      rows[i] += std::fabs(err);
      rows[j] += std::fabs(err);
    }
    p += i;
    q[p++] = 0;
  }
  double gersh = 0.0;
  for (std::int64_t i = 0; i < n; ++i) gersh = std::max(gersh, rows[i]);
  if (!std::isfinite(fro2)) gersh = fro2;
  if (a.size() < static_cast<std::size_t>(n * n)) a.resize(static_cast<std::size_t>(n * n));
  const double rel = norm_bound(e, a, n, std::sqrt(fro2), gersh);
  for (std::int64_t i = 0; i < n; ++i) side[i] = static_cast<float>(d[i]);
  side[n] = static_cast<float>(rel * (1.0 + 1e-6) + 8.0 * static_cast<double>(n) * 0x1p-24);
}

}  // namespace

void int8_quantize_triangles(const float* vals, std::int8_t* q, float* side, std::int64_t nvals,
                             std::int64_t nside, const Sizes& tris) {
  const char* op = "int8_quantize_triangles";
  if (nvals < 0 || nside < 0) fail(op, "negative sizes");
  if (tris.size() % 3 != 0) fail(op, "'tris' must hold (at, sat, n) triples");
  for (std::size_t k = 0; k < tris.size(); k += 3) {
    const std::int64_t at = tris[k], sat = tris[k + 1], n = tris[k + 2];
    if (at < 0 || sat < 0 || n < 0) fail(op, "'tris' has a negative entry");
    if (n > 46340) fail(op, "a triangle is too large");
    if (at + n * (n + 1) / 2 > nvals || sat + n + 1 > nside) fail(op, "'tris' runs past the buffers");
    if (n > 0 && (vals == nullptr || q == nullptr || side == nullptr)) fail(op, "null buffer");
  }
  thread_local std::vector<double> e, a;  // grown to the largest triangle, kept
  for (std::size_t k = 0; k < tris.size(); k += 3)
    quantize_triangle(vals + tris[k], q + tris[k], side + tris[k + 1], tris[k + 2], e, a);
}

}  // namespace fedng::cpu
