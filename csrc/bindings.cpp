// pybind11 module fedng._C: raw pointers and sizes in, nothing torch-specific. Each op releases
// the GIL while it runs. Arguments are converted before the GIL is released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "fedng/blas.h"
#include "fedng/errors.h"
#include "fedng/ops.h"
#include "fedng/small_spd_inverse.h"

namespace py = pybind11;
using fedng::DType;
using fedng::Ptrs;
using fedng::Sizes;

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
  m.def("blas_config", [] { return std::string(scipy_openblas_get_config()); },
        "OpenBLAS build configuration string.");
  m.def("blas_num_threads", [] { return scipy_openblas_get_num_threads(); });
  m.def("small_kernel_isa", [] { return std::string(fedng::cpu::small_kernel_isa()); },
        "Instruction set of the small-matrix kernels chosen for this CPU.");
  py::call_guard<py::gil_scoped_release> nogil;

  m.def(
      "kron_accumulate",
      [](int code, const Ptrs& f, const Ptrs& x, const Sizes& n, const Sizes& k, double decay,
         const std::vector<double>& scale, int nthreads) {
        fedng::cpu::kron_accumulate(dtype_of("kron_accumulate", code), f, x, n, k, decay, scale,
                                    nthreads);
      },
      nogil);
  m.def(
      "damped_cholesky_inverse",
      [](int code, const Ptrs& mats, const Ptrs& outs, const Sizes& n,
         const std::vector<double>& damping, int max_tries, double jitter, std::uintptr_t status,
         std::uintptr_t used, int nthreads) {
        fedng::cpu::damped_cholesky_inverse(
            dtype_of("damped_cholesky_inverse", code), mats, outs, n, damping, max_tries, jitter,
            reinterpret_cast<std::int8_t*>(status), reinterpret_cast<double*>(used), nthreads);
      },
      nogil);
  m.def(
      "kron_precondition",
      [](int code, const Ptrs& grads, const Ptrs& a_inv, const Ptrs& g_inv, const Ptrs& inputs,
         const Ptrs& output_grads, const Sizes& batch, const Ptrs& outs, const Sizes& mm,
         const Sizes& nn, int nthreads) {
        fedng::cpu::kron_precondition(dtype_of("kron_precondition", code), grads, a_inv, g_inv,
                                      inputs, output_grads, batch, outs, mm, nn, nthreads);
      },
      nogil);
  m.def(
      "sketch_accumulate",
      [](int code, const Ptrs& y, const Ptrs& j, const Ptrs& om, const Sizes& d, const Sizes& r,
         const Sizes& b, double decay, const std::vector<double>& scale, int nthreads) {
        fedng::cpu::sketch_accumulate(dtype_of("sketch_accumulate", code), y, j, om, d, r, b,
                                      decay, scale, nthreads);
      },
      nogil);
  m.def(
      "nystrom",
      [](int code, const Ptrs& y, const Ptrs& om, const Ptrs& u, const Ptrs& s, const Sizes& d,
         const Sizes& r, const std::vector<double>& shift, std::uintptr_t used,
         std::uintptr_t status, int nthreads) {
        fedng::cpu::nystrom(dtype_of("nystrom", code), y, om, u, s, d, r, shift,
                            reinterpret_cast<double*>(used), reinterpret_cast<std::int8_t*>(status),
                            nthreads);
      },
      nogil);
  m.def(
      "lowrank_precondition",
      [](int code, const Ptrs& u, const Ptrs& s, const Ptrs& v, const Ptrs& out, const Sizes& d,
         const Sizes& r, const Sizes& c, const std::vector<double>& damping, int nthreads) {
        fedng::cpu::lowrank_precondition(dtype_of("lowrank_precondition", code), u, s, v, out, d,
                                         r, c, damping, nthreads);
      },
      nogil);
  m.def(
      "gaussian_sketch_matrix",
      [](int code, std::uintptr_t out, std::int64_t d, std::int64_t r, std::uint64_t seed,
         std::uint64_t stream, int nthreads) {
        fedng::cpu::gaussian_sketch_matrix(dtype_of("gaussian_sketch_matrix", code), out, d, r,
                                           seed, stream, nthreads);
      },
      nogil);
}
