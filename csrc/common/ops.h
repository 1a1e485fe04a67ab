// The trp_kernels_C ops' entry points and their host side, written once for the CPU and the CUDA kernels:
// argument checks, solver names, the warm step's constants, the inputs and outputs of the block functions
// (common/block_kernels.h) and the registration. A device (csrc/cpu/lowrank_project.cpp,
// csrc/cuda/lowrank_project.cu) keeps only what is its own:
//
// - a struct of block runners, which run a block function over a batch (the CPU: a loop, one "thread" per
//   matrix; CUDA: a kernel launch), taking the contiguous float64 inputs and the allocated outputs:
//
//     static void jacobi(gram, B, n, evals, evecs)                                     jacobi_block per matrix
//     static void select_rank(evals, B, n, energy, max_rank, noise_rel, rank, keep, inv_s)   select_rank_block
//     static void warm_certify(trace, theta, res2, B, m, energy, max_rank, noise_rel, tol,
//                              rank, keep, inv_s, ok)                                     warm_certify_block
//
//   (called only for a nonempty batch), whose host halves are jacobi_eigh_on, select_rank_on and
//   warm_certify_on below;
// - a struct with the solver choice per op,
//
//     static Project3 project(W, energy, max_rank, subgradient, solver, at::Tensor* basis)   the full solve
//     static Warm5 warm(W, basis, energy, max_rank, subgradient, const WarmParams&, solver)  the warm step
//     static EighPair jacobi_eigh(A)                                                          the Jacobi core
//
//   (solver already checked, basis: set to the eigenvectors when not null), registered as Ops<Device>.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "common/block_kernels.h"
#include "common/lowrank_driver.h"
#include "common/warm_driver.h"

namespace trp {

using Project3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Project4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Warm5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using EighPair = std::tuple<at::Tensor, at::Tensor>;
using RankOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;                   // rank, keep, inv_s
using CertifyOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;    // rank, keep, inv_s, ok

// n = min(p, q) of a batch W [B, p, q] (0 for a tensor of another rank: the driver's checks reject it).
inline int64_t batch_n(const at::Tensor& W) { return W.dim() == 3 ? n_of(W.size(1), W.size(2)) : 0; }

// "jacobi": the shared Jacobi core (CUDA: n <= kJacobiMaxN); "lapack": LAPACK one matrix per thread (CPU) or
// cuSOLVER through ATen (CUDA); "lapack_batched": ATen's batched eigensolver; "auto": by size.
inline void check_solver(const std::string& solver) {
  TORCH_CHECK(solver == "auto" || solver == "jacobi" || solver == "lapack" || solver == "lapack_batched",
              "lowrank_project: solver must be auto, jacobi, lapack or lapack_batched, got ", solver);
}

// "per_matrix": one matrix per thread with direct LAPACK/BLAS calls (CPU only); "batched": the ATen driver.
inline void check_warm_solver(const std::string& solver) {
  TORCH_CHECK(solver == "auto" || solver == "per_matrix" || solver == "batched",
              "lowrank_project_warm: solver must be auto, per_matrix or batched, got ", solver);
}

// Outputs of the one-thread-per-matrix kernels (common/block_kernels.h) for B matrices of width n:
// rank int64 [B], keep / inv_s float64 [B, n], ok bool [B], on evals' device.
struct PerMatrixOut {
  at::Tensor rank, keep, inv_s, ok;
  PerMatrixOut(const at::Tensor& like, int64_t B, int64_t n)
      : rank(at::empty({B}, like.options().dtype(at::kLong))),
        keep(at::empty({B, n}, like.options().dtype(at::kDouble))),
        inv_s(at::empty({B, n}, like.options().dtype(at::kDouble))),
        ok(at::empty({B}, like.options().dtype(at::kBool))) {}
};

// ATen's symmetric eigensolver (LAPACK on the CPU; cuSOLVER on CUDA, whose info check synchronises once per
// batch) for gram [B, n, n]: eigenvalues [B, n] and eigenvectors as columns [B, n, n], both in descending order.
inline EighPair aten_eigh_descending(const at::Tensor& gram) {
  auto [evals, evecs] = at::linalg_eigh(gram);  // ascending
  return {evals.flip(-1).contiguous(), evecs.flip(-1).contiguous()};
}

// The Jacobi core for symmetric gram [B, n, n] (any floating dtype): eigenvalues descending [B, n] and
// eigenvectors as columns [B, n, n], float64, by Blocks::jacobi.
template <typename Blocks>
EighPair jacobi_eigh_on(const at::Tensor& gram_in) {
  const at::Tensor gram = gram_in.to(at::kDouble).contiguous();
  const int64_t B = gram.size(0), n = gram.size(2);
  at::Tensor evals = at::empty({B, n}, gram.options());
  at::Tensor evecs = at::empty({B, n, n}, gram.options());
  if (B > 0 && n > 0)
    Blocks::jacobi(gram.data_ptr<double>(), B, int(n), evals.data_ptr<double>(), evecs.data_ptr<double>());
  return {evals, evecs};
}

// The energy-rule rank of each matrix from its eigenvalues evals [B, n] float64 (descending), by
// Blocks::select_rank: the driver's RankFn.
template <typename Blocks>
RankOut select_rank_on(const at::Tensor& evals_in, double energy, int64_t max_rank, double noise_rel) {
  const at::Tensor evals = evals_in.contiguous();
  const int64_t B = evals.size(0);
  const int n = int(evals.size(1));
  PerMatrixOut out(evals, B, n);
  if (B > 0)
    Blocks::select_rank(evals.data_ptr<double>(), B, n, energy, max_rank, noise_rel, out.rank.data_ptr<int64_t>(),
                        out.keep.data_ptr<double>(), out.inv_s.data_ptr<double>());
  return {out.rank, out.keep, out.inv_s};
}

// The warm step's certificate per matrix from trace [B], Ritz values theta [B, m] and squared residual norms
// res2 [B, m] (float64), by Blocks::warm_certify: the driver's CertifyFn.
template <typename Blocks>
CertifyOut warm_certify_on(const at::Tensor& trace_in, const at::Tensor& theta_in, const at::Tensor& res2_in,
                           double energy, int64_t max_rank, double noise_rel, WarmTolerances tol) {
  const at::Tensor trace = trace_in.contiguous(), theta = theta_in.contiguous(), res2 = res2_in.contiguous();
  const int64_t B = theta.size(0);
  const int m = int(theta.size(1));
  PerMatrixOut out(theta, B, m);
  if (B > 0)
    Blocks::warm_certify(trace.data_ptr<double>(), theta.data_ptr<double>(), res2.data_ptr<double>(), B, m, energy,
                         max_rank, noise_rel, tol, out.rank.data_ptr<int64_t>(), out.keep.data_ptr<double>(),
                         out.inv_s.data_ptr<double>(), out.ok.data_ptr<bool>());
  return {out.rank, out.keep, out.inv_s, out.ok};
}

template <typename Device>
struct Ops {
  static Project3 project(const at::Tensor& W, double energy, std::optional<int64_t> max_rank, bool subgradient) {
    return Device::project(W, energy, max_rank, subgradient, "auto", nullptr);
  }

  static Project3 project_solver(const at::Tensor& W, double energy, std::optional<int64_t> max_rank,
                                 bool subgradient, const std::string& solver) {
    check_solver(solver);
    return Device::project(W, energy, max_rank, subgradient, solver, nullptr);
  }

  static Project4 project_basis(const at::Tensor& W, double energy, std::optional<int64_t> max_rank,
                                bool subgradient) {
    at::Tensor basis;
    auto [W_low, rank, G] = Device::project(W, energy, max_rank, subgradient, "auto", &basis);
    return {W_low, rank, G, basis};
  }

  static Warm5 warm_solver(const at::Tensor& W, const at::Tensor& basis, double energy,
                           std::optional<int64_t> max_rank, bool subgradient, int64_t power_steps, double rank_margin,
                           double subspace_tol, double noise_floor, const std::string& solver) {
    check_warm_solver(solver);
    check_warm_args(W, basis, energy, max_rank);
    return Device::warm(W, basis, energy, max_rank, subgradient,
                        WarmParams{power_steps, {rank_margin, subspace_tol, noise_floor}}, solver);
  }

  static Warm5 warm(const at::Tensor& W, const at::Tensor& basis, double energy, std::optional<int64_t> max_rank,
                    bool subgradient, int64_t power_steps, double rank_margin, double subspace_tol,
                    double noise_floor) {
    return warm_solver(W, basis, energy, max_rank, subgradient, power_steps, rank_margin, subspace_tol, noise_floor,
                       "auto");
  }

  static EighPair jacobi_eigh(const at::Tensor& A) {
    TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2), "jacobi_eigh: A must be [B, n, n], got ", A.sizes());
    TORCH_CHECK(at::isFloatingType(A.scalar_type()), "jacobi_eigh: A must be floating point");
    return Device::jacobi_eigh(A);
  }

  static void register_kernels(torch::Library& m) {
    m.impl("lowrank_project", &Ops::project);
    m.impl("lowrank_project_solver", &Ops::project_solver);
    m.impl("lowrank_project_basis", &Ops::project_basis);
    m.impl("lowrank_project_warm", &Ops::warm);
    m.impl("lowrank_project_warm_solver", &Ops::warm_solver);
    m.impl("jacobi_eigh", &Ops::jacobi_eigh);
  }
};

}  // namespace trp
