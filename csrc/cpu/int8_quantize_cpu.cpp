// Int8 quantization of packed symmetric triangles (see fedng/int8_quantize.h).
//
// The receiver rebuilds M^ = D^1/2 (C~ + delta I) D^1/2, which is PSD whenever M is only if
// delta >= lambda_max(-E), E = C~ - C; the stated guarantee M <= M^ <= M + 2 delta D needs
// delta >= ||E||_2. An eigensolver gives ||E||_2 in ~4/3 n^3 flops; here a float32 Cholesky
// factorization of A = t I + s E (s = +-1, n^3 / 3 flops each, half of float64's time) that
// runs to completion proves lambda_min(A) >= -eta: the factorization of A' = fl32(A) satisfies
// R^T R = A' + dA with |dA| <= gamma |R^T| |R|, gamma = (n + 1) u / (1 - (n + 1) u), u = 2^-24
// (Higham, Accuracy and Stability, Thm 10.3), so ||dA||_2 <= gamma max_i (|R^T| |R| 1)_i (a
// symmetric non-negative matrix's 2-norm is at most its largest row sum; two O(n^2) passes
// over |R|, in float64 with 4 n 2^-53 relative headroom), and ||A' - A||_2 <= u (t + max_i
// sum_j |E_ij|); eta is their sum, and ||E||_2 <= t + eta (a few tenths of a percent above t on
// K-FAC factors; the former float64 factorization, bounded by gamma ||R||_F^2, gave 1e-10).
// t starts at the semicircle estimate 2 ||E||_F / sqrt(n) of a matrix of independent rounding
// errors (within ~2% of ||E||_2 on K-FAC factors) and grows by 5% until both factorizations
// succeed; small matrices then shrink it by 3% steps (up to 8) while they still do.
// Gershgorin's max row sum of |E| caps the bound (a bound that needs no proof).
// A' is factorized as LAPACK's column-major lower triangle (OpenBLAS: 20-30% faster than the
// upper one); the O(n^2) passes run vectorized where entries are independent, and every sum has
// one fixed order, compiled without FMA (the same bits on every CPU).
#include "fedng/int8_quantize.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "fedng/blas.h"
#include "fedng/errors.h"
#include "fedng/fold_clones.h"

namespace fedng::cpu {

namespace {

constexpr double kQmax = 127.0;
constexpr double kUnit = 0x1p-53;                 // float64's unit roundoff
constexpr double kUnit32 = 0x1p-24;               // float32's
constexpr std::int64_t kShrinkBelow = 256;        // sizes whose factorizations are cheap
constexpr std::size_t kKeepEntries = 1 << 21;     // buffers kept up to 1448 wide (16 + 8 MB)

// Work buffers of one certificate: A' (float32, row-major upper = LAPACK's column-major lower:
// OpenBLAS factorizes that 'L' 20-30% faster than the 'U' of a row-major lower, 785 wide 2.2
// against 3.0 ms), fl32(E) transposed (row j: E_ij, i > j) to build it from, and the passes'
// sums.
struct Work {
  std::vector<float> a;
  std::vector<float> et;
  std::vector<double> col;
  std::vector<double> z;
};

// et[j n + i] = fl32(e[i n + j]) for j < i: E's strict lower triangle (row-major) transposed to
// the strict upper one, in 8 x 8 tiles (each tile's reads and writes within 8 cache lines).
void transpose_lower(const double* e, float* et, std::int64_t n) {
  constexpr std::int64_t kTile = 8;
  for (std::int64_t i0 = 0; i0 < n; i0 += kTile) {
    const std::int64_t i1 = i0 + kTile < n ? i0 + kTile : n;
    for (std::int64_t j = 0; j < i1; ++j) {
      float* row = et + j * n;
      for (std::int64_t i = j + 1 > i0 ? j + 1 : i0; i < i1; ++i)
        row[i] = static_cast<float>(e[i * n + j]);
    }
  }
}

// a[k] = s x[k] for k < len (s = +-1: exact; vectorized).
FEDNG_CLONES void signed_copy(const float* x, float s, float* a, std::int64_t len) {
#pragma omp simd
  for (std::int64_t k = 0; k < len; ++k) a[k] = s * x[k];
}

// sum_k |r[k]| in float64 over four fixed partial sums (baseline code: the same bits on every
// CPU).
double abs_sum(const float* r, std::int64_t len) {
  double p0 = 0.0, p1 = 0.0, p2 = 0.0, p3 = 0.0;
  std::int64_t k = 0;
  for (; k + 4 <= len; k += 4) {
    p0 += std::fabs(static_cast<double>(r[k]));
    p1 += std::fabs(static_cast<double>(r[k + 1]));
    p2 += std::fabs(static_cast<double>(r[k + 2]));
    p3 += std::fabs(static_cast<double>(r[k + 3]));
  }
  for (; k < len; ++k) p0 += std::fabs(static_cast<double>(r[k]));
  return (p0 + p1) + (p2 + p3);
}

// z[k] += |r[k]| c for k < len: independent entries (baseline code: no FMA contraction, the
// same bits on every CPU).
void add_weighted(const float* r, double c, double* z, std::int64_t len) {
  for (std::int64_t k = 0; k < len; ++k) z[k] += std::fabs(static_cast<double>(r[k])) * c;
}

// Whether t I + s E is certified positive semi-definite up to *eta (lambda_min >= -*eta, set on
// success) by a completed float32 Cholesky factorization; see the file comment. `w.et` holds
// fl32(E)'s strict upper triangle row-major, `gersh` = max_i sum_j |E_ij|.
bool cholesky_ok(Work& w, std::int64_t n, double s, double t, double gersh, double* eta) {
  const float sf = static_cast<float>(s);
  for (std::int64_t j = 0; j < n; ++j) {
    float* aj = w.a.data() + j * n;
    aj[j] = static_cast<float>(t);
    signed_copy(w.et.data() + j * n + j + 1, sf, aj + j + 1, n - j - 1);
  }
  const int ni = static_cast<int>(n);
  int info = 0;
  scipy_spotrf_("L", &ni, w.a.data(), &ni, &info, 1);
  if (info != 0) return false;
  // row j of this row-major upper triangle holds column j of L (A' + dA = L L^T): with R = L^T,
  // (|R^T| |R| 1)_i = sum_(j <= i) |L_ij| c_j, c_j = sum_(k >= j) |L_kj| (row j's sum here)
  w.col.resize(static_cast<std::size_t>(n));
  w.z.assign(static_cast<std::size_t>(n), 0.0);
  for (std::int64_t j = 0; j < n; ++j) {
    const float* lj = w.a.data() + j * n + j;
    w.col[j] = abs_sum(lj, n - j);
    add_weighted(lj, w.col[j], w.z.data() + j, n - j);
  }
  double big = 0.0;
  for (std::int64_t i = 0; i < n; ++i) big = std::max(big, w.z[i]);
  const double nn = static_cast<double>(n);
  const double gamma = (nn + 1.0) * kUnit32 / (1.0 - (nn + 1.0) * kUnit32);
  // the rounding of A to float32 (relative u; 2^-149 per entry where A' is subnormal)
  const double rounding = kUnit32 * (t + gersh) + nn * 0x1p-149;
  *eta = (gamma * big + rounding) * (1.0 + 4.0 * nn * kUnit);
  return true;
}

// A certified upper bound on ||E||_2 (see the file comment).
double norm_bound(Work& w, std::int64_t n, double fro, double gersh) {
  if (!(fro > 0.0)) return fro;  // 0, or NaN for a non-finite input
  double t = std::min(gersh, 1.02 * 2.0 * fro / std::sqrt(static_cast<double>(n)));
  double eta_p = 0.0, eta_m = 0.0;
  while (t < gersh && !cholesky_ok(w, n, 1.0, t, gersh, &eta_p)) t = std::min(gersh, 1.05 * t);
  double t_p = t;  // +E >= -(t_p + eta_p) I, and t only grows from here
  while (t < gersh && !cholesky_ok(w, n, -1.0, t, gersh, &eta_m)) t = std::min(gersh, 1.05 * t);
  if (t >= gersh) return gersh;
  if (n <= kShrinkBelow) {
    for (int k = 0; k < 8; ++k) {
      double ep = 0.0, em = 0.0;
      const double next = t / 1.03;
      if (!cholesky_ok(w, n, 1.0, next, gersh, &ep) || !cholesky_ok(w, n, -1.0, next, gersh, &em))
        break;
      t = t_p = next;
      eta_p = ep;
      eta_m = em;
    }
  }
  return std::min(gersh, std::max(t_p + eta_p, t + eta_m));
}

// Row i of the correlations' strict lower triangle quantized: q[j] = clamp(round(127 c_ij),
// +-127) (half to even; NaN c: -127, as std::max orders NaN; +-Inf: +-127) and e[j] = q[j] / 127
// - c_ij, c_ij = m[j] di inv[j]. The clones round with an instruction; no product is contracted
// into a sum here (a division precedes the only subtraction).
FEDNG_CLONES void quantize_row(const float* m, const double* inv, double di, std::int8_t* q,
                               double* e, std::int64_t len) {
  for (std::int64_t j = 0; j < len; ++j) {
    const double c = static_cast<double>(m[j]) * di * inv[j];
    const double x = c * kQmax;
    double r = -kQmax;  // NaN c: -127, as std::max orders NaN
    if (x == x) {
      r = std::nearbyint(x < -128.0 ? -128.0 : (x > 128.0 ? 128.0 : x));
      r = r < -kQmax ? -kQmax : (r > kQmax ? kQmax : r);
    }
    q[j] = static_cast<std::int8_t>(r);
    e[j] = r / kQmax - c;
  }
}

// rows[j] += |e[j]| for j < len (vectorized; the same sums).
FEDNG_CLONES void add_abs_rows(const double* e, double* rows, std::int64_t len) {
#pragma omp simd
  for (std::int64_t j = 0; j < len; ++j) rows[j] += std::fabs(e[j]);
}

void quantize_triangle(const float* m, std::int8_t* q, float* side, std::int64_t n,
                       std::vector<double>& e, Work& w) {
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
    quantize_row(m + p, inv.data(), inv[i], q + p, ei, i);
    // the sums in the order they always had (the certificate starts from them): the column
    // sums rows[j < i] vectorized, the two chains (fro2, rows[i]) side by side
    add_abs_rows(ei, rows.data(), i);
    double ri = rows[i];
    for (std::int64_t j = 0; j < i; ++j) {
      const double err = ei[j];
      fro2 += 2.0 * err * err;
      ri += std::fabs(err);
    }
    rows[i] = ri;
    p += i;
    q[p++] = 0;
  }
  double gersh = 0.0;
  for (std::int64_t i = 0; i < n; ++i) gersh = std::max(gersh, rows[i]);
  if (!std::isfinite(fro2)) gersh = fro2;
  if (w.a.size() < static_cast<std::size_t>(n * n)) w.a.resize(static_cast<std::size_t>(n * n));
  if (w.et.size() < static_cast<std::size_t>(n * n)) w.et.resize(static_cast<std::size_t>(n * n));
  transpose_lower(e.data(), w.et.data(), n);
  const double rel = norm_bound(w, n, std::sqrt(fro2), gersh);
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
  thread_local std::vector<double> e;  // grown to the largest triangle, kept while small
  thread_local Work w;
  for (std::size_t k = 0; k < tris.size(); k += 3)
    quantize_triangle(vals + tris[k], q + tris[k], side + tris[k + 1], tris[k + 2], e, w);
  if (e.size() > kKeepEntries) {  // a wide factor's buffers are not held between calls
    std::vector<double>().swap(e);
    std::vector<float>().swap(w.a);
    std::vector<float>().swap(w.et);
  }
}

}  // namespace fedng::cpu
