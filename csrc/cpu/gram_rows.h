// The float64 Gram matrix of a matrix's rows, M = A A^T, the lower triangle only (mirrored), for the
// one-matrix-per-thread CPU path. torch's CPU library exports dgemm but not dsyrk, and a GEMM computes both
// triangles: twice the flops of what is needed. This kernel computes each entry once, as a float64 dot
// product of two rows read straight from the input (float32 rows are widened on the fly, so no float64 copy
// of the matrix is made), in 2 x 4 tiles of dot products that keep eight AVX2 accumulators busy (measured:
// README, "Warm start", the settled ResNet-56 step). Other CPUs (no AVX2/FMA, or not x86) take the GEMM.
#pragma once

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define TRP_GRAM_AVX2 1
#endif

namespace trp {
namespace gram {

#ifdef TRP_GRAM_AVX2

__attribute__((target("avx2,fma"))) inline __m256d load4(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
__attribute__((target("avx2,fma"))) inline __m256d load4(const double* p) { return _mm256_loadu_pd(p); }

__attribute__((target("avx2,fma"))) inline double hsum(__m256d v) {
  const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

// dots[r][c] = row (i0 + r) . row (j0 + c), rows of length L, row stride ld.
template <int R, int C, typename In>
__attribute__((target("avx2,fma"))) void tile(const In* a, int ld, int L, int i0, int j0, double dots[2][4]) {
  __m256d acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_pd();
  int k = 0;
  for (; k + 4 <= L; k += 4) {
    __m256d x[R], y[C];
    for (int r = 0; r < R; ++r) x[r] = load4(a + size_t(i0 + r) * ld + k);
    for (int c = 0; c < C; ++c) y[c] = load4(a + size_t(j0 + c) * ld + k);
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_pd(x[r], y[c], acc[r][c]);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      double s = hsum(acc[r][c]);
      for (int t = k; t < L; ++t) s += double(a[size_t(i0 + r) * ld + t]) * double(a[size_t(j0 + c) * ld + t]);
      dots[r][c] = s;
    }
}

template <int R, typename In>
__attribute__((target("avx2,fma"))) void tile_cols(int C, const In* a, int ld, int L, int i0, int j0,
                                                   double dots[2][4]) {
  switch (C) {
    case 4: tile<R, 4>(a, ld, L, i0, j0, dots); break;
    case 3: tile<R, 3>(a, ld, L, i0, j0, dots); break;
    case 2: tile<R, 2>(a, ld, L, i0, j0, dots); break;
    default: tile<R, 1>(a, ld, L, i0, j0, dots); break;
  }
}

// M (n x n, exactly symmetric) = A A^T for the n rows of A (length L, row stride ld).
template <typename In>
__attribute__((target("avx2,fma"))) void rows_avx2(const In* a, int n, int L, int ld, double* M) {
  double dots[2][4];
  for (int i0 = 0; i0 < n; i0 += 2) {
    const int R = std::min(2, n - i0);
    for (int j0 = 0; j0 < i0 + R; j0 += 4) {  // up to the diagonal
      const int C = std::min(4, i0 + R - j0);
      if (R == 2)
        tile_cols<2>(C, a, ld, L, i0, j0, dots);
      else
        tile_cols<1>(C, a, ld, L, i0, j0, dots);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C && j0 + c <= i0 + r; ++c)
          M[size_t(i0 + r) * n + (j0 + c)] = M[size_t(j0 + c) * n + (i0 + r)] = dots[r][c];
    }
  }
}

inline bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

#else

inline bool has_avx2() { return false; }
template <typename In>
void rows_avx2(const In*, int, int, int, double*) {}

#endif

// Whether rows(...) runs here (else the caller takes the GEMM on a float64 copy).
inline bool available() { return has_avx2(); }

// M (n x n, exactly symmetric) = A A^T for the n rows of A (length L, row stride ld); needs available().
template <typename In>
void rows(const In* a, int n, int L, int ld, double* M) {
  rows_avx2(a, n, L, ld, M);
}

}  // namespace gram
}  // namespace trp
