// bfloat16 rows times bfloat16 weights by bf16 dot products (vdpbf16ps: per 32-bit lane, two
// bfloat16 products, each exact in float32, added to a float32 sum), on CPUs that have them.
//
// The weights are packed once, at load, into panels of 16 output columns holding pairs of
// inputs: packed [P, K / 2, 16] int32, lane j of pair p = (w[16 q + j, 2p], w[16 q + j, 2p + 1])
// for panel q (low half, high half), P = ceil(N / 32) * 2 panels, columns past N zero. A tile
// of up to 12 x rows by two panels keeps its 24 sums in registers: per pair of inputs two
// loads of weights and 12 broadcasts of x feed 24 dot products. While a thread's first tile
// of a block runs, the next block's weights are prefetched, so the weights stream from
// memory under the arithmetic (oneDNN's packed bfloat16 product did not overlap them: the
// 120 products of SmolLM2 at 32 rows, weights streamed, 12.3 -> 8.2 ms; benchmarks/RESULTS.md).
//
// Sums are float32 over the pairs in order, rounded once to bfloat16 (nearest, ties to even),
// as oneDNN's bfloat16 linear rounds its float32 sums. A bias is the caller's, added after
// (as after the single-row kernel), so every path of a layer adds it alike.

#include "kernels.h"

#ifdef __AVX512BF16__

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace pytgi {
namespace {

constexpr int64_t kLanes = 16;    // columns of a panel
constexpr int64_t kPanels = 2;    // panels of a block (a tile's columns: 32)
constexpr int64_t kRows = 12;     // x rows of a tile: 24 sums + 2 weights + 1 x in 32 registers

// out rows [0, MR) x block columns [0, 32) = x rows . the block's pairs, rounded to bfloat16
// and stored for the first `cols` columns. x: rows of `pairs` 32-bit pairs, stride
// `xs`; w: the block's two panels, one after the other. While the tile runs, `ahead` bytes
// from `next` are prefetched (the next block's weights; null: none).
template <int MR>
void tile(const uint32_t* x, int64_t xs, const uint32_t* w, int64_t pairs, uint16_t* out,
          int64_t os, int64_t cols, const char* next, int64_t ahead) {
  __m512 acc[MR][kPanels];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < kPanels; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t panel = pairs * kLanes;
  // prefetched bytes per pair: the whole next block over this tile's loop
  const int64_t per_pair = next ? (ahead / pairs + 63) / 64 * 64 : 0;
  int64_t fetched = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    for (int64_t b = 0; b < per_pair && fetched < ahead; b += 64, fetched += 64)
      _mm_prefetch(next + fetched, _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * kLanes);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + panel + p * kLanes);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const __m512bh xi = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[i * xs + p]));
      acc[i][0] = _mm512_dpbf16_ps(acc[i][0], xi, w0);
      acc[i][1] = _mm512_dpbf16_ps(acc[i][1], xi, w1);
    }
  }
  const __mmask16 m0 = cols >= kLanes ? 0xffff : (1u << cols) - 1;
  const __mmask16 m1 = cols >= 2 * kLanes ? 0xffff : cols > kLanes ? (1u << (cols - kLanes)) - 1 : 0;
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i) {
    uint16_t* row = out + i * os;
    _mm256_mask_storeu_epi16(row, m0, (__m256i)_mm512_cvtneps_pbh(acc[i][0]));
    _mm256_mask_storeu_epi16(row + kLanes, m1, (__m256i)_mm512_cvtneps_pbh(acc[i][1]));
  }
}

template <int... R>
void tile_of(int64_t mr, std::integer_sequence<int, R...>, const uint32_t* x, int64_t xs,
             const uint32_t* w, int64_t pairs, uint16_t* out, int64_t os, int64_t cols,
             const char* next, int64_t ahead) {
  ((mr == R + 1 ? tile<R + 1>(x, xs, w, pairs, out, os, cols, next, ahead) : void()), ...);
}

}  // namespace

torch::Tensor pack_pairs(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16, "pack_pairs: bfloat16 [N, K]");
  TORCH_CHECK(w.size(1) % 2 == 0, "pack_pairs: an even number of inputs");
  w = w.contiguous();
  const int64_t n = w.size(0), k = w.size(1), pairs = k / 2;
  const int64_t panels = (n + kPanels * kLanes - 1) / (kPanels * kLanes) * kPanels;
  auto out = torch::zeros({panels, pairs, kLanes}, torch::kInt32);
  const auto* src = reinterpret_cast<const uint32_t*>(w.data_ptr<c10::BFloat16>());
  auto* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q)
      for (int64_t j = 0; j < kLanes && q * kLanes + j < n; ++j) {
        const uint32_t* row = src + (q * kLanes + j) * pairs;  // a pair of inputs per 32 bits
        for (int64_t p = 0; p < pairs; ++p) dst[(q * pairs + p) * kLanes + j] = row[p];
      }
  });
  return out;
}

torch::Tensor pairs_linear(torch::Tensor x, torch::Tensor packed, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16, "x: bfloat16 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kLanes && packed.size(0) % kPanels == 0 &&
                  packed.is_contiguous() && packed.scalar_type() == torch::kInt32,
              "packed: pack_pairs' [P, K / 2, 16] int32");
  TORCH_CHECK(x.size(1) == 2 * packed.size(1), "x has ", x.size(1), " inputs, the weights ",
              2 * packed.size(1));
  TORCH_CHECK(n > 0 && n <= packed.size(0) * kLanes, "n past the packed columns");
  x = x.contiguous();
  const int64_t m = x.size(0), pairs = packed.size(1), blocks = packed.size(0) / kPanels;
  auto out = torch::empty({m, n}, x.options());
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr<c10::BFloat16>());
  const auto* wp = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
  const int64_t block = kPanels * pairs * kLanes;  // 32-bit words of a block
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const uint32_t* w = wp + blk * block;
      const char* next = blk + 1 < end ? reinterpret_cast<const char*>(w + block) : nullptr;
      const int64_t c0 = blk * kPanels * kLanes, cols = std::min(kPanels * kLanes, n - c0);
      for (int64_t r = 0; r < m; r += kRows)
        tile_of(std::min(kRows, m - r), std::make_integer_sequence<int, kRows>{}, xp + r * pairs,
                pairs, w, pairs, op + r * n + c0, n, cols, r == 0 ? next : nullptr, block * 4);
    }
  });
  return out;
}

}  // namespace pytgi

#endif  // __AVX512BF16__
