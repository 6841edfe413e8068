// Several accepted summable replies folded in one pass over the running sums (see
// fedng/summable_fold.h, `fold_batch`). The sums are the largest arrays a FedNG server touches
// per reply; fold_update reads and writes each of them once per reply. Here the sums are walked
// tile by tile (a tile of a flat sum, a row of a packed triangle) and every reply of the batch
// is added to the tile while it sits in L1: the sums cross memory once per batch.
//
// Bit for bit fold_update's result: each entry receives the same products, rounded the same
// way, in the same order (reply 0's, then reply 1's, ...): the per-tile and per-row loops are
// fold_update's own functions (fedng/packed_fold.h), so an FMA contraction is the same too.
#include <cstdint>
#include <vector>

#include "fedng/errors.h"
#include "fedng/packed_fold.h"
#include "fedng/summable_fold.h"

namespace fedng::cpu {

namespace {

constexpr std::int64_t kTile = 4096;  // floats of a flat sum kept in L1 across the batch

}  // namespace

void fold_batch(const Ptrs& xs, const Ptrs& accs, const Sizes& n, const Sizes& bf16,
                const std::vector<double>& weights, const Ptrs& q, const Ptrs& side, float* acc,
                std::int64_t nq, std::int64_t nside, std::int64_t nacc, const Sizes& segs,
                std::int64_t chunk) {
  const char* op = "fold_batch";
  const std::size_t b = weights.size(), m = accs.size();
  check_count(op, "xs", xs.size(), b * m);
  check_count(op, "n", n.size(), m);
  check_count(op, "bf16", bf16.size(), m);
  check_sizes(op, "n", n);
  check_ptrs(op, "accs", accs, n);
  for (std::size_t r = 0; r < b; ++r)
    check_ptrs(op, "xs", Ptrs(xs.begin() + r * m, xs.begin() + (r + 1) * m), n);
  if (!segs.empty()) {
    check_count(op, "q", q.size(), b);
    check_count(op, "side", side.size(), b);
    check_segments(op, segs, nq, nside, nacc, chunk);  // every segment, before any write
    if (acc == nullptr) fail(op, "null int8 buffer");
    for (std::size_t r = 0; r < b; ++r)
      if (q[r] == 0 || side[r] == 0) fail(op, "null int8 buffer");
  }
  std::vector<float> w(b);
  for (std::size_t r = 0; r < b; ++r) w[r] = static_cast<float>(weights[r]);
  // the flat sums: a tile, then every reply's share of it
  for (std::size_t k = 0; k < m; ++k) {
    float* a = as<float>(accs[k]);
    for (std::int64_t lo = 0; lo < n[k]; lo += kTile) {
      const std::int64_t len = n[k] - lo < kTile ? n[k] - lo : kTile;
      for (std::size_t r = 0; r < b; ++r) {
        const std::uintptr_t x = xs[r * m + k];
        if (bf16[k] != 0)
          bf16_axpy_one(as<const std::uint16_t>(x) + lo, a + lo, len, w[r]);
        else
          f32_axpy(as<const float>(x) + lo, a + lo, len, w[r]);
      }
    }
  }
  // the payload's sum, segment by segment (disjoint: their order changes no bit)
  std::vector<float> scales;
  for (std::size_t s = 0; s < segs.size(); s += 6) {
    const std::int64_t at = segs[s + 1], qat = segs[s + 2], sat = segs[s + 3], len = segs[s + 4];
    if (segs[s] != 0) {  // a vector or low-rank segment: reply by reply, the unbatched kernel
      const Sizes one(segs.begin() + static_cast<std::ptrdiff_t>(s),
                      segs.begin() + static_cast<std::ptrdiff_t>(s + 6));
      for (std::size_t r = 0; r < b; ++r)
        int8_payload_axpy(as<const std::int8_t>(q[r]), as<const float>(side[r]), acc, nq, nside,
                          nacc, one, chunk, weights[r]);
      continue;
    }
    // fold_triangle's row scales and diagonal factor, per reply
    scales.resize(static_cast<std::size_t>(len) * b);
    std::vector<float> onep(b);
    for (std::size_t r = 0; r < b; ++r) {
      const float* sd = as<const float>(side[r]) + sat;
      triangle_row_scales(sd, len, scales.data() + r * static_cast<std::size_t>(len));
      onep[r] = 1.0f + sd[len];
    }
    std::int64_t p = 0;
    for (std::int64_t i = 0; i < len; ++i) {
      for (std::size_t r = 0; r < b; ++r) {
        const float* sd = as<const float>(side[r]) + sat;
        fold_triangle_row(as<const std::int8_t>(q[r]) + qat + p, scales.data() + r * len,
                          acc + at + p, i, w[r], sd[i] * onep[r]);
      }
      p += i + 1;
    }
  }
}

}  // namespace fedng::cpu
