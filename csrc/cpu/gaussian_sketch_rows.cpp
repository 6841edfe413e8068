// SIMD rows of the shared-seed Gaussian matrix: the same bits as rng::gaussian_entry (philox.h),
// entry for entry, whatever the vector width. Built once per instruction set (FEDNG_ISA,
// FEDNG_LANE_BYTES; CMakeLists.txt) WITHOUT FMA contraction, and picked at load time
// (gaussian_sketch_matrix_cpu.cpp). Why the bits cannot move:
// - Philox is integer arithmetic; the 32x32->64 products are exact in every lane.
// - The uniform is built from 52 bits by an exact integer->double conversion (magic number).
// - AS241 and det_log use +, -, *, / and sqrt only, in the scalar order, each IEEE-rounded in
//   every lane exactly as in scalar code (no contraction, no reassociation, no approximation).
// - frexp is read from the exponent bits; exact for the normal inputs here (x >= 2^-53).
// Central entries (|p - 0.5| <= 0.425, ~85%) run for all lanes; the tails run on a compacted
// list, and the far tail (r > 5, p < ~1e-11) falls back to the scalar rng::ndtri.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "fedng/philox.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif
// GCC 12 flags _mm512_undefined_*() inside its own AVX-512 intrinsics as maybe-uninitialized.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#ifndef FEDNG_ISA
#error "compile with -DFEDNG_ISA=<name>"
#endif
#ifndef FEDNG_LANE_BYTES
#define FEDNG_LANE_BYTES 32
#endif

namespace fedng::cpu::FEDNG_ISA {
namespace {

constexpr int kBytes = FEDNG_LANE_BYTES;
constexpr int L = kBytes / 8;  // 64-bit lanes per vector
typedef double vd __attribute__((vector_size(kBytes)));
typedef std::uint64_t vu __attribute__((vector_size(kBytes)));
typedef std::int64_t vi __attribute__((vector_size(kBytes)));

inline vd load(const double* p) {
  vd v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void store(double* p, vd v) { std::memcpy(p, &v, sizeof v); }
inline vd splat(double x) { return vd{} + x; }
inline vu splatu(std::uint64_t x) { return vu{} + x; }
inline vd as_d(vu x) { return reinterpret_cast<vd>(x); }
inline vu as_u(vd x) { return reinterpret_cast<vu>(x); }
inline vd select(vi mask, vd a, vd b) {  // mask lanes all-ones: a, else b
  const vu m = reinterpret_cast<vu>(mask);
  return as_d((as_u(a) & m) | (as_u(b) & ~m));
}

// Full 64-bit products of the low 32 bits of each lane (both < 2^32 here).
inline vu mul32(vu a, vu b) {
#if defined(__AVX512F__) && FEDNG_LANE_BYTES == 64
  return reinterpret_cast<vu>(_mm512_mul_epu32(reinterpret_cast<__m512i>(a),
                                               reinterpret_cast<__m512i>(b)));
#elif defined(__AVX2__) && FEDNG_LANE_BYTES == 32
  return reinterpret_cast<vu>(_mm256_mul_epu32(reinterpret_cast<__m256i>(a),
                                               reinterpret_cast<__m256i>(b)));
#elif defined(__SSE2__) && FEDNG_LANE_BYTES == 16
  return reinterpret_cast<vu>(_mm_mul_epu32(reinterpret_cast<__m128i>(a),
                                            reinterpret_cast<__m128i>(b)));
#else
  return a * b;
#endif
}

inline vd vsqrt(vd x) {
#if defined(__AVX512F__) && FEDNG_LANE_BYTES == 64
  return reinterpret_cast<vd>(_mm512_sqrt_pd(reinterpret_cast<__m512d>(x)));
#elif defined(__AVX__) && FEDNG_LANE_BYTES == 32
  return reinterpret_cast<vd>(_mm256_sqrt_pd(reinterpret_cast<__m256d>(x)));
#elif defined(__SSE2__) && FEDNG_LANE_BYTES == 16
  return reinterpret_cast<vd>(_mm_sqrt_pd(reinterpret_cast<__m128d>(x)));
#else
  vd r;
  for (int l = 0; l < L; ++l) r[l] = __builtin_sqrt(x[l]);  // IEEE sqrt, same as the scalar
  return r;
#endif
}

template <int N>
inline vd horner(const double (&c)[N], vd x) {
  vd acc = splat(c[N - 1]);
  for (int i = N - 2; i >= 0; --i) acc = acc * x + c[i];
  return acc;
}

// Exact integer value (< 2^52) to double: put it in the mantissa of 2^52 and subtract 2^52.
inline vd u52_to_double(vu bits) {
  return as_d(bits | splatu(0x4330000000000000ull)) - 0x1p52;
}

// (bits + 0.5) 2^-52 for bits < 2^52, as uniform_entry computes it: 2^52 + bits - (2^52 - 0.5)
// is bits + 0.5 exactly (53 significant bits at most), so one subtraction does both steps.
inline vd uniform(vu bits) {
  return (as_d(bits | splatu(0x4330000000000000ull)) - (0x1p52 - 0.5)) * 0x1p-52;
}

using rng::as241::A;
using rng::as241::B;
using rng::as241::C;
using rng::as241::D;
using rng::as241::kLogSeries;

// rng::det_log for finite normal x > 0, lane by lane.
inline vd det_log(vd x) {
  constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kSqrtHalf = 0.70710678118654752440;
  const vu bits = as_u(x);
  vd m = as_d((bits & splatu(0x000fffffffffffffull)) | splatu(0x3fe0000000000000ull));
  vd e = u52_to_double(bits >> 52) - 1022.0;  // frexp: x = m 2^e, m in [0.5, 1)
  const vi small = m < kSqrtHalf;
  m = select(small, m * 2.0, m);
  e = select(small, e - 1.0, e);
  const vd s = (m - 1.0) / (m + 1.0);
  return e * kLn2Hi + (e * kLn2Lo + 2.0 * s * horner(kLogSeries, s * s));
}

// mul32 reads only the low 32 bits of each lane on x86, so the rounds may leave junk in the
// high halves (masked once at the end); the portable product needs clean lanes every round.
#if (defined(__AVX512F__) && FEDNG_LANE_BYTES == 64) || \
    (defined(__AVX2__) && FEDNG_LANE_BYTES == 32) || (defined(__SSE2__) && FEDNG_LANE_BYTES == 16)
constexpr bool kLazyMask = true;
#else
constexpr bool kLazyMask = false;
#endif

struct Keys {
  std::uint64_t k0[10], k1[10];
};

// Ten Philox-4x32 rounds on L counters (i, k, stream) at once; words held in 64-bit lanes.
inline void philox(vu c0, vu c1, std::uint64_t s0, std::uint64_t s1, const Keys& key, vu& w0,
                   vu& w1, vu& w2, vu& w3) {
  const vu m0 = splatu(0xD2511F53u), m1 = splatu(0xCD9E8D57u), lo = splatu(0xffffffffu);
  vu c2 = splatu(s0), c3 = splatu(s1);
  for (int round = 0; round < 10; ++round) {
    const vu p0 = mul32(c0, m0), p1 = mul32(c2, m1);
    c0 = (p1 >> 32) ^ c1 ^ splatu(key.k0[round]);
    c2 = (p0 >> 32) ^ c3 ^ splatu(key.k1[round]);
    c1 = kLazyMask ? p1 : p1 & lo;
    c3 = kLazyMask ? p0 : p0 & lo;
  }
  w0 = c0 & lo;
  w1 = c1 & lo;
  w2 = c2 & lo;
  w3 = c3 & lo;
}

// Stores e0 o0 e1 o1 ... (2L values) at p.
inline void store_interleaved(double* p, vd e, vd o) {
#if defined(__AVX512F__) && FEDNG_LANE_BYTES == 64
  const __m512i lo = _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0);
  const __m512i hi = _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
  const __m512d a = reinterpret_cast<__m512d>(e), b = reinterpret_cast<__m512d>(o);
  _mm512_storeu_pd(p, _mm512_permutex2var_pd(a, lo, b));
  _mm512_storeu_pd(p + 8, _mm512_permutex2var_pd(a, hi, b));
#else
  for (int l = 0; l < L; ++l) {
    p[2 * l] = e[l];
    p[2 * l + 1] = o[l];
  }
#endif
}

// Appends the lanes of x (entry indices b..b+L-1) with |q| > 0.425 to (idx, tp) at nt.
inline int compact(vd q, vd x, int b, std::int64_t* idx, double* tp, int nt) {
  const vd aq = as_d(as_u(q) & splatu(0x7fffffffffffffffull));
#if defined(__AVX512F__) && FEDNG_LANE_BYTES == 64
  const __mmask8 m = _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(aq), _mm512_set1_pd(0.425),
                                        _CMP_GT_OQ);
  if (!m) return nt;
  const __m512i ids =
      _mm512_add_epi64(_mm512_set1_epi64(b), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
  _mm512_storeu_si512(idx + nt, _mm512_maskz_compress_epi64(m, ids));
  _mm512_storeu_pd(tp + nt, _mm512_maskz_compress_pd(m, reinterpret_cast<__m512d>(x)));
  return nt + __builtin_popcount(m);
#else
  const vi tail = aq > 0.425;
  for (int l = 0; l < L; ++l) {  // branch-free
    idx[nt] = b + l;
    tp[nt] = x[l];
    nt -= static_cast<int>(tail[l]);
  }
  return nt;
#endif
}

// p (n entries, n a multiple of L) -> ndtri(p) into z. idx and tp hold n + L entries.
void ndtri_block(const double* p, double* z, int n, std::int64_t* idx, double* tp) {
  int nt = 0;
  for (int b = 0; b < n; b += L) {
    const vd x = load(p + b);
    const vd q = x - 0.5;
    const vd r = 0.180625 - q * q;
    store(z + b, q * horner(A, r) / horner(B, r));
    nt = compact(q, x, b, idx, tp, nt);
  }
  if (!nt) return;
  for (int t = nt; t % L; ++t) tp[t] = 0.25;  // padding: any value in (0, 1)
  for (int t = 0; t < nt; t += L) {
    const vd x = load(tp + t);
    const vd q = x - 0.5;
    const vi neg = q < 0.0;
    const vd r = vsqrt(-det_log(select(neg, x, 1.0 - x)));
    const vd v = horner(C, r - 1.6) / horner(D, r - 1.6);
    const vd out = select(neg, -v, v);
    const vi far = r > 5.0;
#if defined(__AVX512F__) && FEDNG_LANE_BYTES == 64
    const __mmask8 valid = nt - t >= 8 ? 0xff : static_cast<__mmask8>((1u << (nt - t)) - 1);
    _mm512_mask_i64scatter_pd(z, valid, _mm512_loadu_si512(idx + t),
                              reinterpret_cast<__m512d>(out), 8);
    if (_mm512_movepi64_mask(reinterpret_cast<__m512i>(far)) & valid)
      for (int l = 0; l < L && t + l < nt; ++l)
        if (far[l]) z[idx[t + l]] = rng::ndtri(tp[t + l]);
#else
    for (int l = 0; l < L && t + l < nt; ++l)
      z[idx[t + l]] = far[l] ? rng::ndtri(tp[t + l]) : out[l];
#endif
  }
}

// Lanes whose pair index reached `pairs` move to the next row.
inline void wrap(vu& c0, vu& c1, std::int64_t pairs) {
  const vu p = splatu(static_cast<std::uint64_t>(pairs));
  const vu over = reinterpret_cast<vu>(c1 >= p);  // all ones where wrapped
  c1 -= p & over;
  c0 -= over;
}

template <class T>
void rows(T* out, std::int64_t i0, std::int64_t i1, std::int64_t r, std::uint64_t seed,
          std::uint64_t stream) {
  // Chunks of the flattened (row i, pair k) index, pair k covering columns 2k and 2k + 1.
  constexpr int kPairs = 128;  // a multiple of L
  alignas(64) double u[2 * kPairs], z[2 * kPairs], tp[2 * kPairs + 8];
  alignas(64) std::int64_t idx[2 * kPairs + 8];
  const std::int64_t pairs = (r + 1) / 2;
  Keys key;
  std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    if (round) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    key.k0[round] = k0;
    key.k1[round] = k1;
  }
  const std::uint64_t s0 = stream & 0xffffffffu, s1 = stream >> 32;
  std::int64_t i = i0, k = 0;  // the next pair to generate: row i, pair k
  T* o = out;                  // where its even column goes
  std::int64_t col = 0;        // o's column
  while (i < i1) {
    // The next n <= kPairs pairs, crossing rows.
    const int n = static_cast<int>(std::min<std::int64_t>(kPairs, (i1 - i) * pairs - k));
    const int nv = (n + L - 1) / L * L;
    vu c0 = splatu(static_cast<std::uint64_t>(i)), c1 = splatu(static_cast<std::uint64_t>(k));
    if (pairs >= L) {  // a lane wraps to the next row at most once per step
      for (int l = 0; l < L; ++l) c1[l] += l;
      wrap(c0, c1, pairs);
    } else {
      for (int l = 0; l < L; ++l) {
        const std::int64_t f = k + l;
        c0[l] = static_cast<std::uint64_t>(i + f / pairs);
        c1[l] = static_cast<std::uint64_t>(f % pairs);
      }
    }
    for (int b = 0; b < nv; b += L) {
      vu w0, w1, w2, w3;
      philox(c0, c1, s0, s1, key, w0, w1, w2, w3);
      // Even column: 52 bits of (w1:w0); odd column: of (w3:w2). u = (bits + 0.5) 2^-52.
      store_interleaved(u + 2 * b, uniform(((w1 << 32) | w0) >> 12),
                        uniform(((w3 << 32) | w2) >> 12));
      if (pairs >= L) {
        c1 += static_cast<std::uint64_t>(L);
        wrap(c0, c1, pairs);
      } else {
        for (int l = 0; l < L; ++l) {
          const std::int64_t f = k + b + L + l;
          c0[l] = static_cast<std::uint64_t>(i + f / pairs);
          c1[l] = static_cast<std::uint64_t>(f % pairs);
        }
      }
    }
    i += (k + n) / pairs;
    k = (k + n) % pairs;
    ndtri_block(u, z, 2 * nv, idx, tp);
    // z is in output order, except that an odd r drops each row's last odd column.
    for (int pos = 0; pos < 2 * n;) {
      const int len = static_cast<int>(std::min<std::int64_t>(r - col, 2 * n - pos));
      for (int e = 0; e < len; ++e) o[e] = static_cast<T>(z[pos + e]);
      o += len;
      pos += len;
      col += len;
      if (col == r) {
        pos += static_cast<int>(2 * pairs - r);
        col = 0;
      }
    }
  }
}

}  // namespace

// Rows [i0, i1) of the [d, r] matrix into out (row i at out + (i - i0) r).
void gaussian_rows(float* out, std::int64_t i0, std::int64_t i1, std::int64_t r,
                   std::uint64_t seed, std::uint64_t stream) {
  rows(out, i0, i1, r, seed, stream);
}
void gaussian_rows(double* out, std::int64_t i0, std::int64_t i1, std::int64_t r,
                   std::uint64_t seed, std::uint64_t stream) {
  rows(out, i0, i1, r, seed, stream);
}

}  // namespace fedng::cpu::FEDNG_ISA
