// XLA FFI handlers (jax.ffi) for products and embedding rows read straight from mapped GGUF /
// safetensors files, plus the ISA dispatch. Built by the package's install (setup.py); loaded
// with ctypes by runtime/kernels/__init__.py, which registers the handlers with jax.
//
// Weights arrive as whole files: zero-copy uint8 jax.Arrays over the read-only mappings, one
// operand per file, and a descriptor table (n, 6) uint32 per call: [offset lo, offset hi, ggml
// type, file index, rows, cols] per tensor. Offsets and types are runtime values, so one compiled
// executable serves every layer whatever its tensor types; the handler checks every descriptor
// against the operands before reading (a bad one is an INVALID_ARGUMENT naming the tensor).
//
// One call computes several tensors against the same activations (q/k/v, gate/up): the
// activations are quantised once per layout, then rows are handed out in chunks from an atomic
// counter to the calling thread and the library's persistent workers (one per other CPU, spinning
// briefly between calls, as ggml's threadpool does; see Workers), or XLA's intra-op pool
// (Ctx<ThreadPool>) with PRIMASIM_KERNEL_POOL=xla. No OpenMP; the caller never waits for a chunk
// that has not started.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include <pthread.h>
#include <sched.h>

#include <math.h>
#include <stdlib.h>

#include "qk.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace qk {
namespace {

constexpr int kAbiVersion = 6;
constexpr int kDescWords = 6;
constexpr int kMaxTensors = 16;
constexpr int kGroup = 8;  // tokens per kernel call (weights unpacked once, used for all of them)

// ------------------------------------------------------------------ ISA dispatch
bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

// AVX2's float kernels (F32, F16, BF16) with AVX-512's integer ones (Q8_0, Q4_0..Q5_1, K-quants):
// from memory on two threads (Zen 4, 2026-12-07, docs/runtime.md) AVX-512's quantised kernels
// stream faster (one thread: Q4_K 24.7 vs 21.2 GB/s, Q6_K 29.5 vs 25.7, Q8_0 29.0 vs 27.6; cache
// resident Q4_K 28.2 vs 19.0), its F16 did not (22.4 vs 25.4). Built on first use where both run.
const KernelSet* mixed_kernels() {
  static const KernelSet k = [] {
    KernelSet m = *avx2_kernels();
    const KernelSet& w = *avx512_kernels();
    m.name = "avx512q-avx2f";
    for (uint32_t t : {T_Q8_0, T_Q4_0, T_Q4_1, T_Q5_0, T_Q5_1, T_Q4_K, T_Q5_K, T_Q6_K}) {
      m.dot[t] = w.dot[t];
      m.prep[t] = w.prep[t];
    }
    return m;
  }();
  return &k;
}

// The sets this CPU can run, widest ISA first (the whole AVX-512 set before the mixed one, so the
// name prefix "avx512" selects the former).
int available(const KernelSet* out[4]) {
  int n = 0;
  const bool avx512 = cpu_has_avx512() && avx512_kernels(), avx2 = cpu_has_avx2() && avx2_kernels();
  if (avx512) out[n++] = avx512_kernels();
  if (avx512 && avx2) out[n++] = mixed_kernels();
  if (avx2) out[n++] = avx2_kernels();
  out[n++] = scalar_kernels();
  return n;
}

// The default is the best set this CPU runs: the mixed one where AVX-512 and AVX2 both run, else
// AVX2 (AVX-512's own float kernels were no faster from memory; PRIMASIM_KERNEL_ISA=avx512 selects
// them), else scalar. A name selects the first set it prefixes.
const KernelSet* choose(const char* want) {
  const KernelSet* sets[4];
  const int n = available(sets);
  if (want && *want) {
    for (int i = 0; i < n; ++i)
      if (strncmp(sets[i]->name, want, strlen(want)) == 0) return sets[i];
    return nullptr;
  }
  for (int i = 0; i < n; ++i)
    if (strncmp(sets[i]->name, "avx512-", 7) != 0) return sets[i];
  return sets[n - 1];
}

std::atomic<const KernelSet*> g_set{nullptr};

const KernelSet* kernels() {
  const KernelSet* k = g_set.load(std::memory_order_acquire);
  if (!k) {
    k = choose(getenv("PRIMASIM_KERNEL_ISA"));
    if (!k) k = choose(nullptr);  // an unknown request falls back (Python reports it)
    g_set.store(k, std::memory_order_release);
  }
  return k;
}

}  // namespace

const KernelSet* current_kernels() { return kernels(); }

namespace {

const char* type_name(uint32_t t) {
  switch (t) {
    case T_F32: return "F32"; case T_F16: return "F16"; case T_BF16: return "BF16";
    case T_Q4_0: return "Q4_0"; case T_Q4_1: return "Q4_1"; case T_Q5_0: return "Q5_0";
    case T_Q5_1: return "Q5_1"; case T_Q8_0: return "Q8_0"; case T_Q4_K: return "Q4_K";
    case T_Q5_K: return "Q5_K"; case T_Q6_K: return "Q6_K";
    default: return nullptr;
  }
}

// ------------------------------------------------------------------ scratch + thread pool
struct Scratch {  // per calling thread, grown as needed, 64-byte aligned
  uint8_t* p = nullptr;
  size_t cap = 0;
  ~Scratch() { free(p); }
  uint8_t* get(size_t n) {
    if (n > cap) {
      free(p);
      cap = (n + 4095) & ~(size_t)4095;
      p = (uint8_t*)aligned_alloc(64, cap);
      if (!p) cap = 0;
    }
    return p;
  }
};
thread_local Scratch tl_scratch;

inline void cpu_relax() {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

// The floating-point control word (flush-to-zero / denormals-are-zero): workers compute with the
// caller's, so a result does not depend on which thread computed its rows.
inline uint32_t get_csr() {
#if defined(__x86_64__)
  return __builtin_ia32_stmxcsr();
#else
  return 0;
#endif
}
inline void set_csr(uint32_t v) {
#if defined(__x86_64__)
  if (__builtin_ia32_stmxcsr() != v) __builtin_ia32_ldmxcsr(v);
#else
  (void)v;
#endif
}

// Two ways to hand rows to the other cores. The default is the library's own persistent workers
// (ggml's threadpool recipe): after a call they spin a short while for the next one, then sleep
// on a condition variable. A block's calls come every ~100 us, so the workers are still spinning
// when the next call starts and pick it up within a microsecond; XLA's intra-op pool
// (PRIMASIM_KERNEL_POOL=xla) wakes a parked thread per call instead (measured in docs/runtime.md).
//
// Jobs are tagged by an epoch: a ticket word holds (epoch << 32 | next chunk), and a worker
// claims a chunk only by a compare-and-swap on the epoch it saw, so a late worker never runs
// chunks of a job it did not read (fn/ctx are written before the epoch is published and are not
// touched again until every chunk of the job is done).
class Workers {
 public:
  explicit Workers(int n) : n_(n) {
    for (int i = 0; i < n; ++i) std::thread([this] { loop(); }).detach();  // lives as long as the process
  }
  int size() const { return n_; }
  // Runs fn(ctx, 0..n-1) on the caller and the workers; false (nothing run) if another caller
  // holds the workers (two computations at once: that caller runs alone).
  bool run(int64_t n, void (*fn)(const void*, int64_t), const void* ctx) {
    bool idle = false;
    if (!busy_.compare_exchange_strong(idle, true, std::memory_order_acquire)) return false;
    fn_.store(fn, std::memory_order_relaxed);
    ctx_.store(ctx, std::memory_order_relaxed);
    n_chunks_.store(n, std::memory_order_relaxed);
    csr_.store(get_csr(), std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t e = (epoch_.load(std::memory_order_relaxed) + 1) & 0xffffffffu;
    ticket_.store(e << 32, std::memory_order_seq_cst);
    epoch_.store(e, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> g(m_);
      cv_.notify_all();
    }
    work(e);
    for (int spins = 0; done_.load(std::memory_order_acquire) < n; ++spins) {
      if (spins < 20000) cpu_relax();
      else std::this_thread::yield();  // a descheduled worker (a busy machine): give it the core
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  void work(uint64_t e, bool worker = false) {
    if (worker) set_csr(csr_.load(std::memory_order_relaxed));
    void (*fn)(const void*, int64_t) = fn_.load(std::memory_order_relaxed);
    const void* ctx = ctx_.load(std::memory_order_relaxed);
    const int64_t n = n_chunks_.load(std::memory_order_relaxed);
    uint64_t t = ticket_.load(std::memory_order_seq_cst);
    for (;;) {
      if ((t >> 32) != e || (int64_t)(t & 0xffffffffu) >= n) return;
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_seq_cst)) continue;
      fn(ctx, (int64_t)(t & 0xffffffffu));
      done_.fetch_add(1, std::memory_order_release);
      t = ticket_.load(std::memory_order_seq_cst);
    }
  }
  void loop() {
    uint64_t seen = epoch_.load(std::memory_order_seq_cst);
    for (;;) {
      uint64_t e = seen;
      const auto t0 = std::chrono::steady_clock::now();
      for (int spins = 0; (e = epoch_.load(std::memory_order_seq_cst)) == seen; ++spins) {
        if ((spins & 63) != 63) {
          cpu_relax();
          continue;
        }
        const auto idle = std::chrono::steady_clock::now() - t0;
        if (idle > kSpin) break;
        if (idle > kPause) std::this_thread::yield();  // spinning on, but any other runnable thread goes first
      }
      if (e == seen) {
        std::unique_lock<std::mutex> g(m_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        cv_.wait(g, [&] { return (e = epoch_.load(std::memory_order_seq_cst)) != seen; });
        sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      }
      seen = e;
      work(e, true);
    }
  }
  // How long a worker waits for the next call before sleeping: longer than the gaps between a
  // token's calls (a few us), short enough that a worker idle between tokens gives its core back
  // soon. The first kPause it spins on `pause`, then it yields the core at every look (a
  // head process, the host's Python thread or another program may want it).
  static constexpr std::chrono::microseconds kSpin{200}, kPause{20};
  const int n_;
  std::atomic<bool> busy_{false};
  std::atomic<uint64_t> epoch_{0}, ticket_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  // written by the caller before it publishes the epoch; a worker's read of a newer job's values
  // is harmless (its compare-and-swap on the old epoch fails)
  std::atomic<void (*)(const void*, int64_t)> fn_{nullptr};
  std::atomic<const void*> ctx_{nullptr};
  std::atomic<int64_t> n_chunks_{0};
  std::atomic<uint32_t> csr_{0};  // the caller's floating-point mode (FTZ/DAZ as XLA set them), copied
  std::mutex m_;
  std::condition_variable cv_;
};

int usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  return (int)std::thread::hardware_concurrency();
}

// The process's workers, created at the first threaded call (and again in a forked child, which
// inherits the state but not the threads): as many as XLA would use besides the caller, within
// this process's CPU affinity.
std::atomic<Workers*> g_workers{nullptr};
std::mutex g_workers_mu;
void forget_workers() { g_workers.store(nullptr); new (&g_workers_mu) std::mutex(); }

Workers* workers(int64_t xla_threads) {
  Workers* w = g_workers.load(std::memory_order_acquire);
  if (w) return w;
  std::lock_guard<std::mutex> g(g_workers_mu);
  w = g_workers.load(std::memory_order_acquire);
  if (!w) {
    static const bool once = [] { pthread_atfork(nullptr, nullptr, forget_workers); return true; }();
    (void)once;
    const int64_t cpus = usable_cpus();
    const int64_t n = (xla_threads < cpus ? xla_threads : cpus) - 1;
    w = new Workers(n > 0 ? (int)n : 0);  // (a leaked old set after fork() is a few bytes)
    g_workers.store(w, std::memory_order_release);
  }
  return w;
}

std::atomic<int> g_pool{-1};  // 1: XLA's intra-op pool, 0: the library's workers, -1: not read yet

bool use_xla_pool() {
  int v = g_pool.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* e = getenv("PRIMASIM_KERNEL_POOL");
    v = e && !strcmp(e, "xla");
    g_pool.store(v, std::memory_order_relaxed);
  }
  return v;
}

// XLA's intra-op pool (PRIMASIM_KERNEL_POOL=xla): a job that outlives the call if a helper starts late.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  void (*fn)(const void*, int64_t) = nullptr;
  const void* ctx = nullptr;  // valid while chunks remain: the caller waits for all of them
};

void drain(Work* w) {
  int64_t k;
  while ((k = w->next.fetch_add(1, std::memory_order_relaxed)) < w->n) {
    w->fn(w->ctx, k);
    w->done.fetch_add(1, std::memory_order_release);
  }
}

}  // namespace

bool workers_run(int64_t threads, int64_t n, void (*fn)(const void*, int64_t), const void* ctx) {
  if (threads <= 1 || use_xla_pool()) return false;
  Workers* ws = workers(threads);
  return ws->size() > 0 && ws->run(n, fn, ctx);
}

namespace {

void parallel_for(ffi::ThreadPool* pool, int64_t n, void (*fn)(const void*, int64_t), const void* ctx,
                  bool threaded) {
  const int64_t nt = threaded && pool ? pool->num_threads() : 0;
  if (nt <= 1 || n <= 1) {
    for (int64_t k = 0; k < n; ++k) fn(ctx, k);
    return;
  }
  if (!use_xla_pool()) {
    if (!workers_run(nt, n, fn, ctx))
      for (int64_t k = 0; k < n; ++k) fn(ctx, k);  // the workers are busy with another call
    return;
  }
  auto w = std::make_shared<Work>();  // outlives this call if a helper starts late
  w->n = n;
  w->fn = fn;
  w->ctx = ctx;
  const int64_t helpers = nt - 1 < n - 1 ? nt - 1 : n - 1;  // the caller is the other worker
  for (int64_t i = 0; i < helpers; ++i) pool->Schedule([w] { drain(w.get()); });
  drain(w.get());
  for (int spins = 0; w->done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < 20000) cpu_relax();
    else std::this_thread::yield();  // a descheduled helper (a busy machine): give it the core
  }
}

// ------------------------------------------------------------------ descriptors
struct Tensor {
  const uint8_t* w;
  int64_t rows, row_bytes, nblk;
  uint32_t type;
  DotFn dot;
  int prep;
  float* out;
};

std::string desc_error(int i, const std::string& what) {
  return "primasim kernels: tensor " + std::to_string(i) + " of this call: " + what;
}

ffi::Error read_desc(const uint32_t* d, int i, const ffi::RemainingArgs& files, int64_t K, int64_t rows,
                     const KernelSet* ks, Tensor* t) {
  const uint64_t off = (uint64_t)d[0] | ((uint64_t)d[1] << 32);
  const uint32_t type = d[2], file = d[3];
  const char* name = type_name(type);
  if (!name || !ks->dot[type])
    return ffi::Error::InvalidArgument(desc_error(i, "ggml type id " + std::to_string(type) +
        " has no kernel (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K); "
        "re-quantise the model to one of them"));
  if ((int64_t)d[4] != rows || (int64_t)d[5] != K)
    return ffi::Error::InvalidArgument(desc_error(i, "descriptor says " + std::to_string(d[4]) + "x" +
        std::to_string(d[5]) + ", the operands are " + std::to_string(rows) + "x" + std::to_string(K)));
  if (K % block_elems(type))
    return ffi::Error::InvalidArgument(desc_error(i, std::string(name) + " rows need a multiple of " +
        std::to_string(block_elems(type)) + " elements, got " + std::to_string(K)));
  if (file >= files.size())
    return ffi::Error::InvalidArgument(desc_error(i, "file index " + std::to_string(file) + " but " +
        std::to_string(files.size()) + " file operands"));
  auto buf = files.get<ffi::AnyBuffer>(file);
  if (!buf.has_value()) return ffi::Error::InvalidArgument(desc_error(i, "file operand is not a buffer"));
  const int64_t row_bytes = K / block_elems(type) * block_bytes(type);
  const uint64_t size = buf->size_bytes();
  if (off > size || (uint64_t)(rows * row_bytes) > size - off)
    return ffi::Error::InvalidArgument(desc_error(i, "bytes " + std::to_string(off) + "+" +
        std::to_string(rows * row_bytes) + " lie outside the file (" + std::to_string(size) + " bytes)"));
  t->w = (const uint8_t*)buf->untyped_data() + off;
  t->rows = rows;
  t->row_bytes = row_bytes;
  t->nblk = K / block_elems(type);
  t->type = type;
  t->dot = ks->dot[type];
  t->prep = ks->prep[type];
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ matmul
struct Chunk {  // rows [r0, r1) of tensor t
  int32_t t;
  int32_t r0, r1;
};

struct MatmulCtx {
  const Tensor* ts;
  int nt;
  int64_t B;
  const Chunk* chunks;
  const uint8_t* const* act[P_COUNT];  // prepared token rows per layout
};

void matmul_chunk(const void* c, int64_t k) {
  const MatmulCtx& m = *(const MatmulCtx*)c;
  const Chunk ch = m.chunks[k];
  const Tensor& t = m.ts[ch.t];
  const int64_t r0 = ch.r0, r1 = ch.r1;
  const uint8_t* const* act = m.act[t.prep];
  float res[kGroup];
  for (int64_t g = 0; g < m.B; g += kGroup) {  // token groups inside the chunk: its rows stay in cache
    const int n = (int)(m.B - g < kGroup ? m.B - g : kGroup);
    for (int64_t r = r0; r < r1; ++r) {
      t.dot(t.w + r * t.row_bytes, t.nblk, act + g, n, res);
      for (int j = 0; j < n; ++j) t.out[(g + j) * t.rows + r] = res[j];
    }
  }
}

// The rows of a call's tensors in chunks of decreasing size (guided self-scheduling): each is
// about 1/(3 threads) of the rows still left, in multiples of 16 rows (no two threads write one
// cache line of a result row), 16..256. Threads take them in order from an atomic counter, so
// the big ones go first and the last ones are small: a thread that finishes early waits at most
// one 16-row chunk for the others (fixed chunks of 1/8 per thread kept it waiting ~half a chunk
// per call, 0.3-0.8 ms per Q4_K_M token; docs/runtime.md).
thread_local std::vector<Chunk> tl_chunks;

const std::vector<Chunk>& plan_chunks(const Tensor* ts, int nt, int64_t threads) {
  std::vector<Chunk>& out = tl_chunks;
  out.clear();
  int64_t left = 0;
  for (int i = 0; i < nt; ++i) left += ts[i].rows;
  for (int i = 0; i < nt; ++i)
    for (int64_t r = 0; r < ts[i].rows;) {
      int64_t c = threads > 1 ? left / (3 * threads) : ts[i].rows;
      c = (c + 15) & ~(int64_t)15;
      c = c < 16 ? 16 : threads > 1 && c > 256 ? 256 : c;
      if (c > ts[i].rows - r) c = ts[i].rows - r;
      out.push_back({i, (int32_t)r, (int32_t)(r + c)});
      r += c;
      left -= c;
    }
  return out;
}

// What a call does to its activations before the products and to its first result after
// (the block's element-wise steps, so they cost no XLA op of their own):
enum Mode : int32_t {
  M_NORM = 1,      // x -> rms_norm(x) * aux: aux (K,) the norm weight, eps the attribute
  M_SWIGLU = 2,    // x -> silu(x) * aux: aux the up projection, shaped like x
  M_RESIDUAL = 4,  // result 0 -> resid + result 0: resid shaped like result 0
};

ffi::Error Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> aux, ffi::Buffer<ffi::F32> resid,
                  ffi::Buffer<ffi::U32> desc, ffi::RemainingArgs files, ffi::RemainingRets outs,
                  ffi::ThreadPool pool, float eps, int32_t mode, int32_t first, int64_t aux_off) {
  const KernelSet* ks = kernels();
  const auto xd = x.dimensions();
  if (xd.size() < 1) return ffi::Error::InvalidArgument("primasim kernels: activations need a last axis");
  const int64_t K = xd.back();
  const int64_t B = K ? (int64_t)x.element_count() / K : 0;
  const auto dd = desc.dimensions();
  const int nt = (int)outs.size();
  // the call's tensors are rows first..first+nt-1 of the table (a whole model's table may be passed
  // once to every call of a decode step: one operand instead of one per call)
  if (dd.size() != 2 || dd[1] != kDescWords || first < 0 || dd[0] < (int64_t)first + nt || nt < 1 ||
      nt > kMaxTensors)
    return ffi::Error::InvalidArgument("primasim kernels: descriptor table must be (>= " +
                                       std::to_string(first + nt) + ", 6) for " + std::to_string(nt) +
                                       " results from row " + std::to_string(first));
  Tensor ts[kMaxTensors];
  bool need[P_COUNT] = {};
  int64_t total_rows = 0, total_bytes = 0;
  for (int i = 0; i < nt; ++i) {
    auto o = outs.get<ffi::Buffer<ffi::F32>>(i);
    if (!o.has_value()) return ffi::Error::InvalidArgument(desc_error(i, "result is not an f32 buffer"));
    const auto od = (*o)->dimensions();
    const int64_t rows = od.size() ? od.back() : 0;
    if ((int64_t)(*o)->element_count() != B * rows)
      return ffi::Error::InvalidArgument(desc_error(i, "result shape does not match the activations"));
    ffi::Error e = read_desc(desc.typed_data() + kDescWords * (first + i), i, files, K, rows, ks, &ts[i]);
    if (e.failure()) return e;
    ts[i].out = (*o)->typed_data();
    need[ts[i].prep] = true;
    total_rows += rows;
    total_bytes += rows * ts[i].row_bytes;
  }
  if (B == 0 || total_rows == 0) return ffi::Error::Success();
  const bool pre = mode & (M_NORM | M_SWIGLU);
  // the norm weight: elements aux_off..aux_off+K-1 of aux, a (K,) vector or a table of a step's
  // norms (n, K) with aux_off a multiple of K
  const int64_t aux_n = (int64_t)aux.element_count();
  const auto ad = aux.dimensions();
  if ((mode & M_NORM) && (ad.size() < 1 || ad.back() != K || aux_off < 0 || aux_off % K || aux_off + K > aux_n))
    return ffi::Error::InvalidArgument("primasim kernels: the norm weight must have the activations' width");
  if ((mode & M_SWIGLU) && (aux_off != 0 || aux.element_count() != x.element_count()))
    return ffi::Error::InvalidArgument("primasim kernels: the up projection must be shaped like the gate");
  if ((mode & M_RESIDUAL) && (int64_t)resid.element_count() != B * ts[0].rows)
    return ffi::Error::InvalidArgument("primasim kernels: the residual must be shaped like the first result");
  // activations: one prepared row per token per needed layout, in the calling thread's scratch
  // (after the transformed f32 rows when the call normalises or gates them)
  size_t row_sz[P_COUNT] = {}, need_bytes = pre ? (size_t)B * K * 4 + 64 : 0;
  for (int p = 0; p < P_COUNT; ++p)
    if (need[p]) {
      row_sz[p] = (prep_bytes(p, K) + 63) & ~(size_t)63;
      need_bytes += row_sz[p] * B + sizeof(void*) * B;
    }
  uint8_t* scratch = tl_scratch.get(need_bytes);
  if (!scratch) return ffi::Error(ffi::ErrorCode::kResourceExhausted, "primasim kernels: out of memory for activations");
  MatmulCtx m;
  uint8_t* cur = scratch;
  const float* xp = x.typed_data();
  if (pre) {  // the arithmetic of the JAX ops it replaces (f32; the norm's sum of squares in f64;
              // SwiGLU's exponential vectorised to ~1 ulp where the set has one, see qk.h)
    float* h = (float*)cur;
    const float* a = aux.typed_data() + aux_off;
    for (int64_t b = 0; b < B; ++b) {
      const float* xr = xp + b * K;
      float* hr = h + b * K;
      if (mode & M_NORM) {
        double ss = 0;
        for (int64_t i = 0; i < K; ++i) ss += (double)xr[i] * xr[i];
        const float r = 1.0f / sqrtf((float)(ss / (double)K) + eps);
        for (int64_t i = 0; i < K; ++i) hr[i] = xr[i] * r * a[i];
      } else {
        swiglu(ks, xr, a + b * K, hr, K);
      }
    }
    xp = h;
    cur += ((size_t)B * K * 4 + 63) & ~(size_t)63;
  }
  for (int p = 0; p < P_COUNT; ++p) {
    m.act[p] = nullptr;
    if (!need[p]) continue;
    const uint8_t** ptrs = (const uint8_t**)cur;
    cur += sizeof(void*) * B;
    cur = (uint8_t*)(((uintptr_t)cur + 63) & ~(uintptr_t)63);
    for (int64_t b = 0; b < B; ++b) {
      if (p == P_F32) {
        ptrs[b] = (const uint8_t*)(xp + b * K);  // used as is
      } else {
        prepare_with(ks, p, xp + b * K, K, cur);
        ptrs[b] = cur;
        cur += row_sz[p];
      }
    }
    m.act[p] = ptrs;
  }
  const int64_t threads = pool.num_threads() > 1 ? pool.num_threads() : 1;
  const std::vector<Chunk>& chunks = plan_chunks(ts, nt, threads);
  m.ts = ts;
  m.nt = nt;
  m.B = B;
  m.chunks = chunks.data();
  // below ~64 KB of weight traffic a second thread costs more to wake than it saves
  parallel_for(&pool, (int64_t)chunks.size(), matmul_chunk, &m, total_bytes * ((B + kGroup - 1) / kGroup) > 65536);
  if (mode & M_RESIDUAL) {
    const float* r = resid.typed_data();
    float* o = ts[0].out;
    for (int64_t i = 0, n = B * ts[0].rows; i < n; ++i) o[i] = r[i] + o[i];
  }
  return ffi::Error::Success();
}

// ------------------------------------------------------------------ embedding rows
ffi::Error Embed(ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::U32> desc, ffi::RemainingArgs files,
                 ffi::Result<ffi::Buffer<ffi::F32>> out) {
  const auto od = out->dimensions();
  const int64_t K = od.size() ? od.back() : 0;
  const int64_t n = (int64_t)ids.element_count();
  if ((int64_t)out->element_count() != n * K)
    return ffi::Error::InvalidArgument("primasim kernels: embedding result shape does not match the ids");
  const auto dd = desc.dimensions();
  if (dd.size() != 2 || dd[0] != 1 || dd[1] != kDescWords)
    return ffi::Error::InvalidArgument("primasim kernels: embedding descriptor must be (1, 6)");
  const uint32_t* d = desc.typed_data();
  Tensor t;
  ffi::Error e = read_desc(d, 0, files, K, (int64_t)d[4], kernels(), &t);
  if (e.failure()) return e;
  const int32_t* id = ids.typed_data();
  float* o = out->typed_data();
  for (int64_t i = 0; i < n; ++i) {
    if (id[i] < 0 || id[i] >= t.rows)
      return ffi::Error::InvalidArgument("primasim kernels: token id " + std::to_string(id[i]) +
                                         " outside the embedding's " + std::to_string(t.rows) + " rows");
    dequant_row(t.type, t.w + (int64_t)id[i] * t.row_bytes, t.nblk, o + i * K);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace qk

#pragma GCC visibility push(default)  // the handlers are looked up by name (ctypes)
XLA_FFI_DEFINE_HANDLER_SYMBOL(PrimasimMatmul, qk::Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<float>("eps")
                                  .Attr<int32_t>("mode")
                                  .Attr<int32_t>("first")      // the call's first descriptor row
                                  .Attr<int64_t>("aux_off"));  // the norm weight's first element in aux

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrimasimEmbed, qk::Embed,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());
#pragma GCC visibility pop

// ------------------------------------------------------------------ plain C entry points (ctypes)
extern "C" {
__attribute__((visibility("default"))) int primasim_qk_abi_version() { return qk::kAbiVersion; }

// Names of the kernel sets this CPU can run, best first, separated by commas.
__attribute__((visibility("default"))) const char* primasim_qk_available() {
  static std::string names = [] {
    const qk::KernelSet* sets[4];
    const int n = qk::available(sets);
    std::string s;
    for (int i = 0; i < n; ++i) s += (i ? "," : "") + std::string(sets[i]->name);
    return s;
  }();
  return names.c_str();
}

__attribute__((visibility("default"))) const char* primasim_qk_current() { return qk::kernels()->name; }

namespace {
// The benchmarks' activations: nt token rows of x (nt, K) prepared in layout p, as the handler does.
struct BenchActs {
  uint8_t* buf;
  const uint8_t* act[qk::kGroup];
  BenchActs(int p, const float* x, int64_t K, int nt) {
    const size_t row = (qk::prep_bytes(p, K) + 63) & ~(size_t)63;
    buf = (uint8_t*)aligned_alloc(64, row * nt + 64);
    for (int t = 0; t < nt; ++t) {
      qk::prepare_with(qk::kernels(), p, x + t * K, K, buf + t * row);
      act[t] = p == qk::P_F32 ? (const uint8_t*)(x + t * K) : buf + t * row;
    }
  }
  ~BenchActs() { free(buf); }
};
}  // namespace

// For tests and benchmarks, outside XLA: one weight row (K elements of `type` at w) against nt
// token rows x (nt, K) f32, prepared as the handler prepares them; `reps` > 1 repeats the dot
// alone (activations prepared once) and returns the fastest repetition's seconds, else 0. -1: bad type.
__attribute__((visibility("default"))) double primasim_qk_rowdot(uint32_t type, const uint8_t* w, int64_t K,
                                                                 const float* x, int nt, int reps, float* out) {
  const qk::KernelSet* ks = qk::kernels();
  if (type >= qk::T_COUNT || !ks->dot[type] || nt < 1 || nt > qk::kGroup || K % qk::block_elems(type)) return -1;
  const int p = ks->prep[type];
  BenchActs acts(p, x, K, nt);
  const uint8_t* const* act = acts.act;
  const int64_t nblk = K / qk::block_elems(type);
  ks->dot[type](w, nblk, act, nt, out);
  double per = 0;
  for (int r = 1; r < reps; ++r) {  // the fastest repetition: a shared machine only ever slows one down
    float sink[qk::kGroup];
    const auto t0 = std::chrono::steady_clock::now();
    ks->dot[type](w, nblk, act, nt, sink);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    per = r == 1 || dt < per ? dt : per;
  }
  return per;
}

// For benchmarks, outside XLA: a whole matrix (rows x K of `type` at w) times nt token rows x
// (nt, K), on the calling thread only, as the handler computes a chunk; returns the fastest of
// `reps` repetitions in seconds (activations prepared once), -1 for a bad type. out: (nt, rows).
__attribute__((visibility("default"))) double primasim_qk_matdot(uint32_t type, const uint8_t* w, int64_t rows,
                                                                 int64_t K, const float* x, int nt, int reps,
                                                                 float* out) {
  const qk::KernelSet* ks = qk::kernels();
  if (type >= qk::T_COUNT || !ks->dot[type] || nt < 1 || nt > qk::kGroup || K % qk::block_elems(type)) return -1;
  const int p = ks->prep[type];
  BenchActs acts(p, x, K, nt);
  const uint8_t* const* act = acts.act;
  qk::Tensor ten{w, rows, K / qk::block_elems(type) * qk::block_bytes(type), K / qk::block_elems(type), type,
                 ks->dot[type], p, out};
  qk::MatmulCtx m;
  for (int i = 0; i < qk::P_COUNT; ++i) m.act[i] = act;
  const qk::Chunk whole{0, 0, (int32_t)rows};
  m.ts = &ten;
  m.nt = 1;
  m.B = nt;
  m.chunks = &whole;
  double best = 0;
  for (int r = 0; r < (reps < 1 ? 1 : reps); ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    qk::matmul_chunk(&m, 0);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = r == 0 || dt < best ? dt : best;
  }
  return best;
}

// One token row x (K,) prepared in layout p as the handler prepares it with the current set
// (`portable` = 1: the portable code every set must equal byte for byte); -1 for a bad layout.
// out needs prep_bytes(p, K). For tests.
__attribute__((visibility("default"))) int64_t primasim_qk_prepare(int p, const float* x, int64_t K, uint8_t* out,
                                                                    int portable) {
  if (p < 0 || p >= qk::P_COUNT || K < 0 || ((p == qk::P_Q8K || p == qk::P_Q8K_PERM) && K % 256) ||
      (p == qk::P_Q8_0 && K % 32))
    return -1;
  if (portable) qk::prepare(p, x, K, out);
  else qk::prepare_with(qk::kernels(), p, x, K, out);
  return (int64_t)qk::prep_bytes(p, K);
}

// g / (1 + exp(-g)) * u over n elements with the current set (the fused SwiGLU), for tests.
__attribute__((visibility("default"))) void primasim_qk_swiglu(const float* g, const float* u, float* out, int64_t n) {
  qk::swiglu(qk::kernels(), g, u, out, n);
}

// Hand rows to XLA's intra-op pool (1) or the library's workers (0), for tests and A/B
// benchmarks; returns the previous choice. Only between computations.
__attribute__((visibility("default"))) int primasim_qk_use_xla_pool(int on) {
  const int before = qk::use_xla_pool();
  qk::g_pool.store(on ? 1 : 0);
  return before;
}

// Select a kernel set by name prefix ("avx512", "avx2", "scalar"; "" = best). 0 on success, -1 if
// this CPU cannot run it. Only between computations: running calls keep the set they started with.
__attribute__((visibility("default"))) int primasim_qk_select(const char* name) {
  const qk::KernelSet* k = qk::choose(name);
  if (!k) return -1;
  qk::g_set.store(k, std::memory_order_release);
  return 0;
}
}
