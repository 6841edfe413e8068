// The fused K-FAC step of NaturalGradient's common case (Linear layers): factor update and
// preconditioning of every layer in one native call, the bias column folded without a copy.
#pragma once
#include <cstdint>
#include <vector>

#include "fedng/tensor_ref.h"

namespace fedng::cpu {

// Per layer i (m_i outputs, n_i = k_i + bias_i columns, rows_i batch rows):
//   inputs_i [rows_i, k_i] (the layer inputs, no ones column), output_grads_i [rows_i, m_i];
//   update (update_factors != 0): A_i <- decay_i A_i + a_scale_i [x 1]^T [x 1],
//                              G_i <- decay_i G_i + g_scale_i g^T g  (decay 0 overwrites;
//                              update_factors 2: the lower triangles only, the upper ones are
//                              left as they were);
//   then precondition (precondition != 0): outs_i [m_i, n_i] = g_inv_i grads_i a_inv_i, by the batch
//   form (g g_inv)^T ([x 1] a_inv) when rows (m^2+n^2+mn) < m n (m+n) and the probe check
//   |u^T grads v - (g u).([x 1] v)| <= 1e-3 |grads| + 1e-5 sum|(g u)*([x 1] v)| holds
//   (probe_u_i [m_i], probe_v_i [n_i]), else by the dense form. form_i (int8): 0 untouched,
//   1 dense, 2 batch. sums [2N] (float64): sum(grads_i) when check_finite (then a non-finite one
//   stops the call before any update: the caller skips the step), and <outs_i, grads_i> of the
//   preconditioned layers (NaN otherwise). A layer whose grads_i and outs_i are both null is
//   update-only (the caller preconditions it from its rows): no sum, no output, dot 0. A layer
//   whose a_factors_i and g_factors_i are both null is not updated (the caller updates it).
void kfac_step(DType dtype, const Ptrs& inputs, const Ptrs& output_grads, const Ptrs& grads,
               const Ptrs& a_inv, const Ptrs& g_inv, const Ptrs& probe_u, const Ptrs& probe_v,
               const Ptrs& a_factors, const Ptrs& g_factors, const Ptrs& outs, const Sizes& m,
               const Sizes& n, const Sizes& rows, const Sizes& bias,
               const std::vector<double>& decay, const std::vector<double>& a_scale,
               const std::vector<double>& g_scale, int update_factors, int precondition,
               int check_finite, std::int8_t* form, double* sums, int nthreads);

// The trust region's three sums of a step, products and sums in float64, over N float32 arrays
// of n_i entries: out[0] = sum <g_old_i, params_i - theta_i>, out[1] = sum <grads_i, params_i -
// theta_i> (each difference rounded to float32 first), out[2] = sum <grads_i, grads_i>.
void trust_dots(const Ptrs& params, const Ptrs& theta, const Ptrs& g_old, const Ptrs& grads,
                const Sizes& n, double* out);

}  // namespace fedng::cpu
