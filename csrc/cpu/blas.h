// The Fortran BLAS/LAPACK entry points that torch's CPU library exports (MKL or OpenBLAS builds), for code
// that works on one small matrix per thread: ATen ops cost microseconds of dispatch each, which at n <= 128
// is as much as their arithmetic. The symbols are weak: a torch built without them leaves them null, and
// blas::available() sends the caller to its ATen path instead of failing to load the extension.
#pragma once

#include <vector>

extern "C" {
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info) __attribute__((weak));
void dtrsm_(const char* side, const char* uplo, const char* ta, const char* diag, const int* m, const int* n,
            const double* alpha, const double* a, const int* lda, double* b, const int* ldb)
    __attribute__((weak));
void dsyevd_(const char* jobz, const char* uplo, const int* n, double* a, const int* lda, double* w, double* work,
             const int* lwork, int* iwork, const int* liwork, int* info) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));  // MKL builds only (C interface)
}

namespace trp {
namespace blas {

inline bool available() { return dgemm_ && sgemm_ && dpotrf_ && dtrsm_ && dsyevd_; }

// Single-threaded BLAS on this thread while it lives. torch turns MKL's dynamic threading off, so an MKL call
// inside a parallel region would start its own team on every core (measured: 1.5x slower at 2 threads).
class SequentialScope {
 public:
  SequentialScope() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SequentialScope() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }
  SequentialScope(const SequentialScope&) = delete;
  SequentialScope& operator=(const SequentialScope&) = delete;

 private:
  int prev_;
};

// Column-major C = A' B' (' = transpose when the flag is 'T'), C m x n, beta = 0.
inline void gemm(char ta, char tb, int m, int n, int k, const double* a, int lda, const double* b, int ldb,
                 double* c, int ldc) {
  const double one = 1.0, zero = 0.0;
  dgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &zero, c, &ldc);
}
inline void gemm(char ta, char tb, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                 float* c, int ldc) {
  const float one = 1.0f, zero = 0.0f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, a, &lda, b, &ldb, &zero, c, &ldc);
}

// Cholesky factor, upper: a = U^T U in place; LAPACK's info (0: done).
inline int potrf_upper(int n, double* a, int lda) {
  int info = 0;
  const char uplo = 'U';
  dpotrf_(&uplo, &n, a, &lda, &info);
  return info;
}

// b (m x n) := b U^-1, U upper triangular n x n.
inline void trsm_right_upper(int m, int n, const double* u, int ldu, double* b, int ldb) {
  const char side = 'R', uplo = 'U', ta = 'N', diag = 'N';
  const double one = 1.0;
  dtrsm_(&side, &uplo, &ta, &diag, &m, &n, &one, u, &ldu, b, &ldb);
}

// Symmetric eigensolve in place: a (n x n) -> eigenvectors as columns, w ascending; LAPACK's info.
inline int syevd(int n, double* a, int lda, double* w) {
  const char jobz = 'V', uplo = 'U';
  const int lwork = 1 + 6 * n + 2 * n * n, liwork = 3 + 5 * n;
  std::vector<double> work(lwork);
  std::vector<int> iwork(liwork);
  int info = 0;
  dsyevd_(&jobz, &uplo, &n, a, &lda, w, work.data(), &lwork, iwork.data(), &liwork, &info);
  return info;
}

}  // namespace blas
}  // namespace trp
