// Host-side driver of the Gram route, shared by the CPU and CUDA kernels (ATen ops only, so the same
// code issues MKL GEMMs on the CPU and cuBLAS GEMMs on the GPU). The device-specific parts, the
// eigensolver and the rank selection, are passed in.
//
//   A = W in float64;  Gram = A A^T (p <= q) or A^T A (p > q), n = min(p, q);
//   Gram = Q diag(lam) Q^T (lam descending, lam = s^2);  k = energy rule on lam;
//   left:  W_low = Q_k (Q_k^T A),  G = Q_k S_k^-1 (Q_k^T A)   (= U_k V_k^T)
//   right: W_low = (A Q_k) Q_k^T,  G = (A Q_k) S_k^-1 Q_k^T
//
// Gram matrix and eigensolve in float64: the Gram matrix squares the condition number, and in float32
// its rounding (eps * s_1^2) would move the kept subspace by more than the 1e-5 relative tolerance on
// spectra with a small gap; float32 inputs are exact in float64, so only the float64 rounding remains.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <tuple>

namespace trp {

// gram [B, n, n] float64 symmetric -> (evals [B, n] descending, evecs [B, n, n], eigenvectors as columns)
using EighFn = std::function<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>;
// evals -> (rank int64 [B], keep [B, n] 0/1, inv_s [B, n]) via energy_rank_select
using RankFn = std::function<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, double energy, int64_t max_rank, double noise_rel)>;

// Relative eigenvalue level (of lam_1) below which a kept direction gets no 1/s in the subgradient:
// the Gram matrix's float64 rounding, eps * inner dimension, with a safety factor.
inline double gram_noise_rel(int64_t p, int64_t q) { return 16.0 * 2.220446049250313e-16 * double(p > q ? p : q); }

inline int64_t n_of(int64_t p, int64_t q) { return p < q ? p : q; }

// From this Gram size on, gram_of computes the lower block triangle only (tiles of kGramTile rows) and mirrors
// it: (t + 1) / (2t) of the flops for t tiles, in GEMMs still large enough to run at full speed (measured on
// the 2-core build machine: ResNet-50 spatial's [3, 1536, 1536] 0.24 s instead of 0.34 s, [6, 768, 768]
// 0.047 s instead of 0.062 s).
constexpr int64_t kGramTile = 384;
constexpr int64_t kGramBlockedMinN = 2 * kGramTile;

// The float64 Gram matrix of the smaller side: (A64 = W in float64, gram [B, n, n] exactly symmetric,
// left = whether it is A A^T).
inline std::tuple<at::Tensor, at::Tensor, bool> gram_of(const at::Tensor& W) {
  const at::Tensor A64 = W.to(at::kDouble).contiguous();
  const bool left = W.size(1) <= W.size(2);
  const at::Tensor F = left ? A64 : A64.transpose(1, 2);  // gram = F F^T, F [B, n, k]
  const int64_t n = F.size(1);
  if (n < kGramBlockedMinN) {
    at::Tensor gram = at::bmm(F, F.transpose(1, 2));
    gram = (gram + gram.transpose(1, 2)).mul_(0.5);  // exactly symmetric for the eigensolver
    return {A64, gram, left};
  }
  at::Tensor gram = at::empty({F.size(0), n, n}, A64.options());
  for (int64_t i = 0; i < n; i += kGramTile) {
    const int64_t rows = std::min(kGramTile, n - i);
    // rows i.. against every row up to their own last: the tiles left of the diagonal and the diagonal one
    const at::Tensor block = at::bmm(F.narrow(1, i, rows), F.narrow(1, 0, i + rows).transpose(1, 2));
    gram.narrow(1, i, rows).narrow(2, 0, i + rows).copy_(block);
    gram.narrow(2, i, rows).narrow(1, 0, i).copy_(block.narrow(2, 0, i).transpose(1, 2));
  }
  // the diagonal tiles: exactly symmetric too
  for (int64_t i = 0; i < n; i += kGramTile) {
    const int64_t rows = std::min(kGramTile, n - i);
    at::Tensor d = gram.narrow(1, i, rows).narrow(2, i, rows);
    d.copy_((d + d.transpose(1, 2)).mul_(0.5));
  }
  return {A64, gram, left};
}

// W_low = Q_k (Q_k^T A) (left) or (A Q_k) Q_k^T, and G = U_k V_k^T from orthonormal columns Q [B, n, m]
// float64 (descending), keep/inv_s [B, m] float64 (energy_rank_select's). Shared by the full solve (Q = all
// eigenvectors) and the warm start (Q = the Ritz vectors).
inline std::tuple<at::Tensor, at::Tensor> project_on_basis(const at::Tensor& W, const at::Tensor& Q64,
                                                           const at::Tensor& rank, at::Tensor keep,
                                                           at::Tensor inv_s, bool left, bool subgradient,
                                                           bool truncate_on_host) {
  const int64_t p = W.size(1), q = W.size(2), m = Q64.size(2);
  // The projection itself runs in float32 for float32/16 inputs: the float64 eigenvectors rounded to
  // float32 move W_low by ~1e-7 ||W|| (the accuracy is decided by the Gram eigensolve, not here),
  // and float32 GEMMs are twice as fast and need half the memory traffic.
  const at::ScalarType rdt = W.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor A = W.scalar_type() == rdt ? W.contiguous() : W.to(rdt).contiguous();
  at::Tensor Q = Q64.to(rdt);
  keep = keep.to(rdt);
  inv_s = inv_s.to(rdt);
  if (truncate_on_host) {  // CPU: only the columns that some matrix keeps take part in the GEMMs
    const int64_t kmax = std::max<int64_t>(rank.max().item<int64_t>(), 1), kmin = rank.min().item<int64_t>();
    if (!subgradient && m == n_of(p, q) && (m - kmin) < kmax) {
      // Most directions are kept: W_low = W - Q_rest (Q_rest^T W) multiplies by the n - k discarded
      // eigenvectors instead of the k kept ones (fewer flops, same projection).
      const at::Tensor Qr = Q.narrow(2, kmin, m - kmin) * (1.0 - keep.narrow(1, kmin, m - kmin)).unsqueeze(1);
      const at::Tensor rest = left ? at::bmm(Qr, at::bmm(Qr.transpose(1, 2), A))
                                   : at::bmm(at::bmm(A, Qr), Qr.transpose(1, 2));
      return {(A - rest).to(W.scalar_type()), W.new_empty({0})};
    }
    Q = Q.narrow(2, 0, std::min(kmax, m));
    keep = keep.narrow(1, 0, std::min(kmax, m));
    inv_s = inv_s.narrow(1, 0, std::min(kmax, m));
  }
  const at::Tensor Qk = Q * keep.unsqueeze(1);
  at::Tensor W_low, G;
  if (left) {
    const at::Tensor C = at::bmm(Qk.transpose(1, 2), A);  // [B, k, q] = S_k V_k^T
    W_low = at::bmm(Qk, C);
    if (subgradient) G = at::bmm(Q * inv_s.unsqueeze(1), C);
  } else {
    const at::Tensor C = at::bmm(A, Qk);  // [B, p, k] = U_k S_k
    W_low = at::bmm(C, Qk.transpose(1, 2));
    if (subgradient) G = at::bmm(C, (Q * inv_s.unsqueeze(1)).transpose(1, 2));
  }
  return {W_low.to(W.scalar_type()), subgradient ? G.to(W.scalar_type()) : W.new_empty({0})};
}

inline void check_energy_and_max_rank(double energy, std::optional<int64_t> max_rank) {
  TORCH_CHECK(energy > 0.0 && energy <= 1.0, "lowrank_project: energy must be in (0, 1], got ", energy);
  TORCH_CHECK(!max_rank.has_value() || *max_rank >= 1, "lowrank_project: max_rank must be >= 1");
}

inline void check_project_args(const at::Tensor& W, double energy, std::optional<int64_t> max_rank) {
  TORCH_CHECK(W.dim() == 3, "lowrank_project: W must be 3-D [B, p, q], got ", W.sizes());
  TORCH_CHECK(at::isFloatingType(W.scalar_type()), "lowrank_project: W must be floating point");
  check_energy_and_max_rank(energy, max_rank);
}

// basis (optional): set to the Gram matrix's eigenvectors [B, n, n] float64, as columns in descending order
// of eigenvalue: the left singular vectors of W when p <= q, else the right ones (the warm start's state).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_project_gram(
    const at::Tensor& W, double energy, std::optional<int64_t> max_rank, bool subgradient,
    const EighFn& eigh, const RankFn& select_rank, bool truncate_on_host, at::Tensor* basis = nullptr) {
  check_project_args(W, energy, max_rank);
  // The float32 projection GEMMs stay IEEE float32 whatever the global TF32 setting
  // (torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision("high")): TF32 rounds the inputs
  // to 10 mantissa bits (relative error ~5e-4), far outside the 1e-5 contract. cuBLAS handles read this
  // thread-local guard when ATen fetches them. (On the CPU only oneDNN's bf16 mode for float32, on CPUs
  // with bf16 units and set_float32_matmul_precision("medium"), would bypass it.)
  at::NoTF32Guard no_tf32;
  const int64_t B = W.size(0), p = W.size(1), q = W.size(2);
  auto rank_opts = W.options().dtype(at::kLong);
  if (B == 0 || p == 0 || q == 0) {
    at::Tensor G = subgradient ? at::zeros_like(W) : W.new_empty({0});
    if (basis) *basis = at::zeros({B, n_of(p, q), n_of(p, q)}, W.options().dtype(at::kDouble));
    return {at::zeros_like(W), at::zeros({B}, rank_opts), G};
  }
  auto [A64, gram, left] = gram_of(W);
  auto [evals, evecs] = eigh(gram);
  if (basis) *basis = evecs;
  auto [rank, keep, inv_s] = select_rank(evals, energy, max_rank.value_or(-1), gram_noise_rel(p, q));
  auto [W_low, G] = project_on_basis(W, evecs, rank, keep, inv_s, left, subgradient, truncate_on_host);
  return {W_low, rank, G};
}

}  // namespace trp
