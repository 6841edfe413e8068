// The native ops, on raw row-major buffers. One name per op across C++, bindings and Python.
// All sizes are validated in Python first; these re-check only what could corrupt memory.
//
// One parameter order for every op, here, in the bindings (same names, keyword-only) and in
// python/fedng/_C.pyi:
//   dtype, buffers only read, buffers written (outputs and in-place updates), sizes,
//   parameters, per-matrix reports (int8 `status`, then float64 `<parameter>_used`), nthreads.
#pragma once
#include <cstdint>

#include "fedng/tensor_ref.h"

namespace fedng::cpu {

// F_i <- decay F_i + scale_i X_i^T X_i; F_i [n_i, n_i], X_i [k_i, n_i].
void kron_accumulate(DType dtype, const Ptrs& inputs, const Ptrs& factors, const Sizes& n,
                     const Sizes& k, double decay, const std::vector<double>& scale, int nthreads);

// out_i = (M_i + lambda_i I)^-1 (lower triangle of M_i read); status_i a Status (Jitter: the
// damping was escalated); damping_used_i the lambda that worked (NaN if failed).
void damped_cholesky_inverse(DType dtype, const Ptrs& mats, const Ptrs& outs, const Sizes& n,
                             const std::vector<double>& damping, int max_tries,
                             double jitter_factor, std::int8_t* status, double* damping_used,
                             int nthreads);

// out_i [m_i, n_i] = g_inv_i grads_i a_inv_i, or (Gb_i g_inv_i)^T (Ab_i a_inv_i) when the batch
// factors (inputs Ab [B_i, n_i], output_grads Gb [B_i, m_i]; batch_i >= 0) are given and cheaper.
void kron_precondition(DType dtype, const Ptrs& grads, const Ptrs& a_inv, const Ptrs& g_inv,
                       const Ptrs& inputs, const Ptrs& output_grads, const Ptrs& outs,
                       const Sizes& m, const Sizes& n, const Sizes& batch, int nthreads);

// Y_i <- decay Y_i + scale_i J_i^T (J_i Omega_i); Y_i, Omega_i [d_i, r_i], J_i [b_i, d_i].
void sketch_accumulate(DType dtype, const Ptrs& jacobians, const Ptrs& omegas,
                       const Ptrs& sketches, const Sizes& d, const Sizes& r, const Sizes& b,
                       double decay, const std::vector<double>& scale, int nthreads);

// Stable Nystrom: U_i [d_i, r_i], S_i [r_i] from Y_i = F_i Omega_i; shift_i < 0 means automatic.
// status_i = Status::Failed (shift_used_i NaN) when the sketch is not finite or not of a PSD
// matrix, else Status::Ok.
void nystrom(DType dtype, const Ptrs& sketches, const Ptrs& omegas, const Ptrs& U, const Ptrs& S,
             const Sizes& d, const Sizes& r, const std::vector<double>& shift,
             std::int8_t* status, double* shift_used, int nthreads);

// out_i = (U_i diag(S_i) U_i^T + lambda_i I)^-1 V_i; U_i [d_i, r_i], V_i [d_i, c_i].
void lowrank_precondition(DType dtype, const Ptrs& U, const Ptrs& S, const Ptrs& V,
                          const Ptrs& outs, const Sizes& d, const Sizes& r, const Sizes& c,
                          const std::vector<double>& damping, int nthreads);

// out [d, r] with entry (i, j) = rng::gaussian_entry(seed, stream_id, i, j).
void gaussian_sketch_matrix(DType dtype, std::uintptr_t out, std::int64_t d, std::int64_t r,
                            std::uint64_t seed, std::uint64_t stream_id, int nthreads);

// Which build of the Gaussian rows runs: "baseline", "avx2" or "avx512" (the widest the CPU
// runs, or avx2 with FEDNG_NO_AVX512=1 at load). Every build gives the same bits.
const char* gaussian_isa();
// Switches the build (for tests: not thread-safe against a running call); returns the previous.
const char* set_gaussian_isa(const char* name);

}  // namespace fedng::cpu
