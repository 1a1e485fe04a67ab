// The bodies of the CUDA kernels as host/device functions of one thread block: (block index, thread index,
// thread count, barrier) in, nothing device-specific inside. csrc/cuda/lowrank_project.cu launches them
// (one line per __global__ function), the CPU kernels call them with one thread, and the block emulator
// (csrc/emulator/block_emulator.cpp) runs them on the CPU with one std::thread per CUDA thread, a
// barrier for __syncthreads() and poisoned shared memory, at the launch configuration below (the one
// the .cu uses). Nothing here may use shared memory beyond the bytes the launch configuration gives it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/jacobi.h"
#include "common/warm_certify.h"

namespace trp {

// --- the Jacobi eigensolver: one block per matrix, everything in dynamic shared memory --------------------

constexpr int kJacobiMaxN = 64;         // larger matrices go to the library eigensolver
constexpr int kJacobiMaxThreads = 512;  // also the kernel's __launch_bounds__

// Threads of the block for an n x n matrix: one work item per (pair slot, row/column), up to
// 32 * 64 = 2048 items, rounded up to whole warps, at least one warp and at most kJacobiMaxThreads.
TRP_HD int jacobi_threads(int n) {
  const int items = (jacobi_players(n) / 2) * n;
  const int warps = (items + 31) / 32;
  const int threads = 32 * (warps > 1 ? warps : 1);
  return threads < kJacobiMaxThreads ? threads : kJacobiMaxThreads;
}

// Shared-memory layout of one block: A and Vt (n x (n + 1) doubles each; the padding spreads the column
// accesses over the banks), the round scratch, the absolute floor, then the ints: pair indices and the sort
// permutation.
struct JacobiSmem {
  double* a;
  double* vt;
  double* floor;
  int* perm;
  JacobiRound<double> round;
  int lda;

  TRP_HD static size_t bytes(int n) {
    const size_t half = size_t(jacobi_players(n) / 2);
    return sizeof(double) * (2 * size_t(n) * (n + 1) + 4 * half + 1) + sizeof(int) * (2 * half + n);
  }

  TRP_HD static JacobiSmem carve(void* base, int n) {
    const int lda = n + 1, half = jacobi_players(n) / 2;
    double* d = static_cast<double*>(base);
    JacobiSmem s;
    s.lda = lda;
    s.a = d;
    s.vt = s.a + size_t(n) * lda;
    double* c = s.vt + size_t(n) * lda;
    s.round.c = c;
    s.round.s = c + half;
    s.round.dii = c + 2 * half;
    s.round.djj = c + 3 * half;
    s.floor = c + 4 * half;
    int* i = reinterpret_cast<int*>(s.floor + 1);
    s.round.pi = i;
    s.round.pj = i + half;
    s.perm = i + 2 * half;
    return s;
  }
};

// One matrix: g (n x n, row-major, symmetric) -> evals [n] descending and evecs (n x n, row-major, column j
// = eigenvector j). smem: JacobiSmem::bytes(n) bytes, 8-byte aligned, contents undefined on entry.
template <typename Sync>
TRP_HD void jacobi_block(const double* g, int n, double* evals, double* evecs, void* smem, int tid, int nthreads,
                         Sync sync) {
  const JacobiSmem s = JacobiSmem::carve(smem, n);
  const int lda = s.lda;
  for (int w = tid; w < n * n; w += nthreads) {
    const int i = w / n, j = w % n;
    s.a[i * lda + j] = g[w];
    s.vt[i * lda + j] = i == j ? 1.0 : 0.0;
  }
  sync();
  if (tid == 0) {
    double trace = 0.0;
    for (int i = 0; i < n; ++i) trace += fabs(s.a[i * lda + i]);
    *s.floor = jacobi_floor(trace);
  }
  sync();
  jacobi_solve(s.a, lda, s.vt, lda, n, *s.floor, s.round, tid, nthreads, sync);
  if (tid == 0) sort_desc(s.a, lda + 1, n, s.perm);
  sync();
  for (int w = tid; w < n * n; w += nthreads) {
    const int row = w / n, j = w % n;
    if (row == 0) evals[j] = s.a[s.perm[j] * (lda + 1)];
    evecs[w] = s.vt[s.perm[j] * lda + row];  // column j = eigenvector j
  }
}

// --- one thread per matrix: the energy rank of the full solve and the warm step's certificate -----------

constexpr int kPerMatrixThreads = 128;

TRP_HD int64_t per_matrix_blocks(int64_t B) { return (B + kPerMatrixThreads - 1) / kPerMatrixThreads; }

// evals [B, n] (descending) -> rank [B], keep / inv_s [B, n] (energy_rank_select), matrix block * nthreads + tid.
TRP_HD void select_rank_block(const double* evals, int64_t B, int n, double energy, int64_t max_rank,
                              double noise_rel, int64_t* rank, double* keep, double* inv_s, int64_t block, int tid,
                              int nthreads) {
  const int64_t b = block * nthreads + tid;
  if (b >= B) return;
  rank[b] = energy_rank_select(evals + b * n, n, energy, max_rank, noise_rel, keep + b * n, inv_s + b * n);
}

// trace [B], theta / res2 [B, m] -> rank [B], keep / inv_s [B, m], ok [B] (warm_certify), matrix
// block * nthreads + tid.
TRP_HD void warm_certify_block(const double* trace, const double* theta, const double* res2, int64_t B, int m,
                               double energy, int64_t max_rank, double noise_rel, WarmTolerances tol, int64_t* rank,
                               double* keep, double* inv_s, bool* ok, int64_t block, int tid, int nthreads) {
  const int64_t b = block * nthreads + tid;
  if (b >= B) return;
  rank[b] = warm_certify(trace[b], theta + b * m, res2 + b * m, m, energy, max_rank, noise_rel, tol, keep + b * m,
                         inv_s + b * m, ok + b);
}

// The barrier of the one-thread (CPU) path: nothing to wait for.
struct NoSync {
  TRP_HD void operator()() const {}
  TRP_HD int any(int pred) const { return pred; }
};

}  // namespace trp
