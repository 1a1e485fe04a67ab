// CUDA kernels of trp_kernels_C::lowrank_project (and jacobi_eigh, the warm step): the Gram route of
// common/lowrank_driver.h with cuBLAS GEMMs through ATen, the eigensolver of common/jacobi.h run by one
// thread block per matrix in shared memory (n <= 64; larger n uses ATen's cuSOLVER eigh), and the energy
// rank chosen on the device. No host synchronisation per matrix: one launch sequence per batch.
// Compiled with --fmad=false: the device computes bit for bit what the CPU's one-thread path computes
// (docs/design/gpu-trust.md).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <string>

#include "common/block_kernels.h"
#include "common/lowrank_driver.h"
#include "common/ops.h"
#include "common/warm_driver.h"

namespace trp {
namespace {

struct BlockSync {
  TRP_HD void operator()() const {
#ifdef __CUDA_ARCH__
    __syncthreads();
#endif
  }
  TRP_HD int any(int pred) const {
#ifdef __CUDA_ARCH__
    return __syncthreads_or(pred);
#else
    return pred;
#endif
  }
};

// Each kernel is its block function (common/block_kernels.h), which the block emulator runs on the CPU.
// __launch_bounds__: the launcher uses up to kJacobiMaxThreads threads, so the compiler must keep the kernel
// within 65536 / kJacobiMaxThreads registers per thread (tests/test_cuda_build.py reads them from the binary).
__global__ void __launch_bounds__(kJacobiMaxThreads)
    jacobi_eigh_kernel(const double* __restrict__ gram, int n, double* __restrict__ evals,
                       double* __restrict__ evecs) {
  extern __shared__ double smem[];
  const int64_t b = blockIdx.x;
  jacobi_block(gram + b * n * n, n, evals + b * n, evecs + b * n * n, smem, int(threadIdx.x), int(blockDim.x),
               BlockSync{});
}

__global__ void __launch_bounds__(kPerMatrixThreads)
    select_rank_kernel(const double* __restrict__ evals, int64_t B, int n, double energy, int64_t max_rank,
                       double noise_rel, int64_t* __restrict__ rank, double* __restrict__ keep,
                       double* __restrict__ inv_s) {
  select_rank_block(evals, B, n, energy, max_rank, noise_rel, rank, keep, inv_s, blockIdx.x, int(threadIdx.x),
                    int(blockDim.x));
}

__global__ void __launch_bounds__(kPerMatrixThreads)
    warm_certify_kernel(const double* __restrict__ trace, const double* __restrict__ theta,
                        const double* __restrict__ res2, int64_t B, int m, double energy, int64_t max_rank,
                        double noise_rel, WarmTolerances tol, int64_t* __restrict__ rank,
                        double* __restrict__ keep, double* __restrict__ inv_s, bool* __restrict__ ok) {
  warm_certify_block(trace, theta, res2, B, m, energy, max_rank, noise_rel, tol, rank, keep, inv_s, ok, blockIdx.x,
                     int(threadIdx.x), int(blockDim.x));
}

// Whether the Jacobi kernel can take n x n matrices on the current device: n <= kJacobiMaxN and its shared
// memory within the device's per-block opt-in limit (64 KB on sm_75, 163 KB on sm_80, 227 KB on sm_90).
bool jacobi_fits(int64_t n) {
  return n <= kJacobiMaxN &&
         JacobiSmem::bytes(int(n)) <= at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

// The block functions as kernels, one launch per batch on the current stream: one block per matrix for the
// Jacobi core, kPerMatrixThreads matrices per block for the others.
struct CudaBlocks {
  static void jacobi(const double* gram, int64_t B, int n, double* evals, double* evecs) {
    const size_t smem = JacobiSmem::bytes(n);
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(cudaFuncSetAttribute(jacobi_eigh_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          int(smem)));
    jacobi_eigh_kernel<<<dim3(unsigned(B)), jacobi_threads(n), smem, at::cuda::getCurrentCUDAStream()>>>(
        gram, n, evals, evecs);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void select_rank(const double* evals, int64_t B, int n, double energy, int64_t max_rank, double noise_rel,
                          int64_t* rank, double* keep, double* inv_s) {
    select_rank_kernel<<<unsigned(per_matrix_blocks(B)), kPerMatrixThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        evals, B, n, energy, max_rank, noise_rel, rank, keep, inv_s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  static void warm_certify(const double* trace, const double* theta, const double* res2, int64_t B, int m,
                           double energy, int64_t max_rank, double noise_rel, WarmTolerances tol, int64_t* rank,
                           double* keep, double* inv_s, bool* ok) {
    warm_certify_kernel<<<unsigned(per_matrix_blocks(B)), kPerMatrixThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        trace, theta, res2, B, m, energy, max_rank, noise_rel, tol, rank, keep, inv_s, ok);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The error of `op` asked to run the Jacobi kernel on n x n matrices where it does not fit.
void check_jacobi_fits(const char* op, int64_t n) {
  TORCH_CHECK(jacobi_fits(n), op, ": the CUDA Jacobi kernel handles n <= ", kJacobiMaxN,
              " within the device's shared memory, got n = ", n);
}

// The Jacobi core where it fits (jacobi_fits), else an error.
EighPair jacobi_eigh_cuda(const at::Tensor& gram) {
  check_jacobi_fits("jacobi_eigh", gram.size(2));
  return jacobi_eigh_on<CudaBlocks>(gram);
}

// The eigensolver for a batch of n x n matrices: the Jacobi kernel where it fits (no host synchronisation,
// all matrices at once), else cuSOLVER through ATen (one sync for its error check; for n > 32 PyTorch runs
// the batch one matrix at a time).
EighFn eigh_for(int64_t n, bool jacobi) {
  return jacobi && jacobi_fits(n) ? EighFn(jacobi_eigh_cuda) : EighFn(aten_eigh_descending);
}

struct CudaDevice {
  // solver: "auto" and "jacobi": the Jacobi kernel where it fits; "lapack", "lapack_batched": cuSOLVER.
  static Project3 project(const at::Tensor& W, double energy, std::optional<int64_t> max_rank, bool subgradient,
                          const std::string& solver, at::Tensor* basis) {
    const c10::cuda::CUDAGuard guard(W.device());
    const int64_t n = batch_n(W);
    if (solver == "jacobi") check_jacobi_fits("lowrank_project", n);
    return lowrank_project_gram(W, energy, max_rank, subgradient, eigh_for(n, solver == "auto" || solver == "jacobi"),
                                select_rank_on<CudaBlocks>, /*truncate_on_host=*/false, basis);
  }

  // One launch sequence per group, no host synchronisation while the basis is at most kJacobiMaxN wide (the
  // caller's fallback decision is its one sync). solver: "auto" or "batched" (the only CUDA path).
  static Warm5 warm(const at::Tensor& W, const at::Tensor& basis, double energy, std::optional<int64_t> max_rank,
                    bool subgradient, const WarmParams& params, const std::string& solver) {
    TORCH_CHECK(solver != "per_matrix", "lowrank_project_warm: solver per_matrix is CPU only");
    const c10::cuda::CUDAGuard guard(W.device());
    return lowrank_project_warm_gram(W, basis, energy, max_rank, subgradient, params,
                                     eigh_for(basis.size(2), /*jacobi=*/true), warm_certify_on<CudaBlocks>,
                                     /*truncate_on_host=*/false);
  }

  static EighPair jacobi_eigh(const at::Tensor& A) {
    const c10::cuda::CUDAGuard guard(A.device());
    return jacobi_eigh_cuda(A);
  }
};

// Whether this build has a kernel image the device can run: the SASS of the device's architecture (or an older
// one of the same major version), or PTX for one at most as new that the driver compiles. Returns the version
// of the image the driver picked (e.g. 80, 90), or 0 when there is none ("no kernel image is available").
int64_t cuda_kernel_image(int64_t device) {
  const c10::cuda::CUDAGuard guard(c10::Device(c10::DeviceType::CUDA, c10::DeviceIndex(device)));
  cudaFuncAttributes attrs{};
  const cudaError_t err = cudaFuncGetAttributes(&attrs, jacobi_eigh_kernel);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear it: the error is this function's answer, not a sticky launch failure
    return 0;
  }
  return attrs.binaryVersion;
}

}  // namespace
}  // namespace trp

TORCH_LIBRARY_FRAGMENT(trp_kernels_C, m) {
  // The version of the CUDA kernels' image for a device (0: none, the ops must not run there): trp_kernels/project.py.
  m.def("cuda_kernel_image(int device) -> int", &trp::cuda_kernel_image);
}

TORCH_LIBRARY_IMPL(trp_kernels_C, CUDA, m) { trp::Ops<trp::CudaDevice>::register_kernels(m); }
