// trp_kernels_C::lowrank_project_inplace_: the projection of many small matrices (several shape groups) in
// one call, in place, on the CPU: what RankPruner runs every projection for networks whose matrices all have
// n <= kCpuInplaceMaxN (trp_kernels/inplace.py). The same per-matrix kernels as the functional ops
// (csrc/cpu/per_matrix.h), without what surrounds them there: no stacking of the layers into a batch and no
// copy back (each matrix is read and overwritten where it lives, a view of its layer's weight), the
// subgradient written into buffers the caller keeps between calls, the fallback to the full solve of a
// matrix whose certificate fails done on the spot by the thread that tried it, and the matrices of all
// groups shared out over the threads by their cost. Every matrix is checked for NaN/Inf before any is written;
// only a LAPACK failure on finite input (never seen) could raise after some matrices were written: those then
// hold their projections, which are valid.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

#include "cpu/per_matrix.h"

namespace trp {
namespace {

struct Group {
  int64_t first = 0, count = 0, p = 0, q = 0, n = 0, m = 0;  // m: basis width, 0 = no warm start
  const double* basis = nullptr;
  at::Tensor vectors;  // [count, n, n] float64: each matrix's eigen/Ritz vectors (leading columns used)
};

template <typename Real>
bool all_finite(const Real* x, int64_t size) {
  // x - x is 0 for finite x and NaN otherwise; eight lanes so that the compiler vectorizes the sum
  Real acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= size; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += x[i + l] - x[i + l];
  for (; i < size; ++i) acc[0] += x[i] - x[i];
  Real total = 0;
  for (Real v : acc) total += v;
  return total == 0;
}

// Each thread's share of the matrices: the longest first, each to the least loaded thread.
std::vector<std::vector<int64_t>> share_out(const std::vector<double>& cost, int64_t threads) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<std::vector<int64_t>> share(threads);
  std::vector<double> load(threads, 0.0);
  for (int64_t j : order) {
    const int64_t t = std::min_element(load.begin(), load.end()) - load.begin();
    share[t].push_back(j);
    load[t] += cost[j];
  }
  return share;
}

template <typename Real>
void project_matrix(Real* a, const Group& g, int64_t b, double energy, int64_t max_rank, bool subgradient,
                    const WarmParams& params, Real* gb, std::vector<double>& a64, int64_t* rank, bool* warm) {
  const int p = int(g.p), q = int(g.q), n = int(g.n);
  const double* a_64 = float64_view(a, p, q, a64);
  double* vectors = g.vectors.data_ptr<double>() + b * n * n;
  if (g.m > 0) {
    const WarmOneOut r = warm_one(a, a_64, p, q, g.basis + b * n * g.m, int(g.m), energy, max_rank, subgradient,
                                  params, a, gb, vectors, n);
    if (r.ok) {
      *rank = r.rank;
      *warm = true;
      return;
    }
  }
  *rank = cold_one(a, a_64, p, q, energy, max_rank, subgradient, a, gb, vectors, n);
  *warm = false;
}

// matrices: every group's [p, q] matrices, group after group (group_sizes), each contiguous, float32 or
// float64 (one dtype per group), on the CPU; bases: per group None (full solve) or the warm start [B, n, m]
// float64; G: per group a [B, p, q] buffer in the group's dtype for the subgradient (none when subgradient
// is false). Returns (finite bool [all matrices], per group: rank int64 [B], next basis [B, n, max(1, max
// rank)] float64, warm bool [B]). When some matrix is not finite nothing is computed or written and the
// lists are empty.
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
lowrank_project_inplace_cpu(at::TensorList matrices, at::IntArrayRef group_sizes,
                            const c10::List<std::optional<at::Tensor>>& bases, at::TensorList G, double energy,
                            std::optional<int64_t> max_rank, bool subgradient, int64_t power_steps,
                            double rank_margin, double subspace_tol, double noise_floor) {
  TORCH_CHECK(blas::available(),
              "lowrank_project_inplace_: needs the BLAS/LAPACK symbols of torch's CPU library");
  check_energy_and_max_rank(energy, max_rank);
  const int64_t groups = int64_t(group_sizes.size());
  TORCH_CHECK(int64_t(bases.size()) == groups, "lowrank_project_inplace_: one basis (or None) per group");
  TORCH_CHECK(G.size() == (subgradient ? size_t(groups) : 0),
              "lowrank_project_inplace_: one subgradient buffer per group when subgradient, else none");
  std::vector<Group> gs(groups);
  int64_t total = 0;
  for (int64_t i = 0; i < groups; ++i) {
    Group& g = gs[i];
    g.first = total;
    g.count = group_sizes[i];
    total += g.count;
    TORCH_CHECK(g.count >= 1 && total <= int64_t(matrices.size()),
                "lowrank_project_inplace_: group sizes must be >= 1 and add up to the number of matrices");
    const at::Tensor& w0 = matrices[g.first];
    TORCH_CHECK(w0.dim() == 2 && w0.size(0) >= 1 && w0.size(1) >= 1,
                "lowrank_project_inplace_: matrices must be non-empty 2-D, got ", w0.sizes());
    g.p = w0.size(0);
    g.q = w0.size(1);
    g.n = n_of(g.p, g.q);
    TORCH_CHECK(g.n <= kCpuInplaceMaxN, "lowrank_project_inplace_: matrices with min(p, q) > ", kCpuInplaceMaxN,
                " take the batched path (lowrank_project)");
    for (int64_t b = g.first; b < total; ++b) {
      const at::Tensor& w = matrices[b];
      TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.sizes() == w0.sizes() &&
                      w.scalar_type() == w0.scalar_type() &&
                      (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble),
                  "lowrank_project_inplace_: a group's matrices must be contiguous CPU float32/float64 tensors "
                  "of one shape and dtype");
    }
    if (subgradient)
      TORCH_CHECK(G[i].is_contiguous() && G[i].device().is_cpu() && G[i].scalar_type() == w0.scalar_type() &&
                      G[i].sizes() == at::IntArrayRef({g.count, g.p, g.q}),
                  "lowrank_project_inplace_: G[", i, "] must be a contiguous [B, p, q] buffer in the group's dtype");
    const std::optional<at::Tensor> basis = bases.get(i);
    if (basis.has_value() && basis->defined()) {
      check_warm_basis(*basis, g.count, g.n);
      TORCH_CHECK(basis->is_contiguous() && basis->device().is_cpu(),
                  "lowrank_project_inplace_: basis ", i, " must be a contiguous CPU tensor");
      g.m = basis->size(2);
      g.basis = basis->data_ptr<double>();
    }
  }
  TORCH_CHECK(total == int64_t(matrices.size()),
              "lowrank_project_inplace_: group sizes must add up to the number of matrices");
  // Each matrix is written by one thread: none may share memory with another (the same weight twice)
  std::vector<std::pair<uintptr_t, uintptr_t>> spans;
  for (const at::Tensor& w : matrices) {
    const auto start = reinterpret_cast<uintptr_t>(w.data_ptr());
    spans.emplace_back(start, start + w.numel() * w.element_size());
  }
  std::sort(spans.begin(), spans.end());
  for (size_t j = 1; j < spans.size(); ++j)
    TORCH_CHECK(spans[j - 1].second <= spans[j].first,
                "lowrank_project_inplace_: two matrices share memory (the same weight twice?); each must be "
                "written once");

  at::Tensor finite = at::empty({total}, at::TensorOptions().dtype(at::kBool));
  bool* fp = finite.data_ptr<bool>();
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const at::Tensor& w = matrices[j];
      AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "lowrank_project_inplace_",
                                 [&] { fp[j] = all_finite(w.data_ptr<scalar_t>(), w.numel()); });
    }
  });
  std::vector<at::Tensor> ranks, next, warm;
  if (!std::all_of(fp, fp + total, [](bool f) { return f; })) return {finite, ranks, next, warm};

  std::vector<int64_t*> rank_ptr(groups);
  std::vector<bool*> warm_ptr(groups);
  std::vector<double> cost(total);
  std::vector<int64_t> group_of(total);
  for (int64_t i = 0; i < groups; ++i) {
    Group& g = gs[i];
    ranks.push_back(at::empty({g.count}, at::TensorOptions().dtype(at::kLong)));
    warm.push_back(at::empty({g.count}, at::TensorOptions().dtype(at::kBool)));
    rank_ptr[i] = ranks.back().data_ptr<int64_t>();
    warm_ptr[i] = warm.back().data_ptr<bool>();
    g.vectors = at::empty({g.count, g.n, g.n}, at::TensorOptions().dtype(at::kDouble));
    // the Gram matrix dominates; the full solve adds an n x n eigensolve
    const double c = double(g.n) * g.n * (g.q + g.p + (g.m > 0 ? 0.0 : 4.0 * g.n));
    for (int64_t b = 0; b < g.count; ++b) {
      cost[g.first + b] = c;
      group_of[g.first + b] = i;
    }
  }
  const WarmParams params{power_steps, {rank_margin, subspace_tol, noise_floor}};
  const int64_t max_r = max_rank.value_or(-1);
  const auto share = share_out(cost, std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total)));
  at::parallel_for(0, int64_t(share.size()), 1, [&](int64_t begin, int64_t end) {
    const blas::SequentialScope one_thread_each;  // the threads are spread over the matrices
    std::vector<double> a64;
    for (int64_t t = begin; t < end; ++t)
      for (int64_t j : share[t]) {
        const int64_t i = group_of[j], b = j - gs[i].first;
        const at::Tensor& w = matrices[j];
        AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "lowrank_project_inplace_", [&] {
          project_matrix(w.data_ptr<scalar_t>(), gs[i], b, energy, max_r, subgradient, params,
                         subgradient ? G[i].data_ptr<scalar_t>() + b * gs[i].p * gs[i].q : nullptr, a64,
                         rank_ptr[i] + b, warm_ptr[i] + b);
        });
      }
  });
  // The next call's state: each matrix's kept vectors, zero columns up to the group's largest rank (as
  // trp_kernels/warm.py's next_basis)
  for (int64_t i = 0; i < groups; ++i) {
    const Group& g = gs[i];
    const int64_t* rk = rank_ptr[i];
    const int64_t m = std::max<int64_t>(1, *std::max_element(rk, rk + g.count));
    at::Tensor out = at::zeros({g.count, g.n, m}, at::TensorOptions().dtype(at::kDouble));
    const double* v = g.vectors.data_ptr<double>();
    double* o = out.data_ptr<double>();
    for (int64_t b = 0; b < g.count; ++b)
      for (int64_t r = 0; r < g.n; ++r)
        std::copy_n(v + (b * g.n + r) * g.n, rk[b], o + (b * g.n + r) * m);
    next.push_back(out);
  }
  return {finite, ranks, next, warm};
}

}  // namespace

int64_t inplace_max_n() { return blas::available() ? kCpuInplaceMaxN : 0; }

}  // namespace trp

TORCH_LIBRARY_FRAGMENT(trp_kernels_C, m) {
  // Projects every matrix in place (csrc/cpu/project_inplace.cpp): groups of [p, q] matrices (views of the
  // layers' weights), each group's warm start (or None) and subgradient buffer -> (finite [N], per group:
  // rank [B], next warm start [B, n, m], warm bool [B]); nothing is written when some matrix is not finite.
  m.def("lowrank_project_inplace_(Tensor(a!)[] matrices, int[] group_sizes, Tensor?[] bases, Tensor(b!)[] G, "
        "float energy, int? max_rank, bool subgradient, int power_steps, float rank_margin, float subspace_tol, "
        "float noise_floor) -> (Tensor, Tensor[], Tensor[], Tensor[])");
  // The largest min(p, q) lowrank_project_inplace_ takes (0: not available in this build of torch).
  m.def("lowrank_project_inplace_max_n() -> int", &trp::inplace_max_n);
}

TORCH_LIBRARY_IMPL(trp_kernels_C, CPU, m) { m.impl("lowrank_project_inplace_", &trp::lowrank_project_inplace_cpu); }
