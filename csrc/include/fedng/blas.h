// The BLAS/LAPACK routines fedng uses, from scipy-openblas32 (symbols carry a `scipy_` prefix).
// Declared here rather than via cblas.h so the prefix is explicit. LAPACK is column-major: a
// row-major symmetric matrix's lower triangle is the column-major upper triangle ('U').
#pragma once
#include <cstddef>
#include <cstdint>

extern "C" {
enum FedngCblasOrder { FedngRowMajor = 101 };
enum FedngCblasTrans { FedngNoTrans = 111, FedngTrans = 112 };
enum FedngCblasUplo { FedngUpper = 121, FedngLower = 122 };
enum FedngCblasSide { FedngLeft = 141, FedngRight = 142 };
enum FedngCblasDiag { FedngNonUnit = 131 };

void scipy_cblas_sgemm(int, int, int, int, int, int, float, const float*, int, const float*, int,
                       float, float*, int);
void scipy_cblas_dgemm(int, int, int, int, int, int, double, const double*, int, const double*,
                       int, double, double*, int);
void scipy_cblas_sgemmt(int, int, int, int, int, int, float, const float*, int, const float*, int,
                        float, float*, int);
void scipy_cblas_dgemmt(int, int, int, int, int, int, double, const double*, int, const double*,
                        int, double, double*, int);
void scipy_cblas_sgemv(int, int, int, int, float, const float*, int, const float*, int, float,
                       float*, int);
void scipy_cblas_dgemv(int, int, int, int, double, const double*, int, const double*, int, double,
                       double*, int);
void scipy_cblas_ssyrk(int, int, int, int, int, float, const float*, int, float, float*, int);
void scipy_cblas_dsyrk(int, int, int, int, int, double, const double*, int, double, double*, int);
void scipy_cblas_strsm(int, int, int, int, int, int, int, float, const float*, int, float*, int);
void scipy_cblas_dtrsm(int, int, int, int, int, int, int, double, const double*, int, double*, int);

void scipy_spotrf_(const char*, const int*, float*, const int*, int*, std::size_t);
void scipy_dpotrf_(const char*, const int*, double*, const int*, int*, std::size_t);
void scipy_spotri_(const char*, const int*, float*, const int*, int*, std::size_t);
void scipy_dpotri_(const char*, const int*, double*, const int*, int*, std::size_t);
void scipy_sgesvd_(const char*, const char*, const int*, const int*, float*, const int*, float*,
                   float*, const int*, float*, const int*, float*, const int*, int*, std::size_t,
                   std::size_t);
void scipy_dgesvd_(const char*, const char*, const int*, const int*, double*, const int*, double*,
                   double*, const int*, double*, const int*, double*, const int*, int*,
                   std::size_t, std::size_t);

void scipy_openblas_set_num_threads(int);
int scipy_openblas_get_num_threads(void);
char* scipy_openblas_get_config(void);
}

namespace fedng::blas {

// Row-major C = alpha * op(A) op(B) + beta * C.
inline void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc) {
  scipy_cblas_sgemm(FedngRowMajor, ta ? FedngTrans : FedngNoTrans, tb ? FedngTrans : FedngNoTrans,
                    m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc) {
  scipy_cblas_dgemm(FedngRowMajor, ta ? FedngTrans : FedngNoTrans, tb ? FedngTrans : FedngNoTrans,
                    m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
// Row-major lower triangle of C [n, n] = alpha * op(A) op(B) + beta * C (inner dimension k).
inline void gemmt_lower(bool ta, bool tb, int n, int k, float alpha, const float* a, int lda,
                        const float* b, int ldb, float beta, float* c, int ldc) {
  scipy_cblas_sgemmt(FedngRowMajor, FedngLower, ta ? FedngTrans : FedngNoTrans,
                     tb ? FedngTrans : FedngNoTrans, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void gemmt_lower(bool ta, bool tb, int n, int k, double alpha, const double* a, int lda,
                        const double* b, int ldb, double beta, double* c, int ldc) {
  scipy_cblas_dgemmt(FedngRowMajor, FedngLower, ta ? FedngTrans : FedngNoTrans,
                     tb ? FedngTrans : FedngNoTrans, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
// Row-major y = alpha * op(A) x + beta * y, A [m, n] (leading dimension lda), unit strides.
inline void gemv(bool ta, int m, int n, float alpha, const float* a, int lda, const float* x,
                 float beta, float* y) {
  scipy_cblas_sgemv(FedngRowMajor, ta ? FedngTrans : FedngNoTrans, m, n, alpha, a, lda, x, 1,
                    beta, y, 1);
}
inline void gemv(bool ta, int m, int n, double alpha, const double* a, int lda, const double* x,
                 double beta, double* y) {
  scipy_cblas_dgemv(FedngRowMajor, ta ? FedngTrans : FedngNoTrans, m, n, alpha, a, lda, x, 1,
                    beta, y, 1);
}
// gemv with y strided by incy (e.g. a column of a row-major matrix).
inline void gemv_strided_y(bool ta, int m, int n, float alpha, const float* a, int lda,
                           const float* x, float beta, float* y, int incy) {
  scipy_cblas_sgemv(FedngRowMajor, ta ? FedngTrans : FedngNoTrans, m, n, alpha, a, lda, x, 1,
                    beta, y, incy);
}
inline void gemv_strided_y(bool ta, int m, int n, double alpha, const double* a, int lda,
                           const double* x, double beta, double* y, int incy) {
  scipy_cblas_dgemv(FedngRowMajor, ta ? FedngTrans : FedngNoTrans, m, n, alpha, a, lda, x, 1,
                    beta, y, incy);
}
// Row-major lower triangle of C [n, n] (leading dimension ldc) = alpha * A^T A + beta * C,
// A [k, n] (leading dimension lda); the upper triangle is not touched.
inline void syrk_lower_ata(int n, int k, float alpha, const float* a, float beta, float* c,
                           int lda = 0, int ldc = 0) {
  scipy_cblas_ssyrk(FedngRowMajor, FedngLower, FedngTrans, n, k, alpha, a, lda ? lda : n, beta, c,
                    ldc ? ldc : n);
}
inline void syrk_lower_ata(int n, int k, double alpha, const double* a, double beta, double* c,
                           int lda = 0, int ldc = 0) {
  scipy_cblas_dsyrk(FedngRowMajor, FedngLower, FedngTrans, n, k, alpha, a, lda ? lda : n, beta, c,
                    ldc ? ldc : n);
}
// Row-major B [m, n] <- B L^-1 with L [n, n] lower triangular (leading dimensions ldl, ldb).
inline void trsm_right_lower(int m, int n, const float* l, int ldl, float* b, int ldb) {
  scipy_cblas_strsm(FedngRowMajor, FedngRight, FedngLower, FedngNoTrans, FedngNonUnit, m, n, 1.0f,
                    l, ldl, b, ldb);
}
inline void trsm_right_lower(int m, int n, const double* l, int ldl, double* b, int ldb) {
  scipy_cblas_dtrsm(FedngRowMajor, FedngRight, FedngLower, FedngNoTrans, FedngNonUnit, m, n, 1.0,
                    l, ldl, b, ldb);
}
// Row-major B [m, n] <- B L^-T with L [n, n] lower triangular.
inline void trsm_right_lower_trans(int m, int n, const float* l, float* b) {
  scipy_cblas_strsm(FedngRowMajor, FedngRight, FedngLower, FedngTrans, FedngNonUnit, m, n, 1.0f,
                    l, n, b, n);
}
inline void trsm_right_lower_trans(int m, int n, const double* l, double* b) {
  scipy_cblas_dtrsm(FedngRowMajor, FedngRight, FedngLower, FedngTrans, FedngNonUnit, m, n, 1.0,
                    l, n, b, n);
}
// Column-major Cholesky / inverse from Cholesky, upper triangle ('U'), i.e. the row-major lower
// triangle: potrf leaves L with A = L L^T there, potri then A^-1's lower triangle.
inline int potrf_upper(int n, float* a, int lda = 0) {
  int info = 0;
  lda = lda ? lda : n;
  scipy_spotrf_("U", &n, a, &lda, &info, 1);
  return info;
}
inline int potrf_upper(int n, double* a, int lda = 0) {
  int info = 0;
  lda = lda ? lda : n;
  scipy_dpotrf_("U", &n, a, &lda, &info, 1);
  return info;
}
inline int potri_upper(int n, float* a, int lda = 0) {
  int info = 0;
  lda = lda ? lda : n;
  scipy_spotri_("U", &n, a, &lda, &info, 1);
  return info;
}
inline int potri_upper(int n, double* a, int lda = 0) {
  int info = 0;
  lda = lda ? lda : n;
  scipy_dpotri_("U", &n, a, &lda, &info, 1);
  return info;
}
// Column-major SVD with thin factors ('S'); lwork = -1 queries the workspace size.
inline int gesvd(int m, int n, float* a, float* s, float* u, int ldu, float* vt, int ldvt,
                 float* work, int lwork) {
  int info = 0;
  scipy_sgesvd_("S", "S", &m, &n, a, &m, s, u, &ldu, vt, &ldvt, work, &lwork, &info, 1, 1);
  return info;
}
inline int gesvd(int m, int n, double* a, double* s, double* u, int ldu, double* vt, int ldvt,
                 double* work, int lwork) {
  int info = 0;
  scipy_dgesvd_("S", "S", &m, &n, a, &m, s, u, &ldu, vt, &ldvt, work, &lwork, &info, 1, 1);
  return info;
}

}  // namespace fedng::blas
