#include <vector>

#include "fedng/blas.h"
#include "fedng/dispatch.h"
#include "fedng/ops.h"
#include "fedng/parallel.h"

namespace fedng::cpu {
namespace {

double dense_flops(double m, double n) { return 2.0 * m * n * (m + n); }
double batch_flops(double m, double n, double b) { return 2.0 * b * (m * m + n * n + m * n); }

}  // namespace

void kron_precondition(DType dtype, const Ptrs& grads, const Ptrs& a_inv, const Ptrs& g_inv,
                       const Ptrs& inputs, const Ptrs& output_grads, const Ptrs& outs,
                       const Sizes& m, const Sizes& n, const Sizes& batch, int nthreads) {
  const char* op = "kron_precondition";
  const std::size_t count = outs.size();
  for (auto [name, size] : {std::pair{"grads", grads.size()}, {"a_inv", a_inv.size()},
                            {"g_inv", g_inv.size()}, {"inputs", inputs.size()},
                            {"output_grads", output_grads.size()}, {"batch", batch.size()},
                            {"m", m.size()}, {"n", n.size()}})
    check_count(op, name, size, count);
  check_sizes(op, "m", m);
  check_sizes(op, "n", n);
  std::vector<double> cost(count);
  std::vector<char> use_batch(count);
  Sizes mn(count), nn(count), mm(count), bn(count), bm(count);
  for (std::size_t i = 0; i < count; ++i) {
    const bool has_batch = batch[i] >= 0;
    const double dense = dense_flops(m[i], n[i]);
    const double fact = has_batch ? batch_flops(m[i], n[i], batch[i]) : 0.0;
    // Without a dense gradient, forming it first (2 B m n) then the dense product is also possible.
    use_batch[i] = has_batch && (grads[i] == 0 || fact < dense);
    cost[i] = (use_batch[i] ? fact : dense) + 1.0;
    mn[i] = m[i] * n[i];
    nn[i] = n[i] * n[i];
    mm[i] = m[i] * m[i];
    bn[i] = has_batch ? batch[i] * n[i] : 0;
    bm[i] = has_batch ? batch[i] * m[i] : 0;
    blas_int(op, nn[i]);
    blas_int(op, mm[i]);
    blas_int(op, bn[i]);
    blas_int(op, bm[i]);
    if (!has_batch && grads[i] == 0 && mn[i] > 0) fail(op, "item without grads or batch factors");
  }
  check_ptrs(op, "outs", outs, mn);
  check_ptrs(op, "a_inv", a_inv, nn);
  check_ptrs(op, "g_inv", g_inv, mm);
  check_ptrs(op, "inputs", inputs, bn);
  check_ptrs(op, "output_grads", output_grads, bm);
  dispatch_float(dtype, [&](auto zero) {
    using T = decltype(zero);
    run_ragged(cost, nthreads, [&](std::int64_t i) {
      const int mi = static_cast<int>(m[i]), ni = static_cast<int>(n[i]);
      T* out = as<T>(outs[i]);
      if (mi == 0 || ni == 0) return;
      const T* ai = as<const T>(a_inv[i]);
      const T* gi = as<const T>(g_inv[i]);
      thread_local std::vector<T> t1, t2;
      if (use_batch[i]) {
        const int b = static_cast<int>(batch[i]);
        if (b == 0) {
          for (std::int64_t e = 0; e < mn[i]; ++e) out[e] = T(0);
          return;
        }
        // P = Gb g_inv^T [B, m], Q = Ab a_inv [B, n], out = P^T Q = g_inv Gb^T Ab a_inv.
        t1.resize(static_cast<std::size_t>(bm[i]));
        t2.resize(static_cast<std::size_t>(bn[i]));
        blas::gemm(false, true, b, mi, mi, T(1), as<const T>(output_grads[i]), mi, gi, mi, T(0),
                   t1.data(), mi);
        blas::gemm(false, false, b, ni, ni, T(1), as<const T>(inputs[i]), ni, ai, ni, T(0),
                   t2.data(), ni);
        blas::gemm(true, false, mi, ni, b, T(1), t1.data(), mi, t2.data(), ni, T(0), out, ni);
        return;
      }
      // out = g_inv (grads a_inv): the temporary is [m, n] either way.
      t1.resize(static_cast<std::size_t>(mn[i]));
      blas::gemm(false, false, mi, ni, ni, T(1), as<const T>(grads[i]), ni, ai, ni, T(0),
                 t1.data(), ni);
      blas::gemm(false, false, mi, ni, mi, T(1), gi, mi, t1.data(), ni, T(0), out, ni);
    });
  });
}

}  // namespace fedng::cpu
