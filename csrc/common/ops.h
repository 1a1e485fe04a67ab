// The trp_kernels_C ops' entry points, written once for the CPU and the CUDA kernels: argument checks, solver
// names, the warm step's constants, the outputs of the one-thread-per-matrix kernels and the registration.
// A device (csrc/cpu/lowrank_project.cpp, csrc/cuda/lowrank_project.cu) supplies a struct with
//
//   static Project3 project(W, energy, max_rank, subgradient, solver, at::Tensor* basis)   the full solve
//   static Warm5 warm(W, basis, energy, max_rank, subgradient, const WarmParams&, solver)  the warm step
//   static EighPair jacobi_eigh(A)                                                          the Jacobi core
//
// (solver already checked, basis: set to the eigenvectors when not null) and registers Ops<Device>.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "common/lowrank_driver.h"
#include "common/warm_driver.h"

namespace trp {

using Project3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Project4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Warm5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using EighPair = std::tuple<at::Tensor, at::Tensor>;

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
