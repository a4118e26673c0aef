// Persistent worker threads and per-thread scratch for the na2d CPU kernels.
//
// Why not a std::thread per call: measured on the project's 2-core VM (a C++ driver timing the
// forward at the detection-size stage-3/4 maps with 2 threads), the second thread started its
// first task ~40 us after the call began and joining it took another ~20-50 us; at stage 3 the
// forward's per-call scratch (two ~270 KB buffers, mmap'ed and unmapped by glibc every call) held
// the work back by ~250 us more -- together a fifth to a half of a 0.4-0.9 ms forward.  Here the
// workers live for the process: after a job they spin for kSpinMicros, so back-to-back calls find
// them awake, then sleep on a condition variable, so they never hold a core that PyTorch's own
// threads need for long.  thread_scratch() gives each thread buffers that are reused by its later
// calls (they only grow).
//
// Safety: the pool serves one call at a time (try_lock); a concurrent caller (two Python threads
// -- ctypes releases the GIL) falls back to threads of its own.  After fork() the child builds a
// new pool (the parent's workers do not exist there).  The pool is never destroyed: detached
// workers asleep at exit end with the process.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

namespace na2d {

constexpr int64_t kSpinMicros = 50;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// Spin until pred() or kSpinMicros have passed; true if pred() held.
template <typename P>
inline bool spin_until(const P& pred) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
  for (int i = 0;; ++i) {
    if (pred()) return true;
    cpu_relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) return pred();
  }
}

// Tasks 0..n-1 handed out by an atomic counter (a descheduled thread on a shared machine does not
// stall the others at a barrier); fn(task, tid) with tid < the job's thread count.
struct Job {
  void (*call)(const void* fn, int64_t task, int tid);
  const void* fn;
  int64_t n;
  int nt;
  std::atomic<int64_t> next{0};

  void work(int tid) {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      call(fn, i, tid);
    }
  }
};

class WorkerPool {
 public:
  // Runs job on the caller (tid 0) and job.nt - 1 workers (fewer where no more threads can be
  // started); false (nothing run) if the pool is busy.
  bool run(Job& job) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    while (nworkers_.load(std::memory_order_relaxed) < job.nt - 1) {
      const int id = nworkers_.load(std::memory_order_relaxed) + 1;
      const uint64_t seen = gen_.load(std::memory_order_relaxed);  // it starts with this job
      try {
        std::thread([this, id, seen] { loop(id, seen); }).detach();
      } catch (...) {  // no more threads to be had (resource limits): run with fewer
        break;
      }
      nworkers_.store(id, std::memory_order_relaxed);  // published with the job below
    }
    job.nt = std::min(job.nt, nworkers_.load(std::memory_order_relaxed) + 1);
    acks_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lk(m_);
      job_ = &job;
      gen_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    job.work(0);
    // every worker acknowledges (those with id >= nt without working), so none can still be
    // reading `job` (a local of the caller) once this returns
    const int all = nworkers_.load(std::memory_order_relaxed);
    auto done = [&] { return acks_.load(std::memory_order_acquire) == all; };
    if (!spin_until(done)) {
      std::unique_lock<std::mutex> lk(m_);
      done_.wait(lk, done);
    }
    return true;
  }

  pid_t owner() const { return pid_; }

 private:
  void loop(int id, uint64_t seen) {
    for (;;) {
      auto fresh = [&] { return gen_.load(std::memory_order_acquire) != seen; };
      if (!spin_until(fresh)) {
        std::unique_lock<std::mutex> lk(m_);
        wake_.wait(lk, fresh);
      }
      seen = gen_.load(std::memory_order_acquire);
      Job* job = job_;
      if (id < job->nt) job->work(id);
      // read before acknowledging: once all have, the next run may add workers
      const int all = nworkers_.load(std::memory_order_relaxed);
      if (acks_.fetch_add(1, std::memory_order_acq_rel) + 1 == all) {
        std::lock_guard<std::mutex> lk(m_);  // the caller may be between its check and wait
        done_.notify_one();
      }
    }
  }

  std::mutex busy_, m_;
  std::condition_variable wake_, done_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> acks_{0};
  Job* job_ = nullptr;
  std::atomic<int> nworkers_{0};  // workers started; only grows, under busy_
  const pid_t pid_ = getpid();
};

inline WorkerPool& worker_pool() {
  static std::mutex m;
  static WorkerPool* pool = nullptr;
  std::lock_guard<std::mutex> lk(m);
  if (!pool || pool->owner() != getpid()) pool = new WorkerPool();  // first use, or after fork
  return *pool;
}

// fn(task, tid) for task in [0, n) on up to nthreads threads (tid < nthreads).
template <typename F>
void parallel_for(int64_t n, int nthreads, const F& fn) {
  if (n <= 0) return;
  const int nt = (int)std::min<int64_t>(std::max(nthreads, 1), n);
  if (nt == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  Job job;
  job.call = [](const void* f, int64_t i, int tid) { (*static_cast<const F*>(f))(i, tid); };
  job.fn = &fn;
  job.n = n;
  job.nt = nt;
  if (worker_pool().run(job)) return;
  std::vector<std::thread> threads;  // pool busy: a concurrent call gets threads of its own
  threads.reserve(nt - 1);
  for (int t = 1; t < nt; ++t) {
    try {
      threads.emplace_back([&job, t] { job.work(t); });
    } catch (...) {  // fewer threads: the caller takes the remaining tasks
      break;
    }
  }
  job.work(0);
  for (auto& th : threads) th.join();
}

// A buffer of at least n elements owned by the calling thread (slot: which of its buffers),
// reused by later calls; zeroed if asked.  Valid until the same thread asks for the same slot.
template <typename T, int Slot>
T* thread_scratch(int64_t n, bool zero) {
  thread_local std::vector<T> buf;
  if ((int64_t)buf.size() < n) buf.resize(n);
  if (zero) std::memset(buf.data(), 0, sizeof(T) * n);
  return buf.data();
}

}  // namespace na2d
