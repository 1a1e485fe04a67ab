// The projection on the CPU one matrix per thread (n <= kCpuPerMatrixMaxN): the full solve (as
// csrc/common/lowrank_driver.h) and the warm-started step (as csrc/common/warm_driver.h, specification
// trp_kernels/warm.py), the same steps fused per matrix with direct BLAS/LAPACK calls on thread-local
// scratch. At n <= 128 the batched drivers' dozens of ATen ops per group (dispatch, temporaries, batched
// LAPACK setup, layout copies) cost several times their arithmetic; here what remains is the float64 Gram
// matrix (one triangle: csrc/cpu/gram_rows.h), the eigensolve and the projection GEMMs. Column-major throughout (a row-major [p, q] matrix is a
// column-major q x p one).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "common/lowrank_driver.h"
#include "common/warm_certify.h"
#include "common/warm_driver.h"
#include "cpu/blas.h"
#include "cpu/gram_rows.h"

namespace trp {

// Up to this Gram size the CPU runs one matrix per thread (direct BLAS/LAPACK, the Gram kernel of the rows);
// above it one batched ATen call per step lets MKL thread each large product. Measured on the 2-core build
// machine with the ResNet-50 groups (`benchmarks/lowrank_table.py --part paths`): one matrix per thread is
// faster at n = 64-768 for the full solve and the warm step; at n = 1536 the batched full solve is faster,
// the warm step still slower batched (its products are m columns wide, which MKL threads less well).
constexpr int64_t kCpuPerMatrixMaxN = 1024;
constexpr int64_t kCpuWarmPerMatrixMaxN = 1536;  // the warm step: up to the largest size measured
// The in-place op (project_inplace.cpp) runs a TRP run's steps, warm but for its first call and the rare
// fallback, one matrix per thread with all groups' matrices shared out by cost (no group of 3 on 2 threads
// waiting for its third): up to the warm step's limit.
constexpr int64_t kCpuInplaceMaxN = kCpuWarmPerMatrixMaxN;

struct WarmOneOut {
  int64_t rank = 0;
  bool ok = false;
};

// a (n x n) := (a + a^T) / 2, exactly symmetric for LAPACK's eigensolver, as the batched drivers do.
inline void symmetrize(double* a, int n) {
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < i; ++j) {
      const double s = 0.5 * (a[size_t(j) * n + i] + a[size_t(i) * n + j]);
      a[size_t(j) * n + i] = a[size_t(i) * n + j] = s;
    }
}

// Whether gram_one needs the matrix in float64 (a64): not when the rows' Gram kernel takes it as it is.
inline bool gram_needs_float64(int p, int q) { return !(p <= q && gram::available()); }

// The float64 Gram matrix of the smaller side into M (n x n, exactly symmetric); returns its trace.
// a: row-major p x q; a64: the same in float64 (used, and then needed, only when gram_needs_float64).
template <typename Real>
double gram_one(const Real* a, const double* a64, int p, int q, double* M) {
  const bool left = p <= q;
  const int n = left ? p : q;
  if (!gram_needs_float64(p, q)) {
    gram::rows(a, n, q, q, M);  // A A^T: dot products of rows, the lower triangle only
  } else {
    // A A^T = Ac^T Ac (left) or A^T A = Ac Ac^T, Ac = the column-major q x p
    if (left)
      blas::gemm('T', 'N', n, n, q, a64, q, a64, q, M, n);
    else
      blas::gemm('N', 'T', n, n, p, a64, q, a64, q, M, n);
    symmetrize(M, n);
  }
  double trace = 0.0;
  for (int i = 0; i < n; ++i) trace += M[size_t(i) * n + i];
  return trace;
}

// a64 for gram_one: a itself in float64, else its float64 copy in `scratch` when the Gram matrix needs it
// (null when not).
template <typename Real>
const double* float64_view(const Real* a, int p, int q, std::vector<double>& scratch) {
  if constexpr (std::is_same_v<Real, double>) {
    return a;
  } else {
    if (!gram_needs_float64(p, q)) return nullptr;
    scratch.resize(size_t(p) * q);
    std::copy_n(a, size_t(p) * q, scratch.data());
    return scratch.data();
  }
}

// T (m x m, exactly symmetric) = Y^T Y for the column-major n x m Y: its columns are the rows of the row-major
// m x n view, so the rows' Gram kernel computes one triangle (half a GEMM's flops) where it runs.
inline void columns_gram(const double* Y, int n, int m, double* T) {
  if (gram::available()) {
    gram::rows(Y, m, n, n, T);
  } else {
    blas::gemm('T', 'N', m, m, n, Y, n, Y, n, T, m);
  }
}

// W_low = X_k X_k^T A (left) or A X_k X_k^T and G with X_k diag(inv_s), in the precision Real of a (row-major
// p x q), from the leading k of the m columns of X (column-major n x m, float64, descending). As
// project_on_basis: without G and with all n vectors at hand, the n - k discarded ones when fewer.
// w_low may be a itself (the in-place projection): a is read in full before w_low is written.
template <typename Real>
void project_one(const Real* a, int p, int q, const double* X, int m, int k, const double* inv_s,
                 bool subgradient, Real* w_low, Real* g) {
  const bool left = p <= q;
  const int n = left ? p : q, lda = q;
  if (k == 0) {
    std::fill_n(w_low, size_t(p) * q, Real(0));
    if (subgradient) std::fill_n(g, size_t(p) * q, Real(0));
    return;
  }
  const bool rest = !subgradient && m == n && n - k < k;
  if (rest && k == n) {  // nothing discarded
    if (w_low != a) std::copy_n(a, size_t(p) * q, w_low);
    return;
  }
  const int first = rest ? k : 0, cols = rest ? n - k : k;
  std::vector<Real> Xk(size_t(n) * cols), Xs(subgradient ? size_t(n) * k : 0), C(size_t(cols) * (left ? q : p));
  std::vector<Real> discarded(rest && w_low == a ? size_t(p) * q : 0);
  Real* out = discarded.empty() ? w_low : discarded.data();  // the product, before W_low = A - it
  for (int j = 0; j < cols; ++j)
    for (int i = 0; i < n; ++i) {
      Xk[size_t(j) * n + i] = Real(X[size_t(first + j) * n + i]);
      if (subgradient) Xs[size_t(j) * n + i] = Real(X[size_t(j) * n + i] * inv_s[j]);
    }
  if (left) {
    blas::gemm('N', 'N', q, cols, p, a, lda, Xk.data(), n, C.data(), q);  // C = Ac X_k: (X_k^T A)^T, q x k
    blas::gemm('N', 'T', q, p, cols, C.data(), q, Xk.data(), n, out, q);
    if (subgradient) blas::gemm('N', 'T', q, p, k, C.data(), q, Xs.data(), n, g, q);
  } else {
    blas::gemm('T', 'N', cols, p, q, Xk.data(), n, a, lda, C.data(), cols);  // C = X_k^T Ac: (A X_k)^T, k x p
    blas::gemm('N', 'N', q, p, cols, Xk.data(), n, C.data(), cols, out, q);
    if (subgradient) blas::gemm('N', 'N', q, p, k, Xs.data(), n, C.data(), k, g, q);
  }
  if (rest)  // W_low = A - (discarded part)
    for (size_t i = 0; i < size_t(p) * q; ++i) w_low[i] = a[i] - out[i];
}

// One matrix. a: row-major p x q in the projection precision Real; a64: the same in float64 (may alias a when
// Real = double); basis: row-major n x m (the previous kept vectors, zero columns allowed). Writes x_out
// (row-major n x m, row stride ldx: the Ritz vectors) and, when the certificate holds, w_low / g (row-major
// p x q; w_low may be a: then a is left as it was when the certificate fails).
template <typename Real>
WarmOneOut warm_one(const Real* a, const double* a64, int p, int q, const double* basis, int m, double energy,
                    int64_t max_rank, bool subgradient, const WarmParams& params, Real* w_low, Real* g,
                    double* x_out, int ldx) {
  const int n = p <= q ? p : q;
  std::vector<double> M(size_t(n) * n), Y(size_t(n) * m), Z(size_t(n) * m), T(size_t(m) * m);
  const double trace = gram_one(a, a64, p, q, M.data());
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) {
      const double v = basis[size_t(i) * m + j];
      Y[size_t(j) * n + i] = std::isfinite(v) ? v : 0.0;  // a corrupted state: zero columns, then the full solve
    }
  for (int64_t s = 0; s < params.power_steps; ++s) {
    if (s == 0 && params.power_steps > 1) {  // float32, on M / trace(M) (warm.py: FLOAT32_FIRST_STEP)
      std::vector<float> M32(size_t(n) * n), Y32(size_t(n) * m), Z32(size_t(n) * m);
      const double scale = trace > 0.0 ? 1.0 / trace : 1.0;
      for (size_t i = 0; i < M32.size(); ++i) M32[i] = float(M[i] * scale);
      std::copy(Y.begin(), Y.end(), Y32.begin());
      blas::gemm('N', 'N', n, m, n, M32.data(), n, Y32.data(), n, Z32.data(), n);
      std::copy(Z32.begin(), Z32.end(), Y.begin());
      continue;
    }
    blas::gemm('N', 'N', n, m, n, M.data(), n, Y.data(), n, Z.data(), n);
    std::swap(Y, Z);
  }
  // unit columns; columns M annihilated (or zero padding) stay zero with a unit Cholesky pivot
  std::vector<double> norms(m);
  double max_norm = 0.0;
  for (int j = 0; j < m; ++j) {
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += Y[size_t(j) * n + i] * Y[size_t(j) * n + i];
    norms[j] = std::sqrt(s);
    max_norm = std::max(max_norm, norms[j]);
  }
  std::vector<char> live(m);
  for (int j = 0; j < m; ++j) {
    live[j] = norms[j] > max_norm * 1e-200;
    const double scale = live[j] ? 1.0 / std::max(norms[j], 1e-300) : 0.0;
    for (int i = 0; i < n; ++i) Y[size_t(j) * n + i] *= scale;
  }
  // Cholesky QR: Y^T Y = U^T U, Q = Y U^-1 (in Y)
  columns_gram(Y.data(), n, m, T.data());
  for (int j = 0; j < m; ++j)
    if (!live[j]) T[size_t(j) * m + j] += 1.0;
  bool usable = blas::potrf_upper(m, T.data(), m) == 0;
  WarmOneOut out;
  if (!usable) return out;
  blas::trsm_right_upper(n, m, T.data(), m, Y.data(), n);
  columns_gram(Y.data(), n, m, T.data());
  for (int j = 0; j < m && usable; ++j)
    for (int i = 0; i < m; ++i)
      if (std::fabs(T[size_t(j) * m + i] - (i == j && live[j] ? 1.0 : 0.0)) > 1e-12) {
        usable = false;
        break;
      }
  if (!usable) return out;
  // Rayleigh-Ritz: H = Q^T M Q = S diag(w) S^T (w ascending: reversed below)
  blas::gemm('N', 'N', n, m, n, M.data(), n, Y.data(), n, Z.data(), n);  // Z = M Q
  blas::gemm('T', 'N', m, m, n, Y.data(), n, Z.data(), n, T.data(), m);  // T = H
  symmetrize(T.data(), m);
  std::vector<double> w(m);
  if (blas::syevd(m, T.data(), m, w.data()) != 0) return out;
  std::vector<double> S(size_t(m) * m), theta(m);
  for (int j = 0; j < m; ++j) {
    theta[j] = w[m - 1 - j];
    std::copy_n(&T[size_t(m - 1 - j) * m], m, &S[size_t(j) * m]);
  }
  std::vector<double> X(size_t(n) * m), R(size_t(n) * m), res2(m);
  blas::gemm('N', 'N', n, m, m, Y.data(), n, S.data(), m, X.data(), n);  // X = Q S
  blas::gemm('N', 'N', n, m, m, Z.data(), n, S.data(), m, R.data(), n);  // M X = (M Q) S
  for (int j = 0; j < m; ++j) {
    double s = 0.0;
    for (int i = 0; i < n; ++i) {
      const double r = R[size_t(j) * n + i] - X[size_t(j) * n + i] * theta[j];
      s += r * r;
    }
    res2[j] = s;
  }
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < m; ++j) x_out[size_t(i) * ldx + j] = X[size_t(j) * n + i];
  std::vector<double> keep(m), inv_s(m);
  bool ok = false;
  out.rank = warm_certify(trace, theta.data(), res2.data(), m, energy, max_rank, gram_noise_rel(p, q), params.tol,
                          keep.data(), inv_s.data(), &ok);
  out.ok = ok;
  if (!ok) return out;
  project_one(a, p, q, X.data(), m, int(out.rank), inv_s.data(), subgradient, w_low, g);
  return out;
}

// Full solve of one matrix: eigenvectors of the Gram matrix (LAPACK), the energy rule, the projection.
// basis_out (row-major n x n, row stride ldb; may be null): the eigenvectors as columns, descending. w_low may
// be a.
template <typename Real>
int64_t cold_one(const Real* a, const double* a64, int p, int q, double energy, int64_t max_rank,
                 bool subgradient, Real* w_low, Real* g, double* basis_out, int ldb) {
  const int n = p <= q ? p : q;
  std::vector<double> M(size_t(n) * n), V(size_t(n) * n), w(n), lam(n), keep(n), inv_s(n);
  gram_one(a, a64, p, q, M.data());
  TORCH_CHECK(blas::syevd(n, M.data(), n, w.data()) == 0, "lowrank_project: the eigensolver did not converge");
  for (int j = 0; j < n; ++j) {  // descending
    lam[j] = w[n - 1 - j];
    std::copy_n(&M[size_t(n - 1 - j) * n], n, &V[size_t(j) * n]);
  }
  const int64_t rank = energy_rank_select(lam.data(), n, energy, max_rank, gram_noise_rel(p, q), keep.data(),
                                          inv_s.data());
  if (basis_out)
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) basis_out[size_t(i) * ldb + j] = V[size_t(j) * n + i];
  project_one(a, p, q, V.data(), n, int(rank), inv_s.data(), subgradient, w_low, g);
  return rank;
}

// Runs fn(b, a, a64, w_low, g) on every matrix of W [B, p, q] (float32/float64; other dtypes in float32; a64 as
// float64_view gives it), matrices spread over the threads; returns (W_low, G or an empty tensor) in W's dtype.
template <typename Fn>
std::tuple<at::Tensor, at::Tensor> for_each_matrix(const at::Tensor& W_in, bool subgradient, const Fn& fn) {
  const bool dbl = W_in.scalar_type() == at::kDouble;
  const at::Tensor W = W_in.to(dbl ? at::kDouble : at::kFloat).contiguous();
  const int64_t B = W.size(0), mat = W.size(1) * W.size(2);
  at::Tensor W_low = at::empty_like(W);  // every matrix is written (the warm step: every certified one)
  at::Tensor G = subgradient ? at::empty_like(W) : W.new_empty({0});
  const int p = int(W.size(1)), q = int(W.size(2));
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    const blas::SequentialScope one_thread_each;  // the threads are spread over the matrices
    std::vector<double> scratch;
    AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "lowrank_project_per_matrix", [&] {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* a = W.data_ptr<scalar_t>() + b * mat;
        fn(b, a, float64_view(a, p, q, scratch), W_low.data_ptr<scalar_t>() + b * mat,
           subgradient ? G.data_ptr<scalar_t>() + b * mat : nullptr);
      }
    });
  });
  const auto dtype = W_in.scalar_type();
  return {W_low.to(dtype), subgradient ? G.to(dtype) : W_in.new_empty({0})};
}

// The full solve of a batch, as lowrank_project_gram (basis: set to every matrix's eigenvectors [B, n, n]).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_project_per_matrix(
    const at::Tensor& W, double energy, std::optional<int64_t> max_rank, bool subgradient,
    at::Tensor* basis = nullptr) {
  const int64_t B = W.size(0), p = W.size(1), q = W.size(2), n = n_of(p, q);
  at::Tensor rank = at::zeros({B}, W.options().dtype(at::kLong));
  if (basis) *basis = at::empty({B, n, n}, W.options().dtype(at::kDouble));
  int64_t* rk = rank.data_ptr<int64_t>();
  double* bp = basis ? basis->data_ptr<double>() : nullptr;
  const int64_t max_r = max_rank.value_or(-1);
  auto [W_low, G] = for_each_matrix(W, subgradient, [&](int64_t b, const auto* a, const double* a64, auto* w_low,
                                                         auto* g) {
    rk[b] = cold_one(a, a64, int(p), int(q), energy, max_r, subgradient, w_low, g, bp ? bp + b * n * n : nullptr,
                     int(n));
  });
  return {W_low, rank, G};
}

// The warm-started step of a batch: W [B, p, q], basis [B, n, m] float64 -> (W_low, rank, G, X [B, n, m], ok
// [B]) as lowrank_project_warm_gram returns them.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_project_warm_per_matrix(
    const at::Tensor& W, const at::Tensor& basis_in, double energy, std::optional<int64_t> max_rank,
    bool subgradient, const WarmParams& params) {
  const at::Tensor basis = basis_in.contiguous();
  const int64_t B = W.size(0), p = W.size(1), q = W.size(2), n = n_of(p, q), m = basis.size(2);
  at::Tensor X = at::empty({B, n, m}, basis.options());  // unspecified where not usable, as the results
  at::Tensor rank = at::zeros({B}, W.options().dtype(at::kLong));
  at::Tensor ok = at::zeros({B}, W.options().dtype(at::kBool));
  int64_t* rk = rank.data_ptr<int64_t>();
  bool* okp = ok.data_ptr<bool>();
  const double* bp = basis.data_ptr<double>();
  double* xp = X.data_ptr<double>();
  const int64_t max_r = max_rank.value_or(-1);
  auto [W_low, G] = for_each_matrix(W, subgradient, [&](int64_t b, const auto* a, const double* a64, auto* w_low,
                                                         auto* g) {
    const WarmOneOut r = warm_one(a, a64, int(p), int(q), bp + b * n * m, int(m), energy, max_r, subgradient,
                                  params, w_low, g, xp + b * n * m, int(m));
    rk[b] = r.rank;
    okp[b] = r.ok;
  });
  return {W_low, rank, G, X, ok};
}

}  // namespace trp
