// trp_kernels_C: schemas and the CPU kernels of the batched low-rank projection.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "common/jacobi.h"
#include "common/lowrank_driver.h"
#include "common/warm_driver.h"
#include "cpu/per_matrix.h"

namespace trp {
namespace {

struct NoSync {
  void operator()() const {}
};

// Largest Gram size for which the CPU runs the shared Jacobi solver instead of LAPACK. Measured on the
// 2-core build machine (float64, batches of 18 as in ResNet-56): Jacobi wins only for tiny matrices
// (n = 8: 0.17 vs 0.25 ms) and loses from n = 16 on (16: 1.95 vs 1.0 ms; 64: 120 vs 27 ms); README,
// "Batched low-rank projection", has the table.
constexpr int64_t kCpuJacobiMaxN = 8;

// The shared Jacobi core run serially on one matrix: g (n x n, row-major) -> evals descending, evecs
// as columns (row-major n x n).
void jacobi_eigh_one(const double* g, int n, double* evals, double* evecs) {
  std::vector<double> a(g, g + size_t(n) * n), vt(size_t(n) * n, 0.0);
  for (int i = 0; i < n; ++i) vt[size_t(i) * n + i] = 1.0;
  const int half = jacobi_players(n) / 2;
  std::vector<int> pi(half), pj(half), perm(n);
  std::vector<double> c(half), s(half), dii(half), djj(half);
  JacobiRound<double> r{pi.data(), pj.data(), c.data(), s.data(), dii.data(), djj.data()};
  double trace = 0.0;
  for (int i = 0; i < n; ++i) trace += std::fabs(a[size_t(i) * n + i]);
  int flag = 0;
  jacobi_solve(a.data(), n, vt.data(), n, n, jacobi_floor(trace), r, &flag, 0, 1, NoSync{});
  sort_desc(a.data(), n + 1, n, perm.data());
  for (int j = 0; j < n; ++j) {
    evals[j] = a[size_t(perm[j]) * (n + 1)];
    for (int row = 0; row < n; ++row) evecs[size_t(row) * n + j] = vt[size_t(perm[j]) * n + row];
  }
}

std::tuple<at::Tensor, at::Tensor> jacobi_eigh_batched(const at::Tensor& gram) {
  const at::Tensor g = gram.to(at::kDouble).contiguous();
  const int64_t B = g.size(0), n = g.size(2);
  at::Tensor evals = at::empty({B, n}, g.options());
  at::Tensor evecs = at::empty({B, n, n}, g.options());
  const double* gp = g.data_ptr<double>();
  double* ep = evals.data_ptr<double>();
  double* vp = evecs.data_ptr<double>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      jacobi_eigh_one(gp + b * n * n, int(n), ep + b * n, vp + b * n * n);
  });
  return {evals, evecs};
}

std::tuple<at::Tensor, at::Tensor> lapack_eigh_batched(const at::Tensor& gram) {
  auto [evals, evecs] = at::linalg_eigh(gram);  // ascending
  return {evals.flip(-1).contiguous(), evecs.flip(-1).contiguous()};
}

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_rank_cpu(const at::Tensor& evals, double energy,
                                                               int64_t max_rank, double noise_rel) {
  const at::Tensor ev = evals.contiguous();
  const int64_t B = ev.size(0), n = ev.size(1);
  at::Tensor rank = at::empty({B}, ev.options().dtype(at::kLong));
  at::Tensor keep = at::empty({B, n}, ev.options());
  at::Tensor inv_s = at::empty({B, n}, ev.options());
  const double* e = ev.data_ptr<double>();
  int64_t* rk = rank.data_ptr<int64_t>();
  double* kp = keep.data_ptr<double>();
  double* ip = inv_s.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b)
    rk[b] = energy_rank_select(e + b * n, int(n), energy, max_rank, noise_rel, kp + b * n, ip + b * n);
  return {rank, keep, inv_s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_project_cpu_solver(
    const at::Tensor& W, double energy, std::optional<int64_t> max_rank, bool subgradient,
    const std::string& solver, at::Tensor* basis = nullptr) {
  TORCH_CHECK(solver == "auto" || solver == "jacobi" || solver == "lapack" || solver == "lapack_batched",
              "lowrank_project: solver must be auto, jacobi, lapack or lapack_batched, got ", solver);
  const int64_t n = W.dim() == 3 ? std::min(W.size(1), W.size(2)) : 0;
  std::string choice = solver;
  if (choice == "auto")
    choice = n <= kCpuJacobiMaxN ? "jacobi" : (n <= kCpuPerMatrixMaxN ? "lapack" : "lapack_batched");
  // "lapack": one matrix per thread, fused with direct LAPACK/BLAS calls where torch exports them
  if (choice == "lapack" && blas::available() && W.dim() == 3 && W.numel() > 0) {
    check_project_args(W, energy, max_rank);
    return lowrank_project_per_matrix(W, energy, max_rank, subgradient, basis);
  }
  const EighFn eigh = choice == "jacobi" ? EighFn(jacobi_eigh_batched)
                      : choice == "lapack" ? EighFn(lapack_eigh_per_matrix)
                                           : EighFn(lapack_eigh_batched);
  return lowrank_project_gram(W, energy, max_rank, subgradient, eigh, select_rank_cpu,
                              /*truncate_on_host=*/true, basis);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_project_basis_cpu(
    const at::Tensor& W, double energy, std::optional<int64_t> max_rank, bool subgradient) {
  at::Tensor basis;
  auto [W_low, rank, G] = lowrank_project_cpu_solver(W, energy, max_rank, subgradient, "auto", &basis);
  return {W_low, rank, G, basis};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_project_cpu(const at::Tensor& W, double energy,
                                                                   std::optional<int64_t> max_rank,
                                                                   bool subgradient) {
  return lowrank_project_cpu_solver(W, energy, max_rank, subgradient, "auto");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> warm_certify_cpu(
    const at::Tensor& trace_in, const at::Tensor& theta_in, const at::Tensor& res2_in, double energy,
    int64_t max_rank, double noise_rel, WarmTolerances tol) {
  const at::Tensor trace = trace_in.contiguous(), theta = theta_in.contiguous(), res2 = res2_in.contiguous();
  const int64_t B = theta.size(0), m = theta.size(1);
  at::Tensor rank = at::empty({B}, theta.options().dtype(at::kLong));
  at::Tensor keep = at::empty({B, m}, theta.options());
  at::Tensor inv_s = at::empty({B, m}, theta.options());
  at::Tensor ok = at::empty({B}, theta.options().dtype(at::kBool));
  const double *tr = trace.data_ptr<double>(), *th = theta.data_ptr<double>(), *r2 = res2.data_ptr<double>();
  int64_t* rk = rank.data_ptr<int64_t>();
  double *kp = keep.data_ptr<double>(), *ip = inv_s.data_ptr<double>();
  bool* okp = ok.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b)
    rk[b] = warm_certify(tr[b], th + b * m, r2 + b * m, int(m), energy, max_rank, noise_rel, tol, kp + b * m,
                         ip + b * m, okp + b);
  return {rank, keep, inv_s, ok};
}

// solver: "auto" (per matrix up to kCpuWarmPerMatrixMaxN, measured faster there, when torch exports
// BLAS/LAPACK; else batched), "per_matrix" or "batched" (tests, benchmarks).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_project_warm_cpu_solver(
    const at::Tensor& W, const at::Tensor& basis, double energy, std::optional<int64_t> max_rank,
    bool subgradient, int64_t power_steps, double rank_margin, double subspace_tol, double noise_floor,
    const std::string& solver) {
  TORCH_CHECK(solver == "auto" || solver == "per_matrix" || solver == "batched",
              "lowrank_project_warm: solver must be auto, per_matrix or batched, got ", solver);
  check_warm_args(W, basis, energy, max_rank);
  const WarmParams params{power_steps, {rank_margin, subspace_tol, noise_floor}};
  const bool small = n_of(W.size(1), W.size(2)) <= kCpuWarmPerMatrixMaxN;
  const bool per_matrix = solver == "per_matrix" || (solver == "auto" && small && blas::available());
  TORCH_CHECK(!per_matrix || blas::available(),
              "lowrank_project_warm: solver per_matrix needs the BLAS/LAPACK symbols of torch's CPU library");
  if (per_matrix && W.size(0) > 0 && W.size(1) > 0 && W.size(2) > 0)
    return lowrank_project_warm_per_matrix(W, basis, energy, max_rank, subgradient, params);
  return lowrank_project_warm_gram(W, basis, energy, max_rank, subgradient, params, warm_certify_cpu,
                                   /*truncate_on_host=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_project_warm_cpu(
    const at::Tensor& W, const at::Tensor& basis, double energy, std::optional<int64_t> max_rank,
    bool subgradient, int64_t power_steps, double rank_margin, double subspace_tol, double noise_floor) {
  return lowrank_project_warm_cpu_solver(W, basis, energy, max_rank, subgradient, power_steps, rank_margin,
                                         subspace_tol, noise_floor, "auto");
}

std::tuple<at::Tensor, at::Tensor> jacobi_eigh_cpu(const at::Tensor& A) {
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2), "jacobi_eigh: A must be [B, n, n], got ", A.sizes());
  TORCH_CHECK(at::isFloatingType(A.scalar_type()), "jacobi_eigh: A must be floating point");
  return jacobi_eigh_batched(A);
}

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
  // The same with the CPU path chosen explicitly ("auto", "per_matrix", "batched"): tests and benchmarks.
  m.def("lowrank_project_warm_solver(Tensor W, Tensor basis, float energy, int? max_rank, bool subgradient, int power_steps, float rank_margin, float subspace_tol, float noise_floor, str solver) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The shared Jacobi core alone: symmetric A [B, n, n] -> (eigenvalues descending [B, n] float64,
  // eigenvectors as columns [B, n, n] float64).
  m.def("jacobi_eigh(Tensor A) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(trp_kernels_C, CPU, m) {
  m.impl("lowrank_project", &trp::lowrank_project_cpu);
  m.impl("lowrank_project_solver",
         [](const at::Tensor& W, double energy, std::optional<int64_t> max_rank, bool subgradient,
            const std::string& solver) {
           return trp::lowrank_project_cpu_solver(W, energy, max_rank, subgradient, solver);
         });
  m.impl("lowrank_project_basis", &trp::lowrank_project_basis_cpu);
  m.impl("lowrank_project_warm", &trp::lowrank_project_warm_cpu);
  m.impl("lowrank_project_warm_solver", &trp::lowrank_project_warm_cpu_solver);
  m.impl("jacobi_eigh", &trp::jacobi_eigh_cpu);
}
