// Copies of a row-major symmetric matrix's lower triangle onto its upper one (also of a diagonal
// block of a larger matrix, with a leading dimension). The plain column walk reads a new cache
// line per entry; at n ~ 1000 with a power-of-two stride the rows of a 4 x 4 block also share
// cache sets. So: 32 x 32 tiles, and for float 4 x 4 SSE transposes inside them.
#pragma once
#include <algorithm>
#include <cstdint>
#include <type_traits>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace fedng {

// a(j, i) <- a(i, j) for j < i: the upper triangle from the lower one. a is [n, n] with leading
// dimension lda.
template <class T>
void mirror_strided(T* a, std::int64_t n, std::int64_t lda) {
  constexpr std::int64_t kTile = 32;
  for (std::int64_t i0 = 0; i0 < n; i0 += kTile)
    for (std::int64_t j0 = 0; j0 <= i0; j0 += kTile) {
      const std::int64_t i1 = std::min(n, i0 + kTile), j1 = std::min(n, j0 + kTile);
      for (std::int64_t i = i0; i < i1; ++i)
        for (std::int64_t j = j0; j < std::min(j1, i); ++j) a[j * lda + i] = a[i * lda + j];
    }
}

#if defined(__SSE__)
// dst's 4 x 4 block <- src's transposed (both with leading dimension ld).
inline void transpose4(const float* src, float* dst, std::int64_t ld) {
  __m128 r0 = _mm_loadu_ps(src), r1 = _mm_loadu_ps(src + ld);
  __m128 r2 = _mm_loadu_ps(src + 2 * ld), r3 = _mm_loadu_ps(src + 3 * ld);
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  _mm_storeu_ps(dst, r0);
  _mm_storeu_ps(dst + ld, r1);
  _mm_storeu_ps(dst + 2 * ld, r2);
  _mm_storeu_ps(dst + 3 * ld, r3);
}

inline void mirror_strided(float* a, std::int64_t n, std::int64_t lda) {
  constexpr std::int64_t kTile = 32;
  const std::int64_t whole = n / 4 * 4;
  for (std::int64_t i0 = 0; i0 < whole; i0 += kTile)
    for (std::int64_t j0 = 0; j0 <= i0; j0 += kTile) {
      const std::int64_t i1 = std::min(whole, i0 + kTile);
      for (std::int64_t i = i0; i < i1; i += 4)
        for (std::int64_t j = j0; j < std::min(j0 + kTile, i); j += 4) {  // block (i, j), j < i
          transpose4(a + i * lda + j, a + j * lda + i, lda);
        }
    }
  // The 4 x 4 diagonal blocks and the last n - whole rows, entry by entry.
  auto one = [&](std::int64_t i, std::int64_t j) { a[j * lda + i] = a[i * lda + j]; };
  for (std::int64_t i = 0; i < whole; i += 4)
    for (std::int64_t r = i + 1; r < i + 4; ++r)
      for (std::int64_t c = i; c < r; ++c) one(r, c);
  for (std::int64_t r = whole; r < n; ++r)
    for (std::int64_t c = 0; c < r; ++c) one(r, c);
}
#endif

// a(i, j) <- a(j, i) for i < j: the upper triangle of the row-major [n, n] a from its lower one,
// written front to back in groups of destination rows. For float, 8 rows at a time and 16 source
// rows per step (4 x 4 SSE transposes), so each destination cache line is written whole in one go
// and few strided source rows are live at a 4 KiB row stride. After a SYRK at n ~ 1000 (K-FAC
// factors, kron_accumulate) this beat mirror_strided's 32 x 32 tiles and the scalar tiles.
template <class T>
void mirror_lower_to_upper_rows(T* a, std::int64_t n) {
  std::int64_t c = 0;
#if defined(__SSE__)
  if constexpr (std::is_same_v<T, float>) {
    constexpr std::int64_t kRows = 8, kStep = 16;
    for (; c + kRows <= n; c += kRows) {  // destination rows c .. c + 7
      std::int64_t r = c + kRows;
      for (; r + kStep <= n; r += kStep)  // source rows r .. r + 15
        for (std::int64_t q = r; q < r + kStep; q += 4)
          for (std::int64_t g = c; g < c + kRows; g += 4) {
            transpose4(a + q * n + g, a + g * n + q, n);
          }
      for (std::int64_t cc = c; cc < c + kRows; ++cc) {  // the 8 x 8 diagonal block, the tail
        for (std::int64_t rr = cc + 1; rr < c + kRows; ++rr) a[cc * n + rr] = a[rr * n + cc];
        for (std::int64_t rr = r; rr < n; ++rr) a[cc * n + rr] = a[rr * n + cc];
      }
    }
  }
#endif
  // The rest (double, or a float matrix's last n % 8 rows): its trailing diagonal block.
  if (c < n) mirror_strided(a + c * n + c, n - c, n);
}

}  // namespace fedng
