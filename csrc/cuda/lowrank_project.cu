// CUDA kernels of trp_kernels_C::lowrank_project (and jacobi_eigh): the Gram route of
// common/lowrank_driver.h with cuBLAS GEMMs through ATen, the eigensolver of common/jacobi.h run by one
// thread block per matrix in shared memory (n <= 64; larger n uses ATen's cuSOLVER eigh), and the energy
// rank chosen on the device. No host synchronisation per matrix: one launch sequence per batch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "common/jacobi.h"
#include "common/lowrank_driver.h"
#include "common/warm_driver.h"

namespace trp {
namespace {

constexpr int kCudaJacobiMaxN = 64;

struct BlockSync {
  TRP_HD void operator()() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
};

// Shared-memory layout of one block: A and Vt (n x (n + 1) doubles each; the padding spreads the
// column accesses over the banks), the round scratch, the sort permutation and the sweep flag.
struct JacobiSmem {
  static size_t bytes(int n) {
    const int half = jacobi_players(n) / 2;
    return sizeof(double) * (2 * size_t(n) * (n + 1) + 4 * size_t(half) + 1) +
           sizeof(int) * (2 * size_t(half) + n + 1);
  }
};

__global__ void jacobi_eigh_kernel(const double* __restrict__ gram, int n, double* __restrict__ evals,
                                   double* __restrict__ evecs) {
  extern __shared__ double smem[];
  const int lda = n + 1, half = jacobi_players(n) / 2;
  double* a = smem;
  double* vt = a + size_t(n) * lda;
  double* c = vt + size_t(n) * lda;
  double* s = c + half;
  double* dii = s + half;
  double* djj = dii + half;
  double* floor = djj + half;
  int* pi = reinterpret_cast<int*>(floor + 1);
  int* pj = pi + half;
  int* perm = pj + half;
  int* flag = perm + n;

  const int64_t b = blockIdx.x;
  const double* g = gram + b * n * n;
  for (int w = threadIdx.x; w < n * n; w += blockDim.x) {
    const int i = w / n, j = w % n;
    a[i * lda + j] = g[w];
    vt[i * lda + j] = i == j ? 1.0 : 0.0;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double trace = 0.0;
    for (int i = 0; i < n; ++i) trace += fabs(a[i * lda + i]);
    *floor = jacobi_floor(trace);
  }
  __syncthreads();
  JacobiRound<double> r{pi, pj, c, s, dii, djj};
  jacobi_solve(a, lda, vt, lda, n, *floor, r, flag, int(threadIdx.x), int(blockDim.x), BlockSync{});
  if (threadIdx.x == 0) sort_desc(a, lda + 1, n, perm);
  __syncthreads();
  for (int w = threadIdx.x; w < n * n; w += blockDim.x) {
    const int row = w / n, j = w % n;
    if (row == 0) evals[b * n + j] = a[perm[j] * (lda + 1)];
    evecs[b * n * n + w] = vt[perm[j] * lda + row];  // column j = eigenvector j
  }
}

__global__ void select_rank_kernel(const double* __restrict__ evals, int64_t B, int n, double energy,
                                   int64_t max_rank, double noise_rel, int64_t* __restrict__ rank,
                                   double* __restrict__ keep, double* __restrict__ inv_s) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  rank[b] = energy_rank_select(evals + b * n, n, energy, max_rank, noise_rel, keep + b * n, inv_s + b * n);
}

std::tuple<at::Tensor, at::Tensor> jacobi_eigh_cuda_impl(const at::Tensor& gram_in) {
  const at::Tensor gram = gram_in.to(at::kDouble).contiguous();
  const int64_t B = gram.size(0);
  const int n = int(gram.size(2));
  TORCH_CHECK(n <= kCudaJacobiMaxN, "jacobi_eigh: the CUDA Jacobi kernel handles n <= ", kCudaJacobiMaxN,
              ", got n = ", n);
  at::Tensor evals = at::empty({B, n}, gram.options());
  at::Tensor evecs = at::empty({B, n, n}, gram.options());
  if (B == 0 || n == 0) return {evals, evecs};
  const size_t smem = JacobiSmem::bytes(n);
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(jacobi_eigh_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(smem)));
  // One work item per (pair slot, row/column): up to 32 * 64 = 2048 items, 512 threads at most.
  const int items = (jacobi_players(n) / 2) * n;
  const int threads = std::min(512, std::max(32, (items + 31) / 32 * 32));
  jacobi_eigh_kernel<<<dim3(unsigned(B)), threads, smem, at::cuda::getCurrentCUDAStream()>>>(
      gram.data_ptr<double>(), n, evals.data_ptr<double>(), evecs.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {evals, evecs};
}

std::tuple<at::Tensor, at::Tensor> aten_eigh_cuda(const at::Tensor& gram) {
  auto [evals, evecs] = at::linalg_eigh(gram);  // cuSOLVER, ascending; its info check syncs once per batch
  return {evals.flip(-1).contiguous(), evecs.flip(-1).contiguous()};
}

__global__ void warm_certify_kernel(const double* __restrict__ trace, const double* __restrict__ theta,
                                    const double* __restrict__ res2, int64_t B, int m, double energy,
                                    int64_t max_rank, double noise_rel, WarmTolerances tol,
                                    int64_t* __restrict__ rank, double* __restrict__ keep,
                                    double* __restrict__ inv_s, bool* __restrict__ ok) {
  const int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  rank[b] = warm_certify(trace[b], theta + b * m, res2 + b * m, m, energy, max_rank, noise_rel, tol,
                         keep + b * m, inv_s + b * m, ok + b);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> warm_certify_cuda(
    const at::Tensor& trace_in, const at::Tensor& theta_in, const at::Tensor& res2_in, double energy,
    int64_t max_rank, double noise_rel, WarmTolerances tol) {
  const at::Tensor trace = trace_in.contiguous(), theta = theta_in.contiguous(), res2 = res2_in.contiguous();
  const int64_t B = theta.size(0);
  const int m = int(theta.size(1));
  at::Tensor rank = at::empty({B}, theta.options().dtype(at::kLong));
  at::Tensor keep = at::empty({B, m}, theta.options());
  at::Tensor inv_s = at::empty({B, m}, theta.options());
  at::Tensor ok = at::empty({B}, theta.options().dtype(at::kBool));
  if (B == 0) return {rank, keep, inv_s, ok};
  const int threads = 128;
  const unsigned blocks = unsigned((B + threads - 1) / threads);
  warm_certify_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      trace.data_ptr<double>(), theta.data_ptr<double>(), res2.data_ptr<double>(), B, m, energy, max_rank,
      noise_rel, tol, rank.data_ptr<int64_t>(), keep.data_ptr<double>(), inv_s.data_ptr<double>(),
      ok.data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rank, keep, inv_s, ok};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_rank_cuda(const at::Tensor& evals_in, double energy,
                                                                int64_t max_rank, double noise_rel) {
  const at::Tensor evals = evals_in.contiguous();
  const int64_t B = evals.size(0);
  const int n = int(evals.size(1));
  at::Tensor rank = at::empty({B}, evals.options().dtype(at::kLong));
  at::Tensor keep = at::empty({B, n}, evals.options());
  at::Tensor inv_s = at::empty({B, n}, evals.options());
  if (B == 0) return {rank, keep, inv_s};
  const int threads = 128;
  const unsigned blocks = unsigned((B + threads - 1) / threads);
  select_rank_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      evals.data_ptr<double>(), B, n, energy, max_rank, noise_rel, rank.data_ptr<int64_t>(),
      keep.data_ptr<double>(), inv_s.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {rank, keep, inv_s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_project_cuda_solver(
    const at::Tensor& W, double energy, std::optional<int64_t> max_rank, bool subgradient,
    const std::string& solver, at::Tensor* basis = nullptr) {
  TORCH_CHECK(solver == "auto" || solver == "jacobi" || solver == "lapack" || solver == "lapack_batched",
              "lowrank_project: solver must be auto, jacobi, lapack or lapack_batched, got ", solver);
  const c10::cuda::CUDAGuard guard(W.device());
  const int64_t n = W.dim() == 3 ? std::min(W.size(1), W.size(2)) : 0;
  const bool jacobi = solver == "jacobi" || (solver == "auto" && n <= kCudaJacobiMaxN);
  return lowrank_project_gram(W, energy, max_rank, subgradient,
                              jacobi ? EighFn(jacobi_eigh_cuda_impl) : EighFn(aten_eigh_cuda),
                              select_rank_cuda, /*truncate_on_host=*/false, basis);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_project_basis_cuda(
    const at::Tensor& W, double energy, std::optional<int64_t> max_rank, bool subgradient) {
  at::Tensor basis;
  auto [W_low, rank, G] = lowrank_project_cuda_solver(W, energy, max_rank, subgradient, "auto", &basis);
  return {W_low, rank, G, basis};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_project_cuda(const at::Tensor& W, double energy,
                                                                    std::optional<int64_t> max_rank,
                                                                    bool subgradient) {
  return lowrank_project_cuda_solver(W, energy, max_rank, subgradient, "auto");
}

// One launch sequence per group, no host synchronisation (the caller's fallback decision is its one sync).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lowrank_project_warm_cuda(
    const at::Tensor& W, const at::Tensor& basis, double energy, std::optional<int64_t> max_rank,
    bool subgradient, int64_t power_steps, double rank_margin, double subspace_tol, double noise_floor) {
  const c10::cuda::CUDAGuard guard(W.device());
  return lowrank_project_warm_gram(W, basis, energy, max_rank, subgradient,
                                   {power_steps, {rank_margin, subspace_tol, noise_floor}}, warm_certify_cuda,
                                   /*truncate_on_host=*/false);
}

std::tuple<at::Tensor, at::Tensor> jacobi_eigh_cuda(const at::Tensor& A) {
  TORCH_CHECK(A.dim() == 3 && A.size(1) == A.size(2), "jacobi_eigh: A must be [B, n, n], got ", A.sizes());
  const c10::cuda::CUDAGuard guard(A.device());
  return jacobi_eigh_cuda_impl(A);
}

}  // namespace
}  // namespace trp

TORCH_LIBRARY_IMPL(trp_kernels_C, CUDA, m) {
  m.impl("lowrank_project", &trp::lowrank_project_cuda);
  m.impl("lowrank_project_solver",
         [](const at::Tensor& W, double energy, std::optional<int64_t> max_rank, bool subgradient,
            const std::string& solver) {
           return trp::lowrank_project_cuda_solver(W, energy, max_rank, subgradient, solver);
         });
  m.impl("lowrank_project_basis", &trp::lowrank_project_basis_cuda);
  m.impl("lowrank_project_warm", &trp::lowrank_project_warm_cuda);
  m.impl("jacobi_eigh", &trp::jacobi_eigh_cuda);
}
