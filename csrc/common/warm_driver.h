// Host-side driver of the warm-started projection, shared by the CPU and CUDA kernels (ATen ops, so the
// same code issues MKL/LAPACK calls on the CPU and cuBLAS/cuSOLVER ones on the GPU; the per-matrix
// certificate is passed in). The algorithm, its bounds and its Python twin: trp_kernels/warm.py.
//
//   Y = M^2 basis (M the float64 Gram matrix; the first product in float32), columns scaled to unit norm,
//   Cholesky QR -> Q;
//   H = Q^T M Q = S diag(theta) S^T (the device's small eigensolver);  X = Q S;  R = M X - X diag(theta);
//   certificate(theta, ||R columns||^2, trace M) -> rank, keep, inv_s, ok;  projection on X as the full solve.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <functional>
#include <optional>
#include <tuple>

#include "common/lowrank_driver.h"
#include "common/warm_certify.h"

namespace trp {

// (trace [B], theta [B, m], res2 [B, m], energy, max_rank (< 0: none), noise_rel, tolerances)
//   -> (rank, keep, inv_s, ok)
using CertifyFn = std::function<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, double, int64_t, double, WarmTolerances)>;

// The algorithm's constants come from the caller (trp_kernels/warm.py is their one home).
struct WarmParams {
  int64_t power_steps;
  WarmTolerances tol;
};

// A warm-start state for B matrices with n = min(p, q): float64 [B, n, m], 1 <= m <= n.
inline void check_warm_basis(const at::Tensor& basis, int64_t B, int64_t n) {
  TORCH_CHECK(basis.dim() == 3 && basis.size(0) == B && basis.size(1) == n && basis.size(2) >= 1 &&
                  basis.size(2) <= n && basis.scalar_type() == at::kDouble,
              "lowrank_project_warm: basis must be float64 [B, n, m] with 1 <= m <= n = min(p, q), got ",
              basis.sizes(), " ", basis.scalar_type());
}

inline void check_warm_args(const at::Tensor& W, const at::Tensor& basis, double energy,
                            std::optional<int64_t> max_rank) {
  check_project_args(W, energy, max_rank);
  check_warm_basis(basis, W.size(0), n_of(W.size(1), W.size(2)));
}

// W [B, p, q], basis [B, n, m] float64 -> (W_low, rank, G, X [B, n, m] Ritz vectors, ok bool [B]).
// Matrices with ok = false hold unspecified results: the caller solves them in full. eigh: the m x m
// Rayleigh-Ritz eigensolver (descending, as the full solve's).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_project_warm_gram(
    const at::Tensor& W, const at::Tensor& basis_in, double energy, std::optional<int64_t> max_rank,
    bool subgradient, const WarmParams& params, const EighFn& eigh, const CertifyFn& certify,
    bool truncate_on_host) {
  check_warm_args(W, basis_in, energy, max_rank);
  const int64_t p = W.size(1), q = W.size(2);
  at::NoTF32Guard no_tf32;  // as in lowrank_project_gram
  const at::Tensor basis = at::where(at::isfinite(basis_in), basis_in, at::zeros_like(basis_in));
  auto [A64, M, left] = gram_of(W);
  const at::Tensor trace = M.diagonal(0, 1, 2).sum(-1).contiguous();
  at::Tensor Y = basis;
  for (int64_t s = 0; s < params.power_steps; ++s) {
    if (s == 0 && params.power_steps > 1) {  // float32, on M / trace(M) (warm.py: FLOAT32_FIRST_STEP)
      const at::Tensor tr = trace.view({-1, 1, 1});
      Y = at::bmm(M.div(at::where(tr > 0, tr, at::ones_like(tr))).to(at::kFloat), Y.to(at::kFloat)).to(at::kDouble);
    } else {
      Y = at::bmm(M, Y);
    }
  }
  const at::Tensor norms = at::linalg_vector_norm(Y, 2, {1}, /*keepdim=*/true);
  const at::Tensor live = norms > std::get<0>(norms.max(2, /*keepdim=*/true)) * 1e-200;
  Y = at::where(live, Y / norms.clamp_min(1e-300), at::zeros_like(Y));
  const at::Tensor live_d = live.squeeze(1).to(at::kDouble);
  const at::Tensor dead = at::diag_embed(1.0 - live_d);  // unit pivots keep dead columns at zero
  // Cholesky QR: Y^T Y = L L^T, Q = Y L^-T (solved as Q L^T = Y)
  auto [L, info] = at::linalg_cholesky_ex(at::bmm(Y.transpose(1, 2), Y) + dead);
  const at::Tensor Q_raw = at::linalg_solve_triangular(L.transpose(1, 2), Y, /*upper=*/true, /*left=*/false);
  at::Tensor usable = info.eq(0);
  const at::Tensor ortho = (at::bmm(Q_raw.transpose(1, 2), Q_raw) - at::diag_embed(live_d)).abs().amax({1, 2});
  usable = usable & ortho.le(1e-12);  // false for NaN too
  // A matrix that is not usable (Cholesky broke down: its Q holds garbage, Inf or NaN) gets Q = 0, so H = 0:
  // the eigensolver never sees it, and it falls back to the full solve with ok = false (warm.py likewise).
  const at::Tensor Q = at::where(usable.view({-1, 1, 1}), Q_raw, at::zeros_like(Q_raw));
  const at::Tensor MQ = at::bmm(M, Q);
  const at::Tensor H = at::bmm(Q.transpose(1, 2), MQ);
  auto [theta_d, S_d] = eigh((H + H.transpose(1, 2)).mul_(0.5));
  const at::Tensor theta = theta_d.contiguous(), S = S_d;
  const at::Tensor X = at::bmm(Q, S);
  const at::Tensor R = at::bmm(MQ, S) - X * theta.unsqueeze(1);
  const at::Tensor res2 = R.square().sum(1).contiguous();
  auto [rank, keep, inv_s, ok] = certify(trace, theta, res2, energy, max_rank.value_or(-1), gram_noise_rel(p, q),
                                        params.tol);
  ok = ok & usable;
  auto [W_low, G] = project_on_basis(W, X, rank, keep, inv_s, left, subgradient, truncate_on_host);
  return {W_low, rank, G, X, ok};
}

}  // namespace trp
