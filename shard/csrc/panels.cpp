// Products of several rows with a layer's weights packed once, at load, into panels of 16
// output columns (AVX-512): float32 by multiply-adds; bfloat16 by bf16 dot products
// (vdpbf16ps: per 32-bit lane, two bfloat16 products, each exact in float32, added to a
// float32 sum) where the CPU has them, else (AVX-512 F and BW alone: Skylake-SP to Ice Lake,
// or a VM that hides them) by multiply-adds of the rows widened to float32 once per call and
// the weights widened in registers (a shift and a mask per word), which oneDNN's bfloat16
// path without those instructions is not: SmolLM2 batch-32 steps 190 ms there against 66
// for float32 weights (2-vCPU Xeon, benchmarks/RESULTS.md).
//
// packed [P, K / S, 16] (float32: S = 1, a float per input; bfloat16: S = 2, int32 lanes each
// holding a pair of inputs, low half first): word p of lane j in panel q is
// w[16 q + j, S p .. S p + S); P = ceil(N / 32) * 2 panels, columns past N zero. A tile of up
// to 12 x rows by two panels keeps its 24 sums in registers: per word, two loads of weights
// and 12 broadcasts of x feed 24 multiply-adds. While a thread's first tile of a block runs,
// the next block's weights are prefetched, so the weights stream from memory under the
// arithmetic: oneDNN's packed products did not overlap them (SmolLM2's 120 decoder products,
// weights streamed, 2 cores: 32 rows bfloat16 12.3 -> 8.2 ms, float32 23.3 -> 17.8 ms;
// benchmarks/RESULTS.md).
//
// Sums are float32 over the inputs in order; bfloat16 outputs are rounded once (nearest,
// ties to even), as oneDNN's bfloat16 linear rounds its float32 sums. A bias is the caller's,
// added after (as after the single-row kernel), so every path of a layer adds it alike.
// Where the CPU has AMX, bfloat16 products go to its tiles instead (amx.cpp, same panels).

#include "kernels.h"
#include "vec_exp.h"

#ifdef __AVX512F__

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace pytgi {
namespace {

constexpr int64_t kLanes = 16;  // columns of a panel
constexpr int64_t kPanels = 2;  // panels of a block (a tile's columns: 32)
constexpr int64_t kRows = 12;   // x rows of a tile: 24 sums + 2 weights + 1 x in 32 registers

// A form: Word, the panels' 32-bit word; X, the rows' element as the tile reads it, kX of
// them a word; weights(p), a word of 16 lanes as add takes it; add(acc, x, w), acc plus the
// products of x[0, kX) with w; store, 16 sums as Out.

// float32 rows and panels: one input per word.
struct F32 {
  using Word = float;
  using X = float;
  using Out = float;
  static constexpr int kX = 1;
  static __m512 weights(const Word* p) { return _mm512_loadu_ps(p); }
  static __m512 add(__m512 acc, const X* x, __m512 w) {
    return _mm512_fmadd_ps(_mm512_set1_ps(*x), w, acc);
  }
  static void store(Out* dst, __mmask16 mask, __m512 v) { _mm512_mask_storeu_ps(dst, mask, v); }
};

#ifdef __AVX512BF16__
// bfloat16 rows and panels: a pair of inputs per 32-bit word, outputs rounded once.
struct Bf16 {
  using Word = uint32_t;
  using X = uint32_t;
  using Out = uint16_t;
  static constexpr int kX = 1;
  static __m512bh weights(const Word* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static __m512 add(__m512 acc, const X* x, __m512bh w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(*x)), w);
  }
  static void store(Out* dst, __mmask16 mask, __m512 v) {
    _mm256_mask_storeu_epi16(dst, mask, (__m256i)_mm512_cvtneps_pbh(v));
  }
};
#elif defined(__AVX512BW__)
#define PYTGI_WIDE_PANELS 1
// bfloat16 panels without bf16 dot products: the rows widened to float32 (two a word), each
// word's pair of weights widened in registers (low half: input 2p, shifted up; high half:
// input 2p + 1, masked), so every product is exact and the sums are float32 over the inputs
// in order, as the float32 form's; outputs rounded once as c10::BFloat16 rounds. Registers:
// 24 sums, 4 widened weights, 1 broadcast.
struct Bf16Wide {
  struct Pair {
    __m512 low, high;
  };
  using Word = uint32_t;
  using X = float;
  using Out = uint16_t;
  static constexpr int kX = 2;
  static Pair weights(const Word* p) {
    const __m512i v = _mm512_loadu_si512(p);
    return {_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))))};
  }
  static __m512 add(__m512 acc, const X* x, Pair w) {
    acc = _mm512_fmadd_ps(_mm512_set1_ps(x[0]), w.low, acc);
    return _mm512_fmadd_ps(_mm512_set1_ps(x[1]), w.high, acc);
  }
  static void store(Out* dst, __mmask16 mask, __m512 v) {
    _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtepi32_epi16(bf16_bits(v)));
  }
};
#endif

// out rows [0, MR) x block columns [0, 32) = x rows . the block's two panels of `words`
// words, stored for the first `cols` columns. x: rows of `words` words (words * kX X's),
// stride `xs` X's. While
// the tile runs, `ahead` bytes from `next` are prefetched (the next block; null: none) into
// L2 (`prefetcht1`): a block (SmolLM2: 36-96 KiB) is larger than a core's L1 (Zen 4: 32 KiB),
// so requested into L1 it evicted the block being read. Zen 4, 2 cores, SmolLM2 decode steps
// alternating hints step by step in one process: bfloat16 batch 1 / 8 / 32 0.83-0.95x /
// 0.82-0.85x / 0.89-0.93x the time with T0, float32 batch 8 / 32 0.72x / 0.93x.
template <typename Form, int MR>
void tile(const typename Form::X* x, int64_t xs, const typename Form::Word* w, int64_t words,
          typename Form::Out* out, int64_t os, int64_t cols, const char* next, int64_t ahead) {
  __m512 acc[MR][kPanels];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kPanels; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t panel = words * kLanes;
  const int64_t per_word = next ? (ahead / words + 63) / 64 * 64 : 0;  // bytes prefetched
  int64_t fetched = 0;
  for (int64_t p = 0; p < words; ++p) {
    for (int64_t b = 0; b < per_word && fetched < ahead; b += 64, fetched += 64)
      _mm_prefetch(next + fetched, _MM_HINT_T1);
    const auto w0 = Form::weights(w + p * kLanes), w1 = Form::weights(w + panel + p * kLanes);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      acc[i][0] = Form::add(acc[i][0], x + i * xs + p * Form::kX, w0);
      acc[i][1] = Form::add(acc[i][1], x + i * xs + p * Form::kX, w1);
    }
  }
  const __mmask16 m0 = cols >= kLanes ? 0xffff : (1u << cols) - 1;
  const __mmask16 m1 = cols >= 2 * kLanes ? 0xffff : cols > kLanes ? (1u << (cols - kLanes)) - 1 : 0;
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    Form::store(out + i * os, m0, acc[i][0]);
    Form::store(out + i * os + kLanes, m1, acc[i][1]);
  }
}

template <typename Form, int... R>
void tile_of(int64_t mr, std::integer_sequence<int, R...>, const typename Form::X* x,
             int64_t xs, const typename Form::Word* w, int64_t words, typename Form::Out* out,
             int64_t os, int64_t cols, const char* next, int64_t ahead) {
  ((mr == R + 1 ? tile<Form, R + 1>(x, xs, w, words, out, os, cols, next, ahead) : void()), ...);
}

// w [N, K / S] 32-bit words (float32 or pairs of bfloat16) -> [P, K / S, 16]: the words move
// as they are.
template <typename Word>
torch::Tensor pack(const torch::Tensor& w) {
  const int64_t n = w.size(0), words = w.size(1);  // w: [N, K / S] words
  const int64_t panels = (n + kPanels * kLanes - 1) / (kPanels * kLanes) * kPanels;
  auto out = torch::zeros({panels, words, kLanes}, w.options());
  const auto* src = static_cast<const Word*>(w.data_ptr());
  auto* dst = static_cast<Word*>(out.data_ptr());
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q)
      for (int64_t j = 0; j < kLanes && q * kLanes + j < n; ++j)
        for (int64_t p = 0; p < words; ++p)
          dst[(q * words + p) * kLanes + j] = src[(q * kLanes + j) * words + p];
  });
  return out;
}

template <typename Form>
void multiply(const torch::Tensor& x, const torch::Tensor& packed, int64_t n, torch::Tensor& out) {
  using Word = typename Form::Word;
  const int64_t m = x.size(0), words = packed.size(1), row = words * Form::kX;
  // the blocks holding the first n columns (panels past them, if any, are not read)
  const int64_t blocks = std::min(packed.size(0) / kPanels, (n + kPanels * kLanes - 1) / (kPanels * kLanes));
  const auto* xp = static_cast<const typename Form::X*>(x.data_ptr());
  const auto* wp = static_cast<const Word*>(packed.data_ptr());
  auto* op = static_cast<typename Form::Out*>(out.data_ptr());
  const int64_t block = kPanels * words * kLanes;  // words of a block
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const Word* w = wp + blk * block;
      const char* next = blk + 1 < end ? reinterpret_cast<const char*>(w + block) : nullptr;
      const int64_t c0 = blk * kPanels * kLanes, cols = std::min(kPanels * kLanes, n - c0);
      for (int64_t r = 0; r < m; r += kRows)
        tile_of<Form>(std::min(kRows, m - r), std::make_integer_sequence<int, kRows>{},
                      xp + r * row, row, w, words, op + r * n + c0, n, cols,
                      r == 0 ? next : nullptr, block * 4);
    }
  });
}

}  // namespace

torch::Tensor pack_panels(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2, "pack_panels: weights [N, K]");
  w = w.contiguous();
  if (w.scalar_type() == torch::kFloat) return pack<float>(w);
#if defined(__AVX512BF16__) || defined(PYTGI_WIDE_PANELS)
  if (w.scalar_type() == torch::kBFloat16) {
    TORCH_CHECK(w.size(1) % 2 == 0, "pack_panels: bfloat16 needs an even number of inputs");
    return pack<int32_t>(w.view(torch::kInt32));  // a pair of inputs per 32-bit word
  }
#endif
  TORCH_CHECK(false, "pack_panels: ", w.scalar_type(), " weights (float32, and bfloat16 with "
              "AVX-512 BW)");
}

torch::Tensor panel_linear(torch::Tensor x, torch::Tensor packed, int64_t n, bool tiles) {
  TORCH_CHECK(x.dim() == 2, "x: [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kLanes && packed.size(0) % kPanels == 0 &&
                  packed.is_contiguous(), "packed: pack_panels' [P, K / S, 16]");
  TORCH_CHECK(n > 0 && n <= packed.size(0) * kLanes, "n past the packed columns");
  const bool f32 = x.scalar_type() == torch::kFloat && packed.scalar_type() == torch::kFloat;
#if defined(__AVX512BF16__) || defined(PYTGI_WIDE_PANELS)
  const bool bf16 = x.scalar_type() == torch::kBFloat16 && packed.scalar_type() == torch::kInt;
#else
  const bool bf16 = false;
#endif
  TORCH_CHECK(f32 || bf16, "panel_linear: x ", x.scalar_type(), " with ", packed.scalar_type(),
              " panels (float32 with float32, bfloat16 with pack_panels' int32 pairs)");
  const int64_t inputs = packed.size(1) * (f32 ? 1 : 2);
  TORCH_CHECK(x.size(1) == inputs, "x has ", x.size(1), " inputs, the weights ", inputs);
  x = x.contiguous();
  auto out = torch::empty({x.size(0), n}, x.options());
  if (f32) {
    multiply<F32>(x, packed, n, out);
  } else {
#ifdef PYTGI_AMX
    if (tiles && x.size(0) >= kAmxRows && inputs % 32 == 0 && amx_ready()) {
      amx_linear(static_cast<const uint16_t*>(x.data_ptr()), x.size(0), inputs,
                 packed.data_ptr<int32_t>(), packed.size(0), n,
                 static_cast<uint16_t*>(out.data_ptr()));
      return out;
    }
#endif
#ifdef __AVX512BF16__
    multiply<Bf16>(x.view(torch::kInt32), packed, n, out);  // K even: pairs of inputs
#elif defined(PYTGI_WIDE_PANELS)
    multiply<Bf16Wide>(x.to(torch::kFloat), packed, n, out);  // [M, K] float32, exact
#endif
  }
  return out;
}

}  // namespace pytgi

#endif  // __AVX512F__
