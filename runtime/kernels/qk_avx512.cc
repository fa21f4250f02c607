// AVX-512 kernels (F, BW, VL, DQ, VNNI; BF16 where the CPU has it): the path on Zen 4 / Ice Lake and later.
//
// Integer products use vpdpbusd (u8 x s8 -> i32, four products per lane, no int16 saturation
// stage). Lanes of a 512-bit accumulator are summed only at the end of a row, so a lane's position
// does not matter, only which block (hence which float scale) it belongs to: each weight layout is
// loaded in its natural 64-byte pieces and the activations are prepared in the matching order
// (P_Q8K_PERM for Q4_K/Q5_K). Weight-side unpacking is done once per block for up to 8 tokens.
// All weight loads are unaligned (GGUF aligns tensors to 32 bytes, blocks are 18..210 bytes).
#include "qk.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16")
#include <immintrin.h>

namespace qk {
namespace {

inline float h2f(const uint8_t* p) { return _cvtsh_ss(load_u16(p)); }

inline __m512 zext128(__m128 v) { return _mm512_zextps128_ps512(v); }

// ------------------------------------------------------------------ float weights
template <int NT>
void dot_f32(const uint8_t* w8, int64_t K, const uint8_t* const* act, int, float* out) {
  const float* w = (const float*)w8;
  __m512 acc[NT], acc2[NT];
  for (int t = 0; t < NT; ++t) acc[t] = acc2[t] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= K; i += 32) {
    const __m512 w0 = _mm512_loadu_ps(w + i), w1 = _mm512_loadu_ps(w + i + 16);
    for (int t = 0; t < NT; ++t) {
      const float* x = (const float*)act[t];
      acc[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), acc[t]);
      acc2[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), acc2[t]);
    }
  }
  for (; i < K; i += 16) {
    const __mmask16 m = K - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - i)) - 1);
    const __m512 w0 = _mm512_maskz_loadu_ps(m, w + i);
    for (int t = 0; t < NT; ++t)
      acc[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, (const float*)act[t] + i), acc[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t], acc2[t]));
}

template <int NT>
void dot_f16(const uint8_t* w8, int64_t K, const uint8_t* const* act, int, float* out) {
  const uint16_t* w = (const uint16_t*)w8;
  __m512 acc[NT], acc2[NT];
  for (int t = 0; t < NT; ++t) acc[t] = acc2[t] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= K; i += 32) {
    const __m512 w0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + i)));
    const __m512 w1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + i + 16)));
    for (int t = 0; t < NT; ++t) {
      const float* x = (const float*)act[t];
      acc[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), acc[t]);
      acc2[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), acc2[t]);
    }
  }
  for (; i < K; i += 16) {
    const __mmask16 m = K - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - i)) - 1);
    const __m512 w0 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, w + i));
    for (int t = 0; t < NT; ++t)
      acc[t] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m, (const float*)act[t] + i), acc[t]);
  }
  for (int t = 0; t < NT; ++t) out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t], acc2[t]));
}

// BF16 x bf16-rounded activations, pairs of products into f32 (vdpbf16ps), as llama.cpp's ggml_vec_dot_bf16
template <int NT>
void dot_bf16(const uint8_t* w8, int64_t K, const uint8_t* const* act, int, float* out) {
  const uint16_t* w = (const uint16_t*)w8;
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < K; i += 32) {
    const __mmask32 m = K - i >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (K - i)) - 1);
    const __m512bh w0 = (__m512bh)_mm512_maskz_loadu_epi16(m, w + i);
    for (int t = 0; t < NT; ++t)
      acc[t] = _mm512_dpbf16_ps(acc[t], w0, (__m512bh)_mm512_maskz_loadu_epi16(m, (const uint16_t*)act[t] + i));
  }
  for (int t = 0; t < NT; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
}

// The same without AVX512_BF16 (Ice Lake): widen both to f32 (exact), FMA
template <int NT>
void dot_bf16_widen(const uint8_t* w8, int64_t K, const uint8_t* const* act, int, float* out) {
  const uint16_t* w = (const uint16_t*)w8;
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t i = 0; i < K; i += 16) {
    const __mmask16 m = K - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - i)) - 1);
    const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, w + i)), 16));
    for (int t = 0; t < NT; ++t) {
      const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, (const uint16_t*)act[t] + i)), 16));
      acc[t] = _mm512_fmadd_ps(w0, x, acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
}

// ------------------------------------------------------------------ 32-element block types
// Two blocks per iteration: 64 signed levels (offset removed) in natural order, as |w| (unsigned)
// and the sign mask; activations are negated where w < 0, so vpdpbusd computes w * x exactly.
template <uint32_t T>
inline __m512i levels_pair(const uint8_t* b0, const uint8_t* b1, bool two) {
  if (T == T_Q8_0) {
    const __m256i q0 = _mm256_loadu_si256((const __m256i*)(b0 + 2));
    const __m256i q1 = two ? _mm256_loadu_si256((const __m256i*)(b1 + 2)) : _mm256_setzero_si256();
    return _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
  }
  const int o = (T == T_Q4_1 || T == T_Q5_1) ? 4 : 2;
  const int qo = (T == T_Q5_0 || T == T_Q5_1) ? o + 4 : o;
  const __m128i n0 = _mm_loadu_si128((const __m128i*)(b0 + qo));
  const __m128i n1 = two ? _mm_loadu_si128((const __m128i*)(b1 + qo)) : _mm_setzero_si128();
  const __m256i n = _mm256_inserti128_si256(_mm256_castsi128_si256(n0), n1, 1);  // [A qs | B qs]
  const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(n), _mm256_srli_epi16(n, 4), 1);
  // [A 0-15 | B 0-15 | A 16-31 | B 16-31] -> natural [A 0-31 | B 0-31]
  __m512i q = _mm512_permutexvar_epi64(_mm512_setr_epi64(0, 1, 4, 5, 2, 3, 6, 7),
                                       _mm512_and_si512(z, _mm512_set1_epi8(0x0F)));
  if (T == T_Q5_0 || T == T_Q5_1) {
    const uint64_t h0 = load_u32(b0 + o), h1 = two ? load_u32(b1 + o) : 0;
    q = _mm512_or_si512(q, _mm512_maskz_mov_epi8(h0 | (h1 << 32), _mm512_set1_epi8(0x10)));
  }
  if (T == T_Q4_0) q = _mm512_sub_epi8(q, _mm512_set1_epi8(8));
  if (T == T_Q5_0) q = _mm512_sub_epi8(q, _mm512_set1_epi8(16));
  return q;
}

template <uint32_t T, int NT>
void dot_b32(const uint8_t* w, int64_t nb, const uint8_t* const* act, int, float* out) {
  constexpr bool kMin = T == T_Q4_1 || T == T_Q5_1;  // unsigned levels plus a min: no sign trick
  constexpr int kBytes = T == T_Q8_0 ? 34 : T == T_Q4_0 ? 18 : T == T_Q4_1 ? 20 : T == T_Q5_0 ? 22 : 24;
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  __m512 acc[NT];
  __m128 accm[NT];
  for (int t = 0; t < NT; ++t) { acc[t] = _mm512_setzero_ps(); accm[t] = _mm_setzero_ps(); }
  for (int64_t b = 0; b < nb; b += 2) {
    const bool two = b + 1 < nb;
    const uint8_t* b0 = w + b * kBytes;
    const uint8_t* b1 = b0 + kBytes;
    const __m512i q = levels_pair<T>(b0, b1, two);
    const __m512i qa = kMin ? q : _mm512_abs_epi8(q);
    const __mmask64 neg = kMin ? 0 : _mm512_movepi8_mask(q);
    const __mmask64 live = two ? ~(__mmask64)0 : (__mmask64)0xFFFFFFFFu;
    const uint32_t dbits = (uint32_t)load_u16(b0) | (two ? (uint32_t)load_u16(b1) << 16 : 0u);
    const __m128 dw = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dbits));  // d of A, B (0 if absent)
    __m128 mw = _mm_setzero_ps();
    if (kMin) mw = _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)load_u16(b0 + 2) |
                                                        (two ? (uint32_t)load_u16(b1 + 2) << 16 : 0u))));
    for (int t = 0; t < NT; ++t) {
      const uint8_t* a = act[t];
      __m512i x = _mm512_maskz_loadu_epi8(live, a + 32 * b);
      if (!kMin) x = _mm512_mask_sub_epi8(x, neg, _mm512_setzero_si512(), x);
      const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), qa, x);
      const float* dx = (const float*)(a + 32 * nb);
      const __m128 dx2 = _mm_castsi128_ps(two ? _mm_loadl_epi64((const __m128i*)(dx + b))
                                              : _mm_cvtsi32_si128(*(const int*)(dx + b)));
      const __m512 scale = _mm512_permutexvar_ps(idx, zext128(_mm_mul_ps(dw, dx2)));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[t]);
      if (kMin) {
        const float* sx = dx + 2 * nb;
        const __m128 sx2 = _mm_castsi128_ps(two ? _mm_loadl_epi64((const __m128i*)(sx + b))
                                                : _mm_cvtsi32_si128(*(const int*)(sx + b)));
        accm[t] = _mm_fmadd_ps(mw, sx2, accm[t]);
      }
    }
  }
  for (int t = 0; t < NT; ++t) {
    float r = _mm512_reduce_add_ps(acc[t]);
    if (kMin) r += _mm_cvtss_f32(_mm_hadd_ps(accm[t], accm[t]));
    out[t] = r;
  }
}

// ------------------------------------------------------------------ K-quants (activations Q8_K)
// Q4_K / Q5_K: 64-byte loads of qs give [sub 0 | sub 2] (low nibbles) and [sub 1 | sub 3] (high),
// then [4 | 6], [5 | 7]: P_Q8K_PERM stores the activations in that order. vpdpbusd sums 4
// products per int32 lane (|sum| <= 4 * 31 * 127 < 2^15), so two of its results pack into int16
// lanes without saturating (vpackssdw) and one vpdpwssd multiplies them by their sub-blocks' scales
// and adds pairs: per block 4 vpdpbusd, 2 packs, 2 vpdpwssd instead of 4 vpdpbusd, 4 vpmulld
// (slow) and 3 adds. The scale vectors (vpermw) are built once per block for all tokens.
template <uint32_t T, int NT>
void dot_q45k(const uint8_t* w, int64_t nb, const uint8_t* const* act, int, float* out) {
  constexpr int kBytes = T == T_Q5_K ? 176 : 144, kQs = T == T_Q5_K ? 48 : 16;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  // vpackssdw(a, b) puts, in each 128-bit lane L, a's int32 lanes 4L..4L+3 then b's as int16:
  // a = [sub i | sub i+2] (lanes 0-7 | 8-15), b = [sub i+1 | sub i+3] -> scales per int16
  // lane: L = 0, 1: s_i x4, s_i+1 x4; L = 2, 3: s_i+2 x4, s_i+3 x4 (i = 0, then 4)
  const __m512i sidx01 = _mm512_set_epi16(3, 3, 3, 3, 2, 2, 2, 2, 3, 3, 3, 3, 2, 2, 2, 2,
                                          1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i sidx45 = _mm512_add_epi16(sidx01, _mm512_set1_epi16(4));
  __m512 acc[NT];
  __m128 accm[NT];
  for (int t = 0; t < NT; ++t) { acc[t] = _mm512_setzero_ps(); accm[t] = _mm_setzero_ps(); }
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * kBytes;
    const float d = h2f(blk), dmin = h2f(blk + 2);
    // scales/mins (get_scale_min_k4) with llama.cpp's 32-bit masks
    uint32_t u[4];
    memcpy(u, blk + 4, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    const uint32_t mins_lo = u[1] & 0x3f3f3f3fu;
    u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    u[0] &= 0x3f3f3f3fu;
    u[2] = mins_lo;
    const __m256i scmn = _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2], (int)u[1], (int)u[0]));
    const __m512i sc = _mm512_castsi256_si512(scmn);  // int16 scales 0-7 (mins in 8-15, unused)
    const __m128i mn = _mm256_extracti128_si256(scmn, 1);
    const __m512i s01 = _mm512_permutexvar_epi16(sidx01, sc), s45 = _mm512_permutexvar_epi16(sidx45, sc);
    const __m512i w0 = _mm512_loadu_si512(blk + kQs), w1 = _mm512_loadu_si512(blk + kQs + 64);
    __m512i q0 = _mm512_and_si512(w0, m4), q1 = _mm512_and_si512(_mm512_srli_epi16(w0, 4), m4);
    __m512i q2 = _mm512_and_si512(w1, m4), q3 = _mm512_and_si512(_mm512_srli_epi16(w1, 4), m4);
    if (T == T_Q5_K) {  // fifth bit of element 32k + l is bit k of qh[l]
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(blk + 16)));
      const __m512i bit = _mm512_set1_epi8(0x10);
      auto sel = [&](int lo, int hi) {
        return _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << lo)), _mm256_set1_epi8((char)(1 << hi)), 1);
      };
      q0 = _mm512_or_si512(q0, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(qh, sel(0, 2)), bit));
      q1 = _mm512_or_si512(q1, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(qh, sel(1, 3)), bit));
      q2 = _mm512_or_si512(q2, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(qh, sel(4, 6)), bit));
      q3 = _mm512_or_si512(q3, _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(qh, sel(5, 7)), bit));
    }
    for (int t = 0; t < NT; ++t) {
      const ActK* a = (const ActK*)act[t] + b;
      const __m512i z = _mm512_setzero_si512();
      const __m512i d0 = _mm512_dpbusd_epi32(z, q0, _mm512_loadu_si512(a->qs));
      const __m512i d1 = _mm512_dpbusd_epi32(z, q1, _mm512_loadu_si512(a->qs + 64));
      const __m512i d2 = _mm512_dpbusd_epi32(z, q2, _mm512_loadu_si512(a->qs + 128));
      const __m512i d3 = _mm512_dpbusd_epi32(z, q3, _mm512_loadu_si512(a->qs + 192));
      __m512i s = _mm512_dpwssd_epi32(z, _mm512_packs_epi32(d0, d1), s01);
      s = _mm512_dpwssd_epi32(s, _mm512_packs_epi32(d2, d3), s45);
      const __m128i mi = _mm_madd_epi16(mn, _mm_loadu_si128((const __m128i*)a->bsum32));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(d * a->d), acc[t]);
      accm[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(mi), _mm_set1_ps(dmin * a->d), accm[t]);
    }
  }
  for (int t = 0; t < NT; ++t) {
    __m128 m = _mm_add_ps(accm[t], _mm_movehl_ps(accm[t], accm[t]));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    out[t] = _mm512_reduce_add_ps(acc[t]) - _mm_cvtss_f32(m);
  }
}

// Q6_K: per half, a 64-byte load of ql gives elements [0-31 | 32-63] (low nibbles) and
// [64-95 | 96-127] (high); qh broadcast to both 256-bit halves supplies bits 4-5 by per-half shifts.
// Levels are 0..63 (the -32 offset is applied through bsums), so a vpdpbusd lane sums at most
// 4 * 63 * 128 < 2^15 and two results pack into int16 lanes for one vpdpwssd by the group scales,
// as for Q4_K above. Vector k (= 2 half + nibble) holds groups 4k..4k+3, four int32 lanes each.
template <int NT>
void dot_q6k(const uint8_t* w, int64_t nb, const uint8_t* const* act, int, float* out) {
  const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
  const __m512i shl_a = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);  // bits 0-1 | 2-3 -> 4-5
  const __m512i shr_b = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);  // bits 4-5 | 6-7 -> 4-5
  // vpackssdw(v_k, v_k+1), 128-bit lane L: groups 4k + L (x4 int16) then 4(k+1) + L (x4)
  const __m512i sidx01 = _mm512_set_epi16(7, 7, 7, 7, 3, 3, 3, 3, 6, 6, 6, 6, 2, 2, 2, 2,
                                          5, 5, 5, 5, 1, 1, 1, 1, 4, 4, 4, 4, 0, 0, 0, 0);
  const __m512i sidx23 = _mm512_add_epi16(sidx01, _mm512_set1_epi16(8));
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * 210;
    const float d = h2f(blk + 208);
    const __m128i sc8 = _mm_loadu_si128((const __m128i*)(blk + 192));
    const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
    const __m512i s01 = _mm512_permutexvar_epi16(sidx01, _mm512_castsi256_si512(sc16));
    const __m512i s23 = _mm512_permutexvar_epi16(sidx23, _mm512_castsi256_si512(sc16));
    __m512i q[4];
    for (int h = 0; h < 2; ++h) {
      const __m512i L = _mm512_loadu_si512(blk + 64 * h);
      const __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * h)));
      // q = (L & 0x0F) | ((H << n) & 0x30): ternary logic A | (B & C) = 0xF8
      q[2 * h] = _mm512_ternarylogic_epi32(_mm512_and_si512(L, m4), _mm512_sllv_epi16(H, shl_a), m30, 0xF8);
      q[2 * h + 1] = _mm512_ternarylogic_epi32(_mm512_and_si512(_mm512_srli_epi16(L, 4), m4),
                                               _mm512_srlv_epi16(H, shr_b), m30, 0xF8);
    }
    for (int t = 0; t < NT; ++t) {
      const ActK* a = (const ActK*)act[t] + b;
      const __m512i z = _mm512_setzero_si512();
      const __m512i d0 = _mm512_dpbusd_epi32(z, q[0], _mm512_loadu_si512(a->qs));
      const __m512i d1 = _mm512_dpbusd_epi32(z, q[1], _mm512_loadu_si512(a->qs + 64));
      const __m512i d2 = _mm512_dpbusd_epi32(z, q[2], _mm512_loadu_si512(a->qs + 128));
      const __m512i d3 = _mm512_dpbusd_epi32(z, q[3], _mm512_loadu_si512(a->qs + 192));
      __m512i acc_i = _mm512_dpwssd_epi32(z, _mm512_packs_epi32(d0, d1), s01);
      acc_i = _mm512_dpwssd_epi32(acc_i, _mm512_packs_epi32(d2, d3), s23);
      // the -32 offset: 32 * sum_g scale_g * bsum_g
      const __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i*)a->bsums));
      acc_i = _mm512_sub_epi32(acc_i, _mm512_zextsi256_si512(_mm256_slli_epi32(off, 5)));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc_i), _mm512_set1_ps(d * a->d), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = _mm512_reduce_add_ps(acc[t]);
}

// ------------------------------------------------------------------ table
template <template <int> class K>
void by_nt(const uint8_t* w, int64_t n, const uint8_t* const* a, int nt, float* o) {
  switch (nt) {
    case 1: K<1>::f(w, n, a, nt, o); break;
    case 2: K<2>::f(w, n, a, nt, o); break;
    case 3: K<3>::f(w, n, a, nt, o); break;
    case 4: K<4>::f(w, n, a, nt, o); break;
    case 5: K<5>::f(w, n, a, nt, o); break;
    case 6: K<6>::f(w, n, a, nt, o); break;
    case 7: K<7>::f(w, n, a, nt, o); break;
    default: K<8>::f(w, n, a, nt, o); break;
  }
}

#define QK_WRAP(NAME, CALL) \
  template <int NT>         \
  struct NAME {             \
    static void f(const uint8_t* w, int64_t n, const uint8_t* const* a, int nt, float* o) { CALL; } \
  };
QK_WRAP(WF32, dot_f32<NT>(w, n, a, nt, o))
QK_WRAP(WF16, dot_f16<NT>(w, n, a, nt, o))
QK_WRAP(WBF16, dot_bf16<NT>(w, n, a, nt, o))
QK_WRAP(WBF16W, dot_bf16_widen<NT>(w, n, a, nt, o))
QK_WRAP(WQ80, (dot_b32<T_Q8_0, NT>(w, n, a, nt, o)))
QK_WRAP(WQ40, (dot_b32<T_Q4_0, NT>(w, n, a, nt, o)))
QK_WRAP(WQ41, (dot_b32<T_Q4_1, NT>(w, n, a, nt, o)))
QK_WRAP(WQ50, (dot_b32<T_Q5_0, NT>(w, n, a, nt, o)))
QK_WRAP(WQ51, (dot_b32<T_Q5_1, NT>(w, n, a, nt, o)))
QK_WRAP(WQ4K, (dot_q45k<T_Q4_K, NT>(w, n, a, nt, o)))
QK_WRAP(WQ5K, (dot_q45k<T_Q5_K, NT>(w, n, a, nt, o)))
QK_WRAP(WQ6K, dot_q6k<NT>(w, n, a, nt, o))
#undef QK_WRAP

KernelSet make_avx512(bool bf16) {
  KernelSet k;
  k.name = bf16 ? "avx512-vnni-bf16" : "avx512-vnni";
  k.prep_q8k = avx2_prep_q8k();
  k.swiglu = avx2_swiglu();
  k.attend_row = avx2_attend_row();
  for (uint32_t t = 0; t < T_COUNT; ++t) { k.dot[t] = nullptr; k.prep[t] = P_NONE; }
  k.dot[T_F32] = by_nt<WF32>;   k.prep[T_F32] = P_F32;
  k.dot[T_F16] = by_nt<WF16>;   k.prep[T_F16] = P_F16;
  k.dot[T_BF16] = bf16 ? by_nt<WBF16> : by_nt<WBF16W>;  k.prep[T_BF16] = P_BF16;
  k.dot[T_Q8_0] = by_nt<WQ80>;  k.prep[T_Q8_0] = P_Q8_0;
  k.dot[T_Q4_0] = by_nt<WQ40>;  k.prep[T_Q4_0] = P_Q8_0;
  k.dot[T_Q4_1] = by_nt<WQ41>;  k.prep[T_Q4_1] = P_Q8_0;
  k.dot[T_Q5_0] = by_nt<WQ50>;  k.prep[T_Q5_0] = P_Q8_0;
  k.dot[T_Q5_1] = by_nt<WQ51>;  k.prep[T_Q5_1] = P_Q8_0;
  k.dot[T_Q4_K] = by_nt<WQ4K>;  k.prep[T_Q4_K] = P_Q8K_PERM;
  k.dot[T_Q5_K] = by_nt<WQ5K>;  k.prep[T_Q5_K] = P_Q8K_PERM;
  k.dot[T_Q6_K] = by_nt<WQ6K>;  k.prep[T_Q6_K] = P_Q8K;
  return k;
}

}  // namespace

const KernelSet* avx512_kernels() {
  static const KernelSet with_bf16 = make_avx512(true), without = make_avx512(false);
  return __builtin_cpu_supports("avx512bf16") ? &with_bf16 : &without;
}

}  // namespace qk

#else
namespace qk {
const KernelSet* avx512_kernels() { return nullptr; }
}  // namespace qk
#endif
