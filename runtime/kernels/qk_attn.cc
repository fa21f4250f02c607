// XLA FFI handler for one block's attention on the contiguous KV cache, in one call: RoPE of the
// new queries and keys (undoing llama.cpp's interleaved Q/K row order first, for GGUF Llama), the
// KV write at positions pos..pos+T-1, and causal grouped-query attention over the first `span`
// cached positions. In XLA these are ~14 small fused ops per block, each a thunk of a few us on a
// decode token; here one call (runtime/model.py `block`, docs/runtime.md "Quantised weights").
//
// The arithmetic is runtime/model.py's (rope, _kv_write, attention) in f32: scores q.k / sqrt(D),
// softmax with the maximum subtracted, probabilities times values; masked positions are skipped
// (they contribute exact zeros there). Heads of a token row are independent tasks on the
// library's workers (qk_ffi.cc) or XLA's intra-op pool. A query row runs the kernel set's
// vectorised loops where it has them (KernelSet::attend_row, qk_avx2.cc: 8 positions per score
// reduction, vectorised exp, the weighted sum of values in registers); else the plain C++ below,
// compiled for AVX-512 / AVX2 / baseline (target_clones) with several independent accumulators.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "qk.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace qk {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QK_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QK_CLONES
#endif

// sum_i a[i] * b[i] in 16 lanes (then a fixed pairwise reduction): vectorises as is
QK_CLONES float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[i + l] * b[i + l];
  for (; i < n; ++i) acc[i & 15] += a[i] * b[i];
  for (int w = 8; w; w >>= 1)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// y[i] += s * x[i]
QK_CLONES void axpy(float* y, float s, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += s * x[i];
}

// cos and sin of the angles p * inv_freq[j] of one position (D/2 each): once per position, shared
// by its key and query heads
void rope_angles(float p, const float* inv_freq, int64_t h, float* cs) {
  for (int64_t j = 0; j < h; ++j) {
    const float a = p * inv_freq[j];
    cs[j] = cosf(a);
    cs[h + j] = sinf(a);
  }
}

// rotate-half RoPE of one head vector (D) with its position's angles cs (rope_angles);
// `interleaved`: the row is in llama.cpp's pair order (x0, y0, x1, y1, ...) and is first put in
// rotate-half order
void rope_row(const float* in, float* out, int64_t D, const float* cs, bool interleaved) {
  const int64_t h = D / 2;
  for (int64_t j = 0; j < h; ++j) {
    const float x1 = interleaved ? in[2 * j] : in[j], x2 = interleaved ? in[2 * j + 1] : in[h + j];
    const float c = cs[j], s = cs[h + j];
    out[j] = x1 * c - x2 * s;
    out[h + j] = x2 * c + x1 * s;
  }
}

struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  std::function<void(int64_t)> fn;
};

void drain(Work* w) {
  int64_t k;
  while ((k = w->next.fetch_add(1, std::memory_order_relaxed)) < w->n) {
    w->fn(k);
    w->done.fetch_add(1, std::memory_order_release);
  }
}

void parallel_for(ffi::ThreadPool* pool, int64_t n, std::function<void(int64_t)> fn, bool threaded) {
  const int64_t nt = threaded && pool ? pool->num_threads() : 0;
  if (nt <= 1 || n <= 1) {
    for (int64_t k = 0; k < n; ++k) fn(k);
    return;
  }
  if (workers_run(nt, n, [](const void* f, int64_t k) { (*(const std::function<void(int64_t)>*)f)(k); }, &fn))
    return;  // the library's workers (qk_ffi.cc); else XLA's pool
  auto w = std::make_shared<Work>();
  w->n = n;
  w->fn = std::move(fn);
  const int64_t helpers = nt - 1 < n - 1 ? nt - 1 : n - 1;
  for (int64_t i = 0; i < helpers; ++i) pool->Schedule([w] { drain(w.get()); });
  drain(w.get());
  for (int spins = 0; w->done.load(std::memory_order_acquire) < n; ++spins) {
#if defined(__x86_64__)
    if (spins < 20000) __builtin_ia32_pause();
    else
#endif
      std::this_thread::yield();
  }
}

// The caches are one layer's (B, H_kv, S, D) or a stack of layers (n, B, H_kv, S, D): a whole
// model's cache is then two operands of the decode step instead of two per layer (each costs the
// host time per call, runtime/model.py `_Packed`); this call's layer is kv_rows[layer], a runtime
// operand (windows at different rows share one compiled function; any order of layers).
ffi::Error Attend(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                  ffi::Buffer<ffi::S32> pos, ffi::Buffer<ffi::F32> inv_freq, ffi::Buffer<ffi::S32> kv_rows,
                  ffi::Buffer<ffi::F32> kc_in, ffi::Buffer<ffi::F32> vc_in, ffi::Result<ffi::Buffer<ffi::F32>> out,
                  ffi::Result<ffi::Buffer<ffi::F32>> kc_out, ffi::Result<ffi::Buffer<ffi::F32>> vc_out,
                  ffi::ThreadPool pool, int64_t span, int32_t interleaved, int64_t layer) {
  const auto cd5 = kc_in.dimensions(), qd = q.dimensions();
  const size_t nd = cd5.size();
  if ((nd != 4 && nd != 5) || qd.size() != 3 || vc_in.element_count() != kc_in.element_count() ||
      layer < 0 || layer >= (int64_t)kv_rows.element_count())
    return ffi::Error::InvalidArgument("primasim attend: caches ([n,] B, H_kv, S, D) and q (B, T, H*D) expected");
  const int64_t* cd = cd5.begin() + (nd - 4);
  const int64_t n_layers = nd == 5 ? cd5[0] : 1, li = kv_rows.typed_data()[layer];
  if (li < 0 || li >= n_layers)
    return ffi::Error::InvalidArgument("primasim attend: layer " + std::to_string(li) + " of a cache of " +
                                       std::to_string(n_layers));
  const int64_t B = cd[0], Hkv = cd[1], S = cd[2], D = cd[3], T = qd[1], H = D ? qd[2] / D : 0;
  if (qd[0] != B || H * D != qd[2] || H == 0 || H % Hkv || (int64_t)k.element_count() != B * T * Hkv * D ||
      k.element_count() != v.element_count() || (int64_t)pos.element_count() != B ||
      (int64_t)inv_freq.element_count() != D / 2 || D % 2 || span < 1 || span > S)
    return ffi::Error::InvalidArgument("primasim attend: operand shapes do not fit together");
  const int32_t* ps = pos.typed_data();
  for (int64_t b = 0; b < B; ++b)
    if (ps[b] < 0 || ps[b] + T > span)
      return ffi::Error::InvalidArgument("primasim attend: positions " + std::to_string(ps[b]) + ".." +
                                         std::to_string(ps[b] + T - 1) + " outside the span " + std::to_string(span));
  float* kc = kc_out->typed_data();
  float* vc = vc_out->typed_data();
  const size_t cache_bytes = (size_t)kc_in.element_count() * 4;
  if (kc != kc_in.typed_data()) memcpy(kc, kc_in.typed_data(), cache_bytes);  // not aliased: copy first
  if (vc != vc_in.typed_data()) memcpy(vc, vc_in.typed_data(), cache_bytes);
  kc += li * B * Hkv * S * D;  // this layer's rows
  vc += li * B * Hkv * S * D;
  const float* fr = inv_freq.typed_data();
  const bool il = interleaved != 0;
  std::vector<float> angles((size_t)(B * T * D));  // cos | sin per (sequence, token)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) rope_angles((float)(ps[b] + t), fr, D / 2, angles.data() + (b * T + t) * D);
  // the new keys (rotated) and values, written at their positions
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = ps[b] + t;
      for (int64_t g = 0; g < Hkv; ++g) {
        const int64_t src = ((b * T + t) * Hkv + g) * D, dst = ((b * Hkv + g) * S + p) * D;
        rope_row(k.typed_data() + src, kc + dst, D, angles.data() + (b * T + t) * D, il);
        memcpy(vc + dst, v.typed_data() + src, D * 4);
      }
    }
  // one task per (sequence, head): every token row of it
  const float scale = sqrtf((float)D);
  float* o = out->typed_data();
  const float* qp = q.typed_data();
  const int64_t group = H / Hkv;
  const AttendRowFn row = D % 8 == 0 ? current_kernels()->attend_row : nullptr;
  auto head = [&](int64_t task) {
    const int64_t b = task / H, h = task % H, g = h / group;
    const float* kb = kc + (b * Hkv + g) * S * D;
    const float* vb = vc + (b * Hkv + g) * S * D;
    std::vector<float> buf(D + span);
    float* qr = buf.data();
    float* sc = qr + D;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = ps[b] + t;
      rope_row(qp + ((b * T + t) * H + h) * D, qr, D, angles.data() + (b * T + t) * D, il);
      float* orow = o + ((b * T + t) * H + h) * D;
      if (row) {  // the set's vectorised loops (the same steps; summation order and exp to ~1 ulp differ)
        row(qr, kb, vb, D, p + 1, scale, sc, orow);
        continue;
      }
      float mx = -INFINITY;
      for (int64_t s = 0; s <= p; ++s) {
        sc[s] = dot(qr, kb + s * D, D) / scale;
        mx = sc[s] > mx ? sc[s] : mx;
      }
      float sum = 0;
      for (int64_t s = 0; s <= p; ++s) {
        sc[s] = expf(sc[s] - mx);
        sum += sc[s];
      }
      memset(orow, 0, D * 4);
      for (int64_t s = 0; s <= p; ++s) axpy(orow, sc[s] / sum, vb + s * D, D);
    }
  };
  // below ~32k multiply-adds a second thread costs more to wake than it saves
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b) work += T * (ps[b] + T) * H * D;
  parallel_for(&pool, B * H, head, work > 32768);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace qk

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(PrimasimAttend, qk::Attend,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q (B, T, H*D), before RoPE
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k (B, T, H_kv*D), before RoPE
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v (B, T, H_kv*D)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pos (B,): position of token 0
                                  .Arg<ffi::Buffer<ffi::F32>>()   // RoPE inverse frequencies (D/2,)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // kv_rows (n,): each call's layer row
                                  .Arg<ffi::Buffer<ffi::F32>>()   // K cache ([n,] B, H_kv, S, D)
                                  .Arg<ffi::Buffer<ffi::F32>>()   // V cache
                                  .Ret<ffi::Buffer<ffi::F32>>()   // attention output (B, T, H*D)
                                  .Ret<ffi::Buffer<ffi::F32>>()   // K cache, aliased to the input
                                  .Ret<ffi::Buffer<ffi::F32>>()   // V cache, aliased
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("span")
                                  .Attr<int32_t>("interleaved")
                                  .Attr<int64_t>("layer"));       // this call's row: kv_rows[layer]
#pragma GCC visibility pop
