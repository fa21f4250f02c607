// Shared declarations of primasim's GGUF kernels: block layouts, prepared activations, kernel tables.
//
// Included by every translation unit, including the ISA-specific ones (qk_avx2.cc, qk_avx512.cc,
// compiled for their ISA through `#pragma GCC target`). So this header holds only plain structs,
// constants and `static inline` functions: an inline function with external linkage compiled
// in an AVX-512 unit could be the copy the linker keeps for baseline callers (SIGILL elsewhere).
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

namespace qk {

// ggml type ids (gguf GGMLQuantizationType)
enum : uint32_t {
  T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
  T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30, T_COUNT = 31
};

// How a kernel wants the activations prepared (once per call, per token row).
enum Prep : int {
  P_NONE = -1,
  P_F32 = 0,       // x as is (f32)
  P_F16 = 1,       // x rounded to f16, stored as f32 values (F16 weights: llama.cpp's vec_dot_type F16)
  P_BF16 = 2,      // x rounded to bf16 (nearest even), stored as uint16 (vdpbf16ps pairs)
  P_Q8_0 = 3,      // Q8_0/Q8_1 blocks, structure of arrays: qs[K] | d[nb] f32 | sum[nb] i32 | s[nb] f32
  P_Q8K = 4,       // Q8_K super-blocks (ActK), qs in natural order
  P_Q8K_PERM = 5,  // Q8_K super-blocks, qs in sub-block order 0,2,1,3,4,6,5,7 (matches a 64-byte load of Q4_K nibbles)
  P_COUNT = 6
};

// One Q8_K super-block of activations: llama.cpp's block_q8_K plus per-32 sums, 64-byte multiple.
struct ActK {
  int8_t qs[256];
  int16_t bsums[16];   // sum of qs over each 16 elements (natural order)
  int16_t bsum32[8];   // sum over each 32 elements (natural order): the Q4_K/Q5_K min term
  float d;             // Q8_K scale (negative when the largest-magnitude element is positive)
  int32_t pad[3];
};
static_assert(sizeof(ActK) == 320, "ActK is 5 cache lines");

// Byte sizes of a weight block / elements per block, 0 for unknown types.
static inline int block_elems(uint32_t t) {
  switch (t) {
    case T_F32: case T_F16: case T_BF16: return 1;
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q8_0: return 32;
    case T_Q4_K: case T_Q5_K: case T_Q6_K: return 256;
    default: return 0;
  }
}
static inline int block_bytes(uint32_t t) {
  switch (t) {
    case T_F32: return 4;
    case T_F16: case T_BF16: return 2;
    case T_Q4_0: return 18;
    case T_Q4_1: return 20;
    case T_Q5_0: return 22;
    case T_Q5_1: return 24;
    case T_Q8_0: return 34;
    case T_Q4_K: return 144;
    case T_Q5_K: return 176;
    case T_Q6_K: return 210;
    default: return 0;
  }
}

// Bytes of one prepared token row of K elements in layout p.
static inline size_t prep_bytes(int p, int64_t K) {
  switch (p) {
    case P_F32: case P_F16: return (size_t)K * 4;
    case P_BF16: return (size_t)K * 2;
    case P_Q8_0: return (size_t)K + (size_t)(K / 32) * 12;
    case P_Q8K: case P_Q8K_PERM: return (size_t)(K / 256) * sizeof(ActK);
    default: return 0;
  }
}

// IEEE half -> float, exact for subnormals (no F16C needed).
static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: value = man * 2^-24, exact in f32
    float v = (float)man * (1.0f / 16777216.0f);
    memcpy(&bits, &v, 4);
    bits |= sign;
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static inline uint16_t load_u16(const uint8_t* p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t load_u32(const uint8_t* p) { uint32_t v; memcpy(&v, p, 4); return v; }

// Q4_K / Q5_K 12-byte scales -> 8 six-bit scales (bytes 0..7 of *sc) and 8 mins (bytes 0..7 of *mn).
static inline void unpack_k4(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0xF) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// A dot kernel: one weight row (nblk blocks at w) against nt prepared token rows (nt = 1..8),
// writes nt floats. Prepared rows for P_Q8_0 need nblk to find their d/sum/s arrays.
typedef void (*DotFn)(const uint8_t* w, int64_t nblk, const uint8_t* const* act, int nt, float* out);
// Dequantise one row (nblk blocks) to f32.
typedef void (*RowFn)(const uint8_t* w, int64_t nblk, float* out);

// Vectorised activation preparation (nullptr: the portable code in qk_scalar.cc). prep_q8k must
// give the portable prep_q8_k's bytes exactly (tested): every kernel set sees the same activations.
typedef void (*PrepQ8KFn)(const float* x, int64_t K, uint8_t* out, bool perm);
// out = silu(g) * u = g / (1 + exp(-g)) * u, n elements (the exponential to ~1 ulp, not libm's).
typedef void (*SwigluFn)(const float* g, const float* u, float* out, int64_t n);

// One query row's attention over n cached positions (qk_attn.cc): scores q.k_s / scale, softmax
// (maximum subtracted), out = sum_s p_s v_s; k/v rows of D floats (D a multiple of 8), sc scratch
// of n floats. nullptr: the portable loops.
typedef void (*AttendRowFn)(const float* q, const float* kb, const float* vb, int64_t D, int64_t n, float scale,
                            float* sc, float* out);

struct KernelSet {
  const char* name;
  DotFn dot[T_COUNT];
  int8_t prep[T_COUNT];  // Prep layout each dot kernel reads (P_NONE: type unsupported)
  PrepQ8KFn prep_q8k;
  SwigluFn swiglu;
  AttendRowFn attend_row;
};

// The kernel set in use (qk_ffi.cc).
const KernelSet* current_kernels();

// Per-ISA tables (nullptr when the unit was not built for this compiler / architecture).
const KernelSet* scalar_kernels();
const KernelSet* avx2_kernels();
const KernelSet* avx512_kernels();
PrepQ8KFn avx2_prep_q8k();  // the AVX2 unit's preparation (nullptr where it is not built)
SwigluFn avx2_swiglu();
AttendRowFn avx2_attend_row();

// Shared, ISA-independent: activation preparation and row dequantisation (qk_scalar.cc);
// prepare_with uses the set's vectorised preparation where it has one.
void prepare(int p, const float* x, int64_t K, uint8_t* out);
void prepare_with(const KernelSet* ks, int p, const float* x, int64_t K, uint8_t* out);
void swiglu(const KernelSet* ks, const float* g, const float* u, float* out, int64_t n);
void dequant_row(uint32_t t, const uint8_t* w, int64_t nblk, float* out);

// Runs fn(ctx, 0..n-1) on the calling thread and the library's persistent workers (qk_ffi.cc),
// at most `threads` threads in all; false (nothing run) when they are not to be used (XLA's pool
// chosen by PRIMASIM_KERNEL_POOL=xla, one thread only, or another call holding them).
bool workers_run(int64_t threads, int64_t n, void (*fn)(const void*, int64_t), const void* ctx);

}  // namespace qk
