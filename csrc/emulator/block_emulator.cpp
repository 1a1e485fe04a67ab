// The block emulator: runs the CUDA kernels' block functions (common/block_kernels.h, the code the .cu
// launches) on the CPU as a GPU runs them: one std::thread per CUDA thread of the block, a barrier for
// __syncthreads(), shared memory filled with a poison pattern (NaN as a double, -1 as an int) and followed by a
// canary, at the launch configuration of the .cu (jacobi_threads(n), JacobiSmem::bytes(n), kPerMatrixThreads).
// Every result is compared bit for bit with the one-thread path (what the CPU kernels run); the one-thread
// Jacobi results are also checked against the definition (residual, orthonormality). Plain C++20, no torch:
//
//   g++ -std=c++20 -O2 -pthread -Icsrc csrc/emulator/block_emulator.cpp -o block_emulator [-fsanitize=thread]
//   ./block_emulator [--sizes 1,2,7,64]
//
// Exit status 0 when everything is identical, 1 otherwise (the lines say which size and kernel).
// tests/test_block_emulator.py builds it with and without ThreadSanitizer and with a planted missing barrier.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/block_kernels.h"

namespace {

constexpr unsigned char kPoison = 0xFF;
constexpr size_t kCanaryBytes = 256;
constexpr unsigned char kCanary = 0xA5;
// The largest dynamic shared memory a block may opt in to on the GPUs we build for (sm_90: 227 KB).
constexpr size_t kMaxSharedOptin = 232448;

// A block barrier: the last thread to arrive starts the next phase and wakes the others (C++20 atomic
// wait/notify, futexes on Linux). std::barrier does the same job, but at 512 threads on a 2-core machine
// its tree of atomics costs 1.4x as much per barrier, and 2x under ThreadSanitizer (measured on the build
// machine), where this test's time goes. Acquire/release on `phase` orders every thread's writes before the
// barrier with every thread's reads after it, which is what ThreadSanitizer checks the kernels against.
class BlockBarrier {
 public:
  explicit BlockBarrier(int count) : count_(count), waiting_(count) {}
  void arrive_and_wait() {
    const unsigned phase = phase_.load(std::memory_order_acquire);
    if (waiting_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      waiting_.store(count_, std::memory_order_relaxed);
      phase_.fetch_add(1, std::memory_order_acq_rel);
      phase_.notify_all();
    } else {
      while (phase_.load(std::memory_order_acquire) == phase) phase_.wait(phase, std::memory_order_acquire);
    }
  }

 private:
  const int count_;
  std::atomic<int> waiting_;
  std::atomic<unsigned> phase_{0};
};

// __syncthreads() and __syncthreads_or() of one emulated block.
struct EmuSync {
  BlockBarrier* bar;
  int* votes;  // one per thread; written before, read after a barrier
  int tid;
  int nthreads;
  void operator()() const { bar->arrive_and_wait(); }
  int any(int pred) const {
    votes[tid] = pred;
    bar->arrive_and_wait();
    int result = 0;
    for (int t = 0; t < nthreads; ++t) result |= votes[t];
    bar->arrive_and_wait();  // every thread has read the votes before any thread votes again
    return result;
  }
};

// Runs body(tid, sync) on nthreads concurrent threads (one CUDA block).
template <typename Body>
void run_block(int nthreads, const Body& body) {
  BlockBarrier bar(nthreads);
  std::vector<int> votes(static_cast<size_t>(nthreads), 0);
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(nthreads));
  for (int t = 0; t < nthreads; ++t)
    threads.emplace_back([&, t] { body(t, EmuSync{&bar, votes.data(), t, nthreads}); });
  for (auto& th : threads) th.join();
}

// Dynamic shared memory of `bytes`, poisoned, followed by a canary that must survive the kernel.
struct SharedMemory {
  std::vector<double> storage;  // double: the alignment the kernel's layout needs
  size_t bytes;
  explicit SharedMemory(size_t b) : storage((b + kCanaryBytes) / sizeof(double) + 1), bytes(b) {
    unsigned char* p = reinterpret_cast<unsigned char*>(storage.data());
    std::memset(p, kPoison, bytes);
    std::memset(p + bytes, kCanary, storage.size() * sizeof(double) - bytes);
  }
  void* data() { return storage.data(); }
  bool canary_intact() const {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(storage.data());
    for (size_t i = bytes; i < storage.size() * sizeof(double); ++i)
      if (p[i] != kCanary) return false;
    return true;
  }
};

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Symmetric test matrices of size n: random, a Gram matrix with a decaying spectrum (what the projection
// solves), repeated eigenvalues (I + u u^T), zero, and a nearly diagonal one (distinct diagonal, every
// off-diagonal entry nonzero: every pair rotates in the first sweep, and three sweeps converge). At the
// sizes that take the most threads only the nearly diagonal one: a barrier of 512 threads costs
// milliseconds on a 2-core machine (more under ThreadSanitizer), and one sweep already runs every round's
// access pattern; the others need ten sweeps and more.
std::vector<std::pair<std::string, std::vector<double>>> test_matrices(int n, bool quick, std::mt19937_64& gen) {
  std::normal_distribution<double> normal;
  const size_t nn = static_cast<size_t>(n) * n;
  std::vector<double> x(nn);
  for (auto& v : x) v = normal(gen);
  std::vector<double> sym(nn), gram(nn, 0.0), ones(nn, 0.0), zero(nn, 0.0), near(nn, 0.0);
  std::vector<double> u(static_cast<size_t>(n));
  for (auto& v : u) v = normal(gen);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      const size_t ij = static_cast<size_t>(i) * n + j, ji = static_cast<size_t>(j) * n + i;
      sym[ij] = x[ij] + x[ji];
      double g = 0.0;
      for (int k = 0; k < n; ++k)
        g += x[static_cast<size_t>(i) * n + k] * x[static_cast<size_t>(j) * n + k] * std::pow(0.7, k);
      gram[ij] = g;
      ones[ij] = (i == j ? 1.0 : 0.0) + u[static_cast<size_t>(i)] * u[static_cast<size_t>(j)];
      near[ij] = i == j ? std::pow(0.9, i) : 1e-6 * (x[ij] + x[ji]);
    }
  if (quick) return {{"near-diagonal", near}};
  return {{"random", sym}, {"gram", gram}, {"repeated", ones}, {"zero", zero}, {"near-diagonal", near}};
}

// max |A v_j - lam_j v_j| and max |V^T V - I|, relative to the matrix's scale.
double jacobi_error(const std::vector<double>& a, const std::vector<double>& evals, const std::vector<double>& evecs,
                    int n) {
  double scale = 1e-300, err = 0.0;
  for (double v : a) scale = std::fmax(scale, std::fabs(v));
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < n; ++i) {
      double av = 0.0, vv = 0.0;
      for (int k = 0; k < n; ++k) {
        av += a[static_cast<size_t>(i) * n + k] * evecs[static_cast<size_t>(k) * n + j];
        vv += evecs[static_cast<size_t>(k) * n + i] * evecs[static_cast<size_t>(k) * n + j];
      }
      const double lam_v = evals[static_cast<size_t>(j)] * evecs[static_cast<size_t>(i) * n + j];
      err = std::fmax(err, std::fabs(av - lam_v) / (scale * n));
      err = std::fmax(err, std::fabs(vv - (i == j ? 1.0 : 0.0)));
    }
  for (int j = 1; j < n; ++j)
    if (evals[static_cast<size_t>(j)] > evals[static_cast<size_t>(j - 1)]) err = std::fmax(err, 1.0);  // not descending
  return err;
}

bool check_jacobi(int n, std::mt19937_64& gen) {
  const int threads = trp::jacobi_threads(n);
  const size_t bytes = trp::JacobiSmem::bytes(n);
  bool good = bytes <= kMaxSharedOptin;
  if (!good) std::printf("jacobi n=%d: %zu B of shared memory > %zu\n", n, bytes, kMaxSharedOptin);
  for (const auto& [name, a] : test_matrices(n, threads >= trp::kJacobiMaxThreads, gen)) {
    const size_t nn = static_cast<size_t>(n) * n;
    std::vector<double> ev1(static_cast<size_t>(n)), vec1(nn), ev(static_cast<size_t>(n)), vec(nn);
    SharedMemory one(bytes), emu(bytes);
    trp::jacobi_block(a.data(), n, ev1.data(), vec1.data(), one.data(), 0, 1, trp::NoSync{});
    run_block(threads, [&](int tid, const EmuSync& sync) {
      trp::jacobi_block(a.data(), n, ev.data(), vec.data(), emu.data(), tid, threads, sync);
    });
    const double err = jacobi_error(a, ev1, vec1, n);
    const bool same = same_bits(ev, ev1) && same_bits(vec, vec1);
    const bool ok = same && err < 1e-12 && one.canary_intact() && emu.canary_intact();
    std::printf("jacobi n=%d %s: %d threads, %zu B shared: %s (error %.1e)%s\n", n, name.c_str(), threads, bytes,
                same ? "identical" : "DIFFERENT from the one-thread path", err,
                one.canary_intact() && emu.canary_intact() ? "" : ", WROTE PAST its shared memory");
    good = good && ok;
  }
  return good;
}

// The per-matrix kernels over a grid of kPerMatrixThreads-thread blocks, B matrices of width m.
bool check_per_matrix(int64_t B, int m, std::mt19937_64& gen) {
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  const size_t Bm = static_cast<size_t>(B) * m;
  std::vector<double> trace(static_cast<size_t>(B)), theta(Bm), res2(Bm);
  for (int64_t b = 0; b < B; ++b) {
    double v = 1.0, sum = 0.0;
    for (int i = 0; i < m; ++i) {
      v *= 0.3 + 0.65 * unif(gen);  // descending
      theta[static_cast<size_t>(b) * m + i] = b % 17 == 3 ? 0.0 : v;
      res2[static_cast<size_t>(b) * m + i] = v * v * std::pow(10.0, -14.0 * unif(gen));
      sum += theta[static_cast<size_t>(b) * m + i];
    }
    trace[static_cast<size_t>(b)] = sum * (1.0 + 0.2 * unif(gen));
  }
  const trp::WarmTolerances tol{1e-9, 1e-6, 1e3};
  const double energy = 0.8, noise_rel = 1e-13;
  const int64_t max_rank = m > 2 ? m - 1 : -1;
  const int64_t blocks = trp::per_matrix_blocks(B);
  const int nt = trp::kPerMatrixThreads;
  bool good = true;
  {  // the certificate
    std::vector<int64_t> r1(static_cast<size_t>(B), -7), r(static_cast<size_t>(B), -7);
    std::vector<double> k1(Bm, -1.0), i1(Bm, -1.0), k(Bm, -1.0), iv(Bm, -1.0);
    std::unique_ptr<bool[]> ok1(new bool[static_cast<size_t>(B)]()), ok(new bool[static_cast<size_t>(B)]());
    for (int64_t b = 0; b < B; ++b)
      trp::warm_certify_block(trace.data(), theta.data(), res2.data(), B, m, energy, max_rank, noise_rel, tol,
                              r1.data(), k1.data(), i1.data(), ok1.get(), b, 0, 1);
    for (int64_t blk = 0; blk < blocks; ++blk)
      run_block(nt, [&](int tid, const EmuSync&) {
        trp::warm_certify_block(trace.data(), theta.data(), res2.data(), B, m, energy, max_rank, noise_rel, tol,
                                r.data(), k.data(), iv.data(), ok.get(), blk, tid, nt);
      });
    const bool same = same_bits(r, r1) && same_bits(k, k1) && same_bits(iv, i1) &&
                      std::memcmp(ok.get(), ok1.get(), static_cast<size_t>(B)) == 0;
    int64_t certified = 0;
    for (int64_t b = 0; b < B; ++b) certified += ok1[static_cast<size_t>(b)];
    std::printf("warm_certify B=%lld m=%d: %lld blocks of %d threads: %s (%lld certified)\n", (long long)B, m,
                (long long)blocks, nt, same ? "identical" : "DIFFERENT from the one-thread path",
                (long long)certified);
    good = good && same;
  }
  {  // the energy rank of the full solve (theta as eigenvalues)
    std::vector<int64_t> r1(static_cast<size_t>(B), -7), r(static_cast<size_t>(B), -7);
    std::vector<double> k1(Bm, -1.0), i1(Bm, -1.0), k(Bm, -1.0), iv(Bm, -1.0);
    for (int64_t b = 0; b < B; ++b)
      trp::select_rank_block(theta.data(), B, m, energy, max_rank, noise_rel, r1.data(), k1.data(), i1.data(), b, 0,
                             1);
    for (int64_t blk = 0; blk < blocks; ++blk)
      run_block(nt, [&](int tid, const EmuSync&) {
        trp::select_rank_block(theta.data(), B, m, energy, max_rank, noise_rel, r.data(), k.data(), iv.data(), blk,
                               tid, nt);
      });
    const bool same = same_bits(r, r1) && same_bits(k, k1) && same_bits(iv, i1);
    std::printf("select_rank B=%lld n=%d: %lld blocks of %d threads: %s\n", (long long)B, m, (long long)blocks, nt,
                same ? "identical" : "DIFFERENT from the one-thread path");
    good = good && same;
  }
  return good;
}

std::vector<int> parse_sizes(const char* arg) {
  std::vector<int> sizes;
  for (const char* p = arg; *p;) {
    char* end = nullptr;
    const long v = std::strtol(p, &end, 10);
    if (end == p || v < 1 || v > trp::kJacobiMaxN) {
      std::fprintf(stderr, "--sizes: integers in 1..%d separated by commas, got %s\n", trp::kJacobiMaxN, arg);
      std::exit(2);
    }
    sizes.push_back(int(v));
    p = *end == ',' ? end + 1 : end;
  }
  return sizes;
}

}  // namespace

int main(int argc, char** argv) {
  // The sizes of the issue that introduced the emulator: tiny, odd (a dummy player), around the 48 KB default
  // shared memory (54 | 55) and the largest the kernel takes.
  std::vector<int> sizes{1, 2, 3, 7, 16, 33, 54, 55, trp::kJacobiMaxN};
  bool per_matrix = true;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--sizes" && i + 1 < argc) {
      sizes = parse_sizes(argv[++i]);
    } else if (arg == "--jacobi-only") {
      per_matrix = false;
    } else {
      std::fprintf(stderr, "usage: %s [--sizes N,N,...] [--jacobi-only]\n", argv[0]);
      return 2;
    }
  }
  std::mt19937_64 gen(20240528);
  bool good = true;
  for (int n : sizes) good = check_jacobi(n, gen) && good;
  if (per_matrix) {
    good = check_per_matrix(300, 1, gen) && good;
    good = check_per_matrix(300, 17, gen) && good;
  }
  std::printf("block emulator: %s\n", good ? "all identical" : "FAILED");
  return good ? 0 : 1;
}
