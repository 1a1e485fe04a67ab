// Host/device-shared numeric core of the low-rank projection: a parallel-ordered two-sided Jacobi
// eigensolver for small symmetric matrices and the energy-rank rule. Every function takes the calling
// thread's index and the block's thread count (tid, nthreads) and a barrier `sync` between phases: the CPU
// kernel runs them with one "thread" (tid = 0, nthreads = 1, no barrier); the CUDA kernel with one block
// per matrix (__syncthreads); the block emulator (csrc/emulator/block_emulator.cpp) with one std::thread per
// CUDA thread and a real barrier, so the very code the GPU runs is run, and raced, on the CPU in CI.
//
// A Sync provides `void operator()()` (a block barrier) and `int any(int pred)` (a barrier that also returns
// whether pred was nonzero in some thread: __syncthreads_or). No thread writes a location that another thread
// reads or writes between two barriers, so results do not depend on the thread count or the schedule: the
// emulator checks them bit for bit against the one-thread path.
//
// Floating point: no expression here relies on fused multiply-adds. The CUDA sources are compiled with
// --fmad=false (setup.py, CMakeLists.txt) and the CPU sources with -ffp-contract=off, so that the GPU computes
// bit for bit what the CPU computes (docs/design/gpu-trust.md).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define TRP_HD __host__ __device__ __forceinline__
#else
#define TRP_HD inline
#endif

namespace trp {

// Round-robin ("circle method") tournament ordering: m (even) players, m - 1 rounds of m / 2 disjoint
// pairs, every pair met exactly once per sweep. Disjoint pairs commute, so a whole round can be applied
// in parallel and the result equals applying its rotations one after another. For odd n, m = n + 1 and
// pairs that involve the dummy player n are skipped.
TRP_HD int jacobi_players(int n) { return n + (n & 1); }

TRP_HD void jacobi_pair(int round, int slot, int m, int* i, int* j) {
  int a, b;
  if (slot == 0) {
    a = m - 1;
    b = round;
  } else {
    a = (round + slot) % (m - 1);
    b = (round - slot + (m - 1)) % (m - 1);
  }
  *i = a < b ? a : b;
  *j = a < b ? b : a;
}

// Rotation that annihilates a[i][j] of the symmetric 2x2 block [[aii, aij], [aij, ajj]] (Rutishauser's
// stable formulas). Returns false (c = 1, s = 0) when a[i][j] is already negligible relative to the
// diagonal, |aij| <= tol * sqrt(|aii * ajj|) (the relative test keeps small eigenvalues accurate), or
// below `floor` in absolute terms (nothing left to resolve at the matrix's scale).
template <typename T>
TRP_HD bool jacobi_rotation(T aii, T ajj, T aij, T tol, T floor, T* c, T* s, T* new_ii, T* new_jj) {
  *c = T(1);
  *s = T(0);
  *new_ii = aii;
  *new_jj = ajj;
  const T abs_ij = fabs(aij);
  if (abs_ij == T(0) || abs_ij <= floor || abs_ij <= tol * sqrt(fabs(aii * ajj))) return false;
  const T theta = (ajj - aii) / (T(2) * aij);
  T t;
  if (fabs(theta) > T(1e150)) {
    t = T(0.5) / theta;  // theta^2 would overflow; t ~ 1 / (2 theta)
  } else {
    t = T(1) / (fabs(theta) + sqrt(theta * theta + T(1)));
    if (theta < T(0)) t = -t;
  }
  *c = T(1) / sqrt(t * t + T(1));
  *s = t * (*c);
  *new_ii = aii - t * aij;
  *new_jj = ajj + t * aij;
  return true;
}

// Per-round scratch: pair indices and rotations of the m / 2 slots.
template <typename T>
struct JacobiRound {
  int* pi;
  int* pj;
  T* c;
  T* s;
  T* dii;
  T* djj;
};

// Phase 1: the rotations of round `round` (one slot per thread). Returns how many rotate.
template <typename T>
TRP_HD int jacobi_phase_angles(const T* a, int lda, int n, int round, T tol, T floor, JacobiRound<T> r,
                               int tid, int nthreads) {
  const int m = jacobi_players(n);
  int rotated = 0;
  for (int slot = tid; slot < m / 2; slot += nthreads) {
    int i, j;
    jacobi_pair(round, slot, m, &i, &j);
    r.pi[slot] = i;
    r.pj[slot] = j;
    if (j >= n) {  // dummy player: no rotation
      r.c[slot] = T(1);
      r.s[slot] = T(0);
      continue;
    }
    rotated += jacobi_rotation(a[i * lda + i], a[j * lda + j], a[i * lda + j], tol, floor, &r.c[slot],
                               &r.s[slot], &r.dii[slot], &r.djj[slot]);
  }
  return rotated;
}

// Phase 2: rows i, j of A <- J^T A, and rows i, j of Vt <- J^T Vt (Vt holds the eigenvectors as rows,
// so that V <- V J is a contiguous row update too). Work item = (slot, column).
template <typename T>
TRP_HD void jacobi_phase_rows(T* a, int lda, T* vt, int ldv, int n, JacobiRound<T> r, int tid,
                              int nthreads) {
  const int half = jacobi_players(n) / 2;
  for (int w = tid; w < half * n; w += nthreads) {
    const int slot = w / n, k = w % n;
    const T c = r.c[slot], s = r.s[slot];
    if (s == T(0)) continue;
    const int i = r.pi[slot], j = r.pj[slot];
    const T ai = a[i * lda + k], aj = a[j * lda + k];
    a[i * lda + k] = c * ai - s * aj;
    a[j * lda + k] = s * ai + c * aj;
    const T vi = vt[i * ldv + k], vj = vt[j * ldv + k];
    vt[i * ldv + k] = c * vi - s * vj;
    vt[j * ldv + k] = s * vi + c * vj;
  }
}

// Phase 3: columns i, j of A <- A J. Work item = (slot, row).
template <typename T>
TRP_HD void jacobi_phase_cols(T* a, int lda, int n, JacobiRound<T> r, int tid, int nthreads) {
  const int half = jacobi_players(n) / 2;
  for (int w = tid; w < half * n; w += nthreads) {
    const int slot = w / n, k = w % n;
    const T c = r.c[slot], s = r.s[slot];
    if (s == T(0)) continue;
    const int i = r.pi[slot], j = r.pj[slot];
    const T ai = a[k * lda + i], aj = a[k * lda + j];
    a[k * lda + i] = c * ai - s * aj;
    a[k * lda + j] = s * ai + c * aj;
  }
}

// Phase 4: the annihilated entries become exact zeros and the diagonal takes the closed-form values
// (more accurate than the rounded two-sided update).
template <typename T>
TRP_HD void jacobi_phase_fix(T* a, int lda, int n, JacobiRound<T> r, int tid, int nthreads) {
  const int half = jacobi_players(n) / 2;
  for (int slot = tid; slot < half; slot += nthreads) {
    if (r.s[slot] == T(0)) continue;
    const int i = r.pi[slot], j = r.pj[slot];
    a[i * lda + j] = T(0);
    a[j * lda + i] = T(0);
    a[i * lda + i] = r.dii[slot];
    a[j * lda + j] = r.djj[slot];
  }
}

// Convergence: a sweep (m - 1 rounds) in which no rotation passed the threshold, or max_sweeps.
constexpr int kJacobiMaxSweeps = 40;

// Relative off-diagonal threshold for the compute type.
template <typename T>
TRP_HD T jacobi_tol();
template <>
TRP_HD double jacobi_tol<double>() { return 1e-15; }
template <>
TRP_HD float jacobi_tol<float>() { return 2e-7f; }

// Eigen-decomposition of the symmetric n x n matrix `a` (row-major, leading dimension lda; destroyed:
// its diagonal ends up holding the eigenvalues) by cyclic sweeps of round-robin rounds. `vt` (ldv) must
// hold the identity on entry and holds the eigenvectors as rows on exit. `sync` separates the phases
// (see the top of this file). Returns the number of sweeps done.
template <typename T, typename Sync>
TRP_HD int jacobi_solve(T* a, int lda, T* vt, int ldv, int n, T floor, JacobiRound<T> r, int tid,
                        int nthreads, Sync sync) {
  const int m = jacobi_players(n);
  const T tol = jacobi_tol<T>();
  int sweep = 0;
  while (sweep < kJacobiMaxSweeps) {
    int rotated = 0;
    for (int round = 0; round < m - 1; ++round) {
      rotated |= jacobi_phase_angles(a, lda, n, round, tol, floor, r, tid, nthreads) > 0;
      sync();  // the round's rotations are written before any thread applies them
      jacobi_phase_rows(a, lda, vt, ldv, n, r, tid, nthreads);
#ifndef TRP_PLANT_MISSING_BARRIER  // tests/test_block_emulator.py plants this bug: the emulator must catch it
      sync();  // rows i, j are updated before the columns are read
#endif
      jacobi_phase_cols(a, lda, n, r, tid, nthreads);
      sync();
      jacobi_phase_fix(a, lda, n, r, tid, nthreads);
      sync();  // the next round reads the fixed diagonal and the scratch is rewritten
    }
    ++sweep;
    if (!sync.any(rotated)) break;  // a sweep with no rotation in any thread: converged
  }
  return sweep;
}

// Absolute floor below which off-diagonal entries are not rotated: far below anything that moves the
// eigenvectors of eigenvalues above the rounding level of the matrix (whose scale is its trace).
template <typename T>
TRP_HD T jacobi_floor(T trace) { return trace * T(1e-20); }

// Indices of d[0..n) in descending order (insertion sort: n is small, single thread).
template <typename T>
TRP_HD void sort_desc(const T* d, int stride, int n, int* perm) {
  for (int i = 0; i < n; ++i) perm[i] = i;
  for (int i = 1; i < n; ++i) {
    const int key = perm[i];
    const T v = d[key * stride];
    int k = i - 1;
    while (k >= 0 && d[perm[k] * stride] < v) {
      perm[k + 1] = perm[k];
      --k;
    }
    perm[k + 1] = key;
  }
}

// The energy-rank rule on eigenvalues of the Gram matrix (= squared singular values), sorted
// descending, in double: the smallest k >= 1 with sum_{i<k} lam_i >= energy * sum_i lam_i, capped by
// max_rank (< 0: none); 0 for an all-zero matrix. Negative eigenvalues (rounding of a PSD matrix) count
// as 0. Fills keep[i] = 1 for i < rank, and inv_s[i] = 1 / s_i for the kept i with s_i clearly above the
// rounding level of the Gram matrix (0 otherwise), which the nuclear-norm subgradient U_k S_k^-1 U_k^T W
// needs. Counts prefixes below the threshold, like the reference, so both break ties the same way.
TRP_HD int64_t energy_rank_select(const double* lam, int n, double energy, int64_t max_rank,
                                  double noise_rel, double* keep, double* inv_s) {
  double total = 0.0;
  for (int i = 0; i < n; ++i) total += lam[i] > 0.0 ? lam[i] : 0.0;
  int64_t rank = 0;
  if (total > 0.0) {
    const double threshold = energy * total;
    double cum = 0.0;
    for (int i = 0; i < n; ++i) {
      cum += lam[i] > 0.0 ? lam[i] : 0.0;
      if (cum < threshold) ++rank;
    }
    rank += 1;
    if (rank > n) rank = n;
    if (max_rank >= 0 && rank > max_rank) rank = max_rank;
  }
  const double lam_floor = (n > 0 && lam[0] > 0.0 ? lam[0] : 0.0) * noise_rel;
  for (int i = 0; i < n; ++i) {
    const bool kept = i < rank;
    if (keep) keep[i] = kept ? 1.0 : 0.0;
    if (inv_s) inv_s[i] = (kept && lam[i] > lam_floor && lam[i] > 0.0) ? 1.0 / sqrt(lam[i]) : 0.0;
  }
  return rank;
}

}  // namespace trp
