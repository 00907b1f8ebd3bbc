// A decoder layer's row-wise steps on CPU (kernels.h): RMSNorm (after the residual add),
// rotary embedding, and SiLU(gate) * up; float32 or bfloat16, each rounding where torch's
// element-wise forms round (bfloat16 rotary and SiLU outputs are torch's bit for bit).
//
// Vectorized: 16 lanes with AVX-512, else 8 (AVX2); the norm's squares are summed in 8
// lanes on both, in order, then across them, and the rest is per element, the same in
// either width, so AVX2 and AVX-512 builds give the same bits. Before (norms scalar, SiLU in 8
// lanes), a batch-32 bfloat16 SmolLM2 step spent ~60 us a layer in these (Zen 5, 2 cores);
// per call, batch 32 / 1, before -> after: add_rms_norm 17.3 -> 6.9 / 2.0 -> 1.3 us, SiLU
// 22.6 -> 12.3 / 1.9 -> 1.2, rotary 5.9 -> 5.3 / 0.96 -> 0.86 (benchmarks/RESULTS.md).

#include "kernels.h"
#include "vec_exp.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#define PYTGI_ROWS_AVX2 1
#endif

namespace pytgi {
namespace {

// The bits a loop reads of T: float32 as floats, bfloat16 as its 16 raw bits.
template <typename T>
using Bits = std::conditional_t<std::is_same_v<T, float>, float, uint16_t>;
template <typename T>
const Bits<T>* bits(const T* p) { return reinterpret_cast<const Bits<T>*>(p); }
template <typename T>
Bits<T>* bits(T* p) { return reinterpret_cast<Bits<T>*>(p); }

#ifdef PYTGI_ROWS_AVX2
// v rounded to T (float32: as it is), widened back; stores of 8 (16) lanes in T.
template <typename T, typename V>
V rounded(V v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return round_bf16(v);
}
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store8(uint16_t* p, __m256 v) { store_bf16(p, v); }
#endif
#ifdef __AVX512F__
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(uint16_t* p, __m512 v) { store_bf16(p, v); }
#endif

// RMSNorm of one row x [h] (in float32), then rounded to T and scaled by weight [h] (rounded
// again), as Hugging Face's Llama computes it. With `delta`, x + delta rounded to T first
// (the residual), written to `sum`. `row`: room for h floats. The squares are summed in 8
// lanes, then across them (the same order on AVX2 and AVX-512 CPUs).
template <typename T>
void norm_row(const T* x, const T* delta, const T* weight, T* sum, T* out, int64_t h,
              float eps, float* row) {
  float squares = 0.f;
  int64_t i = 0;
#ifdef PYTGI_ROWS_AVX2
  __m256 lanes = _mm256_setzero_ps();
#ifdef __AVX512F__
  for (; i + 16 <= h; i += 16) {  // the squares still added in 8 lanes, in order
    __m512 v = load16(bits(x) + i);
    if (delta) {
      v = rounded<T>(_mm512_add_ps(v, load16(bits(delta) + i)));
      store16(bits(sum) + i, v);
    }
    _mm512_storeu_ps(row + i, v);
    const __m256 lo = _mm512_castps512_ps256(v);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    lanes = _mm256_fmadd_ps(hi, hi, _mm256_fmadd_ps(lo, lo, lanes));
  }
#endif
  for (; i + 8 <= h; i += 8) {
    __m256 v = load8(bits(x) + i);
    if (delta) {
      v = rounded<T>(_mm256_add_ps(v, load8(bits(delta) + i)));
      store8(bits(sum) + i, v);
    }
    _mm256_storeu_ps(row + i, v);
    lanes = _mm256_fmadd_ps(v, v, lanes);
  }
  squares = hsum(lanes);
#endif
  for (; i < h; ++i) {
    float v = static_cast<float>(x[i]);
    if (delta) {
      const T r = static_cast<T>(v + static_cast<float>(delta[i]));
      sum[i] = r;
      v = static_cast<float>(r);
    }
    row[i] = v;
    squares += v * v;
  }
  const float inv = 1.f / std::sqrt(squares / static_cast<float>(h) + eps);
  i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= h; i += 16) {
    const __m512 scaled = rounded<T>(_mm512_mul_ps(_mm512_loadu_ps(row + i), _mm512_set1_ps(inv)));
    store16(bits(out) + i, _mm512_mul_ps(load16(bits(weight) + i), scaled));
  }
#endif
#ifdef PYTGI_ROWS_AVX2
  for (; i + 8 <= h; i += 8) {
    const __m256 scaled = rounded<T>(_mm256_mul_ps(_mm256_loadu_ps(row + i), _mm256_set1_ps(inv)));
    store8(bits(out) + i, _mm256_mul_ps(load8(bits(weight) + i), scaled));
  }
#endif
  for (; i < h; ++i)
    out[i] = static_cast<T>(static_cast<float>(weight[i]) *
                            static_cast<float>(static_cast<T>(row[i] * inv)));
}

template <typename T>
void norm_typed(const torch::Tensor& x, const torch::Tensor* delta, const torch::Tensor& weight,
                torch::Tensor* sum, torch::Tensor& out, float eps) {
  const T* xp = x.data_ptr<T>();
  const T* dp = delta ? delta->data_ptr<T>() : nullptr;
  T* sp = sum ? sum->data_ptr<T>() : nullptr;
  T* op = out.data_ptr<T>();
  const int64_t h = x.size(1);
  at::parallel_for(0, x.size(0), 8, [&](int64_t begin, int64_t end) {
    std::vector<float> row(h);
    for (int64_t r = begin; r < end; ++r)
      norm_row<T>(xp + r * h, dp ? dp + r * h : nullptr, weight.data_ptr<T>(),
                  sp ? sp + r * h : nullptr, op + r * h, h, eps, row.data());
  });
}

void norm_checked(const torch::Tensor& x, const torch::Tensor* delta, const torch::Tensor& weight,
                  torch::Tensor* sum, torch::Tensor& out, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && weight.is_contiguous(),
              "x [T, H] and weight [H] must be contiguous");
  TORCH_CHECK(weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "weight must be [H] in x's dtype");
  TORCH_CHECK(!delta || (delta->sizes() == x.sizes() && delta->is_contiguous() &&
                         delta->scalar_type() == x.scalar_type()),
              "delta must be contiguous, like x");
  if (x.scalar_type() == torch::kFloat) {
    norm_typed<float>(x, delta, weight, sum, out, static_cast<float>(eps));
  } else if (x.scalar_type() == torch::kBFloat16) {
    norm_typed<c10::BFloat16>(x, delta, weight, sum, out, static_cast<float>(eps));
  } else {
    TORCH_CHECK(false, "rms_norm: float32 or bfloat16 only");
  }
}

// One head's rotation: in, out [D] (in: D contiguous), c, s [half]: the halves (x1, x2)
// become (x1 c - x2 s, x2 c + x1 s), each product and sum rounded to T as torch's
// element-wise form rounds them; dims past 2 half pass.
template <typename T>
void rotate_head(const T* in, const T* c, const T* s, T* out, int64_t half, int64_t d) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= half; i += 16) {
    const __m512 x1 = load16(bits(in) + i), x2 = load16(bits(in) + i + half);
    const __m512 ci = load16(bits(c) + i), si = load16(bits(s) + i);
    store16(bits(out) + i, _mm512_sub_ps(rounded<T>(_mm512_mul_ps(x1, ci)),
                                         rounded<T>(_mm512_mul_ps(x2, si))));
    store16(bits(out) + i + half, _mm512_add_ps(rounded<T>(_mm512_mul_ps(x2, ci)),
                                                rounded<T>(_mm512_mul_ps(x1, si))));
  }
#endif
#ifdef PYTGI_ROWS_AVX2
  for (; i + 8 <= half; i += 8) {
    const __m256 x1 = load8(bits(in) + i), x2 = load8(bits(in) + i + half);
    const __m256 ci = load8(bits(c) + i), si = load8(bits(s) + i);
    store8(bits(out) + i, _mm256_sub_ps(rounded<T>(_mm256_mul_ps(x1, ci)),
                                        rounded<T>(_mm256_mul_ps(x2, si))));
    store8(bits(out) + i + half, _mm256_add_ps(rounded<T>(_mm256_mul_ps(x2, ci)),
                                               rounded<T>(_mm256_mul_ps(x1, si))));
  }
#endif
  auto r = [](float v) { return static_cast<float>(static_cast<T>(v)); };  // round to T
  for (; i < half; ++i) {
    const float x1 = in[i], x2 = in[i + half], ci = c[i], si = s[i];
    out[i] = static_cast<T>(r(x1 * ci) - r(x2 * si));
    out[i + half] = static_cast<T>(r(x2 * ci) + r(x1 * si));
  }
  for (i = 2 * half; i < d; ++i) out[i] = in[i];
}

// x [T, heads, D] (D contiguous, any row and head strides), cos, sin [T, R / 2] -> out
// contiguous [T, heads, D].
template <typename T>
void rotate_rows(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                 torch::Tensor& out) {
  const int64_t heads = x.size(1), d = x.size(2), half = cos.size(1);
  const int64_t row = x.stride(0), head = x.stride(1);
  const T* xp = x.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, x.size(0) * heads, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task / heads, h = task % heads;
      rotate_head<T>(xp + t * row + h * head, cp + t * half, sp + t * half, op + task * d,
                     half, d);
    }
  });
}

// SiLU(g) * u of one row: gate, up, out [inter]; SiLU rounded to T first.
template <typename T>
void silu_row(const T* gate, const T* up, T* out, int64_t inter) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= inter; i += 16) {
    const __m512 g = load16(bits(gate) + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 act = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
    if constexpr (std::is_same_v<T, float>) {
      _mm512_storeu_ps(out + i, _mm512_mul_ps(act, load16(up + i)));
    } else {
      store16(bits(out) + i, _mm512_mul_ps(round_bf16(act), load16(bits(up) + i)));
    }
  }
#endif
#ifdef PYTGI_ROWS_AVX2
  for (; i + 8 <= inter; i += 8) {
    const __m256 g = load8(bits(gate) + i);
    const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 act = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.f), e));
    store8(bits(out) + i, _mm256_mul_ps(rounded<T>(act), load8(bits(up) + i)));
  }
#endif
  for (; i < inter; ++i) {
    const float g = gate[i];
    const float act = static_cast<float>(static_cast<T>(g / (1.f + std::exp(-g))));
    out[i] = static_cast<T>(act * static_cast<float>(up[i]));
  }
}

template <typename T>
void silu_rows(const T* gu, T* out, int64_t tokens, int64_t inter) {
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      silu_row<T>(gu + t * 2 * inter, gu + t * 2 * inter + inter, out + t * inter, inter);
  });
}

}  // namespace

torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  auto out = torch::empty_like(x);
  norm_checked(x, nullptr, weight, nullptr, out, eps);
  return out;
}

// (x + delta, norm(x + delta)) for x, delta [T, H] contiguous.
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor delta,
                                                      torch::Tensor weight, double eps) {
  auto sum = torch::empty_like(x);
  auto out = torch::empty_like(x);
  norm_checked(x, &delta, weight, &sum, out, eps);
  return {sum, out};
}

torch::Tensor rotate(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [T, heads, D] with D contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == x.size(0) &&
                  2 * cos.size(1) <= x.size(2) && cos.is_contiguous() && sin.is_contiguous(),
              "cos, sin must be contiguous [T, R / 2] with R <= D");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "cos, sin in x's dtype");
  auto out = torch::empty({x.size(0), x.size(1), x.size(2)}, x.options());
  if (x.scalar_type() == torch::kFloat) {
    rotate_rows<float>(x, cos, sin, out);
  } else if (x.scalar_type() == torch::kBFloat16) {
    rotate_rows<c10::BFloat16>(x, cos, sin, out);
  } else {
    TORCH_CHECK(false, "rotate: float32 or bfloat16 only");
  }
  return out;
}

torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up must be contiguous [T, 2I]");
  const int64_t tokens = gate_up.size(0), inter = gate_up.size(1) / 2;
  auto out = torch::empty({tokens, inter}, gate_up.options());
  if (gate_up.scalar_type() == torch::kFloat) {
    silu_rows<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), tokens, inter);
  } else if (gate_up.scalar_type() == torch::kBFloat16) {
    using B = c10::BFloat16;
    silu_rows<B>(gate_up.data_ptr<B>(), out.data_ptr<B>(), tokens, inter);
  } else {
    TORCH_CHECK(false, "silu_mul: float32 or bfloat16 only");
  }
  return out;
}

}  // namespace pytgi
