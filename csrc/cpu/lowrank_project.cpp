// trp_kernels_C: schemas and the CPU kernels of the batched low-rank projection.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/block_kernels.h"
#include "common/lowrank_driver.h"
#include "common/ops.h"
#include "common/warm_driver.h"
#include "cpu/per_matrix.h"

namespace trp {
namespace {

// Largest Gram size for which the CPU runs the shared Jacobi solver instead of LAPACK. Measured on the
// 2-core build machine (float64, batches of 18 as in ResNet-56): Jacobi wins only for tiny matrices
// (n = 8: 0.17 vs 0.25 ms) and loses from n = 16 on (16: 1.95 vs 1.0 ms; 64: 120 vs 27 ms); README,
// "Batched low-rank projection", has the table.
constexpr int64_t kCpuJacobiMaxN = 8;

// The block functions of common/block_kernels.h, one CPU "thread" per matrix (the matrix index, thread 0 of 1).
struct CpuBlocks {
  static void jacobi(const double* gram, int64_t B, int n, double* evals, double* evecs) {
    const size_t words = (JacobiSmem::bytes(n) + sizeof(double) - 1) / sizeof(double);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<double> smem(words);  // the CUDA block's shared memory, for the one-thread path
      for (int64_t b = begin; b < end; ++b)
        jacobi_block(gram + b * n * n, n, evals + b * n, evecs + b * n * n, smem.data(), 0, 1, NoSync{});
    });
  }

  static void select_rank(const double* evals, int64_t B, int n, double energy, int64_t max_rank, double noise_rel,
                          int64_t* rank, double* keep, double* inv_s) {
    for (int64_t b = 0; b < B; ++b)
      select_rank_block(evals, B, n, energy, max_rank, noise_rel, rank, keep, inv_s, b, 0, 1);
  }

  static void warm_certify(const double* trace, const double* theta, const double* res2, int64_t B, int m,
                           double energy, int64_t max_rank, double noise_rel, WarmTolerances tol, int64_t* rank,
                           double* keep, double* inv_s, bool* ok) {
    for (int64_t b = 0; b < B; ++b)
      warm_certify_block(trace, theta, res2, B, m, energy, max_rank, noise_rel, tol, rank, keep, inv_s, ok, b, 0, 1);
  }
};

// LAPACK one matrix per task through ATen, where torch exports no BLAS/LAPACK symbols (otherwise
// csrc/cpu/per_matrix.h runs these sizes): at::parallel_for hands each thread whole matrices.
std::tuple<at::Tensor, at::Tensor> lapack_eigh_per_matrix(const at::Tensor& gram) {
  const int64_t B = gram.size(0), n = gram.size(2);
  at::Tensor evals = at::empty({B, n}, gram.options());
  at::Tensor evecs = at::empty({B, n, n}, gram.options());
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      auto [e, v] = at::linalg_eigh(gram[b]);
      evals[b].copy_(e.flip(-1));
      evecs[b].copy_(v.flip(-1));
    }
  });
  return {evals, evecs};
}

struct CpuDevice {
  // solver "auto": Jacobi up to kCpuJacobiMaxN, LAPACK one matrix per thread up to kCpuPerMatrixMaxN, else
  // the batched LAPACK eigensolver.
  static Project3 project(const at::Tensor& W, double energy, std::optional<int64_t> max_rank, bool subgradient,
                          const std::string& solver, at::Tensor* basis) {
    const int64_t n = batch_n(W);
    std::string choice = solver;
    if (choice == "auto")
      choice = n <= kCpuJacobiMaxN ? "jacobi" : (n <= kCpuPerMatrixMaxN ? "lapack" : "lapack_batched");
    // "lapack": one matrix per thread, fused with direct LAPACK/BLAS calls where torch exports them
    if (choice == "lapack" && blas::available() && W.dim() == 3 && W.numel() > 0) {
      check_project_args(W, energy, max_rank);
      return lowrank_project_per_matrix(W, energy, max_rank, subgradient, basis);
    }
    const EighFn eigh = choice == "jacobi" ? EighFn(jacobi_eigh_on<CpuBlocks>)
                        : choice == "lapack" ? EighFn(lapack_eigh_per_matrix)
                                             : EighFn(aten_eigh_descending);
    return lowrank_project_gram(W, energy, max_rank, subgradient, eigh, select_rank_on<CpuBlocks>,
                                /*truncate_on_host=*/true, basis);
  }

  // solver "auto": per matrix up to kCpuWarmPerMatrixMaxN (measured faster there) when torch exports
  // BLAS/LAPACK, else batched.
  static Warm5 warm(const at::Tensor& W, const at::Tensor& basis, double energy, std::optional<int64_t> max_rank,
                    bool subgradient, const WarmParams& params, const std::string& solver) {
    const bool small = n_of(W.size(1), W.size(2)) <= kCpuWarmPerMatrixMaxN;
    const bool per_matrix = solver == "per_matrix" || (solver == "auto" && small && blas::available());
    TORCH_CHECK(!per_matrix || blas::available(),
                "lowrank_project_warm: solver per_matrix needs the BLAS/LAPACK symbols of torch's CPU library");
    if (per_matrix && W.size(0) > 0 && W.size(1) > 0 && W.size(2) > 0)
      return lowrank_project_warm_per_matrix(W, basis, energy, max_rank, subgradient, params);
    return lowrank_project_warm_gram(W, basis, energy, max_rank, subgradient, params, aten_eigh_descending,
                                     warm_certify_on<CpuBlocks>, /*truncate_on_host=*/true);
  }

  static EighPair jacobi_eigh(const at::Tensor& A) { return jacobi_eigh_on<CpuBlocks>(A); }
};

}  // namespace
}  // namespace trp

TORCH_LIBRARY(trp_kernels_C, m) {
  m.def("lowrank_project(Tensor W, float energy, int? max_rank, bool subgradient) -> (Tensor, Tensor, Tensor)");
  // The same with the eigensolver chosen explicitly ("auto", "jacobi", "lapack"; CUDA: "jacobi" is the
  // shared-memory kernel for n <= 64, "lapack" ATen's solver): tests and benchmarks.
  m.def("lowrank_project_solver(Tensor W, float energy, int? max_rank, bool subgradient, str solver) -> (Tensor, Tensor, Tensor)");
  // The same plus the Gram matrix's eigenvectors [B, n, n] float64 (columns, descending): the state the
  // warm-started projection (trp_kernels/warm.py) starts its next call from.
  m.def("lowrank_project_basis(Tensor W, float energy, int? max_rank, bool subgradient) -> (Tensor, Tensor, Tensor, Tensor)");
  // One warm-started step (trp_kernels/warm.py, csrc/common/warm_driver.h): basis [B, n, m] float64 ->
  // (W_low, rank, G, Ritz vectors [B, n, m] float64, ok bool [B]); matrices with ok = false are unspecified.
  m.def("lowrank_project_warm(Tensor W, Tensor basis, float energy, int? max_rank, bool subgradient, int power_steps, float rank_margin, float subspace_tol, float noise_floor) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same with the path chosen explicitly ("auto", "per_matrix" (CPU only), "batched"): tests and benchmarks.
  m.def("lowrank_project_warm_solver(Tensor W, Tensor basis, float energy, int? max_rank, bool subgradient, int power_steps, float rank_margin, float subspace_tol, float noise_floor, str solver) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The shared Jacobi core alone: symmetric A [B, n, n] -> (eigenvalues descending [B, n] float64,
  // eigenvectors as columns [B, n, n] float64).
  m.def("jacobi_eigh(Tensor A) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(trp_kernels_C, CPU, m) { trp::Ops<trp::CpuDevice>::register_kernels(m); }
