// bfloat16 products on AMX tiles (Intel Sapphire Rapids and later), reading
// panels.cpp's panels as they are: a panel's 16 words of 16 consecutive input pairs are 1 KiB,
// 64 bytes a pair, which is the B operand of a bf16 tile product (16 rows of pairs x 16
// columns) with a stride of 64 bytes. A operand: 16 x rows x 32 inputs (stride: a row);
// sums: 16 x 16 float32. Four sum tiles cover 32 rows x a block's 32 columns; per 32 inputs,
// two A and two B tiles feed four tile products (16 x 16 x 32 multiply-adds each).
//
// Rounding: products of bfloat16 are exact in float32 and summed in float32, but the tile unit
// rounds its additions its own way: about one output in 10^4 rounds to a neighbouring
// bfloat16 of panels.cpp's dot products (tests bound the difference). Inputs and outputs
// denormal in float32 count as zero, as in vdpbf16ps. Every row count takes the tiles
// (kAmxRows = 1), so a row's result does not depend on its batch.
//
// SmolLM2's 120 decoder products, weights streamed, 2-core Xeon with AMX (a VM, ~21 GB/s of
// reads), dot products -> tiles in one run: 1 row 10.1 -> 9.7 ms, 8 rows 13.6 -> 9.2, 32 rows
// 46.5 -> 10.1 (at the read bandwidth), 128 rows 182 -> 22, 2048 rows 3.0 s -> 0.32 s.
// Rows through a span of 512 KiB of weights at a time (not all of a thread's blocks): 576 x
// 3072 at 128 / 512 rows 335 -> 237 / 1243 -> 768 us, smaller layers unchanged (their
// blocks fit L2 already; benchmarks/RESULTS.md, 2026-12-05).

#include "kernels.h"

#ifdef PYTGI_AMX

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace pytgi {
namespace {

constexpr int64_t kLanes = 16;     // columns of a panel, of a sum tile; rows of a tile
constexpr int64_t kPairs = 16;     // input pairs of a tile product (32 inputs)
// Weights a thread takes all rows through before its next blocks (bytes; a quarter of a 2 MiB
// L2, the rest for x's rows and the sums).
constexpr int64_t kSpanBytes = 512 << 10;
// Tiles (gcc's tile intrinsics take literal numbers): sums 0..3 (row block i, panel j: 2 i + j),
// x row blocks 4 and 5, the two panels' weights 6 and 7.

// The tile register layout (palette 1): eight tiles of 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes[16] = {};
  uint8_t rows[16] = {};
};

// `rows` rows [16] float32 sums -> bfloat16 (nearest, ties to even) into out, stride os.
void store_sums(const float* sums, int64_t rows, uint16_t* out, int64_t os, __mmask16 mask) {
  for (int64_t i = 0; i < rows; ++i)
    _mm256_mask_storeu_epi16(out + i * os, mask,
                             (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(sums + i * kLanes)));
}

// x row blocks xa[0] and, if `two`, xa[1] (16 rows each, stride xs bytes) times the block
// of two panels at w (`words` pairs each) -> out columns [c0, c0 + 32) of its first `rows0`
// and next `rows1` rows (stride n; columns past n not stored).
void block_rows(const uint16_t* const xa[2], int64_t xs, const int32_t* w, int64_t words,
                bool two, uint16_t* out, int64_t rows0, int64_t rows1, int64_t n, int64_t c0) {
  const int32_t* w1 = w + words * kLanes;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t p = 0; p < words; p += kPairs) {
    _tile_loadd(6, w + p * kLanes, 64);
    _tile_loadd(7, w1 + p * kLanes, 64);
    _tile_loadd(4, xa[0] + 2 * p, xs);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
      _tile_loadd(5, xa[1] + 2 * p, xs);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  alignas(64) float sums[4][kLanes * kLanes];
  _tile_stored(0, sums[0], 64);
  _tile_stored(1, sums[1], 64);
  if (two) {
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
  }
  const int64_t cols = std::min(2 * kLanes, n - c0);
  const __mmask16 m0 = cols >= kLanes ? 0xffff : (1u << cols) - 1;
  const __mmask16 m1 = cols >= 2 * kLanes ? 0xffff : cols > kLanes ? (1u << (cols - kLanes)) - 1 : 0;
  store_sums(sums[0], rows0, out + c0, n, m0);
  store_sums(sums[1], rows0, out + c0 + kLanes, n, m1);
  store_sums(sums[2], rows1, out + kLanes * n + c0, n, m0);
  store_sums(sums[3], rows1, out + kLanes * n + c0 + kLanes, n, m1);
}

}  // namespace

void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.bytes[t] = 64;
    config.rows[t] = kLanes;
  }
  // gcc's _tile_loadconfig tells the compiler it reads 8 bytes: without this barrier the
  // stores above may be dropped as dead, and ldtilecfg faults on what is left on the stack
  __asm__ __volatile__("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

bool amx_ready() {
  // Linux hands out the tile registers' state only on request, once per process.
  constexpr int kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XTILEDATA
  static const bool ready = syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  return ready;
}

void amx_linear(const uint16_t* x, int64_t m, int64_t k, const int32_t* packed, int64_t panels,
                int64_t n, uint16_t* out) {
  const int64_t words = k / 2, blocks = std::min(panels / 2, (n + 2 * kLanes - 1) / (2 * kLanes));
  // A last row block of fewer than 16 rows is read from a zero-padded copy.
  const int64_t full = m / kLanes * kLanes;
  std::vector<uint16_t> tail(m > full ? kLanes * k : 0, 0);
  if (m > full) std::memcpy(tail.data(), x + full * k, (m - full) * k * sizeof(uint16_t));
  const auto rows_at = [&](int64_t r) { return r < full ? x + r * k : tail.data(); };
  // Blocks a span: their weights (a block: 2 panels of `words` pairs, 128 bytes a pair) stay
  // in L2 while every row goes through them.
  const int64_t span = std::max<int64_t>(1, kSpanBytes / (words * 128));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    configure_tiles();
    // 32 rows at a time through a span of the thread's blocks: those rows of x stay in L1
    // while the span's weights come again from L2 (2048 x 576 rows: 1.3-1.5x faster
    // than all rows through one block at a time, with x from L3).
    for (int64_t b0 = begin; b0 < end; b0 += span) {
      const int64_t b1 = std::min(end, b0 + span);
      for (int64_t r = 0; r < m; r += 2 * kLanes) {
        const bool two = r + kLanes < m;
        const uint16_t* xa[2] = {rows_at(r), two ? rows_at(r + kLanes) : nullptr};
        for (int64_t blk = b0; blk < b1; ++blk)
          block_rows(xa, k * 2, packed + blk * 2 * words * kLanes, words, two, out + r * n,
                     std::min(kLanes, m - r), two ? std::min(kLanes, m - r - kLanes) : 0, n,
                     blk * 2 * kLanes);
      }
    }
    _tile_release();
  });
}

}  // namespace pytgi

#endif  // PYTGI_AMX
