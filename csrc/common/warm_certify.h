// Host/device-shared certificate of the warm-started projection (trp_kernels/warm.py has the derivation
// and is the executable specification): from one matrix's Ritz values theta [m] (descending) and squared
// residual norms res2 [m], the energy-rule rank and whether the bounds prove it equal to the exact one with
// the kept subspace within subspace_tol. Fills keep / inv_s like energy_rank_select. O(m), no scratch, so
// a CUDA thread runs it as is.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/jacobi.h"  // TRP_HD

namespace trp {

struct WarmTolerances {
  double rank_margin;    // relative energy margin at the threshold
  double subspace_tol;   // bound on the sine of the angle to the exact kept subspace
  double noise_floor;    // kept directions must have theta_k > noise_floor * noise_rel * theta_1
};

// gap_j (0-based j) of warm.py's certify: theta_j - ||R_{0..j}|| - max(theta_{j+1}, tau) - 2 ||R_{j+1..}||
TRP_HD double warm_gap(const double* theta, int m, int j, double head, double res_total, double tau) {
  const double th = theta[j] > 0.0 ? theta[j] : 0.0;
  double next = j + 1 < m ? theta[j + 1] : 0.0;
  next = next > 0.0 ? next : 0.0;
  const double tail = res_total - head > 0.0 ? sqrt(res_total - head) : 0.0;
  return th - sqrt(head) - (next > tau ? next : tau) - 2.0 * tail;
}

TRP_HD int64_t warm_certify(double trace, const double* theta, const double* res2, int m, double energy,
                            int64_t max_rank, double noise_rel, WarmTolerances tol, double* keep,
                            double* inv_s, bool* ok) {
  double sum_theta = 0.0, res_total = 0.0;
  for (int i = 0; i < m; ++i) {
    sum_theta += theta[i] > 0.0 ? theta[i] : 0.0;
    res_total += res2[i];
  }
  const double th0 = m > 0 && theta[0] > 0.0 ? theta[0] : 0.0;
  int64_t rank = 0;
  bool good = true;
  if (!(trace > 0.0)) {
    good = trace == 0.0;  // an all-zero matrix: rank 0, nothing to certify
  } else {
    const double tau = (trace - sum_theta > 0.0 ? trace - sum_theta : 0.0) +
                       8.0 * 2.220446049250313e-16 * double(m) * trace;
    const double target = energy * trace, margin = tol.rank_margin * trace;
    double cum = 0.0;
    for (int i = 0; i < m; ++i) {
      cum += theta[i] > 0.0 ? theta[i] : 0.0;
      if (cum < target) ++rank;
    }
    const int64_t rank_w = rank + 1;  // m + 1: the threshold is not reached within the block
    rank = max_rank >= 0 && rank_w > max_rank ? max_rank : rank_w;
    const bool capped = rank < rank_w;
    good = rank <= m;
    if (good) {
      const int k = int(rank) - 1;  // index of the last kept Ritz value
      double cum_k = 0.0, cum_j = 0.0, head_k = 0.0, head = 0.0, eps_min = INFINITY;
      for (int i = 0; i < m; ++i) {
        const double th = theta[i] > 0.0 ? theta[i] : 0.0;
        head += res2[i];
        if (i <= k) cum_k += th;
        if (i <= k - 1) cum_j += th;
        if (i == k) head_k = head;
        if (i >= k - 1) {  // eps_i bounds F(j) for every j <= i: the best over i >= k - 1
          const double g = warm_gap(theta, m, i, head, res_total, tau);
          if (g > 0.0 && head / g < eps_min) eps_min = head / g;
        }
      }
      good = capped || cum_k >= target + margin;
      good = good && (rank == 1 || cum_j + eps_min < target - margin);
      // the kept subspace: the smaller of the first-order (Davis-Kahan) and the second-order bound
      const double gap_k = warm_gap(theta, m, k, head_k, res_total, tau);
      const double th_k = theta[k] > 0.0 ? theta[k] : 0.0;
      const double th_k1 = k + 1 < m && theta[k + 1] > 0.0 ? theta[k + 1] : 0.0;
      const double out_gap = th_k - tau, in_gap = th_k - th_k1;
      double sin = gap_k > 0.0 ? sqrt(head_k) / gap_k : INFINITY;
      if (out_gap > 0.0 && in_gap > 0.0) {
        const double s_c = sqrt(res_total) / out_gap;
        const double s_b = (res_total - head_k > 0.0 ? sqrt(res_total - head_k) : 0.0) * s_c / in_gap;
        const double second = sqrt(s_b * s_b + s_c * s_c);
        sin = second < sin ? second : sin;
      }
      good = good && th_k > tol.noise_floor * noise_rel * th0 &&
             sin * (1.0 + sqrt(th0 / th_k)) <= tol.subspace_tol;
    }
    if (!good) rank = rank > m ? m : rank;
  }
  for (int i = 0; i < m; ++i) {
    const bool kept = i < rank;
    keep[i] = kept ? 1.0 : 0.0;
    inv_s[i] = (kept && theta[i] > th0 * noise_rel && theta[i] > 0.0) ? 1.0 / sqrt(theta[i]) : 0.0;
  }
  *ok = good;
  return rank;
}

}  // namespace trp
