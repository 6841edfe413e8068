#include "fedng/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <mutex>
#include <numeric>
#include <queue>
#include <thread>

#include "fedng/blas.h"

namespace fedng {
namespace {

// pthread condition variable: std::condition_variable::wait carries a GLIBCXX_3.4.30 symbol
// version (GCC 12), which would lift the wheel's manylinux tag above 2_34.
class CondVar {
 public:
  CondVar() { pthread_cond_init(&cv_, nullptr); }
  CondVar(const CondVar&) = delete;
  CondVar& operator=(const CondVar&) = delete;
  template <class Pred>
  void wait(std::unique_lock<std::mutex>& lk, Pred ready) {
    while (!ready()) pthread_cond_wait(&cv_, lk.mutex()->native_handle());
  }
  void notify_one() { pthread_cond_signal(&cv_); }
  void notify_all() { pthread_cond_broadcast(&cv_); }

 private:
  pthread_cond_t cv_;
};

// A persistent pool: waking sleeping workers costs microseconds, creating threads does not pay
// for the 4096-tiny-matrix case. Workers sleep on a condition variable (no spinning against
// torch's or OpenBLAS's threads).
class Pool {
 public:
  void run(std::int64_t n, int nthreads, const std::function<void(std::int64_t)>& fn) {
    std::lock_guard<std::mutex> serial(run_mu_);  // one parallel region at a time
    int helpers = static_cast<int>(std::min<std::int64_t>(nthreads, n)) - 1;
    grow(helpers);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      wanted_ = helpers;
      busy_ = helpers;
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return busy_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void grow(int helpers) {
    while (static_cast<int>(threads_.size()) < helpers) {
      int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id] { loop(id); });
    }
  }

  void work() {
    for (;;) {
      std::int64_t i = next_.fetch_add(1);
      if (i >= n_) return;
      try {
        (*fn_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_);  // stop handing out work
      }
    }
  }

  void loop(int id) {
    std::uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= wanted_) continue;
      }
      work();
      std::lock_guard<std::mutex> lk(mu_);
      if (--busy_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex run_mu_, mu_;
  CondVar cv_, done_cv_;
  std::vector<std::thread> threads_;
  const std::function<void(std::int64_t)>* fn_ = nullptr;
  std::int64_t n_ = 0;
  std::atomic<std::int64_t> next_{0};
  int wanted_ = 0, busy_ = 0;
  std::uint64_t generation_ = 0;
  std::exception_ptr error_;
};

// Leaked on purpose: joining at interpreter exit could deadlock. A forked child starts a new pool
// (the parent's workers do not exist there).
Pool* g_pool = nullptr;
std::once_flag g_atfork_once;
int g_blas_threads = -1;

Pool& pool() {
  std::call_once(g_atfork_once, [] {
    pthread_atfork(nullptr, nullptr, [] {
      g_pool = nullptr;
      g_blas_threads = -1;
    });
  });
  if (!g_pool) g_pool = new Pool();
  return *g_pool;
}

// Longest-processing-time makespan of `cost` (sorted descending) on `p` threads.
double lpt_makespan(const std::vector<double>& sorted, std::size_t first, int p) {
  std::priority_queue<double, std::vector<double>, std::greater<double>> load;
  for (int t = 0; t < p; ++t) load.push(0.0);
  double worst = 0.0;
  for (std::size_t i = first; i < sorted.size(); ++i) {
    double l = load.top() + sorted[i];
    load.pop();
    load.push(l);
    worst = std::max(worst, l);
  }
  return worst;
}

// Waking a worker and splitting the work costs tens of microseconds: below this much work (a few
// hundred microseconds of one core) a call runs serially.
constexpr double kSerialBelowFlops = 2e7;

}  // namespace

void parallel_for(std::int64_t n, int nthreads, const std::function<void(std::int64_t)>& fn) {
  if (n <= 0) return;
  if (nthreads <= 1 || n == 1) {
    for (std::int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  pool().run(n, nthreads, fn);
}

void set_blas_threads(int n) {
  n = std::max(1, n);
  if (n != g_blas_threads) {
    scipy_openblas_set_num_threads(n);
    g_blas_threads = n;
  }
}

void run_ragged(const std::vector<double>& cost, int nthreads,
                const std::function<void(std::int64_t)>& fn) {
  const std::int64_t n = static_cast<std::int64_t>(cost.size());
  if (n == 0) return;
  std::vector<std::int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](std::int64_t a, std::int64_t b) { return cost[a] > cost[b]; });
  const double total = std::accumulate(cost.begin(), cost.end(), 0.0);
  if (total < kSerialBelowFlops) {  // too little work to share: one thread, serial BLAS too
    set_blas_threads(1);
    for (std::int64_t i : order) fn(i);
    return;
  }
  if (nthreads <= 1 || n == 1) {
    set_blas_threads(nthreads);
    for (std::int64_t i : order) fn(i);
    return;
  }
  // Peel the largest items into the threaded-BLAS phase while they unbalance the rest.
  std::vector<double> sorted(n);
  for (std::int64_t i = 0; i < n; ++i) sorted[i] = cost[order[i]];
  std::size_t big = 0;
  double remaining = total;
  while (big < sorted.size()) {
    double ideal = remaining / nthreads;
    if (lpt_makespan(sorted, big, nthreads) <= 1.2 * ideal) break;
    remaining -= sorted[big];
    ++big;
  }
  if (big) {
    set_blas_threads(nthreads);
    for (std::size_t i = 0; i < big; ++i) fn(order[i]);
  }
  if (big < sorted.size()) {
    set_blas_threads(1);
    parallel_for(static_cast<std::int64_t>(sorted.size() - big), nthreads,
                 [&](std::int64_t i) { fn(order[big + i]); });
  }
}

}  // namespace fedng
