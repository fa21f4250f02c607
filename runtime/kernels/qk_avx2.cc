// AVX2 + FMA + F16C kernels: x86-64 CPUs without AVX-512 (llama.cpp's recipes: the sign trick,
// vpmaddubsw into int16 pairs, vpmaddwd by the block scales). Activations in natural order.
#include <math.h>

#include "qk.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#include <immintrin.h>

namespace qk {
namespace {

inline float h2f(const uint8_t* p) { return _cvtsh_ss(load_u16(p)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline __m256i loadu(const void* p) { return _mm256_loadu_si256((const __m256i*)p); }

// Sum of int8 x int8 products in pairs -> 8 int32 lanes (|x| never -128: Q8 activations are -127..127)
inline __m256i dot_i8(__m256i w, __m256i x) {
  const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

// -1 bytes where bit j of the 32-bit word is set (llama.cpp's bytes_from_bits_32)
inline __m256i bits_to_bytes(uint32_t x32) {
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
  b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1));
}

template <uint32_t T>
inline __m256 load8(const uint8_t* p) {  // 8 weights (or bf16 activations) widened to f32
  if (T == T_F32) return _mm256_loadu_ps((const float*)p);
  if (T == T_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// Float weights: FMA chains have a 4-cycle latency, so each token keeps 4 / NT-scaled independent
// accumulators (one chain would cap F16 at ~4 bytes a cycle).
template <uint32_t T, int NT>
void dot_float(const uint8_t* w, int64_t K, const uint8_t* const* act, float* out) {
  constexpr int kItem = T == T_F32 ? 4 : 2, kA = NT == 1 ? 4 : NT == 2 ? 2 : 1;
  __m256 acc[NT][kA];
  for (int t = 0; t < NT; ++t)
    for (int a = 0; a < kA; ++a) acc[t][a] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 * kA <= K; i += 8 * kA) {
    for (int a = 0; a < kA; ++a) {
      const __m256 wv = load8<T>(w + kItem * (i + 8 * a));
      for (int t = 0; t < NT; ++t) {
        const __m256 x = T == T_BF16 ? load8<T_BF16>(act[t] + 2 * (i + 8 * a)) : _mm256_loadu_ps((const float*)act[t] + i + 8 * a);
        acc[t][a] = _mm256_fmadd_ps(wv, x, acc[t][a]);
      }
    }
  }
  for (; i + 8 <= K; i += 8) {
    const __m256 wv = load8<T>(w + kItem * i);
    for (int t = 0; t < NT; ++t) {
      const __m256 x = T == T_BF16 ? load8<T_BF16>(act[t] + 2 * i) : _mm256_loadu_ps((const float*)act[t] + i);
      acc[t][0] = _mm256_fmadd_ps(wv, x, acc[t][0]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    for (int a = 1; a < kA; ++a) acc[t][0] = _mm256_add_ps(acc[t][0], acc[t][a]);
    float s = hsum(acc[t][0]);
    for (int64_t j = i; j < K; ++j) {  // tail, exact widenings
      float wj, xj;
      if (T == T_F32) memcpy(&wj, w + 4 * j, 4);
      else if (T == T_F16) wj = _cvtsh_ss(load_u16(w + 2 * j));
      else { uint32_t u = (uint32_t)load_u16(w + 2 * j) << 16; memcpy(&wj, &u, 4); }
      if (T == T_BF16) { uint32_t u = (uint32_t)load_u16(act[t] + 2 * j) << 16; memcpy(&xj, &u, 4); }
      else xj = ((const float*)act[t])[j];
      s += wj * xj;
    }
    out[t] = s;
  }
}

template <uint32_t T, int NT>
void dot_b32(const uint8_t* w, int64_t nb, const uint8_t* const* act, float* out) {
  constexpr bool kMin = T == T_Q4_1 || T == T_Q5_1;
  const int bytes = block_bytes(T);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc[NT];
  float accm[NT];
  for (int t = 0; t < NT; ++t) { acc[t] = _mm256_setzero_ps(); accm[t] = 0.0f; }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * bytes;
    __m256i q;
    if (T == T_Q8_0) {
      q = loadu(blk + 2);
    } else {
      const int o = kMin ? 4 : 2, qo = (T == T_Q5_0 || T == T_Q5_1) ? o + 4 : o;
      const __m128i n = _mm_loadu_si128((const __m128i*)(blk + qo));
      q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(n, 4), n), m4);
      if (T == T_Q5_0 || T == T_Q5_1)
        q = _mm256_or_si256(q, _mm256_and_si256(bits_to_bytes(load_u32(blk + o)), _mm256_set1_epi8(0x10)));
      if (T == T_Q4_0) q = _mm256_sub_epi8(q, _mm256_set1_epi8(8));
      if (T == T_Q5_0) q = _mm256_sub_epi8(q, _mm256_set1_epi8(16));
    }
    const float dw = h2f(blk), mw = kMin ? h2f(blk + 2) : 0.0f;
    for (int t = 0; t < NT; ++t) {
      const uint8_t* a = act[t];
      const __m256i x = loadu(a + 32 * b);
      const __m256i s = kMin ? _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1)) : dot_i8(q, x);
      const float* dx = (const float*)(a + 32 * nb);
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dw * dx[b]), acc[t]);
      if (kMin) accm[t] += mw * dx[2 * nb + b];
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]) + accm[t];
}

// vpshufb masks broadcasting int16 lane pair i (Q4_K/Q5_K scales) / int8 byte pairs (Q6_K)
alignas(32) const uint8_t kShufK4[8][32] = {
#define R(a) {a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, \
               a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1, a, a + 1}
    R(0), R(2), R(4), R(6), R(8), R(10), R(12), R(14)
#undef R
};
alignas(16) const uint8_t kShuf6[8][16] = {
#define R(a) {a, a, a, a, a, a, a, a, a + 1, a + 1, a + 1, a + 1, a + 1, a + 1, a + 1, a + 1}
    R(0), R(2), R(4), R(6), R(8), R(10), R(12), R(14)
#undef R
};

template <uint32_t T, int NT>
void dot_q45k(const uint8_t* w, int64_t nb, const uint8_t* const* act, float* out) {
  constexpr int kBytes = T == T_Q5_K ? 176 : 144, kQs = T == T_Q5_K ? 48 : 16;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc[NT];
  __m128 accm[NT];
  for (int t = 0; t < NT; ++t) { acc[t] = _mm256_setzero_ps(); accm[t] = _mm_setzero_ps(); }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * kBytes;
    const float d = _cvtsh_ss(load_u16(blk)), dmin = _cvtsh_ss(load_u16(blk + 2));
    uint32_t u[4];  // get_scale_min_k4 for all 8 with llama.cpp's 32-bit masks: u[0..1] scales, u[2..3] mins
    memcpy(u, blk + 4, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    const uint32_t mins_lo = u[1] & 0x3f3f3f3fu;
    u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    u[2] = mins_lo;
    u[0] &= 0x3f3f3f3fu;
    const __m256i ms = _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]));
    const __m128i mins = _mm256_extracti128_si256(ms, 1);
    const __m256i scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(ms));
    __m256i q[8];
    const __m256i qh = T == T_Q5_K ? _mm256_loadu_si256((const __m256i*)(blk + 16)) : _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i bits = _mm256_loadu_si256((const __m256i*)(blk + kQs + 32 * c));
      q[2 * c] = _mm256_and_si256(bits, m4);
      q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
      if (T == T_Q5_K)
        for (int k = 2 * c; k < 2 * c + 2; ++k)  // bit k of qh[l] -> 16 (masked before the 16-bit shift)
          q[k] = _mm256_or_si256(q[k], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, k), _mm256_set1_epi8(1)), 4));
    }
    for (int t = 0; t < NT; ++t) {
      const ActK* a = (const ActK*)act[t] + b;
      __m256i s = _mm256_setzero_si256();
      for (int k = 0; k < 8; ++k) {
        const __m256i p = _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i*)(a->qs + 32 * k)));
        s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_shuffle_epi8(scales, _mm256_load_si256((const __m256i*)kShufK4[k])), p));
      }
      const __m128i mi = _mm_madd_epi16(mins, _mm_loadu_si128((const __m128i*)a->bsum32));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * a->d), acc[t]);
      accm[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(mi), _mm_set1_ps(dmin * a->d), accm[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m128 m = _mm_add_ps(accm[t], _mm_movehl_ps(accm[t], accm[t]));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    out[t] = hsum(acc[t]) - _mm_cvtss_f32(m);
  }
}

// One token (decode): each 32-weight group is unpacked and multiplied at once, so the block's 8
// weight vectors and 8 scale vectors never need 16 live registers (AVX2 has 16: spills).
void dot_q6k_1(const uint8_t* w, int64_t nb, const uint8_t* const* act, float* out) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const ActK* a = (const ActK*)act[0];
  for (int64_t b = 0; b < nb; ++b, ++a) {
    const uint8_t* blk = w + b * 210;
    const __m128i sc8 = _mm_loadu_si128((const __m128i*)(blk + 192));
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int h = 0; h < 2; ++h) {
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)(blk + 64 * h));
      const __m256i l1 = _mm256_loadu_si256((const __m256i*)(blk + 64 * h + 32));
      const __m256i hb = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h));
      const __m256i q0 = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4));
      const __m256i q1 = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                         _mm256_slli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(12)), 2));
      const __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                         _mm256_and_si256(hb, _mm256_set1_epi8(48)));
      const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                         _mm256_srli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8((char)0xC0)), 2));
      const int8_t* x = a->qs + 128 * h;
      const __m256i p0 = _mm256_maddubs_epi16(q0, _mm256_loadu_si256((const __m256i*)x));
      const __m256i p1 = _mm256_maddubs_epi16(q1, _mm256_loadu_si256((const __m256i*)(x + 32)));
      const __m256i p2 = _mm256_maddubs_epi16(q2, _mm256_loadu_si256((const __m256i*)(x + 64)));
      const __m256i p3 = _mm256_maddubs_epi16(q3, _mm256_loadu_si256((const __m256i*)(x + 96)));
      const __m256i c0 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, _mm_load_si128((const __m128i*)kShuf6[4 * h])));
      const __m256i c1 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, _mm_load_si128((const __m128i*)kShuf6[4 * h + 1])));
      const __m256i c2 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, _mm_load_si128((const __m128i*)kShuf6[4 * h + 2])));
      const __m256i c3 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, _mm_load_si128((const __m128i*)kShuf6[4 * h + 3])));
      s0 = _mm256_add_epi32(s0, _mm256_add_epi32(_mm256_madd_epi16(c0, p0), _mm256_madd_epi16(c1, p1)));
      s1 = _mm256_add_epi32(s1, _mm256_add_epi32(_mm256_madd_epi16(c2, p2), _mm256_madd_epi16(c3, p3)));
    }
    const __m256i off = _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc8), _mm256_loadu_si256((const __m256i*)a->bsums));
    const __m256i s = _mm256_sub_epi32(_mm256_add_epi32(s0, s1), _mm256_slli_epi32(off, 5));
    const __m256 f = _mm256_cvtepi32_ps(s), dd = _mm256_set1_ps(_cvtsh_ss(load_u16(blk + 208)) * a->d);
    if (b & 1) acc1 = _mm256_fmadd_ps(f, dd, acc1);
    else acc0 = _mm256_fmadd_ps(f, dd, acc0);
  }
  out[0] = hsum(_mm256_add_ps(acc0, acc1));
}

template <int NT>
void dot_q6k(const uint8_t* w, int64_t nb, const uint8_t* const* act, float* out) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 210;
    const float d = _cvtsh_ss(load_u16(blk + 208));
    const __m128i sc8 = _mm_loadu_si128((const __m128i*)(blk + 192));
    const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
    __m256i q[8], s16[8];
    for (int h = 0; h < 2; ++h) {
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)(blk + 64 * h));
      const __m256i l1 = _mm256_loadu_si256((const __m256i*)(blk + 64 * h + 32));
      const __m256i hb = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h));
      q[4 * h + 0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4));
      q[4 * h + 1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                     _mm256_slli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8(12)), 2));
      q[4 * h + 2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                     _mm256_and_si256(hb, _mm256_set1_epi8(48)));
      q[4 * h + 3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                     _mm256_srli_epi16(_mm256_and_si256(hb, _mm256_set1_epi8((char)0xC0)), 2));
      for (int k = 0; k < 4; ++k)  // groups 8h + 2k, 8h + 2k + 1: scale pair broadcast to 8 int16 lanes each
        s16[4 * h + k] = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, _mm_load_si128((const __m128i*)kShuf6[4 * h + k])));
    }
    (void)m3;
    for (int t = 0; t < NT; ++t) {
      const ActK* a = (const ActK*)act[t] + b;
      __m256i s = _mm256_setzero_si256();
      for (int k = 0; k < 8; ++k)
        s = _mm256_add_epi32(s, _mm256_madd_epi16(s16[k], _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i*)(a->qs + 32 * k)))));
      const __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i*)a->bsums));
      s = _mm256_sub_epi32(s, _mm256_slli_epi32(off, 5));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * a->d), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]);
}

template <uint32_t T, int NT>
void run(const uint8_t* w, int64_t n, const uint8_t* const* a, float* o) {
  if (T == T_F32 || T == T_F16 || T == T_BF16) dot_float<T, NT>(w, n, a, o);
  else if (T == T_Q4_K || T == T_Q5_K) dot_q45k<T, NT>(w, n, a, o);
  else if (T == T_Q6_K && NT == 1) dot_q6k_1(w, n, a, o);
  else if (T == T_Q6_K) dot_q6k<NT>(w, n, a, o);
  else dot_b32<T, NT>(w, n, a, o);
}

template <uint32_t T>
void by_nt(const uint8_t* w, int64_t n, const uint8_t* const* a, int nt, float* o) {
  switch (nt) {
    case 1: run<T, 1>(w, n, a, o); break;
    case 2: run<T, 2>(w, n, a, o); break;
    case 3: run<T, 3>(w, n, a, o); break;
    case 4: run<T, 4>(w, n, a, o); break;
    case 5: run<T, 5>(w, n, a, o); break;
    case 6: run<T, 6>(w, n, a, o); break;
    case 7: run<T, 7>(w, n, a, o); break;
    default: run<T, 8>(w, n, a, o); break;
  }
}

// ------------------------------------------------------------------ activations
// Q8_K preparation, byte for byte the portable prep_q8_k (qk_scalar.cc): the scale comes from the
// first element of largest magnitude, q = nearest-even(iscale * x) (vcvtps2dq in the default
// rounding mode, as lrintf), at most 127; blocks with inf/NaN or an overflowing scale go to the
// portable code.
void prep_q8k_avx2(const float* x, int64_t K, uint8_t* out, bool perm) {
  static const int order[8] = {0, 2, 1, 3, 4, 6, 5, 7};
  const __m256 sign = _mm256_set1_ps(-0.0f);
  ActK* a = (ActK*)out;
  for (int64_t b = 0; b < K / 256; ++b, x += 256) {
    __m256 m = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int j = 0; j < 256; j += 8) {
      const __m256 v = _mm256_loadu_ps(x + j);
      m = _mm256_max_ps(_mm256_andnot_ps(sign, v), m);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    // inf or NaN in the block, or a scale that overflows (subnormal inputs outside XLA's DAZ):
    // the portable code's exact behaviour (its lrintf of inf/NaN is INT_MIN, stored as 0)
    if (!(amax <= 3.4028235e38f) || _mm256_movemask_ps(nan) || (amax != 0.0f && !(127.0f / amax <= 3.4028235e38f))) {
      prepare(perm ? P_Q8K_PERM : P_Q8K, x, 256, (uint8_t*)(a + b));
      continue;
    }
    alignas(32) int8_t q[256];
    if (amax == 0.0f) {
      memset(q, 0, sizeof q);
      a[b].d = 0.0f;
    } else {
      float mx = 0.0f;
      const __m256 am = _mm256_set1_ps(amax);
      for (int j = 0; j < 256; j += 8) {
        const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)), am, _CMP_EQ_OQ));
        if (hit) { mx = x[j + __builtin_ctz((unsigned)hit)]; break; }
      }
      const float iscale = -127.0f / mx;
      const __m256 is = _mm256_set1_ps(iscale);
      const __m256i top = _mm256_set1_epi32(127), perm8 = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      for (int j = 0; j < 256; j += 32) {
        __m256i v[4];
        for (int k = 0; k < 4; ++k)
          v[k] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(is, _mm256_loadu_ps(x + j + 8 * k))), top);
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
        _mm256_store_si256((__m256i*)(q + j), _mm256_permutevar8x32_epi32(p, perm8));
      }
      a[b].d = 1.0f / iscale;
    }
    for (int g = 0; g < 16; ++g) {
      int sum = 0;
      for (int j = 0; j < 16; ++j) sum += q[16 * g + j];
      a[b].bsums[g] = (int16_t)sum;
    }
    for (int g = 0; g < 8; ++g) a[b].bsum32[g] = (int16_t)(a[b].bsums[2 * g] + a[b].bsums[2 * g + 1]);
    for (int p = 0; p < 8; ++p) memcpy(a[b].qs + 32 * p, q + 32 * (perm ? order[p] : p), 32);
    memset(a[b].pad, 0, sizeof a[b].pad);
  }
}

// e^x for x in [-87.3, 88.3] (clamped): 2^n * p(r), r = x - n ln 2 in two parts, Cephes' expf
// polynomial (relative error ~1e-7, within 2 ulp of libm's)
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.37626f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

void swiglu_avx2(const float* g, const float* u, float* out, int64_t n) {
  int64_t i = 0;
  const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 s = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_xor_ps(x, sign))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

// ------------------------------------------------------------------ attention (one query row)
// Scores 8 positions at a time (8 accumulators over D, one transposing reduction), the softmax's
// exponentials vectorised (exp8), and the weighted sum of value rows kept in registers over all
// positions, 64 dimensions at a time.
void attend_row_avx2(const float* q, const float* kb, const float* vb, int64_t D, int64_t n, float scale, float* sc,
                     float* out) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t s = 0;
  for (; s + 8 <= n; s += 8) {
    __m256 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kb + (s + j) * D + d), acc[j]);
    }
    const __m256 t0 = _mm256_hadd_ps(acc[0], acc[1]), t1 = _mm256_hadd_ps(acc[2], acc[3]);
    const __m256 t2 = _mm256_hadd_ps(acc[4], acc[5]), t3 = _mm256_hadd_ps(acc[6], acc[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    const __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(sc + s, _mm256_div_ps(r, vscale));
  }
  for (; s < n; ++s) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(kb + s * D + d), acc);
    sc[s] = hsum(acc) / scale;
  }
  float mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = sc[i] > mx ? sc[i] : mx;
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + i), vmx));
    _mm256_storeu_ps(sc + i, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = hsum(vsum);
  for (; i < n; ++i) {
    sc[i] = expf(sc[i] - mx);
    sum += sc[i];
  }
  const float inv = 1.0f / sum;
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int nv = (int)((D - d0 < 64 ? D - d0 : 64) / 8);
    __m256 o[8];
    for (int j = 0; j < 8; ++j) o[j] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const __m256 wt = _mm256_set1_ps(sc[t]);
      const float* vr = vb + t * D + d0;
      for (int j = 0; j < nv; ++j) o[j] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(vr + 8 * j), o[j]);
    }
    for (int j = 0; j < nv; ++j) _mm256_storeu_ps(out + d0 + 8 * j, _mm256_mul_ps(o[j], _mm256_set1_ps(inv)));
  }
}

KernelSet make_avx2() {
  KernelSet k;
  k.name = "avx2";
  k.prep_q8k = prep_q8k_avx2;
  k.swiglu = swiglu_avx2;
  k.attend_row = attend_row_avx2;
  for (uint32_t t = 0; t < T_COUNT; ++t) { k.dot[t] = nullptr; k.prep[t] = P_NONE; }
  k.dot[T_F32] = by_nt<T_F32>;    k.prep[T_F32] = P_F32;
  k.dot[T_F16] = by_nt<T_F16>;    k.prep[T_F16] = P_F16;
  k.dot[T_BF16] = by_nt<T_BF16>;  k.prep[T_BF16] = P_BF16;
  k.dot[T_Q8_0] = by_nt<T_Q8_0>;  k.prep[T_Q8_0] = P_Q8_0;
  k.dot[T_Q4_0] = by_nt<T_Q4_0>;  k.prep[T_Q4_0] = P_Q8_0;
  k.dot[T_Q4_1] = by_nt<T_Q4_1>;  k.prep[T_Q4_1] = P_Q8_0;
  k.dot[T_Q5_0] = by_nt<T_Q5_0>;  k.prep[T_Q5_0] = P_Q8_0;
  k.dot[T_Q5_1] = by_nt<T_Q5_1>;  k.prep[T_Q5_1] = P_Q8_0;
  k.dot[T_Q4_K] = by_nt<T_Q4_K>;  k.prep[T_Q4_K] = P_Q8K;
  k.dot[T_Q5_K] = by_nt<T_Q5_K>;  k.prep[T_Q5_K] = P_Q8K;
  k.dot[T_Q6_K] = by_nt<T_Q6_K>;  k.prep[T_Q6_K] = P_Q8K;
  return k;
}

}  // namespace

const KernelSet* avx2_kernels() {
  static const KernelSet k = make_avx2();
  return &k;
}

// the AVX-512 set's preparation (its unit compiles for AVX2 too; these are the same code)
PrepQ8KFn avx2_prep_q8k() { return prep_q8k_avx2; }
SwigluFn avx2_swiglu() { return swiglu_avx2; }
AttendRowFn avx2_attend_row() { return attend_row_avx2; }

}  // namespace qk

#else
namespace qk {
const KernelSet* avx2_kernels() { return nullptr; }
PrepQ8KFn avx2_prep_q8k() { return nullptr; }
SwigluFn avx2_swiglu() { return nullptr; }
AttendRowFn avx2_attend_row() { return nullptr; }
}  // namespace qk
#endif
