// Weight-only int8 / int4 linear layers on CPU (layouts in quant.h).
//
// Decode is bound by reading the weights: each packed weight row is read from memory once
// per call and used for every input row while it sits in L1. Products are accumulated in
// float32 lanes, each group's part scaled as it is added; the int4 mins are folded in
// through each input row's per-group sums: sum_k x_k (s q_k + m) = s sum_k x_k q_k + m sum_k x_k.

#include "quant.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PYTGI_AVX2 1
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

// x[0..k) . (int8 row q with its group scales sf, as float32), reading q once.
inline float dot_q8(const float* x, const int8_t* q, const float* sf, int64_t k, int64_t groups) {
  const int64_t g = k / groups;
  float total = 0.f;
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

// x[0..k) . (int4 row q with its group scales sf and mins mf, as float32), reading q once;
// `sums` are x's group sums.
inline float dot_q4(const float* x, const uint8_t* q, const float* sf, const float* mf,
                    const float* sums, int64_t k, int64_t groups) {
  const int64_t g = k / groups;
#ifdef PYTGI_AVX2
  // sum_g m_g sums_g in 8 lanes: a scalar chain of dependent adds here cost more than the
  // products of a 576-input row (measured: 9.9 vs 14.6 G weights/s per core)
  __m256 lanes = _mm256_setzero_ps();
  int64_t first = 0;
  for (; first + 8 <= groups; first += 8)
    lanes = _mm256_fmadd_ps(_mm256_loadu_ps(mf + first), _mm256_loadu_ps(sums + first), lanes);
  float offset = hsum(lanes);
  for (; first < groups; ++first) offset += mf[first] * sums[first];
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

// out[m, n] = x[m] . w[n] for many rows x (decode batches): kNr weight rows at a time are
// dequantized into float32 (with their scales, as `dequantize` gives them: L1-resident for
// K up to ~1000 inputs), then every block of kMr x rows is multiplied by them with kMr x kNr
// accumulators in registers; each weight is converted once per call, each x value loaded
// once per kNr outputs.
constexpr int64_t kMr = 4, kNr = 3;  // 12 accumulators, 3 weight and 1 x register

#ifdef PYTGI_AVX2
// out[i * stride + j] = x_i . w_j over k inputs (k % 8 == 0), for kMr rows x_i and kNr w_j.
inline void tile(const float* const* xs, const float* const* ws, int64_t k, float* out,
                 int64_t stride) {
  __m256 acc[kMr][kNr];
  for (int64_t i = 0; i < kMr; ++i)
    for (int64_t j = 0; j < kNr; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t p = 0; p < k; p += 8) {
    const __m256 w0 = _mm256_loadu_ps(ws[0] + p), w1 = _mm256_loadu_ps(ws[1] + p);
    const __m256 w2 = _mm256_loadu_ps(ws[2] + p);
    for (int64_t i = 0; i < kMr; ++i) {
      const __m256 xv = _mm256_loadu_ps(xs[i] + p);
      acc[i][0] = _mm256_fmadd_ps(xv, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(xv, w1, acc[i][1]);
      acc[i][2] = _mm256_fmadd_ps(xv, w2, acc[i][2]);
    }
  }
  for (int64_t i = 0; i < kMr; ++i)
    for (int64_t j = 0; j < kNr; ++j) out[i * stride + j] = hsum(acc[i][j]);
}
#endif

inline void tile_any(const float* const* xs, const float* const* ws, int64_t k, float* out,
                     int64_t stride) {
  for (int64_t i = 0; i < kMr; ++i)
    for (int64_t j = 0; j < kNr; ++j) {
      float sum = 0.f;
      for (int64_t p = 0; p < k; ++p) sum += xs[i][p] * ws[j][p];
      out[i * stride + j] = sum;
    }
}

template <typename Row>
torch::Tensor blocked(const torch::Tensor& xf, const torch::Tensor& x, int64_t n_rows, Row row) {
  const int64_t m_rows = xf.size(0), k = xf.size(1);
  const float* xp = xf.data_ptr<float>();
  auto out = torch::empty({m_rows, n_rows}, xf.options());
  float* op = out.data_ptr<float>();
  const int64_t blocks = (n_rows + kNr - 1) / kNr;
  at::parallel_for(0, blocks, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> w(kNr * k);
    float part[kMr * kNr];
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kNr, nr = std::min(kNr, n_rows - n0);
      for (int64_t j = 0; j < nr; ++j) row(n0 + j, w.data() + j * k);
      const float* ws[kNr];
      for (int64_t j = 0; j < kNr; ++j) ws[j] = w.data() + std::min(j, nr - 1) * k;
      for (int64_t m0 = 0; m0 < m_rows; m0 += kMr) {
        const int64_t mr = std::min(kMr, m_rows - m0);
        const float* xs[kMr];  // rows past the end repeat the last one; their sums are dropped
        for (int64_t i = 0; i < kMr; ++i) xs[i] = xp + (m0 + std::min(i, mr - 1)) * k;
#ifdef PYTGI_AVX2
        if (k % 8 == 0) {
          tile(xs, ws, k, part, kNr);
        } else {
          tile_any(xs, ws, k, part, kNr);
        }
#else
        tile_any(xs, ws, k, part, kNr);
#endif
        for (int64_t i = 0; i < mr; ++i)
          for (int64_t j = 0; j < nr; ++j) op[(m0 + i) * n_rows + n0 + j] = part[i * kNr + j];
      }
    }
  });
  return x.scalar_type() == torch::kFloat ? out : out.to(x.scalar_type());
}

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
