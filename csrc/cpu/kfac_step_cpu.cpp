#include <cmath>
#include <cstring>
#include <vector>

#include "fedng/blas.h"
#include "fedng/dispatch.h"
#include "fedng/mirror.h"
#include "fedng/kfac_step.h"
#include "fedng/parallel.h"

namespace fedng::cpu {
namespace {

// Whether the batch form is cheaper (the same test as fedng.curvature.kfac.batch_form_cheaper).
bool batch_cheaper(std::int64_t rows, std::int64_t m, std::int64_t n) {
  return rows * (m * m + n * n + m * n) < m * n * (m + n);
}

// F <- decay F (decay 0 overwrites, as BLAS's beta = 0).
template <class T>
T decayed(double decay, T f) {
  return decay == 0.0 ? T(0) : static_cast<T>(decay) * f;
}

// The ones column's products with x [rows, k]: x's column sums (one GEMV), y <- decay y + scale
// 1^T x with y strided by incy.
template <class T>
void bias_products(const T* x, int rows, int k, double decay, double sa, T* y, int incy) {
  thread_local std::vector<T> ones;
  if (ones.size() < std::size_t(rows)) ones.assign(std::size_t(rows), T(1));
  blas::gemv_strided_y(true, rows, k, static_cast<T>(sa), x, k, ones.data(),
                       static_cast<T>(decay), y, incy);
}

// A [n, n] <- decay A + scale [x 1]^T [x 1] with x [rows, k], n = k + bias; G likewise from g.
// SYRKs write the lower triangles; unless lower_only, those are then mirrored onto the upper
// ones (mirror.h). lower_only leaves the upper triangles with older values (the caller mirrors
// them when it needs them, `fedng.curvature.kfac.KFAC`): the inversion reads the lower triangle
// only, and a ~1000-wide factor's mirror costs a sixth to a third of its SYRK.
template <class T>
void update(const T* x, const T* g, T* a, T* gf, int rows, int k, int m, bool bias, double decay,
            double sa, double sg, bool lower_only) {
  const int n = k + (bias ? 1 : 0);
  if (rows == 0) {
    for (std::int64_t e = 0; e < std::int64_t(n) * n; ++e) a[e] = decayed(decay, a[e]);
    for (std::int64_t e = 0; e < std::int64_t(m) * m; ++e) gf[e] = decayed(decay, gf[e]);
    return;
  }
  if (k > 0) {
    blas::syrk_lower_ata(k, rows, static_cast<T>(sa), x, static_cast<T>(decay), a, k, n);
    // the ones column's products with x: x's column sums, into row k
    if (bias) bias_products(x, rows, k, decay, sa, a + std::int64_t(k) * n, 1);
  }
  if (bias)
    a[std::int64_t(k) * n + k] =
        decayed(decay, a[std::int64_t(k) * n + k]) + static_cast<T>(sa * rows);
  if (m > 0) blas::syrk_lower_ata(m, rows, static_cast<T>(sg), g, static_cast<T>(decay), gf);
  if (lower_only) return;
  mirror_lower_to_upper_rows(a, n);
  if (m > 0) mirror_lower_to_upper_rows(gf, m);
}

// sum_e a[e] * b[e] (b null: sum_e a[e]) in double, eight independent sums (a chained sum over a
// [1024, 1025] matrix took milliseconds).
template <class T>
double wide_dot(const T* a, const T* b, std::int64_t count) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const std::int64_t whole = count / 8 * 8;
  for (std::int64_t e = 0; e < whole; e += 8)
    for (int j = 0; j < 8; ++j) part[j] += double(a[e + j]) * (b ? double(b[e + j]) : 1.0);
  double total = 0.0;
  for (std::int64_t e = whole; e < count; ++e) total += double(a[e]) * (b ? double(b[e]) : 1.0);
  for (double p : part) total += p;
  return total;
}

// Whether grads = g^T [x 1], probed with the fixed vectors u [m], v [n].
template <class T>
bool probe_holds(const T* x, const T* g, const T* grad, const T* u, const T* v, int rows, int k,
                 int m, bool bias) {
  const int n = k + (bias ? 1 : 0);
  std::vector<T> gu(static_cast<std::size_t>(rows)), av(static_cast<std::size_t>(rows));
  std::vector<T> grad_v(static_cast<std::size_t>(m));
  blas::gemv(false, rows, m, T(1), g, m, u, T(0), gu.data());
  if (k > 0) blas::gemv(false, rows, k, T(1), x, k, v, T(0), av.data());
  else for (auto& e : av) e = T(0);
  if (bias)
    for (auto& e : av) e += v[k];
  blas::gemv(false, m, n, T(1), grad, n, v, T(0), grad_v.data());
  double lhs = 0.0, rhs = 0.0, mass = 0.0;
  for (int i = 0; i < m; ++i) lhs += double(u[i]) * double(grad_v[i]);
  for (int r = 0; r < rows; ++r) {
    const double p = double(gu[r]) * double(av[r]);
    rhs += p;
    mass += std::abs(p);
  }
  // The norm term only loosens the test: a pass over the gradient only when it is needed.
  if (std::abs(lhs - rhs) <= 1e-5 * mass) return true;
  const double norm = wide_dot(grad, grad, std::int64_t(m) * n);
  return std::abs(lhs - rhs) <= 1e-3 * std::sqrt(norm) + 1e-5 * mass;
}

}  // namespace

void kfac_step(DType dtype, const Ptrs& inputs, const Ptrs& output_grads, const Ptrs& grads,
               const Ptrs& a_inv, const Ptrs& g_inv, const Ptrs& probe_u, const Ptrs& probe_v,
               const Ptrs& a_factors, const Ptrs& g_factors, const Ptrs& outs, const Sizes& m,
               const Sizes& n, const Sizes& rows, const Sizes& bias,
               const std::vector<double>& decay, const std::vector<double>& a_scale,
               const std::vector<double>& g_scale, int update_factors, int precondition,
               int check_finite, std::int8_t* form, double* sums, int nthreads) {
  const char* op = "kfac_step";
  const std::size_t count = outs.size();
  for (auto [name, size] :
       {std::pair{"inputs", inputs.size()}, {"output_grads", output_grads.size()},
        {"grads", grads.size()}, {"a_inv", a_inv.size()}, {"g_inv", g_inv.size()},
        {"probe_u", probe_u.size()}, {"probe_v", probe_v.size()}, {"a_factors", a_factors.size()},
        {"g_factors", g_factors.size()}, {"m", m.size()}, {"n", n.size()}, {"rows", rows.size()},
        {"bias", bias.size()}, {"decay", decay.size()}, {"a_scale", a_scale.size()},
        {"g_scale", g_scale.size()}})
    check_count(op, name, size, count);
  check_sizes(op, "m", m);
  check_sizes(op, "rows", rows);
  if (update_factors < 0 || update_factors > 2) fail(op, "update_factors must be 0, 1 or 2");
  std::vector<double> cost(count);
  for (std::size_t i = 0; i < count; ++i) {
    if (bias[i] != 0 && bias[i] != 1) fail(op, "bias entries must be 0 or 1");
    if (n[i] < bias[i]) fail(op, "n smaller than the bias column");
    const std::int64_t k = n[i] - bias[i];
    for (std::int64_t v : {m[i] * m[i], n[i] * n[i], rows[i] * m[i], rows[i] * k, m[i] * n[i]})
      blas_int(op, v);
    // A layer without grads and outs is the caller's to precondition (update only here).
    const bool own = grads[i] != 0 || outs[i] != 0;
    // A layer with both factor pointers null is the caller's to update (e.g. in bf16).
    const bool upd = update_factors != 0 && (a_factors[i] != 0 || g_factors[i] != 0);
    const bool pre = precondition != 0 && own && m[i] > 0 && n[i] > 0;
    const bool rows_needed = (upd || (pre && batch_cheaper(rows[i], m[i], n[i]))) && rows[i] > 0;
    if (upd && ((a_factors[i] == 0 && n[i] > 0) || (g_factors[i] == 0 && m[i] > 0)))
      fail(op, "a null pointer among the factors");
    if (rows_needed && ((inputs[i] == 0 && k > 0) || (output_grads[i] == 0 && m[i] > 0)))
      fail(op, "a null pointer among the batch rows");
    if (pre && (a_inv[i] == 0 || g_inv[i] == 0 || grads[i] == 0 || outs[i] == 0 ||
                probe_u[i] == 0 || probe_v[i] == 0))
      fail(op, "a null pointer among the preconditioning buffers");
    const double mi = double(m[i]), ni = double(n[i]), bi = double(rows[i]);
    cost[i] = 1.0 + (upd ? bi * (ni * ni + mi * mi) : 0.0) +
              (pre ? 2.0 * mi * ni * (mi + ni) : 0.0);
  }
  dispatch_float(dtype, [&](auto zero) {
    using T = decltype(zero);
    for (std::size_t i = 0; i < count; ++i) {
      form[i] = 0;
      sums[i] = 0.0;
      sums[count + i] = std::nan("");
    }
    if (check_finite != 0) {
      // A step with a non-finite gradient changes nothing (the caller skips it).
      bool finite = true;
      for (std::size_t i = 0; i < count; ++i) {
        if (grads[i] == 0 && outs[i] == 0) continue;  // the caller's layer
        if (m[i] * n[i] > 0 && grads[i] == 0) fail(op, "a null pointer among the grads");
        sums[i] = wide_dot(as<const T>(grads[i]), static_cast<const T*>(nullptr), m[i] * n[i]);
        finite = finite && std::isfinite(sums[i]);
      }
      if (!finite) return;
    }
    run_ragged(cost, nthreads, [&](std::int64_t i) {
      const int mi = static_cast<int>(m[i]), ni = static_cast<int>(n[i]);
      const int b = static_cast<int>(rows[i]);
      const bool has_bias = bias[i] == 1;
      const int k = ni - (has_bias ? 1 : 0);
      const T* x = as<const T>(inputs[i]);
      const T* g = as<const T>(output_grads[i]);
      if (update_factors != 0 && (a_factors[i] != 0 || g_factors[i] != 0))
        update(x, g, as<T>(a_factors[i]), as<T>(g_factors[i]), b, k, mi, has_bias, decay[i],
               a_scale[i], g_scale[i], update_factors == 2);
      if (precondition == 0) return;
      if ((mi == 0 || ni == 0) || (grads[i] == 0 && outs[i] == 0)) {
        sums[count + i] = 0.0;
        return;
      }
      const T* ai = as<const T>(a_inv[i]);
      const T* gi = as<const T>(g_inv[i]);
      const T* grad = as<const T>(grads[i]);
      T* out = as<T>(outs[i]);
      thread_local std::vector<T> t1, t2;
      if (b > 0 && batch_cheaper(b, mi, ni) &&
          probe_holds(x, g, grad, as<const T>(probe_u[i]), as<const T>(probe_v[i]), b, k, mi,
                      has_bias)) {
        // P = g g_inv^T [b, m], Q = [x 1] a_inv [b, n] (the ones column adds a_inv's last row),
        // out = P^T Q.
        t1.resize(std::size_t(b) * mi);
        t2.resize(std::size_t(b) * ni);
        blas::gemm(false, true, b, mi, mi, T(1), g, mi, gi, mi, T(0), t1.data(), mi);
        if (k > 0) blas::gemm(false, false, b, ni, k, T(1), x, k, ai, ni, T(0), t2.data(), ni);
        else for (auto& e : t2) e = T(0);
        if (has_bias)
          for (int r = 0; r < b; ++r)
            for (int j = 0; j < ni; ++j) t2[std::size_t(r) * ni + j] += ai[std::int64_t(k) * ni + j];
        blas::gemm(true, false, mi, ni, b, T(1), t1.data(), mi, t2.data(), ni, T(0), out, ni);
        form[i] = 2;
        sums[count + i] = wide_dot(static_cast<const T*>(out), grad, std::int64_t(mi) * ni);
        return;
      }
      t1.resize(std::size_t(mi) * ni);
      blas::gemm(false, false, mi, ni, ni, T(1), grad, ni, ai, ni, T(0), t1.data(), ni);
      blas::gemm(false, false, mi, ni, mi, T(1), gi, mi, t1.data(), ni, T(0), out, ni);
      form[i] = 1;
      sums[count + i] = wide_dot(static_cast<const T*>(out), grad, std::int64_t(mi) * ni);
    });
  });
}

void trust_dots(const Ptrs& params, const Ptrs& theta, const Ptrs& g_old, const Ptrs& grads,
                const Sizes& n, double* out) {
  const char* op = "trust_dots";
  const std::size_t count = params.size();
  for (auto [name, size] : {std::pair{"theta", theta.size()}, {"g_old", g_old.size()},
                            {"grads", grads.size()}, {"n", n.size()}})
    check_count(op, name, size, count);
  check_sizes(op, "n", n);
  for (auto [name, ptrs] : {std::pair{"params", &params}, {"theta", &theta}, {"g_old", &g_old},
                            {"grads", &grads}})
    check_ptrs(op, name, *ptrs, n);
  double before[4] = {0, 0, 0, 0}, after[4] = {0, 0, 0, 0}, energy[4] = {0, 0, 0, 0};
  for (std::size_t i = 0; i < count; ++i) {
    const float* p = as<const float>(params[i]);
    const float* t = as<const float>(theta[i]);
    const float* o = as<const float>(g_old[i]);
    const float* g = as<const float>(grads[i]);
    const std::int64_t whole = n[i] / 4 * 4;
    for (std::int64_t e = 0; e < whole; e += 4)
      for (int j = 0; j < 4; ++j) {
        const double d = double(p[e + j] - t[e + j]);  // the float32 step, as torch's sub
        const double gj = double(g[e + j]);
        before[j] += double(o[e + j]) * d;
        after[j] += gj * d;
        energy[j] += gj * gj;
      }
    for (std::int64_t e = whole; e < n[i]; ++e) {
      const double d = double(p[e] - t[e]);
      const double ge = double(g[e]);
      before[0] += double(o[e]) * d;
      after[0] += ge * d;
      energy[0] += ge * ge;
    }
  }
  out[0] = (before[0] + before[1]) + (before[2] + before[3]);
  out[1] = (after[0] + after[1]) + (after[2] + after[3]);
  out[2] = (energy[0] + energy[1]) + (energy[2] + energy[3]);
}

}  // namespace fedng::cpu
