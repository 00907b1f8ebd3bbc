// Weight-only int8 / int4 linear layers on CPU (layouts in quant.h), and bfloat16 weights
// through the same many-row product where the CPU has no bf16 instructions.
//
// Decode is bound by reading the weights: each packed weight row is read from memory once
// per call and used for every input row while it sits in L1. Products are accumulated in
// float32 lanes, each group's part scaled as it is added; the int4 mins are folded in
// through each input row's per-group sums: sum_k x_k (s q_k + m) = s sum_k x_k q_k + m sum_k x_k.

#include "quant.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define PYTGI_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define PYTGI_AVX512 1  // 16-lane forms of the products below; AVX2's stay for other CPUs
#if defined(__AVX512BF16__)
#define PYTGI_DPBF16 1  // bfloat16 inputs of many rows through bf16 dot products
#endif
// M(i) for the 12 rows of a 16-lane tile (each guarded by `if constexpr (MR > i)`)
#define PYTGI_EACH12(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
#endif

namespace pytgi {
namespace {

constexpr int64_t kBlock = 32;  // int4 inputs per GGML block (16 bytes)
// Up to this many x rows the products read each packed row once per x row (`product`);
// more go through `blocked` (each row dequantized once, then a register-blocked product).
constexpr int64_t kFewRows = 8;

inline float to_float(c10::Half h) { return static_cast<float>(h); }
inline float to_float(float f) { return f; }

// Row n of an int8 layer, dequantized into dst[0..k).
template <typename S>
inline void row_q8(const int8_t* q, const S* scales, int64_t k, int64_t groups,
                   float* dst) {
  const int64_t g = k / groups;
  for (int64_t grp = 0; grp < groups; ++grp, q += g, dst += g) {
    const float s = to_float(scales[grp]);
#pragma omp simd
    for (int64_t i = 0; i < g; ++i) dst[i] = s * static_cast<float>(q[i]);
  }
}

// Row n of an int4 layer (k / 2 bytes), dequantized into dst[0..k); S: the scales' type.
template <typename S>
inline void row_q4(const uint8_t* q, const S* scales, const float* mins, int64_t k,
                   int64_t groups, float* dst) {
  const int64_t g = k / groups;
  for (int64_t grp = 0; grp < groups; ++grp) {
    const float s = to_float(scales[grp]), mn = mins[grp];
    for (int64_t b = 0; b < g; b += kBlock, q += kBlock / 2, dst += kBlock) {
#pragma omp simd
      for (int64_t j = 0; j < kBlock / 2; ++j) {
        dst[j] = s * static_cast<float>(q[j] & 15) + mn;
        dst[j + 16] = s * static_cast<float>(q[j] >> 4) + mn;
      }
    }
  }
}

// Row n of a bfloat16 layer (k values) widened into dst[0..k): a bfloat16 is the top half
// of its float32, so each is exact.
inline void row_bf16(const uint16_t* w, int64_t k, float* dst) {
  int64_t i = 0;
#ifdef __AVX2__
  for (; i + 8 <= k; i += 8) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_slli_epi32(wide, 16));
  }
#endif
  for (; i < k; ++i) {
    const uint32_t bits = static_cast<uint32_t>(w[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof(float));
  }
}

// Per x row and group: the sum of the row's inputs in the group (int4's mins term).
std::vector<float> group_sums(const float* x, int64_t rows, int64_t k, int64_t groups) {
  const int64_t g = k / groups;
  std::vector<float> sums(rows * groups);
  for (int64_t i = 0; i < rows * groups; ++i) {
    float s = 0.f;
    for (int64_t j = 0; j < g; ++j) s += x[i * g + j];
    sums[i] = s;
  }
  return sums;
}

#ifdef PYTGI_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline __m256 load8(const int8_t* q) {  // 8 int8 weights as 8 floats
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
#endif

// n float32 scales (GGUF's K-quants: a float16 times a 6-bit integer) into dst.
inline void widen_scales(const float* src, int64_t n, float* dst) {
  std::copy(src, src + n, dst);
}

// Widens n float16 scales into dst.
inline void widen_scales(const c10::Half* src, int64_t n, float* dst) {
  int64_t i = 0;
#ifdef __F16C__
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

#ifdef PYTGI_AVX512
inline __m512 load16(const int8_t* q) {  // 16 int8 weights as 16 floats
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}

// x[0..g) . q[0..g) for one int8 group (g a multiple of 16), in 16 lanes.
inline __m512 group_q8(const float* x, const int8_t* q, int64_t g) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= g; i += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), load16(q + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), load16(q + i + 16), a1);
  }
  if (i < g) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), load16(q + i), a0);
  return _mm512_add_ps(a0, a1);
}

// x[0..g) . q for one int4 group (g / 32 blocks of 16 bytes): a block's 16 bytes widened to
// 16 lanes hold inputs 0..15 in their low nibbles and 16..31 in their high nibbles.
inline __m512 group_q4(const float* x, const uint8_t* q, int64_t g) {
  const __m512i mask = _mm512_set1_epi32(15);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (int64_t b = 0; b < g; b += kBlock, x += kBlock, q += kBlock / 2) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x), _mm512_cvtepi32_ps(_mm512_and_si512(d, mask)), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + 16), _mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4)), a1);
  }
  return _mm512_add_ps(a0, a1);
}

// sum over groups of sf[grp] * part(grp), part in 16 lanes: two chains of scaled sums
// (even and odd groups), as one chain of dependent multiply-adds per group of 32 would
// bound the loop at the multiply-add's latency.
template <typename Part>
inline float scaled_groups(const float* sf, int64_t groups, Part part) {
  __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  int64_t grp = 0;
  for (; grp + 2 <= groups; grp += 2) {
    s0 = _mm512_fmadd_ps(part(grp), _mm512_set1_ps(sf[grp]), s0);
    s1 = _mm512_fmadd_ps(part(grp + 1), _mm512_set1_ps(sf[grp + 1]), s1);
  }
  if (grp < groups) s0 = _mm512_fmadd_ps(part(grp), _mm512_set1_ps(sf[grp]), s0);
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
#endif

// x[0..k) . (int8 row q with its group scales sf, as float32), reading q once.
inline float dot_q8(const float* x, const int8_t* q, const float* sf, int64_t k, int64_t groups) {
  const int64_t g = k / groups;
  float total = 0.f;
#ifdef PYTGI_AVX512
  if (g % 16 == 0)
    return scaled_groups(sf, groups, [&](int64_t grp) { return group_q8(x + grp * g, q + grp * g, g); });
#endif
#ifdef PYTGI_AVX2
  if (g % 32 == 0) {
    __m256 sum = _mm256_setzero_ps();
    for (int64_t grp = 0; grp < groups; ++grp) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      // one 8-byte load per 8 weights, sign-extended from memory: no shuffle (measured 1.3x
      // faster than 16-byte loads split with unpackhi on a Zen 3 EPYC)
      for (int64_t i = 0; i < g; i += 32, x += 32, q += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x), load8(q), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), load8(q + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + 16), load8(q + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + 24), load8(q + 24), a3);
      }
      const __m256 part = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
      sum = _mm256_fmadd_ps(part, _mm256_set1_ps(sf[grp]), sum);
    }
    return hsum(sum);
  }
  if (g % 16 == 0) {  // GGUF's Q6_K: groups of 16
    __m256 sum = _mm256_setzero_ps();
    for (int64_t grp = 0; grp < groups; ++grp) {
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      for (int64_t i = 0; i < g; i += 16, x += 16, q += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x), load8(q), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), load8(q + 8), a1);
      }
      sum = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(sf[grp]), sum);
    }
    return hsum(sum);
  }
#endif
  for (int64_t grp = 0; grp < groups; ++grp, x += g, q += g) {
    float part = 0.f;
    for (int64_t i = 0; i < g; ++i) part += x[i] * static_cast<float>(q[i]);
    total += sf[grp] * part;
  }
  return total;
}

#ifdef PYTGI_AVX2
// sum_g m_g sums_g (int4's mins term) in 8 lanes: a scalar chain of dependent adds here cost
// more than the products of a 576-input row (measured: 9.9 vs 14.6 G weights/s per core).
inline float mins_term(const float* mf, const float* sums, int64_t groups) {
  __m256 lanes = _mm256_setzero_ps();
  int64_t first = 0;
  for (; first + 8 <= groups; first += 8)
    lanes = _mm256_fmadd_ps(_mm256_loadu_ps(mf + first), _mm256_loadu_ps(sums + first), lanes);
  float offset = hsum(lanes);
  for (; first < groups; ++first) offset += mf[first] * sums[first];
  return offset;
}
#endif

// x[0..k) . (int4 row q with its group scales sf and mins mf, as float32), reading q once;
// `sums` are x's group sums.
inline float dot_q4(const float* x, const uint8_t* q, const float* sf, const float* mf,
                    const float* sums, int64_t k, int64_t groups) {
  const int64_t g = k / groups;
#ifdef PYTGI_AVX512
  return mins_term(mf, sums, groups) + scaled_groups(sf, groups, [&](int64_t grp) {
    return group_q4(x + grp * g, q + grp * g / 2, g);
  });
#elif defined(PYTGI_AVX2)
  const float offset = mins_term(mf, sums, groups);
  const __m256i mask = _mm256_set1_epi32(15);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t grp = 0; grp < groups; ++grp) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t b = 0; b < g; b += kBlock, x += kBlock, q += kBlock / 2) {
      // bytes 0..7 and 8..15 zero-extended to 32 bits: low nibbles are inputs 0..15, high
      // nibbles inputs 16..31 (one shuffle per 8 bytes, the rest is lane-wise)
      const __m256i d0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q)));
      const __m256i d1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8)));
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x), _mm256_cvtepi32_ps(_mm256_and_si256(d0, mask)), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), _mm256_cvtepi32_ps(_mm256_and_si256(d1, mask)), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + 16), _mm256_cvtepi32_ps(_mm256_srli_epi32(d0, 4)), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + 24), _mm256_cvtepi32_ps(_mm256_srli_epi32(d1, 4)), a3);
    }
    const __m256 part = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    sum = _mm256_fmadd_ps(part, _mm256_set1_ps(sf[grp]), sum);
  }
  return hsum(sum) + offset;
#else
  float offset = 0.f;
  for (int64_t grp = 0; grp < groups; ++grp) offset += mf[grp] * sums[grp];
  float total = 0.f;
  for (int64_t grp = 0; grp < groups; ++grp) {
    float part = 0.f;
    for (int64_t b = 0; b < g; b += kBlock, x += kBlock, q += kBlock / 2)
      for (int64_t j = 0; j < kBlock / 2; ++j)
        part += x[j] * static_cast<float>(q[j] & 15) + x[j + 16] * static_cast<float>(q[j] >> 4);
    total += sf[grp] * part;
  }
  return total + offset;
#endif
}

void check(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scales,
           int64_t k, int64_t multiple) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [M, K] with K the layer's inputs");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
              "x: float32 or bfloat16 only");
  TORCH_CHECK(q.is_contiguous() && scales.is_contiguous(), "weights must be contiguous");
  TORCH_CHECK((scales.scalar_type() == torch::kHalf || scales.scalar_type() == torch::kFloat) &&
                  scales.dim() == 2 && scales.size(0) == q.size(0) && k % scales.size(1) == 0,
              "scales must be float16 or float32 [N, G] with G dividing K");
  TORCH_CHECK((k / scales.size(1)) % multiple == 0, "group size must be a multiple of ",
              multiple);
}

// out[m, n] = x[m] . w[n] for a few rows x (decode): `fused(xm, m, n, params, first)` is one
// product read from the packed row n (`params`: room for the row's group parameters as
// float32, filled when `first`). Each packed row is read from memory once per call and from
// L1 for the other x rows; more rows go through `blocked`, as each product here unpacks the
// row again.
template <typename Fused>
torch::Tensor product(const torch::Tensor& xf, const torch::Tensor& x, int64_t n_rows,
                      int64_t groups, Fused fused) {
  const int64_t m_rows = xf.size(0), k = xf.size(1);
  const float* xp = xf.data_ptr<float>();
  auto out = torch::empty({m_rows, n_rows}, xf.options());
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> params(2 * groups);
    for (int64_t n = begin; n < end; ++n)
      for (int64_t m = 0; m < m_rows; ++m)
        op[m * n_rows + n] = fused(xp + m * k, m, n, params.data(), m == 0);
  });
  return x.scalar_type() == torch::kFloat ? out : out.to(x.scalar_type());
}

// out[m, n] = x[m] . w[n] for many rows x (decode batches, bfloat16 layers): kPanel weight
// rows at a time are dequantized into float32 (as `dequantize` gives them) and transposed
// into a panel [k][kPanel], input k's kPanel weights side by side, up to kChunk inputs at a
// time (the panel stays in L1/L2); then each block of up to kMr x rows is multiplied by the
// panel with kMr x 2 registers of 8 sums: per input one broadcast of x[m][k] per row, two
// loads of the panel, 2 kMr multiply-adds, and no horizontal sums. Each weight is converted
// once per call. Against the dot-product tile it replaced (4 x rows by 3 weight rows, each
// sum reduced at its end), SmolLM2's 120 decoder products on one Zen 3 core: 32 rows 100 vs
// 127-159 ms, 64 rows 178 vs 313-370 ms. With AVX-512, kMr = 12 rows of one register of 16
// sums each, one panel load per input (Zen 5, 2 cores, 32 rows: 28 vs 38 ms).
constexpr int64_t kPanel = 16, kChunk = 1024;
#ifdef PYTGI_AVX512
constexpr int64_t kMr = 12;  // 12 of the 32 registers
#else
constexpr int64_t kMr = 6;
#endif

// rows [kPanel][stride] (inputs k0 .. k0 + len of each) -> panel [len][kPanel].
inline void transpose_panel(const float* rows, int64_t stride, int64_t k0, int64_t len,
                            float* panel) {
  int64_t k = 0;
#ifdef PYTGI_AVX2
  for (; k + 8 <= len; k += 8) {
    for (int64_t half = 0; half < 2; ++half) {  // an 8 x 8 transpose per half of the panel
      __m256 r[8];
      for (int64_t j = 0; j < 8; ++j)
        r[j] = _mm256_loadu_ps(rows + (half * 8 + j) * stride + k0 + k);
      __m256 t[8], u[8];
      for (int64_t j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_ps(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_ps(r[j], r[j + 1]);
      }
      for (int64_t j = 0; j < 8; j += 4) {
        u[j] = _mm256_shuffle_ps(t[j], t[j + 2], 0x44);
        u[j + 1] = _mm256_shuffle_ps(t[j], t[j + 2], 0xEE);
        u[j + 2] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0x44);
        u[j + 3] = _mm256_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
      }
      float* out = panel + k * kPanel + half * 8;
      for (int64_t i = 0; i < 4; ++i) {
        _mm256_storeu_ps(out + i * kPanel, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(out + (i + 4) * kPanel, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
      }
    }
  }
#endif
  for (; k < len; ++k)
    for (int64_t j = 0; j < kPanel; ++j) panel[k * kPanel + j] = rows[j * stride + k0 + k];
}

#ifdef PYTGI_AVX512
// Row i (< MR) of a 16-lane panel tile: x_i[k] broadcast into its sums (named, as below).
#define PYTGI_PANEL_ROW16(i)                                                   \
  if constexpr (MR > i) acc##i = _mm512_fmadd_ps(_mm512_set1_ps(x[i * stride + k]), w, acc##i);
#define PYTGI_PANEL_STORE16(i) \
  if constexpr (MR > i) _mm512_storeu_ps(out + i * kPanel, acc##i);
#endif

#ifdef PYTGI_AVX2
// Row i (< MR) of a panel tile: its broadcast x_i[k] into its two sums (named registers: GCC
// -O3 kept an array of these sums in memory too, stored at every input, at half the speed).
#define PYTGI_PANEL_ROW(i)                                      \
  if constexpr (MR > i) {                                       \
    const __m256 xv = _mm256_broadcast_ss(x + i * stride + k);  \
    lo##i = _mm256_fmadd_ps(xv, w0, lo##i);                     \
    hi##i = _mm256_fmadd_ps(xv, w1, hi##i);                     \
  }
#define PYTGI_PANEL_STORE(i)                                    \
  if constexpr (MR > i) {                                       \
    _mm256_storeu_ps(out + i * kPanel, lo##i);                  \
    _mm256_storeu_ps(out + i * kPanel + 8, hi##i);              \
  }
#endif

// out[i][0..kPanel) = sum over the panel's len inputs of x_i[k] * panel[k][..], for MR
// (<= kMr) rows x_i = x + i * stride.
template <int64_t MR>
inline void panel_tile(const float* x, int64_t stride, const float* panel, int64_t len,
                       float* out) {
  static_assert(MR >= 1 && MR <= kMr);
#ifdef PYTGI_AVX512
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0, acc4 = acc0;
  __m512 acc5 = acc0, acc6 = acc0, acc7 = acc0, acc8 = acc0, acc9 = acc0, acc10 = acc0;
  __m512 acc11 = acc0;
  for (int64_t k = 0; k < len; ++k) {
    const __m512 w = _mm512_loadu_ps(panel + k * kPanel);
    PYTGI_EACH12(PYTGI_PANEL_ROW16)
  }
  PYTGI_EACH12(PYTGI_PANEL_STORE16)
#elif defined(PYTGI_AVX2)
  // 2 MR sums, 2 panel values and one broadcast: 15 of the 16 registers
  __m256 lo0 = _mm256_setzero_ps(), lo1 = lo0, lo2 = lo0, lo3 = lo0, lo4 = lo0, lo5 = lo0;
  __m256 hi0 = lo0, hi1 = lo0, hi2 = lo0, hi3 = lo0, hi4 = lo0, hi5 = lo0;
  for (int64_t k = 0; k < len; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel);
    const __m256 w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
    PYTGI_PANEL_ROW(0) PYTGI_PANEL_ROW(1) PYTGI_PANEL_ROW(2)
    PYTGI_PANEL_ROW(3) PYTGI_PANEL_ROW(4) PYTGI_PANEL_ROW(5)
  }
  PYTGI_PANEL_STORE(0) PYTGI_PANEL_STORE(1) PYTGI_PANEL_STORE(2)
  PYTGI_PANEL_STORE(3) PYTGI_PANEL_STORE(4) PYTGI_PANEL_STORE(5)
#else
  for (int64_t i = 0; i < MR; ++i)
    for (int64_t j = 0; j < kPanel; ++j) {
      float sum = 0.f;
      for (int64_t k = 0; k < len; ++k) sum += x[i * stride + k] * panel[k * kPanel + j];
      out[i * kPanel + j] = sum;
    }
#endif
}

// panel_tile<mr> for a run-time mr in 1..kMr.
template <int64_t... I>
inline void panel_dispatch(int64_t mr, const float* x, int64_t stride, const float* panel,
                           int64_t len, float* out, std::integer_sequence<int64_t, I...>) {
  ((mr == I + 1 ? panel_tile<I + 1>(x, stride, panel, len, out) : void()), ...);
}

// acc[mr][kPanel] = (first) or += (after) panel_tile over mr (1..kMr) rows; `part` is room
// for kMr x kPanel floats.
inline void panel_rows(int64_t mr, const float* x, int64_t stride, const float* panel,
                       int64_t len, float* acc, bool first, float* part) {
  float* out = first ? acc : part;
  panel_dispatch(mr, x, stride, panel, len, out, std::make_integer_sequence<int64_t, kMr>{});
  if (!first)
    for (int64_t i = 0; i < mr * kPanel; ++i) acc[i] += part[i];
}

template <typename Row>
torch::Tensor blocked(const torch::Tensor& xf, const torch::Tensor& x, int64_t n_rows, Row row) {
  const int64_t m_rows = xf.size(0), k = xf.size(1);
  const float* xp = xf.data_ptr<float>();
  auto out = torch::empty({m_rows, n_rows}, xf.options());
  float* op = out.data_ptr<float>();
  const int64_t panels = (n_rows + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 2, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(kPanel * k), panel(kPanel * std::min(k, kChunk));
    std::vector<float> acc(m_rows * kPanel), part(kMr * kPanel);  // [M][kPanel], [kMr][kPanel]
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanel, nr = std::min(kPanel, n_rows - n0);
      for (int64_t j = 0; j < kPanel; ++j)  // rows past the end repeat the last; dropped below
        if (j < nr) row(n0 + j, rows.data() + j * k);
        else std::copy_n(rows.data() + (nr - 1) * k, k, rows.data() + j * k);
      for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
        const int64_t len = std::min(kChunk, k - k0);
        transpose_panel(rows.data(), k, k0, len, panel.data());
        for (int64_t m0 = 0; m0 < m_rows; m0 += kMr)
          panel_rows(std::min(kMr, m_rows - m0), xp + m0 * k + k0, k, panel.data(), len,
                     acc.data() + m0 * kPanel, k0 == 0, part.data());
      }
      for (int64_t m = 0; m < m_rows; ++m)
        std::copy_n(acc.data() + m * kPanel, nr, op + m * n_rows + n0);
    }
  });
  return x.scalar_type() == torch::kFloat ? out : out.to(x.scalar_type());
}

#ifdef PYTGI_DPBF16
// The many-row product for bfloat16 inputs on CPUs with bf16 dot products (vdpbf16ps: per
// 32-bit lane, two bfloat16 products, exact in float32, added to a float32 sum). A weight's
// integer code (int8 -127..127, int4 0..15) is exact in bfloat16 and so is a bfloat16 input:
// each product x q is exact and summed in float32, the group's scale (and int4's min times
// the group's input sum) applied once per group, as the float32 path's sums do. The panel
// holds 16 weight rows' codes as pairs of inputs: [k / 2][16] 32-bit lanes (inputs 2p and
// 2p + 1 of each row), transposed as the float32 panel is.

// Row i (< MR) of a bf16 panel tile: its pair of inputs broadcast into its group sum.
#define PYTGI_BF16_ROW(i)                                                                   \
  if constexpr (MR > i)                                                                     \
    acc##i = _mm512_dpbf16_ps(acc##i, (__m512bh)_mm512_set1_epi32(static_cast<int>(x[i * xs + p])), \
                              (__m512bh)w);
// ... then the group's sum scaled into the row's total (int4: plus min x input sum).
#define PYTGI_BF16_GROUP(i)                                                    \
  if constexpr (MR > i) {                                                      \
    tot##i = _mm512_fmadd_ps(acc##i, sv, tot##i);                              \
    if (mins) tot##i = _mm512_fmadd_ps(_mm512_set1_ps(sums[i * ss + s]), mv, tot##i); \
    acc##i = _mm512_setzero_ps();                                              \
  }
#define PYTGI_BF16_LOAD(i) \
  if constexpr (MR > i) tot##i = first ? _mm512_setzero_ps() : _mm512_loadu_ps(out + i * kPanel);
#define PYTGI_BF16_STORE(i) if constexpr (MR > i) _mm512_storeu_ps(out + i * kPanel, tot##i);

// out[i][0..16) (+)= sum over segments s of scales[s] * (x_i pairs . panel pairs of s) (+
// mins[s] * sums[i][s]) for MR rows; x_i = x + i * xs (32-bit pairs), `seg` pairs a segment.
template <int64_t MR>
inline void bf16_tile(const uint32_t* x, int64_t xs, const uint32_t* panel, int64_t pairs,
                      int64_t seg, const float* scales, const float* mins, const float* sums,
                      int64_t ss, float* out, bool first) {
  static_assert(MR >= 1 && MR <= kMr);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0, acc4 = acc0;
  __m512 acc5 = acc0, acc6 = acc0, acc7 = acc0, acc8 = acc0, acc9 = acc0, acc10 = acc0;
  __m512 acc11 = acc0, tot0, tot1, tot2, tot3, tot4, tot5, tot6, tot7, tot8, tot9, tot10, tot11;
  PYTGI_EACH12(PYTGI_BF16_LOAD)
  for (int64_t s = 0, p = 0; p < pairs; ++s) {
    for (const int64_t end = p + seg; p < end; ++p) {
      const __m512i w = _mm512_loadu_si512(panel + p * kPanel);
      PYTGI_EACH12(PYTGI_BF16_ROW)
    }
    const __m512 sv = _mm512_loadu_ps(scales + s * kPanel);
    const __m512 mv = mins ? _mm512_loadu_ps(mins + s * kPanel) : sv;
    PYTGI_EACH12(PYTGI_BF16_GROUP)
  }
  PYTGI_EACH12(PYTGI_BF16_STORE)
}

template <int64_t... I>
inline void bf16_dispatch(int64_t mr, std::integer_sequence<int64_t, I...>, const uint32_t* x,
                          int64_t xs, const uint32_t* panel, int64_t pairs, int64_t seg,
                          const float* scales, const float* mins, const float* sums, int64_t ss,
                          float* out, bool first) {
  ((mr == I + 1 ? bf16_tile<I + 1>(x, xs, panel, pairs, seg, scales, mins, sums, ss, out, first)
                : void()),
   ...);
}

// 16 float32 values (small integers) -> their bfloat16 bits at dst (exact).
inline void store_codes(__m512 v, uint16_t* dst) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// Row n's int8 codes as bfloat16 into dst[0..k) (k a multiple of 16).
inline void codes_q8(const int8_t* q, int64_t k, uint16_t* dst) {
  for (int64_t i = 0; i < k; i += 16) store_codes(load16(q + i), dst + i);
}

// Row n's int4 codes (GGML blocks) as bfloat16 into dst[0..k), in input order.
inline void codes_q4(const uint8_t* q, int64_t k, uint16_t* dst) {
  const __m512i mask = _mm512_set1_epi32(15);
  for (int64_t b = 0; b < k; b += kBlock, q += kBlock / 2, dst += kBlock) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    store_codes(_mm512_cvtepi32_ps(_mm512_and_si512(d, mask)), dst);
    store_codes(_mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4)), dst + 16);
  }
}

// out [M, N] for bfloat16 x [M, K] (contiguous): `codes(n, dst)` writes row n's codes,
// scales [N, G] (S: float16 or float32), mins [N, G] float32 or null, `sums` [M, G] the
// inputs' group sums (int4). Groups tile kChunk or there is one group a row.
template <typename S, typename Codes>
torch::Tensor blocked_bf16(const torch::Tensor& x, int64_t n_rows, int64_t groups,
                           const S* scales, const float* mins, const float* sums, Codes codes) {
  const int64_t m_rows = x.size(0), k = x.size(1), g = k / groups;
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<c10::BFloat16>());
  auto out = torch::empty({m_rows, n_rows}, x.options().dtype(torch::kFloat));
  float* op = out.data_ptr<float>();
  const int64_t panels = (n_rows + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 2, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> rows(kPanel * k);
    std::vector<uint32_t> panel(kPanel * std::min(k, kChunk) / 2);
    std::vector<float> st(groups * kPanel), mt(mins ? groups * kPanel : 0), widened(groups);
    std::vector<float> acc(m_rows * kPanel);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanel, nr = std::min(kPanel, n_rows - n0);
      for (int64_t j = 0; j < kPanel; ++j) {  // rows past the end repeat the last; dropped
        const int64_t n = n0 + std::min(j, nr - 1);
        codes(n, rows.data() + j * k);
        widen_scales(scales + n * groups, groups, widened.data());
        for (int64_t grp = 0; grp < groups; ++grp) {
          st[grp * kPanel + j] = widened[grp];
          if (mins) mt[grp * kPanel + j] = mins[n * groups + grp];
        }
      }
      for (int64_t k0 = 0; k0 < k; k0 += kChunk) {
        const int64_t len = std::min(kChunk, k - k0);
        const int64_t seg = groups == 1 ? len : g, g0 = groups == 1 ? 0 : k0 / g;
        transpose_panel(reinterpret_cast<const float*>(rows.data()), k / 2, k0 / 2, len / 2,
                        reinterpret_cast<float*>(panel.data()));
        for (int64_t m0 = 0; m0 < m_rows; m0 += kMr)
          bf16_dispatch(std::min(kMr, m_rows - m0), std::make_integer_sequence<int64_t, kMr>{},
                        xp + (m0 * k + k0) / 2, k / 2, panel.data(), len / 2, seg / 2,
                        st.data() + g0 * kPanel, mins ? mt.data() + g0 * kPanel : nullptr,
                        sums ? sums + m0 * groups + g0 : nullptr, groups,
                        acc.data() + m0 * kPanel, k0 == 0);
      }
      for (int64_t m = 0; m < m_rows; ++m)
        std::copy_n(acc.data() + m * kPanel, nr, op + m * n_rows + n0);
    }
  });
  return out.to(torch::kBFloat16);
}

// Whether blocked_bf16 takes x for a layer of k inputs in `groups` groups.
inline bool takes_bf16(const torch::Tensor& x, int64_t k, int64_t groups) {
  const int64_t g = k / groups;
  return x.scalar_type() == torch::kBFloat16 && x.size(0) > kFewRows && g % 16 == 0 &&
         (groups == 1 || kChunk % g == 0);
}
#endif

template <typename Row>
torch::Tensor dequantized(int64_t n_rows, int64_t k, const torch::Tensor& like, Row row) {
  auto out = torch::empty({n_rows, k}, torch::dtype(torch::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) row(n, op + n * k);
  });
  return out.to(like.scalar_type());
}

}  // namespace

namespace {

void check_q8(const torch::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == torch::kChar && q.dim() == 2, "q must be int8 [N, K]");
}

void check_q4(const torch::Tensor& q, const torch::Tensor& scales, const torch::Tensor& mins) {
  TORCH_CHECK(q.scalar_type() == torch::kByte && q.dim() == 2, "q must be uint8 [N, K / 2]");
  TORCH_CHECK(mins.sizes() == scales.sizes() && mins.scalar_type() == torch::kFloat &&
                  mins.is_contiguous(),
              "mins must be float32, shaped like scales");
}

}  // namespace

template <typename S>
torch::Tensor q8_linear_typed(const torch::Tensor& x, const torch::Tensor& q,
                              const torch::Tensor& scales) {
  const int64_t k = q.size(1), groups = scales.size(1);
  const int8_t* qp = q.data_ptr<int8_t>();
  const S* sp = scales.data_ptr<S>();
#ifdef PYTGI_DPBF16
  if (takes_bf16(x, k, groups))
    return blocked_bf16(x.contiguous(), q.size(0), groups, sp, nullptr, nullptr,
                        [=](int64_t n, uint16_t* dst) { codes_q8(qp + n * k, k, dst); });
#endif
  const auto xf = x.to(torch::kFloat).contiguous();
  if (xf.size(0) > kFewRows)
    return blocked(xf, x, q.size(0), [=](int64_t n, float* dst) {
      row_q8(qp + n * k, sp + n * groups, k, groups, dst);
    });
  return product(
      xf, x, q.size(0), groups,
      [=](const float* xm, int64_t, int64_t n, float* sf, bool first) {
        if (first) widen_scales(sp + n * groups, groups, sf);
        return dot_q8(xm, qp + n * k, sf, k, groups);
      });
}

torch::Tensor q8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales) {
  check_q8(q);
  check(x, q, scales, q.size(1), 1);
  if (scales.scalar_type() == torch::kFloat) return q8_linear_typed<float>(x, q, scales);
  return q8_linear_typed<c10::Half>(x, q, scales);
}

template <typename S>
torch::Tensor q4_linear_typed(const torch::Tensor& x, const torch::Tensor& q,
                              const torch::Tensor& scales, const torch::Tensor& mins) {
  const int64_t k = 2 * q.size(1), groups = scales.size(1);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const S* sp = scales.data_ptr<S>();
  const float* mp = mins.data_ptr<float>();
  const auto xf = x.to(torch::kFloat).contiguous();
#ifdef PYTGI_DPBF16
  if (takes_bf16(x, k, groups)) {
    const auto sums = group_sums(xf.data_ptr<float>(), xf.size(0), k, groups);
    return blocked_bf16(x.contiguous(), q.size(0), groups, sp, mp, sums.data(),
                        [=](int64_t n, uint16_t* dst) { codes_q4(qp + n * k / 2, k, dst); });
  }
#endif
  if (xf.size(0) > kFewRows)
    return blocked(xf, x, q.size(0), [=](int64_t n, float* dst) {
      row_q4(qp + n * k / 2, sp + n * groups, mp + n * groups, k, groups, dst);
    });
  const auto sums = group_sums(xf.data_ptr<float>(), xf.size(0), k, groups);
  const float* sums_p = sums.data();
  return product(
      xf, x, q.size(0), groups,
      [=](const float* xm, int64_t m, int64_t n, float* params, bool first) {
        if (first) widen_scales(sp + n * groups, groups, params);
        return dot_q4(xm, qp + n * k / 2, params, mp + n * groups, sums_p + m * groups, k,
                      groups);
      });
}

torch::Tensor q4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales,
                        torch::Tensor mins) {
  check_q4(q, scales, mins);
  check(x, q, scales, 2 * q.size(1), kBlock);
  if (scales.scalar_type() == torch::kFloat) return q4_linear_typed<float>(x, q, scales, mins);
  return q4_linear_typed<c10::Half>(x, q, scales, mins);
}

torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() == torch::kBFloat16 && w.dim() == 2 && w.is_contiguous(),
              "w must be contiguous bfloat16 [N, K]");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1), "x must be [M, K] with K the layer's inputs");
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16,
              "x: float32 or bfloat16 only");
  const int64_t k = w.size(1);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
  const auto xf = x.to(torch::kFloat).contiguous();
  return blocked(xf, x, w.size(0), [=](int64_t n, float* dst) { row_bf16(wp + n * k, k, dst); });
}

template <typename S>
torch::Tensor q8_dequantize_typed(const torch::Tensor& q, const torch::Tensor& scales,
                                  const torch::Tensor& like) {
  const int64_t k = q.size(1), groups = scales.size(1);
  const int8_t* qp = q.data_ptr<int8_t>();
  const S* sp = scales.data_ptr<S>();
  return dequantized(q.size(0), k, like, [=](int64_t n, float* dst) {
    row_q8(qp + n * k, sp + n * groups, k, groups, dst);
  });
}

torch::Tensor q8_dequantize(torch::Tensor q, torch::Tensor scales, torch::Tensor like) {
  check_q8(q);
  TORCH_CHECK(scales.scalar_type() == torch::kHalf || scales.scalar_type() == torch::kFloat,
              "scales must be float16 or float32");
  if (scales.scalar_type() == torch::kFloat) return q8_dequantize_typed<float>(q, scales, like);
  return q8_dequantize_typed<c10::Half>(q, scales, like);
}

template <typename S>
torch::Tensor q4_dequantize_typed(const torch::Tensor& q, const torch::Tensor& scales,
                                  const torch::Tensor& mins, const torch::Tensor& like) {
  const int64_t k = 2 * q.size(1), groups = scales.size(1);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const S* sp = scales.data_ptr<S>();
  const float* mp = mins.data_ptr<float>();
  return dequantized(q.size(0), k, like, [=](int64_t n, float* dst) {
    row_q4(qp + n * k / 2, sp + n * groups, mp + n * groups, k, groups, dst);
  });
}

torch::Tensor q4_dequantize(torch::Tensor q, torch::Tensor scales, torch::Tensor mins,
                            torch::Tensor like) {
  check_q4(q, scales, mins);
  const int64_t k = 2 * q.size(1), groups = scales.size(1);
  TORCH_CHECK((k / groups) % kBlock == 0, "group size must be a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf || scales.scalar_type() == torch::kFloat,
              "scales must be float16 or float32");
  if (scales.scalar_type() == torch::kFloat)
    return q4_dequantize_typed<float>(q, scales, mins, like);
  return q4_dequantize_typed<c10::Half>(q, scales, mins, like);
}

}  // namespace pytgi
