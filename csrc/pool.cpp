#include "pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace cpu_ext {
namespace {

constexpr int kSpinMicros = 50;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Workers and the caller claim tasks from `ticket_` (generation << 32 | next task). A worker
// holding a stale generation fails its compare-exchange, so it never runs a task of a region it
// did not read the function of.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) {
      workers_.emplace_back([this] { work(); });
    }
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(m_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) {
      t.join();
    }
  }

  int size() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  void run(int tasks, TaskFn fn, void* ctx) {
    uint32_t g = gen_.load(std::memory_order_relaxed) + 1;
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    tasks_.store(tasks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    ticket_.store(uint64_t(g) << 32, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(m_);
      gen_.store(g, std::memory_order_release);
      if (sleepers_ > 0) {
        cv_.notify_all();
      }
    }
    claim(g, fn, ctx, tasks);
    while (done_.load(std::memory_order_acquire) < tasks) {
      cpu_relax();
    }
  }

 private:
  void claim(uint32_t g, TaskFn fn, void* ctx, int tasks) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      if (uint32_t(t >> 32) != g || int(uint32_t(t)) >= tasks) {
        return;
      }
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) {
        fn(ctx, int(uint32_t(t)));
        done_.fetch_add(1, std::memory_order_release);
        t = ticket_.load(std::memory_order_acquire);
      }
    }
  }

  void work() {
    uint32_t seen = 0;
    for (;;) {
      uint32_t g = gen_.load(std::memory_order_acquire);
      if (g == seen) {
        auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
        for (int i = 0; g == seen; ++i) {
          cpu_relax();
          g = gen_.load(std::memory_order_acquire);
          if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) {
            break;
          }
        }
      }
      if (g == seen) {
        std::unique_lock<std::mutex> lk(m_);
        ++sleepers_;
        cv_.wait(lk, [&] {
          g = gen_.load(std::memory_order_acquire);
          return stop_ || g != seen;
        });
        --sleepers_;
        if (stop_) {
          return;
        }
      }
      seen = g;
      claim(g,
            fn_.load(std::memory_order_relaxed),
            ctx_.load(std::memory_order_relaxed),
            tasks_.load(std::memory_order_relaxed));
    }
  }

  std::vector<std::thread> workers_;
  std::atomic<uint64_t> ticket_{0};
  std::atomic<uint32_t> gen_{0};
  std::atomic<TaskFn> fn_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int> tasks_{0};
  std::atomic<int> done_{0};
  std::mutex m_;
  std::condition_variable cv_;
  int sleepers_ = 0;
  bool stop_ = false;
};

// The pool is created on first use and deliberately never destroyed at exit (its workers may be
// asleep in a condition variable that static destruction would tear down). A forked child has
// none of the parent's threads: it drops (leaks) the parent's pool and makes its own.
std::mutex g_region; // one region at a time; held by the thread in run()
Pool* g_pool = nullptr;
int g_threads = 0; // requested size; 0 means the default

void forget_pool_in_child() {
  g_pool = nullptr;
  new (&g_region) std::mutex();
}

Pool& pool() {
  static bool registered = [] {
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork(nullptr, nullptr, &forget_pool_in_child);
#endif
    return true;
  }();
  (void)registered;
  int want = g_threads > 0 ? g_threads : default_num_threads();
  if (g_pool == nullptr || g_pool->size() != want) {
    delete g_pool;
    g_pool = new Pool(want);
  }
  return *g_pool;
}

int count_cpus() {
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0) {
    return CPU_COUNT(&set);
  }
#endif
  unsigned n = std::thread::hardware_concurrency();
  return n > 0 ? static_cast<int>(n) : 1;
}

} // namespace

int default_num_threads() {
  static const int n = count_cpus(); // the mask at first use
  return n;
}

int num_threads() {
  std::lock_guard<std::mutex> lk(g_region);
  return g_threads > 0 ? g_threads : default_num_threads();
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(g_region);
  g_threads = n > 0 ? n : 0;
}

void parallel_for(int tasks, TaskFn fn, void* ctx) {
  if (tasks <= 0) {
    return;
  }
  std::lock_guard<std::mutex> lk(g_region);
  int want = g_threads > 0 ? g_threads : default_num_threads();
  if (tasks == 1 || want == 1) {
    for (int i = 0; i < tasks; ++i) {
      fn(ctx, i);
    }
    return;
  }
  pool().run(tasks, fn, ctx);
}

} // namespace cpu_ext
