// pybind11 module fedng._C: raw pointers and sizes in, nothing torch-specific. Typed by
// python/fedng/_C.pyi (tests/test_native_boundary.py holds the two together).
//
// Every op takes keyword arguments only, named as in csrc/include/fedng/ops.h and in the one
// order documented there (dtype, inputs, outputs, sizes, parameters, reports, nthreads): an
// address passed under the wrong name is a TypeError, not doubles written into an int8 buffer.
// Each op releases the GIL while it runs; arguments are converted before it is released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "fedng/blas.h"
#include "fedng/errors.h"
#include "fedng/kfac_step.h"
#include "fedng/ops.h"
#include "fedng/packed_fold.h"
#include "fedng/int8_quantize.h"
#include "fedng/small_spd_inverse.h"
#include "fedng/summable_fold.h"

namespace py = pybind11;
using fedng::DType;
using fedng::Ptrs;
using fedng::Sizes;
using fedng::Status;
using Floats = std::vector<double>;
using Address = std::uintptr_t;

namespace {

DType dtype_of(const char* op, int code) {
  fedng::check_dtype(op, code);
  return static_cast<DType>(code);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fedng native kernels (CPU). Called through fedng.ops, which validates inputs.";
  m.attr("__version__") = FEDNG_VERSION;
  m.attr("cuda_built") = false;
  py::dict dtype_codes;
  dtype_codes["float32"] = static_cast<int>(DType::Float32);
  dtype_codes["float64"] = static_cast<int>(DType::Float64);
  m.attr("dtype_codes") = dtype_codes;
  py::dict status_codes;
  status_codes["OK"] = static_cast<int>(Status::Ok);
  status_codes["JITTER"] = static_cast<int>(Status::Jitter);
  status_codes["FAILED"] = static_cast<int>(Status::Failed);
  m.attr("status_codes") = status_codes;
  m.def("blas_config", [] { return std::string(scipy_openblas_get_config()); },
        "OpenBLAS build configuration string.");
  m.def("blas_num_threads", [] { return scipy_openblas_get_num_threads(); },
        "Threads OpenBLAS is set to use.");
  m.def("small_kernel_isa", [] { return std::string(fedng::cpu::small_kernel_isa()); },
        "Instruction set of the small-matrix kernels chosen for this CPU.");
  m.def("set_avx512_lanes", &fedng::cpu::set_avx512_lanes, py::arg("on"),
        "Lets the lane kernels use AVX-512 (if the CPU has it); returns the previous setting.");
  m.def("gaussian_isa", [] { return std::string(fedng::cpu::gaussian_isa()); },
        "Build of the Gaussian sketch rows in use: 'baseline', 'avx2' or 'avx512'.");
  m.def("set_gaussian_isa",
        [](const std::string& isa) { return std::string(fedng::cpu::set_gaussian_isa(isa.c_str())); },
        py::arg("isa"), "Switches the Gaussian sketch rows' build (same bits); returns the previous.");

  py::call_guard<py::gil_scoped_release> nogil;
  py::kw_only kw;

  m.def(
      "kron_accumulate",
      [](int dtype, const Ptrs& inputs, const Ptrs& factors, const Sizes& n, const Sizes& k,
         double decay, const Floats& scale, int nthreads) {
        fedng::cpu::kron_accumulate(dtype_of("kron_accumulate", dtype), inputs, factors, n, k,
                                    decay, scale, nthreads);
      },
      nogil, kw, py::arg("dtype"), py::arg("inputs"), py::arg("factors"), py::arg("n"),
      py::arg("k"), py::arg("decay"), py::arg("scale"), py::arg("nthreads"),
      "factors[i] <- decay factors[i] + scale[i] inputs[i]^T inputs[i], in place.");
  m.def(
      "damped_cholesky_inverse",
      [](int dtype, const Ptrs& mats, const Ptrs& outs, const Sizes& n, const Floats& damping,
         int max_tries, double jitter_factor, Address status, Address damping_used,
         int nthreads) {
        fedng::cpu::damped_cholesky_inverse(
            dtype_of("damped_cholesky_inverse", dtype), mats, outs, n, damping, max_tries,
            jitter_factor, reinterpret_cast<std::int8_t*>(status),
            reinterpret_cast<double*>(damping_used), nthreads);
      },
      nogil, kw, py::arg("dtype"), py::arg("mats"), py::arg("outs"), py::arg("n"),
      py::arg("damping"), py::arg("max_tries"), py::arg("jitter_factor"), py::arg("status"),
      py::arg("damping_used"), py::arg("nthreads"),
      "outs[i] <- (mats[i] + damping[i] I)^-1; status: int8 [N], damping_used: float64 [N].");
  m.def(
      "kron_precondition",
      [](int dtype, const Ptrs& grads, const Ptrs& a_inv, const Ptrs& g_inv, const Ptrs& inputs,
         const Ptrs& output_grads, const Ptrs& outs, const Sizes& m, const Sizes& n,
         const Sizes& batch, int nthreads) {
        fedng::cpu::kron_precondition(dtype_of("kron_precondition", dtype), grads, a_inv, g_inv,
                                      inputs, output_grads, outs, m, n, batch, nthreads);
      },
      nogil, kw, py::arg("dtype"), py::arg("grads"), py::arg("a_inv"), py::arg("g_inv"),
      py::arg("inputs"), py::arg("output_grads"), py::arg("outs"), py::arg("m"), py::arg("n"),
      py::arg("batch"), py::arg("nthreads"),
      "outs[i] <- g_inv[i] grads[i] a_inv[i] (batch[i] >= 0: from inputs, output_grads).");
  m.def(
      "sketch_accumulate",
      [](int dtype, const Ptrs& jacobians, const Ptrs& omegas, const Ptrs& sketches,
         const Sizes& d, const Sizes& r, const Sizes& b, double decay, const Floats& scale,
         int nthreads) {
        fedng::cpu::sketch_accumulate(dtype_of("sketch_accumulate", dtype), jacobians, omegas,
                                      sketches, d, r, b, decay, scale, nthreads);
      },
      nogil, kw, py::arg("dtype"), py::arg("jacobians"), py::arg("omegas"), py::arg("sketches"),
      py::arg("d"), py::arg("r"), py::arg("b"), py::arg("decay"), py::arg("scale"),
      py::arg("nthreads"),
      "sketches[i] <- decay sketches[i] + scale[i] J^T (J omegas[i]), J = jacobians[i].");
  m.def(
      "nystrom",
      [](int dtype, const Ptrs& sketches, const Ptrs& omegas, const Ptrs& U, const Ptrs& S,
         const Sizes& d, const Sizes& r, const Floats& shift, Address status, Address shift_used,
         int nthreads) {
        fedng::cpu::nystrom(dtype_of("nystrom", dtype), sketches, omegas, U, S, d, r, shift,
                            reinterpret_cast<std::int8_t*>(status),
                            reinterpret_cast<double*>(shift_used), nthreads);
      },
      nogil, kw, py::arg("dtype"), py::arg("sketches"), py::arg("omegas"), py::arg("U"),
      py::arg("S"), py::arg("d"), py::arg("r"), py::arg("shift"), py::arg("status"),
      py::arg("shift_used"), py::arg("nthreads"),
      "U[i], S[i] <- stable Nystrom of sketches[i]; status: int8 [N], shift_used: float64 [N].");
  m.def(
      "lowrank_precondition",
      [](int dtype, const Ptrs& U, const Ptrs& S, const Ptrs& V, const Ptrs& outs,
         const Sizes& d, const Sizes& r, const Sizes& c, const Floats& damping, int nthreads) {
        fedng::cpu::lowrank_precondition(dtype_of("lowrank_precondition", dtype), U, S, V, outs,
                                         d, r, c, damping, nthreads);
      },
      nogil, kw, py::arg("dtype"), py::arg("U"), py::arg("S"), py::arg("V"), py::arg("outs"),
      py::arg("d"), py::arg("r"), py::arg("c"), py::arg("damping"), py::arg("nthreads"),
      "outs[i] <- (U[i] diag(S[i]) U[i]^T + damping[i] I)^-1 V[i].");
  m.def(
      "gaussian_sketch_matrix",
      [](int dtype, Address out, std::int64_t d, std::int64_t r, std::uint64_t seed,
         std::uint64_t stream_id, int nthreads) {
        fedng::cpu::gaussian_sketch_matrix(dtype_of("gaussian_sketch_matrix", dtype), out, d, r,
                                           seed, stream_id, nthreads);
      },
      nogil, kw, py::arg("dtype"), py::arg("out"), py::arg("d"), py::arg("r"), py::arg("seed"),
      py::arg("stream_id"), py::arg("nthreads"),
      "out [d, r] <- the Philox Gaussian matrix of (seed, stream_id).");
  m.def(
      "bf16_axpy",
      [](const Ptrs& xs, const Ptrs& accs, const Sizes& n, double weight) {
        fedng::cpu::bf16_axpy(xs, accs, n, weight);
      },
      nogil, kw, py::arg("xs"), py::arg("accs"), py::arg("n"), py::arg("weight"),
      "accs[k] [n_k] float32 += weight * xs[k] [n_k] bfloat16.");
  m.def(
      "int8_payload_axpy",
      [](Address q, Address side, Address acc, std::int64_t nq, std::int64_t nside,
         std::int64_t nacc, const Sizes& segs, std::int64_t chunk, double weight) {
        fedng::cpu::int8_payload_axpy(reinterpret_cast<const std::int8_t*>(q),
                                      reinterpret_cast<const float*>(side),
                                      reinterpret_cast<float*>(acc), nq, nside, nacc, segs, chunk,
                                      weight);
      },
      nogil, kw, py::arg("q"), py::arg("side"), py::arg("acc"), py::arg("nq"), py::arg("nside"),
      py::arg("nacc"), py::arg("segs"), py::arg("chunk"), py::arg("weight"),
      "acc += weight * (the int8 payload q, side dequantized), segment by segment.");
  m.def(
      "int8_payload_traces",
      [](Address q, Address side, std::int64_t nq, std::int64_t nside, const Sizes& segs,
         std::int64_t chunk) {
        std::vector<double> traces(segs.size() / 6);
        const bool ok = fedng::cpu::int8_payload_traces(reinterpret_cast<const std::int8_t*>(q),
                                                        reinterpret_cast<const float*>(side), nq,
                                                        nside, segs, chunk, traces.data());
        return ok ? traces : std::vector<double>{};
      },
      nogil, kw, py::arg("q"), py::arg("side"), py::arg("nq"), py::arg("nside"), py::arg("segs"),
      py::arg("chunk"),
      "Per int8 segment, the trace of its dequantized matrix; [] if unsettled by the scales.");
  m.def(
      "unpack_triangle",
      [](int dtype, Address vec, Address out, std::int64_t n) {
        fedng::cpu::unpack_triangle(dtype_of("unpack_triangle", dtype), vec, out, n);
      },
      nogil, kw, py::arg("dtype"), py::arg("vec"), py::arg("out"), py::arg("n"),
      "out [n, n] <- the symmetric matrix of the packed lower triangle vec.");
  m.def(
      "int8_quantize_vector",
      [](Address x, Address q, Address scale, std::int64_t n, std::int64_t chunk) {
        fedng::cpu::int8_quantize_vector(reinterpret_cast<const float*>(x),
                                         reinterpret_cast<std::int8_t*>(q),
                                         reinterpret_cast<float*>(scale), n, chunk);
      },
      nogil, kw, py::arg("x"), py::arg("q"), py::arg("scale"), py::arg("n"), py::arg("chunk"),
      "q, scale <- the int8 values of float32 x, one scale per chunk entries.");
  m.def(
      "fold_update",
      [](const Ptrs& xs, const Ptrs& accs, const Sizes& n, const Sizes& bf16, double weight,
         Address q, Address side, Address acc, std::int64_t nq, std::int64_t nside,
         std::int64_t nacc, const Sizes& segs, std::int64_t chunk) {
        fedng::cpu::fold_update(xs, accs, n, bf16, weight, reinterpret_cast<const std::int8_t*>(q),
                                reinterpret_cast<const float*>(side), reinterpret_cast<float*>(acc),
                                nq, nside, nacc, segs, chunk);
      },
      nogil, kw, py::arg("xs"), py::arg("accs"), py::arg("n"), py::arg("bf16"),
      py::arg("weight"), py::arg("q"), py::arg("side"), py::arg("acc"), py::arg("nq"),
      py::arg("nside"), py::arg("nacc"), py::arg("segs"), py::arg("chunk"),
      "accs[k] += weight * xs[k] (float32 or bfloat16), then an int8 payload's fold.");
  m.def(
      "check_fold",
      [](const Ptrs& xs, const Ptrs& accs, const Sizes& n, const Sizes& bf16, double weight,
         double bound, bool first) {
        std::vector<double> sq(xs.size());
        const bool folded =
            fedng::cpu::check_fold(xs, accs, n, bf16, weight, bound, first, sq.data());
        return py::make_tuple(folded, sq);
      },
      kw, py::arg("xs"), py::arg("accs"), py::arg("n"), py::arg("bf16"), py::arg("weight"),
      py::arg("bound"), py::arg("first"),
      "(folded, squared norms): a plain update's norm check, then accs[k] (+)= weight * xs[k].");
  m.def(
      "summable_check_fold",
      [](const Ptrs& xs, const Ptrs& accs, const Sizes& n, const Sizes& bf16, std::int64_t ndelta,
         Address q, Address side, Address acc, std::int64_t nq, std::int64_t nside,
         std::int64_t nacc, const Sizes& segs, std::int64_t chunk, double max_abs,
         const Sizes& pairs, const Floats& divs, const Floats& bounds, double weight,
         double norm_bound) {
        std::vector<double> sq(xs.size()), traces(segs.size() / 6), scales(divs.size());
        double norm = 0.0;
        const int status = fedng::cpu::summable_check_fold(
            xs, accs, n, bf16, ndelta, reinterpret_cast<const std::int8_t*>(q),
            reinterpret_cast<const float*>(side), reinterpret_cast<float*>(acc), nq, nside, nacc,
            segs, chunk, max_abs, pairs, divs, bounds, weight, norm_bound, sq.data(),
            traces.data(), &norm, scales.data());
        return py::make_tuple(status, norm, sq, scales);
      },
      kw, py::arg("xs"), py::arg("accs"), py::arg("n"), py::arg("bf16"), py::arg("ndelta"),
      py::arg("q"), py::arg("side"), py::arg("acc"), py::arg("nq"), py::arg("nside"),
      py::arg("nacc"), py::arg("segs"), py::arg("chunk"), py::arg("max_abs"), py::arg("pairs"),
      py::arg("divs"), py::arg("bounds"), py::arg("weight"), py::arg("norm_bound"),
      "(status, delta norm, squared norms, curvature scales): a summable reply's checks, then its"
      " fold (status 0).");
  m.def(
      "exact_sum",
      [](const std::vector<double>& x) { return fedng::cpu::exact_sum(x.data(), x.size()); },
      kw, py::arg("x"), "The correctly rounded sum of finite doubles (math.fsum).");
  m.def(
      "dots_f64",
      [](const Ptrs& xs, const Ptrs& ys, const Sizes& n) {
        std::vector<double> out(xs.size());
        fedng::cpu::dots_f64(xs, ys, n, out.data());
        return out;
      },
      nogil, kw, py::arg("xs"), py::arg("ys"), py::arg("n"),
      "Per pair of float32 arrays, their dot product in float64.");
  m.def(
      "int8_quantize_triangles",
      [](Address vals, Address q, Address side, std::int64_t nvals, std::int64_t nside,
         const Sizes& tris) {
        fedng::cpu::int8_quantize_triangles(reinterpret_cast<const float*>(vals),
                                            reinterpret_cast<std::int8_t*>(q),
                                            reinterpret_cast<float*>(side), nvals, nside, tris);
      },
      nogil, kw, py::arg("vals"), py::arg("q"), py::arg("side"), py::arg("nvals"),
      py::arg("nside"), py::arg("tris"),
      "q, side <- the int8 triangles of vals with their scales and certified error bounds.");
  m.def(
      "sum_squares",
      [](const Ptrs& xs, const Sizes& n, const Sizes& bf16) {
        std::vector<double> out(xs.size());
        fedng::cpu::sum_squares(xs, n, bf16, out.data());
        return out;
      },
      nogil, kw, py::arg("xs"), py::arg("n"), py::arg("bf16"),
      "Per array, the sum of its squared entries in float64 (float32 or bfloat16 arrays).");
  m.def(
      "kfac_step",
      [](int dtype, const Ptrs& inputs, const Ptrs& output_grads, const Ptrs& grads,
         const Ptrs& a_inv, const Ptrs& g_inv, const Ptrs& probe_u, const Ptrs& probe_v,
         const Ptrs& a_factors, const Ptrs& g_factors, const Ptrs& outs, const Sizes& m,
         const Sizes& n, const Sizes& rows, const Sizes& bias, const Floats& decay,
         const Floats& a_scale, const Floats& g_scale, int update_factors, int precondition,
         int check_finite, Address form, Address sums, int nthreads) {
        fedng::cpu::kfac_step(dtype_of("kfac_step", dtype), inputs, output_grads, grads, a_inv,
                              g_inv, probe_u, probe_v, a_factors, g_factors, outs, m, n, rows,
                              bias, decay, a_scale, g_scale, update_factors, precondition,
                              check_finite, reinterpret_cast<std::int8_t*>(form),
                              reinterpret_cast<double*>(sums), nthreads);
      },
      nogil, kw, py::arg("dtype"), py::arg("inputs"), py::arg("output_grads"), py::arg("grads"),
      py::arg("a_inv"), py::arg("g_inv"), py::arg("probe_u"), py::arg("probe_v"),
      py::arg("a_factors"), py::arg("g_factors"), py::arg("outs"), py::arg("m"), py::arg("n"),
      py::arg("rows"), py::arg("bias"), py::arg("decay"), py::arg("a_scale"), py::arg("g_scale"),
      py::arg("update_factors"), py::arg("precondition"), py::arg("check_finite"), py::arg("form"),
      py::arg("sums"), py::arg("nthreads"),
      "Fused K-FAC step of Linear layers: factor EMA update, then outs[i] <- G^-1 grads[i] A^-1"
      " (batch or dense form; form: int8 [N]; sums: float64 [2N], gradient sums and <out, grad>).");
  m.def(
      "trust_dots",
      [](const Ptrs& params, const Ptrs& theta, const Ptrs& g_old, const Ptrs& grads,
         const Sizes& n) {
        double out[3];
        fedng::cpu::trust_dots(params, theta, g_old, grads, n, out);
        return std::vector<double>(out, out + 3);
      },
      nogil, kw, py::arg("params"), py::arg("theta"), py::arg("g_old"), py::arg("grads"),
      py::arg("n"),
      "The trust region's sums in float64: <g_old, params - theta>, <grads, params - theta>,"
      " <grads, grads> over float32 arrays.");
}
