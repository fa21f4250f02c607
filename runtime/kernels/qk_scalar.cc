// Portable part of the GGUF kernels: activation preparation (llama.cpp's Q8_0/Q8_1/Q8_K, f16 and
// bf16 rounding), row dequantisation (embedding lookups) and scalar dot kernels (the fallback on
// CPUs without AVX2, and a readable statement of what the SIMD kernels compute).
//
// Preparation runs here for every ISA, so all kernels see bit-identical activations (the AVX2
// Q8_K preparation, KernelSet::prep_q8k, gives these bytes exactly: tested); its cost is
// O(tokens * K) against O(tokens * K * rows) for the products.
#include <math.h>

#include "qk.h"

namespace qk {
namespace {

// f32 -> IEEE half, round to nearest even, in integers only (no FTZ/DAZ dependence: XLA's
// threads run with both on, Python's with both off).
inline uint16_t f32_to_f16(float f) {
  uint32_t x;
  memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
  if (ax >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0));
  if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  // >= 65520 rounds to inf
  if (ax < 0x38800000) {                                  // below 2^-14: subnormal half or zero
    if (ax < 0x33000000) return (uint16_t)sign;           // <= 2^-25 rounds to zero
    uint32_t e = ax >> 23, m = (ax & 0x7fffff) | 0x800000, shift = 126 - e;
    uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) ++q;
    return (uint16_t)(sign | q);
  }
  uint32_t r = ax - 0x38000000, q = r >> 13, rem = r & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (q & 1))) ++q;  // a carry moves into the exponent: right
  return (uint16_t)(sign | q);
}

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 64);  // quiet NaN
  return (uint16_t)((u + (0x7fff + ((u >> 16) & 1))) >> 16);
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline float rt_f16(float f) { return f16_to_f32(f32_to_f16(f)); }

// llama.cpp's nearest_int / _mm256_round_ps(NEAREST): round half to even
inline int nearest(float v) { return (int)lrintf(v); }

void prep_q8_0(const float* x, int64_t K, uint8_t* out) {
  const int64_t nb = K / 32;
  int8_t* qs = (int8_t*)out;
  float* d = (float*)(out + K);
  int32_t* sum = (int32_t*)(d + nb);
  float* s = (float*)(sum + nb);
  for (int64_t b = 0; b < nb; ++b) {
    const float* v = x + 32 * b;
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(v[j]));
    const float db = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
    int32_t acc = 0;
    for (int j = 0; j < 32; ++j) {
      int q = nearest(v[j] * id);
      qs[32 * b + j] = (int8_t)q;
      acc += q;
    }
    d[b] = rt_f16(db);
    sum[b] = acc;
    s[b] = rt_f16(db * (float)acc);
  }
}

void prep_q8_k(const float* x, int64_t K, uint8_t* out, bool perm) {
  static const int order[8] = {0, 2, 1, 3, 4, 6, 5, 7};  // sub-block stored at each position
  ActK* a = (ActK*)out;
  for (int64_t b = 0; b < K / 256; ++b, x += 256) {
    float mx = 0.0f, amax = 0.0f;
    for (int j = 0; j < 256; ++j) {
      float ax = fabsf(x[j]);
      if (ax > amax) { amax = ax; mx = x[j]; }
    }
    int8_t q[256];
    if (amax == 0.0f) {
      memset(q, 0, sizeof q);
      a[b].d = 0.0f;
    } else {
      const float iscale = -127.0f / mx;
      for (int j = 0; j < 256; ++j) {
        int v = nearest(iscale * x[j]);
        q[j] = (int8_t)(v < 127 ? v : 127);
      }
      a[b].d = 1.0f / iscale;
    }
    for (int g = 0; g < 16; ++g) {
      int s = 0;
      for (int j = 0; j < 16; ++j) s += q[16 * g + j];
      a[b].bsums[g] = (int16_t)s;
    }
    for (int g = 0; g < 8; ++g) a[b].bsum32[g] = (int16_t)(a[b].bsums[2 * g] + a[b].bsums[2 * g + 1]);
    for (int p = 0; p < 8; ++p) memcpy(a[b].qs + 32 * p, q + 32 * (perm ? order[p] : p), 32);
    memset(a[b].pad, 0, sizeof a[b].pad);
  }
}

// ------------------------------------------------------------------ scalar dot kernels (one token)
float dot1_f32(const uint8_t* w, int64_t K, const uint8_t* a) {
  const float* x = (const float*)a;
  float s = 0.0f;
  for (int64_t i = 0; i < K; ++i) {
    float v;
    memcpy(&v, w + 4 * i, 4);
    s += v * x[i];
  }
  return s;
}

float dot1_f16(const uint8_t* w, int64_t K, const uint8_t* a) {
  const float* x = (const float*)a;
  float s = 0.0f;
  for (int64_t i = 0; i < K; ++i) s += f16_to_f32(load_u16(w + 2 * i)) * x[i];
  return s;
}

float dot1_bf16(const uint8_t* w, int64_t K, const uint8_t* a) {
  const uint16_t* x = (const uint16_t*)a;
  float s = 0.0f;
  for (int64_t i = 0; i < K; ++i) s += bf16_to_f32(load_u16(w + 2 * i)) * bf16_to_f32(x[i]);
  return s;
}

// The 32-element block types: levels of block b into q[32] (signed, offsets removed) / min
template <uint32_t T>
inline void levels32(const uint8_t* blk, int q[32]) {
  if (T == T_Q8_0) {
    for (int j = 0; j < 32; ++j) q[j] = (int8_t)blk[2 + j];
    return;
  }
  const int o = (T == T_Q4_1 || T == T_Q5_1) ? 4 : 2;
  uint32_t qh = 0;
  const uint8_t* qs = blk + o;
  if (T == T_Q5_0 || T == T_Q5_1) {
    qh = load_u32(blk + o);
    qs += 4;
  }
  const int off = T == T_Q4_0 ? 8 : T == T_Q5_0 ? 16 : 0;
  for (int j = 0; j < 16; ++j) {
    q[j] = (qs[j] & 0xF) | (int)(((qh >> j) & 1) << 4);
    q[j + 16] = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
    q[j] -= off;
    q[j + 16] -= off;
  }
}

template <uint32_t T>
float dot1_b32(const uint8_t* w, int64_t nb, const uint8_t* a) {
  const int8_t* qx = (const int8_t*)a;
  const float* dx = (const float*)(a + 32 * nb);
  const float* sx = (const float*)(a + 32 * nb + 8 * nb);
  const int bytes = block_bytes(T);
  float s = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * bytes;
    int q[32], sumi = 0;
    levels32<T>(blk, q);
    for (int j = 0; j < 32; ++j) sumi += q[j] * qx[32 * b + j];
    s += f16_to_f32(load_u16(blk)) * dx[b] * (float)sumi;
    if (T == T_Q4_1 || T == T_Q5_1) s += f16_to_f32(load_u16(blk + 2)) * sx[b];
  }
  return s;
}

template <uint32_t T>
float dot1_q45k(const uint8_t* w, int64_t nb, const uint8_t* act) {
  const ActK* a = (const ActK*)act;
  float s = 0.0f;
  for (int64_t b = 0; b < nb; ++b, ++a) {
    const uint8_t* blk = w + b * block_bytes(T);
    uint8_t sc[8], mn[8];
    unpack_k4(blk + 4, sc, mn);
    const uint8_t* qh = blk + 16;
    const uint8_t* qs = blk + (T == T_Q5_K ? 48 : 16);
    int32_t sumi = 0, summ = 0;
    for (int j = 0; j < 8; ++j) {
      int32_t t = 0;
      for (int l = 0; l < 32; ++l) {
        int q = (qs[32 * (j / 2) + l] >> (4 * (j & 1))) & 0xF;
        if (T == T_Q5_K) q |= ((qh[l] >> j) & 1) << 4;
        t += q * a->qs[32 * j + l];
      }
      sumi += sc[j] * t;
      summ += mn[j] * a->bsum32[j];
    }
    s += a->d * (f16_to_f32(load_u16(blk)) * (float)sumi - f16_to_f32(load_u16(blk + 2)) * (float)summ);
  }
  return s;
}

float dot1_q6k(const uint8_t* w, int64_t nb, const uint8_t* act) {
  const ActK* a = (const ActK*)act;
  float s = 0.0f;
  for (int64_t b = 0; b < nb; ++b, ++a) {
    const uint8_t* blk = w + b * 210;
    const int8_t* sc = (const int8_t*)(blk + 192);
    int q[256];
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = blk + 64 * h;
      const uint8_t* qh = blk + 128 + 32 * h;
      for (int l = 0; l < 32; ++l) {
        q[128 * h + l] = (ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4);
        q[128 * h + l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
        q[128 * h + l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
        q[128 * h + l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
      }
    }
    int32_t sumi = 0;
    for (int g = 0; g < 16; ++g) {
      int32_t t = 0;
      for (int l = 0; l < 16; ++l) t += (q[16 * g + l] - 32) * a->qs[16 * g + l];
      sumi += sc[g] * t;
    }
    s += a->d * f16_to_f32(load_u16(blk + 208)) * (float)sumi;
  }
  return s;
}

template <float (*F)(const uint8_t*, int64_t, const uint8_t*)>
void dot_each(const uint8_t* w, int64_t nblk, const uint8_t* const* act, int nt, float* out) {
  for (int t = 0; t < nt; ++t) out[t] = F(w, nblk, act[t]);
}

KernelSet make_scalar() {
  KernelSet k;
  k.name = "scalar";
  k.prep_q8k = nullptr;
  k.swiglu = nullptr;
  k.attend_row = nullptr;
  for (uint32_t t = 0; t < T_COUNT; ++t) { k.dot[t] = nullptr; k.prep[t] = P_NONE; }
  k.dot[T_F32] = dot_each<dot1_f32>;            k.prep[T_F32] = P_F32;
  k.dot[T_F16] = dot_each<dot1_f16>;            k.prep[T_F16] = P_F16;
  k.dot[T_BF16] = dot_each<dot1_bf16>;          k.prep[T_BF16] = P_BF16;
  k.dot[T_Q8_0] = dot_each<dot1_b32<T_Q8_0>>;   k.prep[T_Q8_0] = P_Q8_0;
  k.dot[T_Q4_0] = dot_each<dot1_b32<T_Q4_0>>;   k.prep[T_Q4_0] = P_Q8_0;
  k.dot[T_Q4_1] = dot_each<dot1_b32<T_Q4_1>>;   k.prep[T_Q4_1] = P_Q8_0;
  k.dot[T_Q5_0] = dot_each<dot1_b32<T_Q5_0>>;   k.prep[T_Q5_0] = P_Q8_0;
  k.dot[T_Q5_1] = dot_each<dot1_b32<T_Q5_1>>;   k.prep[T_Q5_1] = P_Q8_0;
  k.dot[T_Q4_K] = dot_each<dot1_q45k<T_Q4_K>>;  k.prep[T_Q4_K] = P_Q8K;
  k.dot[T_Q5_K] = dot_each<dot1_q45k<T_Q5_K>>;  k.prep[T_Q5_K] = P_Q8K;
  k.dot[T_Q6_K] = dot_each<dot1_q6k>;           k.prep[T_Q6_K] = P_Q8K;
  return k;
}

const KernelSet kScalar = make_scalar();

}  // namespace

const KernelSet* scalar_kernels() { return &kScalar; }

void prepare(int p, const float* x, int64_t K, uint8_t* out) {
  switch (p) {
    case P_F32:
      memcpy(out, x, (size_t)K * 4);
      break;
    case P_F16: {
      float* o = (float*)out;
      for (int64_t i = 0; i < K; ++i) o[i] = rt_f16(x[i]);
      break;
    }
    case P_BF16: {
      uint16_t* o = (uint16_t*)out;
      for (int64_t i = 0; i < K; ++i) o[i] = f32_to_bf16(x[i]);
      break;
    }
    case P_Q8_0: prep_q8_0(x, K, out); break;
    case P_Q8K: prep_q8_k(x, K, out, false); break;
    case P_Q8K_PERM: prep_q8_k(x, K, out, true); break;
    default: break;
  }
}

void prepare_with(const KernelSet* ks, int p, const float* x, int64_t K, uint8_t* out) {
  if ((p == P_Q8K || p == P_Q8K_PERM) && ks->prep_q8k) ks->prep_q8k(x, K, out, p == P_Q8K_PERM);
  else prepare(p, x, K, out);
}

void swiglu(const KernelSet* ks, const float* g, const float* u, float* out, int64_t n) {
  if (ks->swiglu) {
    ks->swiglu(g, u, out, n);
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

void dequant_row(uint32_t t, const uint8_t* w, int64_t nblk, float* out) {
  switch (t) {
    case T_F32: memcpy(out, w, (size_t)nblk * 4); return;
    case T_F16: for (int64_t i = 0; i < nblk; ++i) out[i] = f16_to_f32(load_u16(w + 2 * i)); return;
    case T_BF16: for (int64_t i = 0; i < nblk; ++i) out[i] = bf16_to_f32(load_u16(w + 2 * i)); return;
    default: break;
  }
  const int bytes = block_bytes(t);
  for (int64_t b = 0; b < nblk; ++b) {
    const uint8_t* blk = w + b * bytes;
    if (t == T_Q4_K || t == T_Q5_K) {
      const float d = f16_to_f32(load_u16(blk)), dmin = f16_to_f32(load_u16(blk + 2));
      uint8_t sc[8], mn[8];
      unpack_k4(blk + 4, sc, mn);
      const uint8_t* qs = blk + (t == T_Q5_K ? 48 : 16);
      for (int j = 0; j < 8; ++j)
        for (int l = 0; l < 32; ++l) {
          int q = (qs[32 * (j / 2) + l] >> (4 * (j & 1))) & 0xF;
          if (t == T_Q5_K) q |= ((blk[16 + l] >> j) & 1) << 4;
          out[256 * b + 32 * j + l] = d * sc[j] * q - dmin * mn[j];
        }
    } else if (t == T_Q6_K) {
      const float d = f16_to_f32(load_u16(blk + 208));
      const int8_t* sc = (const int8_t*)(blk + 192);
      for (int h = 0; h < 2; ++h)
        for (int l = 0; l < 32; ++l) {
          const uint8_t* ql = blk + 64 * h;
          const uint8_t qh = blk[128 + 32 * h + l];
          const int q[4] = {(ql[l] & 0xF) | ((qh & 3) << 4), (ql[l + 32] & 0xF) | (((qh >> 2) & 3) << 4),
                            (ql[l] >> 4) | (((qh >> 4) & 3) << 4), (ql[l + 32] >> 4) | (((qh >> 6) & 3) << 4)};
          for (int k = 0; k < 4; ++k) {
            const int e = 128 * h + 32 * k + l;
            out[256 * b + e] = d * sc[e / 16] * (q[k] - 32);
          }
        }
    } else {
      int q[32];
      switch (t) {
        case T_Q8_0: levels32<T_Q8_0>(blk, q); break;
        case T_Q4_0: levels32<T_Q4_0>(blk, q); break;
        case T_Q4_1: levels32<T_Q4_1>(blk, q); break;
        case T_Q5_0: levels32<T_Q5_0>(blk, q); break;
        case T_Q5_1: levels32<T_Q5_1>(blk, q); break;
        default: return;
      }
      const float d = f16_to_f32(load_u16(blk));
      const float m = (t == T_Q4_1 || t == T_Q5_1) ? f16_to_f32(load_u16(blk + 2)) : 0.0f;
      for (int j = 0; j < 32; ++j) out[32 * b + j] = d * q[j] + m;
    }
  }
}

}  // namespace qk
