// CPU kernels for decode steps, compiled for the machine (shard/attention/cpu_kernels.py).
//
// paged_decode: attention of one new token per request, K/V read from their blocks in
// place (no gather into a contiguous copy), softmax in float32. With a sliding window of
// `window` > 0 keys, a request of context c attends positions max(0, c - window) .. c - 1.
// With `softcap` > 0 each score s becomes softcap * tanh(s / softcap) (Gemma 2).
//
// Shapes: q [B, H, D] (row and head strides given, D contiguous); k_cache, v_cache
// [N, BS, KVH, D] contiguous; block_tables [B, W] int64; context_lens [B] int64 (each >= 1,
// each <= W * BS); out [B, H, D] contiguous. H = KVH * G: query heads h*G .. h*G+G-1 share
// KV head h. Work is split over requests (and KV groups when few) with ATen's thread pool,
// and, in the vector forms, over chunks of 512 keys (decode_chunked).
// Caches hold q's dtype, or float8 e4m3fn values v standing for v * k_scale (v_scale): the
// scores are scaled by k_scale with `scale`, the outputs by v_scale.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernels.h"
#include "vec_exp.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace pytgi {
namespace {

// bfloat16 is the top half of a float32: widening is a shift of the raw 16 bits, which
// vectorizes (c10's conversion operator does not).
inline float widen(float x) { return x; }
inline float widen(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}
template <typename T> struct Raw { using type = T; };  // the element type the loops read
template <> struct Raw<c10::BFloat16> { using type = uint16_t; };
template <> struct Raw<c10::Float8_e4m3fn> { using type = uint8_t; };

// float8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is subnormal
// (m * 2^-9). Writers saturate, so no NaN (0x7f/0xff) is read. Branch-free integer and
// float operations, which the compiler vectorizes in the dot products below.
inline float widen(uint8_t b) {
  const uint32_t mag = b & 0x7fu;
  const uint32_t bits = (mag << 20) + (120u << 23);  // exponent rebased from 7 to 127
  float normal;
  std::memcpy(&normal, &bits, sizeof(normal));
  const float sub = static_cast<float>(static_cast<int32_t>(mag & 7u)) * 0x1p-9f;
  const float out = (mag >> 3) ? normal : sub;
  return (b & 0x80u) ? -out : out;
}

// float32 -> e4m3fn bits: saturated to +-448, rounded to nearest even (PyTorch's result).
inline uint8_t narrow_fp8(float x) {
  x = std::min(std::max(x, -448.f), 448.f);
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t sign = (bits >> 24) & 0x80u;
  bits &= 0x7fffffffu;
  float a;
  std::memcpy(&a, &bits, sizeof(a));
  uint32_t mag;
  if (a < 0x1p-6f) {  // subnormal: a multiple of 2^-9; adding 2^23 rounds to nearest even
    mag = static_cast<uint32_t>((a * 512.f + 8388608.f) - 8388608.f);
  } else {  // float32's mantissa rounded to 3 bits (a carry bumps the exponent)
    mag = ((bits + 0x7ffffu + ((bits >> 20) & 1u)) >> 20) - (120u << 3);
  }
  return static_cast<uint8_t>(sign | mag);
}

#if defined(__AVX2__) && defined(__FMA__)
// widen() of 8 fp8 values at once: 8 vector operations instead of ~8 scalar ones each.
inline __m256 widen8(const uint8_t* p) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  const __m256i mag = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
  const __m256 normal = _mm256_castsi256_ps(
      _mm256_add_epi32(_mm256_slli_epi32(mag, 20), _mm256_set1_epi32(120 << 23)));
  const __m256 sub = _mm256_mul_ps(
      _mm256_cvtepi32_ps(_mm256_and_si256(mag, _mm256_set1_epi32(7))), _mm256_set1_ps(0x1p-9f));
  const __m256 is_sub = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), mag));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  return _mm256_or_ps(_mm256_blendv_ps(normal, sub, is_sub), _mm256_castsi256_ps(sign));
}

inline float dot(const float* q, const uint8_t* k, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), widen8(k + i), acc);
  float sum = hsum(acc);
  for (; i < d; ++i) sum += q[i] * widen(k[i]);
  return sum;
}

inline void axpy(float a, const uint8_t* v, float* acc, int64_t d) {
  const __m256 scale = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(scale, widen8(v + i), _mm256_loadu_ps(acc + i)));
  for (; i < d; ++i) acc[i] += a * widen(v[i]);
}

// q . k[u] for 4 keys at once (d a multiple of 8): one reduction of the four accumulators
// by horizontal adds instead of a horizontal sum per key.
template <typename R>
inline __m128 dot4(const float* q, const R* const* k, int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 x = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(x, load8(k[0] + i), a0);
    a1 = _mm256_fmadd_ps(x, load8(k[1] + i), a1);
    a2 = _mm256_fmadd_ps(x, load8(k[2] + i), a2);
    a3 = _mm256_fmadd_ps(x, load8(k[3] + i), a3);
  }
  // hadd(a0, a1) = [a0 01, a0 23, a1 01, a1 23 | a0 45, a0 67, a1 45, a1 67]; twice more
  // gives [a0 0123, a1 0123, a2 0123, a3 0123 | the 4567 sums], the halves added last.
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// The widest float32 vectors here (16 lanes with AVX-512, else 8), for the decode attention:
// loads of float32, bfloat16 or fp8 e4m3fn (widened) values, multiply-adds, and 4 sums
// reduced at once.
struct Lanes {
#ifdef __AVX512F__
  using V = __m512;
  static constexpr int64_t kWidth = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const uint16_t* p) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static V load(const uint8_t* p) {  // 16 fp8 e4m3fn values, as widen8 does 8
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7f));
    const __m512 normal = _mm512_castsi512_ps(
        _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23)));
    const __m512 sub = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_and_si512(mag, _mm512_set1_epi32(7))), _mm512_set1_ps(0x1p-9f));
    const __mmask16 is_sub = _mm512_cmplt_epi32_mask(mag, _mm512_set1_epi32(8));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
    return _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(_mm512_mask_blend_ps(is_sub, normal, sub)), sign));
  }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static float sum(V v) { return _mm512_reduce_add_ps(v); }
  static __m256 half(V v) {  // lanes i and i + 8 added
    return _mm256_add_ps(_mm512_castps512_ps256(v),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
#else
  using V = __m256;
  static constexpr int64_t kWidth = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V load(const uint16_t* p) { return load8(p); }
  static V load(const uint8_t* p) { return widen8(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static float sum(V v) { return hsum(v); }
  static __m256 half(V v) { return v; }
#endif
  // [sum(a0), sum(a1), sum(a2), sum(a3)], as dot4 reduces its four sums
  static __m128 sum4(V a0, V a1, V a2, V a3) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(half(a0), half(a1)),
                                    _mm256_hadd_ps(half(a2), half(a3)));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  }
};
#define PYTGI_ATTEND_AVX2 1  // dot4, exp8, exp_sum and the bfloat16 roundings are defined
#endif

template <typename R>
inline float dot(const float* q, const R* k, int64_t d) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += q[i] * widen(k[i]);
  return sum;
}

template <typename R>
inline void axpy(float a, const R* v, float* acc, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += a * widen(v[i]);
}

// `count` fp8 values -> float32 `out`.
inline void widen_n(const uint8_t* p, int64_t count, float* out) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= count; i += 8) _mm256_storeu_ps(out + i, widen8(p + i));
#endif
  for (; i < count; ++i) out[i] = widen(p[i]);
}

// `count` values of a slot's row, readable by dot/axpy: in place, or for fp8 widened once
// into `buf` (then shared by every query head of a KV group instead of widened per head).
template <typename R>
inline const R* row_values(const R* row, int64_t, float*) { return row; }
inline const float* row_values(const uint8_t* row, int64_t count, float* buf) {
  widen_n(row, count, buf);
  return buf;
}

// The largest of x[0..n), n >= 1 (a dependent scalar max per score took a tenth of a
// batch-32 attention's time).
inline float row_max(const float* x, int64_t n) {
  int64_t i = 0;
  float top = x[0];
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 m = _mm512_loadu_ps(x);
    for (i = 16; i + 16 <= n; i += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(x + i));
    top = _mm512_reduce_max_ps(m);
  }
#elif defined(__AVX2__)
  if (n >= 8) {
    __m256 m = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    const __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    const __m128 q = _mm_max_ps(h, _mm_movehl_ps(h, h));
    top = _mm_cvtss_f32(_mm_max_ss(q, _mm_shuffle_ps(q, q, 1)));
  }
#endif
  for (; i < n; ++i) top = std::max(top, x[i]);
  return top;
}

// Scores [n, ctx] -> e^(score - top) per row (soft-capped first when softcap > 0); each
// row's top and the sum of its exponentials into stats [n, 2].
inline void exponentiate(float* scores, int64_t n, int64_t ctx, float softcap, float* stats) {
  if (softcap > 0.f)
    for (int64_t i = 0; i < n * ctx; ++i) scores[i] = softcap * std::tanh(scores[i] / softcap);
  for (int64_t j = 0; j < n; ++j) {
    float* s = scores + j * ctx;
    stats[2 * j] = row_max(s, ctx);
    stats[2 * j + 1] = exp_sum(s, ctx, stats[2 * j]);
  }
}

// Scores [n, ctx] -> their softmax per row, each soft-capped first when softcap > 0.
inline void soften(float* scores, int64_t n, int64_t ctx, float softcap) {
  std::vector<float> stats(2 * n);
  exponentiate(scores, n, ctx, softcap, stats.data());
  for (int64_t j = 0; j < n; ++j) {
    const float inv = 1.f / stats[2 * j + 1];
    for (int64_t t = 0; t < ctx; ++t) scores[j * ctx + t] *= inv;
  }
}

// A task's working memory, kept across the tasks a thread takes: q scaled [n, D], scores
// [n, keys], widened rows, where each key's row starts, and the sums and statistics of a
// request attended in one task.
struct Scratch {
  std::vector<float> qf, scores, wide, acc, stats;
  std::vector<int64_t> slots;
};

// Attends query heads [h0, h1) of request r to the keys at positions [first, end). Keys of
// one slot lie together for all KV heads (KVH * D values), so a task that covers every head
// reads each slot's row once.
template <typename T, typename R>
void attend(const T* qp, const R* kp, const R* vp, const int64_t* table, int64_t first,
            int64_t end, int64_t bs, int64_t kv_heads, int64_t group, int64_t d, int64_t q_head,
            float scale, float softcap, float v_scale, int64_t h0, int64_t h1, T* op,
            std::vector<float>& qf, std::vector<float>& scores, std::vector<float>& acc,
            std::vector<float>& wide) {
  const int64_t n = h1 - h0;  // query heads in this task
  const int64_t ctx = end - first;  // keys attended
  const int64_t kv0 = h0 / group, kv_values = ((h1 - 1) / group + 1 - kv0) * d;  // heads read
  wide.resize(kv_values);
  qf.resize(n * d);
  acc.assign(n * d, 0.f);
  scores.resize(n * ctx);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < d; ++i) qf[j * d + i] = static_cast<float>(qp[(h0 + j) * q_head + i]) * scale;
  int64_t t0 = 0;  // keys scored 4 at a time first where the rows are read in place
#ifdef PYTGI_ATTEND_AVX2
  if constexpr (!std::is_same_v<R, uint8_t>) {
    if (d % 8 == 0) {
      for (; t0 + 4 <= ctx; t0 += 4) {
        const R* rows[4];
        for (int64_t u = 0; u < 4; ++u) {
          const int64_t pos = first + t0 + u;
          rows[u] = kp + (table[pos / bs] * bs + pos % bs) * kv_heads * d + kv0 * d;
        }
        for (int64_t j = 0; j < n; ++j) {
          const int64_t off = ((h0 + j) / group - kv0) * d;
          const R* keys[4] = {rows[0] + off, rows[1] + off, rows[2] + off, rows[3] + off};
          _mm_storeu_ps(&scores[j * ctx + t0], dot4(&qf[j * d], keys, d));
        }
      }
    }
  }
#endif
  for (int64_t t = t0; t < ctx; ++t) {  // scores[j, t] = q_j . k_(first + t)
    const int64_t pos = first + t;
    const R* row = kp + (table[pos / bs] * bs + pos % bs) * kv_heads * d + kv0 * d;
    const auto* keys = row_values(row, kv_values, wide.data());
    for (int64_t j = 0; j < n; ++j)
      scores[j * ctx + t] = dot(&qf[j * d], keys + ((h0 + j) / group - kv0) * d, d);
  }
  soften(scores.data(), n, ctx, softcap);
  for (int64_t t = 0; t < ctx; ++t) {  // acc[j] = sum_t p[j, t] v_(first + t)
    const int64_t pos = first + t;
    const R* row = vp + (table[pos / bs] * bs + pos % bs) * kv_heads * d + kv0 * d;
    const auto* values = row_values(row, kv_values, wide.data());
    for (int64_t j = 0; j < n; ++j)
      axpy(scores[j * ctx + t], values + ((h0 + j) / group - kv0) * d, &acc[j * d], d);
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < d; ++i) op[(h0 + j) * d + i] = static_cast<T>(acc[j * d + i] * v_scale);
}

#ifdef PYTGI_ATTEND_AVX2
// Keys about 8 KiB ahead of the one in use (16 to 64 keys) are requested from memory, for a
// stream of `bytes` a key: without, a core read a layer's K/V of 32 requests at 8-16 GB/s,
// the hardware prefetcher losing the stream at each block's end (blocks lie anywhere in the
// cache) and at the values' stride. SmolLM2 decode steps alternating in one process (Zen 5,
// 2 cores): batch 32 attention 15.6 -> 9.5 ms a step (bfloat16), 12.3 -> 7.9 ms (float32)
// at 16 keys. A batch-1 task reads one KV group's 128 bytes of a bfloat16 row, 2 KiB in 16
// keys: 32-64 keys took its attention over 2000 keys from 2.0 to 1.4-1.5 ms
// (benchmarks/decode_attention.py, builds alternating), 32 keys of whole rows 3-7% off
// batch 8 and 32.
// The rows are requested into L2 (`prefetcht1`), not L1: a core's L1 holds few misses in
// flight, and on Zen 4 requests into L1 held a core to ~8 GB/s of K/V where its streaming
// reads reach ~28; into L2, batch 32 x 300 keys (bfloat16) took 9.4-10.1 ms a step against
// 13.7-15.0, 1 x 2000 1.8-2.2 against 3.1-4.2 (benchmarks/decode_attention.py shapes, builds
// alternating). Zen 5 measured both alike. 16 or 32 KiB ahead were slower than 8.
inline int64_t keys_ahead(int64_t bytes) { return std::clamp<int64_t>(8192 / bytes, 16, 64); }
inline void prefetch(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(p) + b, _MM_HINT_T1);
}

#endif

#ifdef __AVX512BF16__
// scores[j, t] = scale * (q_(h0 + j) . k_t) for bfloat16 q and keys, t < ctx, the keys' rows at
// kp + slots[t]: 32 products per instruction (vdpbf16ps: each product of two bfloat16 values
// exact in float32, pairs summed into float32 lanes), 4 keys reduced together; d % 32 == 0.
inline void score_bf16(const uint16_t* qp, int64_t q_head, int64_t h0, int64_t n, int64_t group,
                       int64_t kv0, int64_t d, const uint16_t* kp, const uint16_t* vp,
                       const int64_t* slots, int64_t ctx, int64_t row_bytes, float scale,
                       float* scores) {
  auto pairs = [](const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); };
  const __m128 scale4 = _mm_set1_ps(scale);
  const int64_t ahead = keys_ahead(row_bytes);
  int64_t t = 0;
  for (; t + 4 <= ctx; t += 4) {
    for (int64_t u = t + ahead; u < std::min(t + ahead + 4, ctx); ++u) {
      prefetch(kp + slots[u], row_bytes);
      if (vp) prefetch(vp + slots[u], row_bytes);
    }
    const uint16_t* k[4] = {kp + slots[t], kp + slots[t + 1], kp + slots[t + 2], kp + slots[t + 3]};
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* q = qp + (h0 + j) * q_head;
      const int64_t off = ((h0 + j) / group - kv0) * d;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < d; i += 32) {
        const __m512bh x = pairs(q + i);
        a0 = _mm512_dpbf16_ps(a0, x, pairs(k[0] + off + i));
        a1 = _mm512_dpbf16_ps(a1, x, pairs(k[1] + off + i));
        a2 = _mm512_dpbf16_ps(a2, x, pairs(k[2] + off + i));
        a3 = _mm512_dpbf16_ps(a3, x, pairs(k[3] + off + i));
      }
      _mm_storeu_ps(scores + j * ctx + t, _mm_mul_ps(Lanes::sum4(a0, a1, a2, a3), scale4));
    }
  }
  for (; t < ctx; ++t) {
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* q = qp + (h0 + j) * q_head;
      const uint16_t* key = kp + slots[t] + ((h0 + j) / group - kv0) * d;
      __m512 a = _mm512_setzero_ps();
      for (int64_t i = 0; i < d; i += 32) a = _mm512_dpbf16_ps(a, pairs(q + i), pairs(key + i));
      scores[j * ctx + t] = _mm512_reduce_add_ps(a) * scale;
    }
  }
}
#endif

#ifdef PYTGI_ATTEND_AVX2
// acc[g, i] = sum_t p[g, t] v_t[off + i] for the G query heads of one KV head (p: their
// softmaxed scores, rows of `ctx`), i < d, d a multiple of S vector widths: per pass over
// the keys the G x S sums of S vectors of values stay in registers, instead of a load and a
// store of each sum per key. One pass over the keys, rather than several narrower ones,
// measured faster (the rows' reads).
template <int G, int S, typename R>
void values_of(const float* p, int64_t ctx, const R* vp, const int64_t* slots, int64_t off,
               int64_t d, float* acc) {
  using V = Lanes::V;
  constexpr int64_t W = Lanes::kWidth;
  const int64_t ahead = keys_ahead(S * W * sizeof(R));
  for (int64_t i = 0; i < d; i += S * W) {
    V a[G][S];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int u = 0; u < S; ++u) a[g][u] = Lanes::zero();
    for (int64_t t = 0; t < ctx; ++t) {
      const R* row = vp + slots[t] + off + i;
      if (t + ahead < ctx) prefetch(vp + slots[t + ahead] + off + i, S * W * sizeof(R));
      V v[S];
#pragma GCC unroll 8
      for (int u = 0; u < S; ++u) v[u] = Lanes::load(row + u * W);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        const V pg = Lanes::set1(p[g * ctx + t]);
#pragma GCC unroll 8
        for (int u = 0; u < S; ++u) a[g][u] = Lanes::fma(pg, v[u], a[g][u]);
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 8
      for (int u = 0; u < S; ++u) Lanes::store(acc + g * d + i + u * W, a[g][u]);
  }
}

// values_of for a run-time group of up to 8 query heads: S vectors of each head's values per
// pass over the keys, as many as the registers hold (G x S sums); false past 8 heads (the
// caller then sums a key at a time).
template <typename R>
bool values_of_group(int64_t group, const float* p, int64_t ctx, const R* vp,
                     const int64_t* slots, int64_t off, int64_t d, float* acc) {
  constexpr int64_t W = Lanes::kWidth;
  constexpr int kSums = W == 16 ? 24 : 12;  // of 32 / 16 registers
  for (const int s : {8, 4, 2, 1}) {
    if (d % (s * W) != 0 || group * s > kSums) continue;
#define PYTGI_VALUES(G)                                                        \
  if (group == G) {                                                            \
    if constexpr (G * 8 <= kSums) if (s == 8) return values_of<G, 8>(p, ctx, vp, slots, off, d, acc), true; \
    if constexpr (G * 4 <= kSums) if (s == 4) return values_of<G, 4>(p, ctx, vp, slots, off, d, acc), true; \
    if constexpr (G * 2 <= kSums) if (s == 2) return values_of<G, 2>(p, ctx, vp, slots, off, d, acc), true; \
    return values_of<G, 1>(p, ctx, vp, slots, off, d, acc), true;             \
  }
    PYTGI_VALUES(1) PYTGI_VALUES(2) PYTGI_VALUES(3) PYTGI_VALUES(4)
    PYTGI_VALUES(5) PYTGI_VALUES(6) PYTGI_VALUES(7) PYTGI_VALUES(8)
#undef PYTGI_VALUES
    return false;
  }
  return false;
}
#endif

#ifdef PYTGI_ATTEND_AVX2
// attend() for d a multiple of the vector width, in Lanes' vectors: bfloat16 keys are read
// in place by bf16 dot products where the CPU has them, else each key's row (every KV head
// the task reads; bfloat16 or fp8) is widened to float32 once for all the query heads
// (attend() widens it per query head); the values' sums stay in registers (values_of). Key
// positions are walked block by block (attend() divides per key).
// Keys ahead are prefetched. The keys are those of positions [first, end) (one chunk, see
// decode_chunked): acc [n, D] gets each head's sum of e^(s_t - top) v_t, stats [n, 2] its
// top score and sum of e^(s_t - top). The same sums as attend()'s in another order. Against
// attend(), before the prefetches (Zen 5, 2 cores, SmolLM2 decode steps alternating in one
// process): batch 32 bfloat16 0.80-0.92x its time, float32 0.93-0.96x; batch 1 (the whole
// step) 0.86x / 0.92x; the prefetches then took another 0.61x / 0.64x off at batch 32.
template <typename T, typename R>
void attend_lanes(const T* qp, const R* kp, const R* vp, const int64_t* table, int64_t first,
                  int64_t end, int64_t bs, int64_t kv_heads, int64_t group, int64_t d,
                  int64_t q_head, float scale, float softcap, int64_t h0, int64_t h1,
                  float* acc, float* stats, Scratch& scratch) {
  using V = Lanes::V;
  constexpr int64_t W = Lanes::kWidth;
  const int64_t n = h1 - h0, ctx = end - first;
  const int64_t kv0 = h0 / group, kv_values = ((h1 - 1) / group + 1 - kv0) * d;
  std::vector<float>& qf = scratch.qf;
  std::vector<float>& scores = scratch.scores;
  std::vector<float>& wide = scratch.wide;
  std::vector<int64_t>& slots = scratch.slots;
  wide.resize(4 * kv_values + 16);
  float* const widened = wide.data() + (16 - reinterpret_cast<uintptr_t>(wide.data()) / 4 % 16) % 16;
  qf.resize(n * d);
  std::fill(acc, acc + n * d, 0.f);
  scores.resize(n * ctx);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < d; ++i) qf[j * d + i] = static_cast<float>(qp[(h0 + j) * q_head + i]) * scale;
  // where key t's values start in a cache, walked block by block (no division per key)
  slots.resize(ctx);
  for (int64_t t = 0, block = first / bs, in = first % bs; t < ctx; ++t) {
    slots[t] = ((table[block] * bs + in) * kv_heads + kv0) * d;
    if (++in == bs) in = 0, ++block;
  }
  // the KV values of key t (read in place when float32, else widened into buffer u of 4)
  auto row_at = [&](const R* cache, int64_t t, int64_t u) -> const float* {
    const R* row = cache + slots[t];
    if constexpr (std::is_same_v<R, float>) {
      return row;
    } else {
      float* dst = widened + u * kv_values;  // 64-byte aligned: no split stores
      for (int64_t i = 0; i < kv_values; i += W) Lanes::store(dst + i, Lanes::load(row + i));
      return dst;
    }
  };
  auto offset = [&](int64_t j) { return ((h0 + j) / group - kv0) * d; };
  // A task of whole rows (every KV head) also requests its values' rows as it scores: its
  // value passes (one per KV head) then read them from L2.
  const R* v_early = kv_values == kv_heads * d ? vp : nullptr;
  // the first keys' and values' rows, which the passes below request only `ahead` keys on
  const int64_t ahead = keys_ahead(kv_values * sizeof(R));
  for (int64_t u = 0; u < std::min(ahead, ctx); ++u) {
    prefetch(kp + slots[u], kv_values * sizeof(R));
    prefetch(vp + slots[u], kv_values * sizeof(R));
  }
  int64_t t = 0;
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<R, uint16_t>) {
    if (d % 32 == 0) {  // bfloat16 keys read in place by bf16 dot products
      score_bf16(reinterpret_cast<const uint16_t*>(qp), q_head, h0, n, group, kv0, d, kp, v_early,
                 slots.data(), ctx, kv_values * 2, scale, scores.data());
      t = ctx;
    }
  }
#endif
  for (; t + 4 <= ctx; t += 4) {  // scores[j, t..t+4) = q_j . k_(first + t ..)
    for (int64_t u = t + ahead; u < std::min(t + ahead + 4, ctx); ++u) {
      prefetch(kp + slots[u], kv_values * sizeof(R));
      if (v_early) prefetch(v_early + slots[u], kv_values * sizeof(R));
    }
    const float* k0 = row_at(kp, t, 0);
    const float* k1 = row_at(kp, t + 1, 1);
    const float* k2 = row_at(kp, t + 2, 2);
    const float* k3 = row_at(kp, t + 3, 3);
    for (int64_t j = 0; j < n; ++j) {
      const float* q = &qf[j * d];
      const int64_t off = offset(j);
      V a0 = Lanes::zero(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < d; i += W) {
        const V x = Lanes::load(q + i);
        a0 = Lanes::fma(x, Lanes::load(k0 + off + i), a0);
        a1 = Lanes::fma(x, Lanes::load(k1 + off + i), a1);
        a2 = Lanes::fma(x, Lanes::load(k2 + off + i), a2);
        a3 = Lanes::fma(x, Lanes::load(k3 + off + i), a3);
      }
      _mm_storeu_ps(&scores[j * ctx + t], Lanes::sum4(a0, a1, a2, a3));
    }
  }
  for (; t < ctx; ++t) {
    const float* k = row_at(kp, t, 0);
    for (int64_t j = 0; j < n; ++j) {
      V a = Lanes::zero();
      for (int64_t i = 0; i < d; i += W)
        a = Lanes::fma(Lanes::load(&qf[j * d] + i), Lanes::load(k + offset(j) + i), a);
      scores[j * ctx + t] = Lanes::sum(a);
    }
  }
  exponentiate(scores.data(), n, ctx, softcap, stats);
  // acc[j] = sum_t p[j, t] v_t: per KV head in registers where they fit, else a key at a time
  bool summed = n % group == 0 && h0 % group == 0;
  for (int64_t h = 0; summed && h < n / group; ++h)
    summed = values_of_group(group, &scores[h * group * ctx], ctx, vp, slots.data(), h * d, d,
                             acc + h * group * d);
  for (t = 0; !summed && t < ctx; ++t) {
    const float* v = row_at(vp, t, 0);
    for (int64_t j = 0; j < n; ++j) {
      const V p = Lanes::set1(scores[j * ctx + t]);
      for (int64_t i = 0; i < d; i += W)
        Lanes::store(acc + j * d + i,
                     Lanes::fma(p, Lanes::load(v + offset(j) + i), Lanes::load(acc + j * d + i)));
    }
  }
}

// A request's keys are attended kChunk positions at a time from its first: each chunk's
// task leaves its query heads' unnormalized sums and softmax statistics, which are merged
// per head after (as flash-decoding splits a long context). Chunks follow from the context
// alone, so a request's output is the same in any batch. The tasks (a chunk's KV groups when
// there are few requests, else all its heads) are taken by the threads one at a time, so a
// batch-1 step shares a long context between the cores: one task per KV group left one of
// 2 cores idle for a third of SmolLM2's 3 groups. 512 keys measured faster than 256 at every
// batch (benchmarks/decode_attention.py shapes, alternating in one process).
constexpr int64_t kChunk = 512;

template <typename T, typename R>
void decode_chunked(const T* qp, const R* kp, const R* vp, const int64_t* tp, const int64_t* cp,
                    int64_t rows, int64_t heads, int64_t d, int64_t q_row, int64_t q_head,
                    int64_t width, int64_t bs, int64_t kv_heads, int64_t window, float scale,
                    float softcap, float v_scale, T* op) {
  const int64_t group = heads / kv_heads, threads = at::get_num_threads();
  const int64_t splits = rows >= 2 * threads ? 1 : kv_heads, per_split = heads / splits;
  // chunk c of request r is chunk0[r] + c; its keys start at first[r] + c * kChunk. A
  // request of several chunks leaves its sums and statistics at part[r] + c (else -1: its
  // task writes its output).
  std::vector<int64_t> first(rows), chunk0(rows + 1, 0), part(rows, -1), merged;
  int64_t parts = 0;
  for (int64_t r = 0; r < rows; ++r) {
    first[r] = window > 0 ? std::max<int64_t>(0, cp[r] - window) : 0;
    const int64_t n = std::max<int64_t>(1, (cp[r] - first[r] + kChunk - 1) / kChunk);
    chunk0[r + 1] = chunk0[r] + n;
    if (n > 1) part[r] = parts, parts += n, merged.push_back(r);
  }
  const int64_t tasks = chunk0[rows] * splits;
  std::vector<float> sums(parts * heads * d), stats(parts * heads * 2);  // [part, H, D | 2]
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
    Scratch scratch;
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t chunk = task / splits, h0 = task % splits * per_split;
      const int64_t r = std::upper_bound(chunk0.begin(), chunk0.end(), chunk) - chunk0.begin() - 1;
      const int64_t c = chunk - chunk0[r], begin = first[r] + c * kChunk;
      const int64_t at = part[r] < 0 ? -1 : (part[r] + c) * heads + h0;
      if (at < 0) {
        scratch.acc.resize(per_split * d);
        scratch.stats.resize(per_split * 2);
      }
      float* acc = at < 0 ? scratch.acc.data() : &sums[at * d];
      float* st = at < 0 ? scratch.stats.data() : &stats[at * 2];
      attend_lanes(qp + r * q_row, kp, vp, tp + r * width, begin,
                   std::min(begin + kChunk, cp[r]), bs, kv_heads, group, d, q_head, scale,
                   softcap, h0, h0 + per_split, acc, st, scratch);
      for (int64_t j = 0; at < 0 && j < per_split; ++j) {  // out = v_scale * sums / total
        const float factor = v_scale / st[2 * j + 1];
        T* dst = op + (r * heads + h0 + j) * d;
        for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(acc[j * d + i] * factor);
      }
    }
  });
  // out[r, h] = v_scale * sum_c e^(top_c - top) sums_c / sum_c e^(top_c - top) total_c
  const int64_t pairs = static_cast<int64_t>(merged.size()) * heads;
  at::parallel_for(0, pairs, 32, [&](int64_t begin, int64_t end) {
    std::vector<float> out(d), weight;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r = merged[k / heads], h = k % heads, n = chunk0[r + 1] - chunk0[r];
      const float* st = &stats[(part[r] * heads + h) * 2];  // chunk c's at st + c * heads * 2
      float top = st[0], total = 0.f;
      for (int64_t c = 1; c < n; ++c) top = std::max(top, st[c * heads * 2]);
      weight.resize(n);
      for (int64_t c = 0; c < n; ++c) {
        weight[c] = std::exp(st[c * heads * 2] - top);
        total += weight[c] * st[c * heads * 2 + 1];
      }
      std::fill(out.begin(), out.end(), 0.f);
      for (int64_t c = 0; c < n; ++c) {
        const float* sum = &sums[((part[r] + c) * heads + h) * d];
        for (int64_t i = 0; i < d; ++i) out[i] += weight[c] * sum[i];
      }
      const float factor = v_scale / total;
      T* dst = op + (r * heads + h) * d;
      for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<T>(out[i] * factor);
    }
  });
}
#endif

// C: the caches' element type (T, or c10::Float8_e4m3fn).
template <typename T, typename C>
void decode(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
            const torch::Tensor& tables, const torch::Tensor& context, double scale,
            int64_t window, double softcap, double v_scale, torch::Tensor& out) {
  const int64_t rows = q.size(0), heads = q.size(1), d = q.size(2);
  const int64_t bs = k_cache.size(1), kv_heads = k_cache.size(2), group = heads / kv_heads;
  const int64_t q_row = q.stride(0), q_head = q.stride(1), width = tables.size(1);
  const T* qp = q.data_ptr<T>();
  using R = typename Raw<C>::type;
  const R* kp = reinterpret_cast<const R*>(k_cache.data_ptr<C>());
  const R* vp = reinterpret_cast<const R*>(v_cache.data_ptr<C>());
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* cp = context.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
#ifdef PYTGI_ATTEND_AVX2
  if (d % Lanes::kWidth == 0) {
    decode_chunked(qp, kp, vp, tp, cp, rows, heads, d, q_row, q_head, width, bs, kv_heads,
                   window, static_cast<float>(scale), static_cast<float>(softcap),
                   static_cast<float>(v_scale), op);
    return;
  }
#endif
  // Enough requests to share out: one task per request (every head). Few: split the heads
  // too, one task per KV group, so both cores work at batch 1.
  const int64_t splits = rows >= 2 * at::get_num_threads() ? 1 : kv_heads;
  const int64_t per_split = heads / splits;
  at::parallel_for(0, rows * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, scores, acc, wide;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / splits, h0 = task % splits * per_split;
      const int64_t first = window > 0 ? std::max<int64_t>(0, cp[r] - window) : 0;
      attend(qp + r * q_row, kp, vp, tp + r * width, first, cp[r], bs, kv_heads, group, d,
             q_head, static_cast<float>(scale), static_cast<float>(softcap),
             static_cast<float>(v_scale), h0, h0 + per_split, op + r * heads * d, qf, scores,
             acc, wide);
    }
  });
}

}  // namespace

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor tables, torch::Tensor context, double scale,
                           int64_t window, double softcap, double k_scale, double v_scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [B, H, D] with D contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const bool fp8 = k_cache.scalar_type() == torch::kFloat8_e4m3fn;
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "K and V cache dtypes differ");
  TORCH_CHECK(fp8 || q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  if (!fp8) k_scale = v_scale = 1.0;  // scales stand for fp8 values only
  scale *= k_scale;
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "heads must be a multiple of KV heads");
  auto tables64 = tables.to(torch::kInt64).contiguous();
  auto context64 = context.to(torch::kInt64).contiguous();
  TORCH_CHECK(tables64.dim() == 2 && tables64.size(0) == q.size(0) &&
                  context64.numel() == q.size(0), "a block table and a context length per row");
  const int64_t positions = tables64.size(1) * k_cache.size(1);
  for (int64_t r = 0; r < context64.numel(); ++r) {
    const int64_t c = context64.data_ptr<int64_t>()[r];
    TORCH_CHECK(c >= 1 && c <= positions, "context length ", c, " of row ", r,
                " outside 1..", positions, " (its block table's positions)");
  }
  auto out = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  // q's dtype T and the caches' C: (T, T) or (T, float8)
  auto run = [&](auto* query, auto* cached) {
    using T = std::remove_pointer_t<decltype(query)>;
    using C = std::remove_pointer_t<decltype(cached)>;
    decode<T, C>(q, k_cache, v_cache, tables64, context64, scale, window, softcap, v_scale, out);
  };
  using F8 = c10::Float8_e4m3fn;
  using BF = c10::BFloat16;
  if (q.scalar_type() == torch::kFloat) {
    fp8 ? run((float*)nullptr, (F8*)nullptr) : run((float*)nullptr, (float*)nullptr);
  } else if (q.scalar_type() == torch::kBFloat16) {
    fp8 ? run((BF*)nullptr, (F8*)nullptr) : run((BF*)nullptr, (BF*)nullptr);
  } else {
    TORCH_CHECK(false, "paged_decode: float32 or bfloat16 only");
  }
  return out;
}

namespace {

// New K/V rows [T, KVH, D] (float32 or bfloat16) into an fp8 cache [N, BS, KVH, D] at
// `slots` [T] (-1: skipped), as x * inv_scale.
template <typename T>
void store_rows(const torch::Tensor& x, torch::Tensor& cache, const int64_t* slots,
                float inv_scale) {
  const int64_t tokens = x.size(0), row = x.size(1) * x.size(2);
  const T* xp = x.data_ptr<T>();
  uint8_t* cp = reinterpret_cast<uint8_t*>(cache.data_ptr<c10::Float8_e4m3fn>());
  for (int64_t t = 0; t < tokens; ++t) {
    if (slots[t] < 0) continue;
    uint8_t* dst = cp + slots[t] * row;
    const T* src = xp + t * row;
    for (int64_t i = 0; i < row; ++i) dst[i] = narrow_fp8(static_cast<float>(src[i]) * inv_scale);
  }
}

}  // namespace

void store_fp8(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
               torch::Tensor slots, double inv_k, double inv_v) {
  TORCH_CHECK(k_cache.scalar_type() == torch::kFloat8_e4m3fn, "store_fp8: fp8 caches only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  auto slots64 = slots.to(torch::kInt64).contiguous();
  const int64_t* sp = slots64.data_ptr<int64_t>();
  for (auto [x, cache, inv] : {std::tuple{k.contiguous(), k_cache, inv_k},
                               std::tuple{v.contiguous(), v_cache, inv_v}}) {
    TORCH_CHECK(x.size(1) * x.size(2) == cache.size(2) * cache.size(3), "K/V rows differ");
    if (x.scalar_type() == torch::kFloat) {
      store_rows<float>(x, cache, sp, static_cast<float>(inv));
    } else if (x.scalar_type() == torch::kBFloat16) {
      store_rows<c10::BFloat16>(x, cache, sp, static_cast<float>(inv));
    } else {
      TORCH_CHECK(false, "store_fp8: float32 or bfloat16 K/V only");
    }
  }
}

namespace {

#if defined(PYTGI_ATTEND_AVX2) && !defined(__AVX512F__)
#define PYTGI_ROWS4 1
// out[0..4) = x . w[j] for the 4 float32 weight rows w[j] = w + j * k: two accumulators per
// row (8 independent multiply-add chains), x's vectors loaded once for the 4 rows. On a
// 2-core AVX2 EPYC (Zen 1) one row's single chain waited on its latency: SmolLM2's products
// 38 -> 31 ms. bfloat16 rows stay one at a time (this form took them 24 -> 32 ms there), and
// AVX-512's single 16-lane chain was not measured slow (benchmarks/RESULTS.md, 2026-12-04).
inline void dot_rows4(const float* x, const float* w, int64_t k, float* out) {
  using L = Lanes;
  constexpr int64_t W = L::kWidth;
  const float *w0 = w, *w1 = w + k, *w2 = w + 2 * k, *w3 = w + 3 * k;
  L::V a0 = L::zero(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  int64_t i = 0;
  for (; i + 2 * W <= k; i += 2 * W) {
    const L::V x0 = L::load(x + i), x1 = L::load(x + i + W);
    a0 = L::fma(x0, L::load(w0 + i), a0), b0 = L::fma(x1, L::load(w0 + i + W), b0);
    a1 = L::fma(x0, L::load(w1 + i), a1), b1 = L::fma(x1, L::load(w1 + i + W), b1);
    a2 = L::fma(x0, L::load(w2 + i), a2), b2 = L::fma(x1, L::load(w2 + i + W), b2);
    a3 = L::fma(x0, L::load(w3 + i), a3), b3 = L::fma(x1, L::load(w3 + i + W), b3);
  }
  for (; i + W <= k; i += W) {
    const L::V x0 = L::load(x + i);
    a0 = L::fma(x0, L::load(w0 + i), a0), a1 = L::fma(x0, L::load(w1 + i), a1);
    a2 = L::fma(x0, L::load(w2 + i), a2), a3 = L::fma(x0, L::load(w3 + i), a3);
  }
  _mm_storeu_ps(out, L::sum4(L::add(a0, b0), L::add(a1, b1), L::add(a2, b2), L::add(a3, b3)));
  for (; i < k; ++i) {  // k not a multiple of the lanes: the last values one by one
    out[0] += x[i] * w0[i], out[1] += x[i] * w1[i];
    out[2] += x[i] * w2[i], out[3] += x[i] * w3[i];
  }
}
#endif

// out[m, n] = x[m, :] . w[n, :] for a few rows x (decode: one per request). Each group of 4
// weight rows is read once from memory and used for every x row while it sits in L1, so
// the time is the time to stream the weights; groups are shared out over ATen's threads.
template <typename T>
void small_matmul(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& out) {
  using R = typename Raw<T>::type;
  const int64_t m_rows = x.size(0), k = x.size(1), n_rows = w.size(0);
  const R* wp = reinterpret_cast<const R*>(w.data_ptr<T>());
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  std::vector<float> xf(m_rows * k);
  for (int64_t i = 0; i < m_rows * k; ++i) xf[i] = static_cast<float>(xp[i]);
  at::parallel_for(0, (n_rows + 3) / 4, 4, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t n0 = 4 * g, rows = std::min<int64_t>(4, n_rows - n0);
      for (int64_t m = 0; m < m_rows; ++m) {
        float sums[4];
#ifdef PYTGI_ROWS4
        if (std::is_same_v<R, float> && rows == 4) {
          dot_rows4(&xf[m * k], reinterpret_cast<const float*>(wp + n0 * k), k, sums);
        } else
#endif
        {
          for (int64_t j = 0; j < rows; ++j) sums[j] = dot(&xf[m * k], wp + (n0 + j) * k, k);
        }
        for (int64_t j = 0; j < rows; ++j) op[m * n_rows + n0 + j] = static_cast<T>(sums[j]);
      }
    }
  });
}

}  // namespace

torch::Tensor linear_small(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "x and w dtypes differ");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto out = torch::empty({x.size(0), w.size(0)}, x.options());
  if (x.scalar_type() == torch::kFloat) {
    small_matmul<float>(xc, wc, out);
  } else if (x.scalar_type() == torch::kBFloat16) {
    small_matmul<c10::BFloat16>(xc, wc, out);
  } else {
    TORCH_CHECK(false, "linear_small: float32 or bfloat16 only");
  }
  return out;
}

// Row x [n]'s first maximum: its value (NaNs are passed over) and index.
inline std::pair<float, int64_t> first_max(const float* x, int64_t n) {
  float top = -std::numeric_limits<float>::infinity();
  int64_t t = 0;
#ifdef PYTGI_ATTEND_AVX2
  __m256 best = _mm256_set1_ps(top);
  for (; t + 8 <= n; t += 8) best = _mm256_max_ps(_mm256_loadu_ps(x + t), best);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, best);
  for (const float v : lanes) top = std::max(top, v);
#endif
  for (; t < n; ++t) top = std::max(top, x[t]);
  int64_t at = 0;
#ifdef PYTGI_ATTEND_AVX2
  const __m256 target = _mm256_set1_ps(top);
  for (; at + 8 <= n; at += 8) {
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + at), target,
                                                      _CMP_EQ_OQ));
    if (mask) return {top, at + __builtin_ctz(mask)};
  }
#endif
  for (; at < n && x[at] != top; ++at) {
  }
  return {top, at < n ? at : 0};  // none equal: a row of NaNs or -inf, token 0 (as torch)
}

// sum over t of e^(x[t] - top), x unchanged: float32 sums of 1024 terms added in double
// (one float32 sum over a 151936-token vocabulary drifts by 2e-5; torch's by <1e-6).
inline double exp_total(const float* x, int64_t n, float top) {
  double sum = 0.;
  int64_t t = 0;
#ifdef PYTGI_ATTEND_AVX2
  const __m256 shift = _mm256_set1_ps(top);
  while (t + 8 <= n) {
    __m256 block = _mm256_setzero_ps();
    for (const int64_t end = std::min(n, t + 1024); t + 8 <= end; t += 8)
      block = _mm256_add_ps(block, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + t), shift)));
    sum += hsum(block);
  }
#endif
  for (; t < n; ++t) sum += std::exp(x[t] - top);
  return sum;
}

std::tuple<torch::Tensor, torch::Tensor> greedy(torch::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == torch::kFloat &&
                  logits.stride(1) == 1,
              "greedy: float32 logits [R, V] with contiguous rows");
  const int64_t rows = logits.size(0), vocab = logits.size(1), stride = logits.stride(0);
  auto ids = torch::empty({rows}, logits.options().dtype(torch::kLong));
  auto logprobs = torch::empty({rows}, logits.options());
  const float* base = logits.data_ptr<float>();
  int64_t* id = ids.data_ptr<int64_t>();
  float* lp = logprobs.data_ptr<float>();
#pragma omp parallel for if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    const float* x = base + r * stride;
    const auto [top, at] = first_max(x, vocab);
    id[r] = at;
    lp[r] = static_cast<float>(-std::log(exp_total(x, vocab, top)));
  }
  return {ids, logprobs};
}

}  // namespace pytgi
