// Weight-only int8 / int4 products of bfloat16 (and float32, below) rows on panels packed at
// load (shard/models/qpanels.py packs them): bfloat16 rows where the CPU has AVX-512 with bf16
// dot products, float32 rows wherever it has AVX-512 F and BW (Skylake-SP, Cascade Lake, Ice
// Lake: most cloud x86 servers, whose shards serve float32 by default).
//
// A unit is 32 output columns (two panels of 16). Per pair of inputs (2p, 2p + 1) it holds
// the codes in the order a bf16 dot product (vdpbf16ps) reads them: lane j of a panel is
// column j's two codes, the even input's in the low half.
// - int8: 64 bytes a pair, panel 0's 32 codes then panel 1's; each code converted through
//   float32 (exact: -128..127 are bfloat16 integers).
// - int4: 64 bytes two pairs; 16-bit word i holds word i of (pair, panel) (0, 0), (0, 1),
//   (1, 0), (1, 1) in its nibbles, lowest first. A code c is read as 16 + c, whose bfloat16
//   bits are 0x4180 | c << 3 (16..31 share an exponent): one shift and one bitwise select a
//   word of 32. The offset goes into the mins as each group is scaled: m - 16 s, in float32
//   (as exact as quant.cpp's float32 forms: 16 s is exact, the difference rounded once).
// Codes and x are exact in bfloat16, so each product is exact in float32; a group's float32
// sum is scaled once (int4: plus its min times the group's sum of x), as quant.cpp's float32
// forms do. Scales (and int4's mins) [U, G, 32], zero past N, are float16 where every one is
// a float16 value (GGUF's Q8_0 / Q4_0 / Q4_1, on-the-fly int8 and int4), else float32 (Q4_K,
// Q6_K, GPTQ's mins s z). Outputs rounded once.
//
// A tile of up to 12 x rows by the unit's two panels keeps 24 sums in registers (few rows:
// several sums per row, so enough dot products are in flight). The first tile converts the
// codes in registers as it reads them; with more than 12 rows it also writes them, a chunk
// of 256 pairs at a time, to an L1 buffer of bfloat16 pairs that the other row tiles read.
// Codes are prefetched into L2 8 KiB ahead of the tile reading them, so they stream from memory
// under the arithmetic (as panels.cpp does for plain weights). SmolLM2's 120 decoder
// products, Zen 5, 2 cores, bfloat16 rows, quant.cpp's products on the row-major codes ->
// these (benchmarks/qpanel_products.py): int8 1 / 8 / 32 rows 3.38 / 15.0 / 17.7 -> 2.85 /
// 3.23 / 9.01 ms; int4 groups of 64 2.96 / 13.8 / 18.0 -> 2.06 / 2.75 / 8.99 ms; bfloat16
// weights in panels.cpp's panels 5.78 / 5.92 / 9.28 ms.
//
// Where the CPU has AMX (amx.cpp), bfloat16 batches of kQTileRows rows or more go to its tiles
// instead: each chunk's codes converted once into the buffer, every row multiplied from it,
// each group's tile sums scaled as above (below: `tiles_chunk`). 2-core Xeon with AMX, the
// same 120 products, dot products -> tiles: int8 16 / 32 / 128 rows 29.3 / 53.9 / 219 ->
// 11.1 / 17.1 / 50.5 ms; int4 groups of 32 26.6 / 52.2 / 261 -> 11.8 / 20.7 / 63.6 ms
// (bfloat16 weights on the tiles 8.6 / 10.2 / 50.0). Fewer rows, in another run (a slower
// minute): int8 4 / 8 / 12 rows 13.2 / 20.2 / 28.6 -> 15.8 / 16.1 / 16.4 ms, int4 g32 10.8 /
// 18.9 / 27.1 -> 14.3 / 16.3 / 17.5: the tiles from 8 rows. Two groups' sums scaled a pass
// (each total loaded and stored once per two) and the codes prefetched as a chunk converts
// took their time at 32 rows, against bfloat16 weights on the tiles in the same process,
// from int8 1.12-1.19x / int4 g32 1.28-1.33x / g64 1.09-1.15x to 1.00-1.06x / 1.08-1.18x /
// 0.97-1.06x (three process pairs alternating, the VM's slower minutes; in its faster ones,
// where bfloat16 streams at the memory's rate, 1.22-1.25x / 1.38-1.52x / 1.24-1.28x: the
// conversion and the scaling are the limit there). The first row block now converts each 16
// pairs while the tile unit multiplies the 16 before (the vector unit's conversion and the
// tile products overlap instead of taking turns): same 120 products, 16 / 32 / 128 rows,
// forms alternating in one process, int8 10.27 / 12.47 / 21.95 -> 9.44 / 10.22 / 20.62 ms,
// int4 g32 9.20 / 13.00 / 36.32 -> 7.19 / 10.83 / 34.38, g64 7.51 / 10.36 / 27.54 -> 5.82 /
// 8.45 / 26.50 (bfloat16 weights on the tiles 9.00 / 10.49 / 20.49).

#include "kernels.h"
#include "quant.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <type_traits>
#include <vector>

namespace pytgi {
namespace {

constexpr int64_t kLanes = 16, kCols = 32;  // columns of a panel, of a unit
constexpr int64_t kRows = 12;               // x rows of a tile
constexpr int64_t kChunk = 256;             // pairs of inputs converted at a time
// Codes are prefetched this many bytes ahead of the tile reading them (up to the end of the
// thread's units), into L2 (`prefetch`). Into L1, of 0 / 1 / 4 / 16 KiB, 4 was fastest for
// SmolLM2's 120 decoder products at 1 and 8 rows (Zen 5, 2 cores: int8 1 row 2.80 / 2.90 /
// 2.49 / 2.52 ms). On the 2-core AMX Xeon VM, one row, bfloat16 panels' time over int8's /
// int4 g64's (alternating in a process): L1 at 4 KiB 1.34-1.35x / 2.37-2.43x, L2 at 4 / 8 /
// 16 / 32 KiB 1.56 / 1.54-1.58 / 1.49-1.56 / 1.52x and 2.68 / 2.58 / 2.46-2.52 / 2.38x;
// both hints (L2 at 8 KiB, L1 at 1 KiB) no better than L2 alone.
constexpr int64_t kAhead = 8192;
inline void prefetch(const uint8_t* at) {
  _mm_prefetch(reinterpret_cast<const char*>(at), _MM_HINT_T1);
}

// Each form reads kPairs pairs of inputs (kBytes bytes) at a time into w[pair][panel].

// A panel's 32 words of a pair as float32, lanes (column j, input h) in order 2 j + h: words
// 0..15 in `lo`, 16..31 in `hi` -> input 0's and input 1's 16 columns.
inline void unpair(__m512 lo, __m512 hi, __m512& even, __m512& odd) {
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  even = _mm512_permutex2var_ps(lo, evens, hi);
  odd = _mm512_permutex2var_ps(lo, _mm512_add_epi32(evens, _mm512_set1_epi32(1)), hi);
}

// int8 codes, 64 bytes a pair, converted through float32 (exact).
struct Q8 {
  static constexpr int64_t kBytes = 64, kPairs = 1;
  static __m512 quarter(const uint8_t* c) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c))));
  }
#ifdef __AVX512BF16__
  static void weights(const uint8_t* c, __m512bh (&w)[kPairs][2]) {
    w[0][0] = _mm512_cvtne2ps_pbh(quarter(c + 16), quarter(c));  // low half: second operand
    w[0][1] = _mm512_cvtne2ps_pbh(quarter(c + 48), quarter(c + 32));
  }
#endif
  // float32: w[pair][input h][panel], 16 columns' weights for one input
  static void weights32(const uint8_t* c, __m512 (&w)[kPairs][2][2]) {
    for (int panel = 0; panel < 2; ++panel)
      unpair(quarter(c + 32 * panel), quarter(c + 32 * panel + 16), w[0][0][panel], w[0][1][panel]);
  }
};

// int4 codes, 64 bytes two pairs: 16-bit word i holds word i of (pair, panel) (0, 0), (0, 1),
// (1, 0), (1, 1) in its nibbles, low first. A code c is read as 16 + c, whose bfloat16 bits
// are 0x4180 | c << 3 (16..31 share an exponent), so each word takes one shift and one
// bitwise select; the offset comes out with the mins as each group is scaled (m - 16 s).
struct Q4 {
  static constexpr int64_t kBytes = 64, kPairs = 2;
#ifdef __AVX512BF16__
  static __m512bh at(__m512i bits) {  // code bits at 3..6 (among others) -> bfloat16 16 + c
    return (__m512bh)_mm512_ternarylogic_epi32(bits, _mm512_set1_epi16(0x78),
                                               _mm512_set1_epi16(0x4180), 0xEA);  // a & b | c
  }
  static void weights(const uint8_t* c, __m512bh (&w)[kPairs][2]) {
    const __m512i v = _mm512_loadu_si512(c);
    w[0][0] = at(_mm512_slli_epi16(v, 3));
    w[0][1] = at(_mm512_srli_epi16(v, 1));
    w[1][0] = at(_mm512_srli_epi16(v, 5));
    w[1][1] = at(_mm512_srli_epi16(v, 9));
  }
#endif
  static void weights32(const uint8_t* c, __m512 (&w)[kPairs][2][2]) {
    const __m512i v = _mm512_loadu_si512(c);
    // float32 16 + c looked up (vpermps reads an index's low 4 bits), already one input's 16
    // columns: dword d is word 2d (column d, input 0) then word 2d + 1 (input 1), so its nibble
    // n is (pair, panel) n % 4's code for input n / 4. (Widening the words, setting each
    // nibble's bits into 0x41800000 and unpairing the inputs with permutes took 1.25x its time:
    // float32 rows, int4 groups of 32, SmolLM2's 120 products, Zen 5: 1 / 2 / 4 rows 2.09 /
    // 2.49 / 3.05 -> 1.68 / 1.84 / 2.63 ms.)
    const __m512 table = _mm512_setr_ps(16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31);
#pragma GCC unroll 8
    for (int n = 0; n < 8; ++n)
      w[(n >> 1) & 1][n >> 2][n & 1] =
          _mm512_permutexvar_ps(n ? _mm512_srli_epi32(v, 4 * n) : v, table);
  }
};

#ifdef __AVX512BF16__
// Codes already converted: two panels of bfloat16 pairs, 128 bytes a pair.
struct Converted {
  static constexpr int64_t kBytes = 128, kPairs = 1;
  static void weights(const uint8_t* c, __m512bh (&w)[kPairs][2]) {
    w[0][0] = (__m512bh)_mm512_loadu_si512(c);
    w[0][1] = (__m512bh)_mm512_loadu_si512(c + 64);
  }
};
#endif

// A layer's group parameters: scales and int4's mins m (w = s q + m; null for int8), both
// [U, G, 32], float16 (`half`) or float32.
struct Params {
  const void* scales;
  const void* mins;
  bool half;
};

// What a tile reads besides its codes: segments (groups) of `seg` pairs, segment s scaled by
// scales[s][0..32) (int4: plus (mins[s][..] - 16 scales[s][..]) times sums[i * ss + s], row
// i's sum of x over it).
struct Groups {
  int64_t seg;
  const void* scales;  // float16 or float32 (`half`) from the chunk's first segment on
  const void* mins;    // null for int8
  bool half;
  const float* sums;  // [rows][ss] float32, null for int8
  int64_t ss;
};

// 16 parameters from element `at` of p, float16 (`half`) or float32.
inline __m512 param16(const void* p, int64_t at, bool half) {
  if (half)
    return _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + at)));
  return _mm512_loadu_ps(static_cast<const float*>(p) + at);
}

// Segment s's scales (sc) and, for int4, its mins with the codes' offset taken out (mn).
// Forced inline: GCC made it a call, spilling a tile's sums and totals around every segment
// (int4 groups of 32, SmolLM2's 120 products, 16 / 32 bfloat16 rows, Zen 4: 1.02-1.21x /
// 1.09-1.14x of bfloat16 panels' time -> 0.81-0.97x / 1.07-1.08x, three process pairs).
__attribute__((always_inline)) inline void group_params(const Groups& g, int64_t s,
                                                       __m512 (&sc)[2], __m512 (&mn)[2]) {
  for (int j = 0; j < 2; ++j) {
    const int64_t at = s * kCols + j * kLanes;
    sc[j] = param16(g.scales, at, g.half);
    if (g.mins)  // m - 16 s: 16 s exact, the difference rounded once
      mn[j] = _mm512_fnmadd_ps(_mm512_set1_ps(16.f), sc[j], param16(g.mins, at, g.half));
  }
}

// Independent sums per row and panel for MR rows: enough chains of dot products in flight
// to cover their latency when there are few rows (one row: 2 chains would leave most cycles
// waiting on the previous sum).
template <int MR>
constexpr int sets() { return MR <= 3 ? 4 : MR <= 6 ? 2 : 1; }

// The loop of both tiles: `step(set, p, acc)` adds pairs p .. p + kStep - 1 into the sums
// acc[set] (sets taking turns); each segment's sets are added and scaled into the totals
// tot[i][0..32) (int4: plus the min times row i's sum of x over the segment), which stay in
// registers across segments.
template <int MR, int S, int64_t kStep, typename Step>
void segments(int64_t pairs, const Groups& g, float* tot, Step step) {
  __m512 tr[MR][2];
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 2; ++j) tr[i][j] = _mm512_loadu_ps(tot + i * kCols + j * kLanes);
  for (int64_t s = 0, p = 0; p < pairs; ++s) {
    __m512 acc[S][MR][2];
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i)
      for (int k = 0; k < S; ++k) acc[k][i][0] = acc[k][i][1] = _mm512_setzero_ps();
    const int64_t end = std::min(pairs, p + g.seg);  // segments hold whole steps
    for (; p + S * kStep <= end; p += S * kStep)
#pragma GCC unroll 4
      for (int k = 0; k < S; ++k) step(k, p + k * kStep, acc);
    for (; p < end; p += kStep) step(0, p, acc);
    __m512 sc[2], mn[2];
    group_params(g, s, sc, mn);
#pragma GCC unroll 12
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 2; ++j) {
        __m512 sum = acc[0][i][j];
        for (int k = 1; k < S; ++k) sum = _mm512_add_ps(sum, acc[k][i][j]);
        __m512 v = _mm512_fmadd_ps(sum, sc[j], tr[i][j]);
        if (g.mins) v = _mm512_fmadd_ps(_mm512_set1_ps(g.sums[i * g.ss + s]), mn[j], v);
        tr[i][j] = v;
      }
  }
#pragma GCC unroll 12
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 2; ++j) _mm512_storeu_ps(tot + i * kCols + j * kLanes, tr[i][j]);
}

#ifdef __AVX512BF16__
// tot[i][0..32) += the unit's two panels' products with x rows i < MR over `pairs` pairs
// (x: 32-bit pairs, row stride xs; codes: Src's bytes a pair). `keep`: room for the pairs'
// converted weights (Converted's layout), written as they are read, or null. Codes are
// prefetched `dist` bytes ahead of those read (not at or past `limit`; 0: none).
template <typename Src, int MR>
void tile(const uint32_t* x, int64_t xs, const uint8_t* codes, int64_t pairs, Groups g,
          float* tot, uint8_t* keep, int64_t dist, const uint8_t* limit) {
  constexpr int S = sets<MR>();
  auto step = [&](int set, int64_t p, __m512 (&acc)[S][MR][2]) {
    const uint8_t* at = codes + p / Src::kPairs * Src::kBytes;  // p: a multiple of kPairs
    if (dist && at + dist < limit) prefetch(at + dist);
    __m512bh w[Src::kPairs][2];
    Src::weights(at, w);
    for (int q = 0; q < Src::kPairs; ++q) {
      if (keep) {
        _mm512_storeu_si512(keep + (p + q) * 128, (__m512i)w[q][0]);
        _mm512_storeu_si512(keep + (p + q) * 128 + 64, (__m512i)w[q][1]);
      }
#pragma GCC unroll 12
      for (int i = 0; i < MR; ++i) {
        const auto xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[i * xs + p + q]));
        acc[set][i][0] = _mm512_dpbf16_ps(acc[set][i][0], xv, w[q][0]);
        acc[set][i][1] = _mm512_dpbf16_ps(acc[set][i][1], xv, w[q][1]);
      }
    }
  };
  segments<MR, S, Src::kPairs>(pairs, g, tot, step);
}

template <typename Src, int... R>
void tile_of(int64_t mr, std::integer_sequence<int, R...>, const uint32_t* x, int64_t xs,
             const uint8_t* codes, int64_t pairs, Groups g, float* tot, uint8_t* keep,
             int64_t dist, const uint8_t* limit) {
  ((mr == R + 1 ? tile<Src, R + 1>(x, xs, codes, pairs, g, tot, keep, dist, limit) : void()),
   ...);
}

// int8 codes times up to kPairedRows float32 rows, in the codes' own order: a pair's 64 codes
// are four quarters of 16 (quarter t: panel t / 2, columns 8 (t % 2) .. + 8, lane 2 j + h
// column j's code for input h), each converted to float32 and multiplied by the row's two
// inputs broadcast as alternate lanes (x[2p], x[2p + 1], ...). A segment's sums are folded
// (even lanes plus odd lanes: columns in order) and scaled once, as `segments` scales. Four
// multiply-adds a row per pair where the dot products take two, so this wins only where a
// vdpbf16ps costs more than two vfmadd: on the 2-core AMX Xeon ~1 ns against ~0.25 (8 chains
// each; one row's int8 product 64 codes in ~3.5-4 ns a thread against ~7: SmolLM2's 120
// products 1 / 2 / 4 rows 9.2 / 14.2 / 15.2 -> 7.8 / 10.2 / 10.8 ms), on Zen 5 ~0.50 against
// ~0.44, where the dot products win (2.63 / 2.60 / 2.92 against 2.90 / 3.06 / 3.52 ms).
// paired_faster() measures which, once.
constexpr int64_t kPairedRows = 4;

// 16 columns in order from two quarters' pair sums (lanes 2 j + h): both inputs added.
inline __m512 fold(__m512 a, __m512 b) {
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  return _mm512_add_ps(_mm512_permutex2var_ps(a, evens, b),
                       _mm512_permutex2var_ps(a, _mm512_add_epi32(evens, _mm512_set1_epi32(1)), b));
}

// tot[i][0..32) += int8 codes (Q8's layout) times float32 rows i < MR (stride xs inputs) over
// `pairs` pairs, segments of g.seg pairs scaled by g's scales; codes prefetched kAhead bytes
// ahead (not at or past `limit`).
template <int MR>
void tile_paired(const float* x, int64_t xs, const uint8_t* codes, int64_t pairs,
                 const Groups& g, float* tot, const uint8_t* limit) {
  constexpr int S = MR == 1 ? 2 : 1;  // 4 S MR chains of multiply-adds: 8 or more
  __m512 tr[MR][2];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 2; ++j) tr[i][j] = _mm512_loadu_ps(tot + i * kCols + j * kLanes);
  const auto step = [&](int64_t p, __m512 (&acc)[MR][4]) {
    const uint8_t* at = codes + p * 64;
    if (at + kAhead < limit) prefetch(at + kAhead);
    __m512 w[4];
    for (int t = 0; t < 4; ++t) w[t] = Q8::quarter(at + 16 * t);
    for (int i = 0; i < MR; ++i) {
      double both;  // the row's inputs 2p, 2p + 1 as one 64-bit broadcast
      std::memcpy(&both, x + i * xs + 2 * p, sizeof both);
      const __m512 xv = _mm512_castpd_ps(_mm512_set1_pd(both));
      for (int t = 0; t < 4; ++t) acc[i][t] = _mm512_fmadd_ps(xv, w[t], acc[i][t]);
    }
  };
  for (int64_t s = 0, p = 0; p < pairs; ++s) {
    __m512 acc[S][MR][4];
    for (int k = 0; k < S; ++k)
      for (int i = 0; i < MR; ++i)
        for (int t = 0; t < 4; ++t) acc[k][i][t] = _mm512_setzero_ps();
    const int64_t end = std::min(pairs, p + g.seg);
    for (; p + S <= end; p += S)
#pragma GCC unroll 2
      for (int k = 0; k < S; ++k) step(p + k, acc[k]);
    for (; p < end; ++p) step(p, acc[0]);
    __m512 sc[2], mn[2];
    group_params(g, s, sc, mn);
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < 2; ++j) {
        __m512 a = acc[0][i][2 * j], b = acc[0][i][2 * j + 1];
        for (int k = 1; k < S; ++k) {
          a = _mm512_add_ps(a, acc[k][i][2 * j]);
          b = _mm512_add_ps(b, acc[k][i][2 * j + 1]);
        }
        tr[i][j] = _mm512_fmadd_ps(fold(a, b), sc[j], tr[i][j]);
      }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 2; ++j) _mm512_storeu_ps(tot + i * kCols + j * kLanes, tr[i][j]);
}

template <int... R>
void tile_paired_of(int64_t mr, std::integer_sequence<int, R...>, const float* x, int64_t xs,
                    const uint8_t* codes, int64_t pairs, const Groups& g, float* tot,
                    const uint8_t* limit) {
  ((mr == R + 1 ? tile_paired<R + 1>(x, xs, codes, pairs, g, tot, limit) : void()), ...);
}

// Whether this CPU's vdpbf16ps costs more than two 16-lane vfmadd (tile_paired then beats
// the dot products): each timed in 8 independent chains, the fastest of 15 alternating tries
// (a preempted try only reads slower), ~0.1 ms once per process.
template <bool kDot>
double chain_ns() {
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512 a = _mm512_set1_ps(1.0001f), b = _mm512_set1_ps(0.9999f);
  const __m512bh ab = _mm512_cvtne2ps_pbh(a, b);
  constexpr int kSteps = 512;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kSteps; ++i)
    for (auto& c : acc) c = kDot ? _mm512_dpbf16_ps(c, ab, ab) : _mm512_fmadd_ps(c, a, b);
  const std::chrono::duration<double, std::nano> took = std::chrono::steady_clock::now() - start;
  volatile float sink = 0;  // keeps the chains
  for (const auto& c : acc) sink = sink + _mm512_reduce_add_ps(c);
  return took.count() / (8.0 * kSteps);
}

bool paired_faster() {
  static const bool faster = [] {
    double dot = 1e30, fma = 1e30;
    for (int i = 0; i < 15; ++i) {
      dot = std::min(dot, chain_ns<true>());
      fma = std::min(fma, chain_ns<false>());
    }
    return dot > 2 * fma;
  }();
  return faster;
}
#endif  // __AVX512BF16__

// The groups of unit u's chunk from segment s0 on (segments of `seg` pairs), as tiles read
// them; `sums` [rows][groups] (empty for int8).
Groups chunk_groups(int64_t u, int64_t s0, int64_t seg, int64_t groups, const Params& q,
                    const std::vector<float>& sums) {
  const int64_t at = (u * groups + s0) * kCols * (q.half ? 2 : 4);  // bytes
  const auto from = [at](const void* p) { return static_cast<const uint8_t*>(p) + at; };
  return {seg, from(q.scales), q.mins ? from(q.mins) : nullptr,
          q.half, q.mins ? sums.data() + s0 : nullptr, groups};
}

#ifdef __AVX512BF16__
// sums[m][grp] = sum over group grp of x row m (bfloat16 bits, K inputs; groups of a
// multiple of 16), in float32: 16 lanes of partial sums, then theirs. (A scalar loop, one
// dependent add per input, took ~16 us a call at 32 rows: as long as the product.)
std::vector<float> group_sums(const uint16_t* x, int64_t m, int64_t k, int64_t groups) {
  const int64_t g = k / groups;
  std::vector<float> sums(m * groups);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t grp = 0; grp < groups; ++grp) {
      const uint16_t* in = x + r * k + grp * g;
      __m512 s = _mm512_setzero_ps();
      for (int64_t i = 0; i < g; i += kLanes) {  // bfloat16 -> float32: the bits shifted up
        const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + i));
        s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16)));
      }
      sums[r * groups + grp] = _mm512_reduce_add_ps(s);
    }
  return sums;
}

#ifdef PYTGI_AMX
// On AMX tiles (amx.cpp's tile products): a chunk's codes are converted into the buffer of
// bfloat16 pairs ([pair][panel], 128 bytes a pair), which is two B operands (16 pairs x 16
// columns, stride 128 bytes); x's rows are the A operands (16 rows x 32 inputs). The first
// block of 32 rows converts pairs q + 16.. q + 31 after issuing its products of pairs q..
// q + 15 (so the conversion runs while the tile unit works); later blocks read the buffer.
// Per segment
// (a group, or the chunk where one scale covers a row) the four sum tiles (32 rows x 32
// columns) start from zero and are stored; two segments' stored sums at a time are scaled
// into the totals, as `segments` scales its sums: the same float32 arithmetic but for the
// tile unit's own rounding of its additions (amx.cpp). Segments must be whole tile
// products: a multiple of 16 pairs.

// `len` pairs of codes (Src's layout) -> bfloat16 pairs in Converted's layout at out; codes
// prefetched kAhead bytes ahead (not at or past `limit`), so the next codes stream in as
// these convert (SmolLM2's 120 products at 32 rows, Xeon: int8 ~10% faster, measured when a
// chunk converted whole; since conversion went under the tile products, no distance of 1 to
// 32 KiB, hint, or no prefetch at all measured apart beyond the noise).
template <typename Src>
void convert(const uint8_t* codes, int64_t len, uint8_t* out, const uint8_t* limit) {
  for (int64_t p = 0; p < len; p += Src::kPairs) {
    const uint8_t* at = codes + p / Src::kPairs * Src::kBytes;
    if (at + kAhead < limit) prefetch(at + kAhead);
    __m512bh w[Src::kPairs][2];
    Src::weights(at, w);
    for (int q = 0; q < Src::kPairs; ++q) {
      _mm512_storeu_si512(out + (p + q) * 128, (__m512i)w[q][0]);
      _mm512_storeu_si512(out + (p + q) * 128 + 64, (__m512i)w[q][1]);
    }
  }
}

// The four sum tiles of a segment as stored: [row block][panel] 16 x 16 float32.
using Sums = float[2][2][kLanes * kLanes];

// tot rows [rows][32] (from row0) += N consecutive segments' sums (sums[t][block]) scaled
// by sc[t] (int4: plus mn[t] times the row's sum of x over segment s + t). Both panels of a
// row and N segments a pass: a total is loaded and stored once per N segments.
template <bool kMins, int N>
void scale_rows(const Sums* sums, int block, int64_t rows, int64_t row0, int64_t s,
                const Groups& g, const __m512 (&sc)[2][2], const __m512 (&mn)[2][2],
                float* tot) {
  const float* xsum = kMins ? g.sums + row0 * g.ss + s : nullptr;
  tot += row0 * kCols;
  for (int64_t i = 0; i < rows; ++i, tot += kCols) {
    __m512 v0 = _mm512_loadu_ps(tot), v1 = _mm512_loadu_ps(tot + kLanes);
    for (int t = 0; t < N; ++t) {
      v0 = _mm512_fmadd_ps(_mm512_load_ps(sums[t][block][0] + i * kLanes), sc[t][0], v0);
      v1 = _mm512_fmadd_ps(_mm512_load_ps(sums[t][block][1] + i * kLanes), sc[t][1], v1);
      if constexpr (kMins) {
        const __m512 b = _mm512_set1_ps(xsum[i * g.ss + t]);
        v0 = _mm512_fmadd_ps(b, mn[t][0], v0);
        v1 = _mm512_fmadd_ps(b, mn[t][1], v1);
      }
    }
    _mm512_storeu_ps(tot, v0);
    _mm512_storeu_ps(tot + kLanes, v1);
  }
}

// tot [m][32] += x's m rows (bfloat16, k inputs a row; rows past the last whole 16 read from
// `tail`, a zero-padded copy) from pair p0 on, times `len` pairs of codes (Src's layout) at
// `codes`, converted into conv by the first row block as its tile products run.
template <typename Src>
void tiles_chunk(const uint16_t* x, int64_t k, int64_t m, const uint16_t* tail, int64_t p0,
                 const uint8_t* codes, const uint8_t* limit, uint8_t* conv, int64_t len,
                 const Groups& g, float* tot) {
  const auto convert_at = [&](int64_t q, int64_t n) {
    convert<Src>(codes + q / Src::kPairs * Src::kBytes, n, conv + q * Converted::kBytes, limit);
  };
  convert_at(0, kLanes);
  const int64_t full = m / kLanes * kLanes, stride = k * 2;  // bytes a row
  const int64_t segs = len / g.seg, per = segs % 2 == 0 ? 2 : 1;  // segments a scaling pass
  const auto block = [&](int64_t r) { return (r < full ? x + r * k : tail) + 2 * p0; };
  alignas(64) Sums sums[2];
  for (int64_t r = 0; r < m; r += 2 * kLanes) {
    const bool two = r + kLanes < m;
    const uint16_t* a0 = block(r);
    const uint16_t* a1 = two ? block(r + kLanes) : nullptr;
    const int64_t rows0 = std::min(kLanes, m - r), rows1 = two ? std::min(kLanes, m - r - kLanes) : 0;
    for (int64_t s = 0; s < segs; s += per) {
      __m512 sc[2][2], mn[2][2];
      for (int64_t t = 0; t < per; ++t) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t q = (s + t) * g.seg; q < (s + t + 1) * g.seg; q += kLanes) {
          _tile_loadd(6, conv + q * Converted::kBytes, Converted::kBytes);
          _tile_loadd(7, conv + q * Converted::kBytes + 64, Converted::kBytes);
          _tile_loadd(4, a0 + 2 * q, stride);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {
            _tile_loadd(5, a1 + 2 * q, stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          if (r == 0 && q + kLanes < len) convert_at(q + kLanes, kLanes);  // under the products
        }
        _tile_stored(0, sums[t][0][0], 64);
        _tile_stored(1, sums[t][0][1], 64);
        if (two) {
          _tile_stored(2, sums[t][1][0], 64);
          _tile_stored(3, sums[t][1][1], 64);
        }
        group_params(g, s + t, sc[t], mn[t]);
      }
      for (int b = 0; b < (two ? 2 : 1); ++b) {
        const int64_t rows = b ? rows1 : rows0, row0 = r + b * kLanes;
        if (g.mins)
          per == 2 ? scale_rows<true, 2>(sums, b, rows, row0, s, g, sc, mn, tot)
                   : scale_rows<true, 1>(sums, b, rows, row0, s, g, sc, mn, tot);
        else
          per == 2 ? scale_rows<false, 2>(sums, b, rows, row0, s, g, sc, mn, tot)
                   : scale_rows<false, 1>(sums, b, rows, row0, s, g, sc, mn, tot);
      }
    }
  }
}
#endif

template <typename Src>
void multiply(const torch::Tensor& x, const uint8_t* codes, int64_t pairs, const Params& q,
              int64_t groups, int64_t units, int64_t n, uint16_t* out, bool tiles,
              std::optional<bool> force_paired) {
  const int64_t m = x.size(0), seg = pairs / groups;  // pairs of a group
  const auto* xp = reinterpret_cast<const uint32_t*>(x.data_ptr());
  const std::vector<float> sums =
      q.mins ? group_sums(reinterpret_cast<const uint16_t*>(xp), m, 2 * pairs, groups)
           : std::vector<float>();
  const int64_t unit = pairs / Src::kPairs * Src::kBytes;  // bytes of a unit's codes
  // a chunk holds whole groups (one group a row: the chunk is its own segment)
  const int64_t chunk = groups == 1 ? kChunk : std::max(seg, kChunk / seg * seg);
#ifdef PYTGI_AMX
  // whole tile products in every segment (chunks of kChunk pairs where one group is a row)
  tiles = tiles && m >= kQTileRows && (groups == 1 ? pairs : seg) % kLanes == 0 && amx_ready();
  const int64_t full = m / kLanes * kLanes;  // the last rows' zero-padded block for the tiles
  std::vector<uint16_t> tail(tiles && m > full ? kLanes * 2 * pairs : 0, 0);
  if (!tail.empty())
    std::memcpy(tail.data(), x.data_ptr<at::BFloat16>() + full * 2 * pairs,
                (m - full) * 2 * pairs * sizeof(uint16_t));
#else
  tiles = false;
#endif
  // int8 on few rows: float32 multiply-adds in the codes' order where they are faster
  const bool paired = std::is_same_v<Src, Q8> && !tiles && m <= kPairedRows &&
                      (force_paired ? *force_paired : paired_faster());
  std::vector<float> xf(paired ? m * 2 * pairs : 0);
  if (paired) {
    const auto* bits = reinterpret_cast<const uint16_t*>(xp);
    for (size_t i = 0; i < xf.size(); ++i) {
      const uint32_t v = static_cast<uint32_t>(bits[i]) << 16;
      std::memcpy(&xf[i], &v, sizeof v);
    }
  }
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tot(m * kCols);
    std::vector<uint8_t> converted(m > kRows || tiles ? chunk * Converted::kBytes : 0);
#ifdef PYTGI_AMX
    if (tiles) configure_tiles();
#endif
    for (int64_t u = begin; u < end; ++u) {
      std::fill(tot.begin(), tot.end(), 0.f);
      for (int64_t p0 = 0; p0 < pairs; p0 += chunk) {
        const int64_t len = std::min(chunk, pairs - p0), s0 = p0 / seg;  // its first segment
        const uint8_t* c = codes + u * unit + p0 / Src::kPairs * Src::kBytes;
        const Groups g = chunk_groups(u, s0, groups == 1 ? len : seg, groups, q, sums);
#ifdef PYTGI_AMX
        if (tiles) {  // every row on the tiles, from the chunk's converted codes
          tiles_chunk<Src>(reinterpret_cast<const uint16_t*>(xp), 2 * pairs, m, tail.data(), p0,
                           c, codes + end * unit, converted.data(), len, g, tot.data());
          continue;
        }
#endif
        if constexpr (std::is_same_v<Src, Q8>)
          if (paired) {
            tile_paired_of(m, std::make_integer_sequence<int, kPairedRows>{}, xf.data() + 2 * p0,
                           2 * pairs, c, len, g, tot.data(), codes + end * unit);
            continue;
          }
        // the first row tile converts the codes (keeping them for the others, if any)
        uint8_t* keep = m > kRows ? converted.data() : nullptr;
        tile_of<Src>(std::min(kRows, m), std::make_integer_sequence<int, kRows>{}, xp + p0,
                     pairs, c, len, g, tot.data(), keep, kAhead, codes + end * unit);
        for (int64_t r = kRows; r < m; r += kRows) {
          Groups rows = g;
          if (rows.sums) rows.sums += r * groups;
          tile_of<Converted>(std::min(kRows, m - r), std::make_integer_sequence<int, kRows>{},
                             xp + r * pairs + p0, pairs, converted.data(), len, rows,
                             tot.data() + r * kCols, nullptr, 0, nullptr);
        }
      }
      const int64_t c0 = u * kCols, cols = std::min(kCols, n - c0);
      const __mmask32 mask = cols >= kCols ? ~0u : (1u << cols) - 1;
      for (int64_t r = 0; r < m; ++r) {  // rounded once to bfloat16
        const __m512 lo = _mm512_loadu_ps(tot.data() + r * kCols);
        const __m512 hi = _mm512_loadu_ps(tot.data() + r * kCols + kLanes);
        _mm512_mask_storeu_epi16(out + r * n + c0, mask, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
    }
#ifdef PYTGI_AMX
    if (tiles) _tile_release();
#endif
  });
}

#endif  // __AVX512BF16__

// ---- float32 rows (float32 models): the same panels, each code converted to float32 (int4:
// 16 + c, looked up) and the pairs split into their two inputs, then
// multiply-adds (products rounded in float32, as quant.cpp's float32 forms). Up to 4 rows
// convert in registers as the tile reads them; more convert a chunk of 128 pairs into an L1
// buffer [pair][input][panel][16] that tiles of up to 12 rows by two panels read. SmolLM2's
// 120 decoder products, float32 rows, row-major codes -> these: int8 1 / 8 / 32 rows 3.23 /
// 14.8 / 27.8 -> 2.97 / 6.91 / 17.9 ms; int4 groups of 64 2.69 / 13.5 / 27.3 -> 2.35 / 6.18 /
// 17.1 ms; float32 weights in panels.cpp's panels 11.3 / 11.5 / 18.2 ms.

constexpr int64_t kChunk32 = 128;  // pairs of a float32 chunk (32 KiB)
constexpr int64_t kRawRows32 = 4;  // up to this many rows convert in registers, no buffer

// Codes already converted to float32: [pair][input][panel][16], 256 bytes a pair.
struct Converted32 {
  static constexpr int64_t kBytes = 256, kPairs = 1;
  static void weights32(const uint8_t* c, __m512 (&w)[kPairs][2][2]) {
    const auto* f = reinterpret_cast<const float*>(c);
    for (int h = 0; h < 2; ++h)
      for (int panel = 0; panel < 2; ++panel)
        w[0][h][panel] = _mm512_loadu_ps(f + (h * 2 + panel) * kLanes);
  }
};

// tot[i][0..32) += the panels' products with float32 rows i < MR over `pairs` pairs of codes
// in Src's form (x rows of stride xs inputs), prefetching `dist` bytes ahead (not at or past
// `limit`; 0: none).
template <typename Src, int MR>
void tile32(const float* x, int64_t xs, const uint8_t* codes, int64_t pairs, Groups g,
            float* tot, int64_t dist, const uint8_t* limit) {
  constexpr int S = sets<MR>();
  auto step = [&](int set, int64_t p, __m512 (&acc)[S][MR][2]) {
    const uint8_t* at = codes + p / Src::kPairs * Src::kBytes;
    if (dist && at + dist < limit) prefetch(at + dist);
    __m512 w[Src::kPairs][2][2];
    Src::weights32(at, w);
    for (int q = 0; q < Src::kPairs; ++q)
      for (int h = 0; h < 2; ++h) {
#pragma GCC unroll 12
        for (int i = 0; i < MR; ++i) {
          const __m512 xv = _mm512_set1_ps(x[i * xs + 2 * (p + q) + h]);
          acc[set][i][0] = _mm512_fmadd_ps(xv, w[q][h][0], acc[set][i][0]);
          acc[set][i][1] = _mm512_fmadd_ps(xv, w[q][h][1], acc[set][i][1]);
        }
      }
  };
  segments<MR, S, Src::kPairs>(pairs, g, tot, step);
}

template <typename Src, int... R>
void tile32_of(int64_t mr, std::integer_sequence<int, R...>, const float* x, int64_t xs,
               const uint8_t* codes, int64_t pairs, Groups g, float* tot, int64_t dist,
               const uint8_t* limit) {
  ((mr == R + 1 ? tile32<Src, R + 1>(x, xs, codes, pairs, g, tot, dist, limit) : void()), ...);
}

// `pairs` pairs of Src's codes -> the float32 buffer (Converted32's layout), prefetching
// kAhead bytes ahead (not at or past `limit`).
template <typename Src>
void convert32(const uint8_t* codes, int64_t pairs, float* out, const uint8_t* limit) {
  for (int64_t p = 0; p < pairs; p += Src::kPairs) {
    const uint8_t* at = codes + p / Src::kPairs * Src::kBytes;
    if (at + kAhead < limit) prefetch(at + kAhead);
    __m512 w[Src::kPairs][2][2];
    Src::weights32(at, w);
    for (int q = 0; q < Src::kPairs; ++q)
      for (int h = 0; h < 2; ++h)
        for (int panel = 0; panel < 2; ++panel)
          _mm512_storeu_ps(out + ((p + q) * 2 + h) * kCols + panel * kLanes, w[q][h][panel]);
  }
}

// sums[m][grp] = sum over group grp of float32 row m, in float32 (16 lanes, then theirs).
std::vector<float> group_sums32(const float* x, int64_t m, int64_t k, int64_t groups) {
  const int64_t g = k / groups;
  std::vector<float> sums(m * groups);
  for (int64_t r = 0; r < m; ++r)
    for (int64_t grp = 0; grp < groups; ++grp) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t i = 0; i < g; i += kLanes) s = _mm512_add_ps(s, _mm512_loadu_ps(x + r * k + grp * g + i));
      sums[r * groups + grp] = _mm512_reduce_add_ps(s);
    }
  return sums;
}

template <typename Src>
void multiply32(const torch::Tensor& x, const uint8_t* codes, int64_t pairs, const Params& q,
                int64_t groups, int64_t units, int64_t n, float* out) {
  const int64_t m = x.size(0), seg = pairs / groups;
  const float* xp = x.data_ptr<float>();
  const std::vector<float> sums = q.mins ? group_sums32(xp, m, 2 * pairs, groups) : std::vector<float>();
  const int64_t unit = pairs / Src::kPairs * Src::kBytes;
  const int64_t chunk = groups == 1 ? kChunk32 : std::max(seg, kChunk32 / seg * seg);
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tot(m * kCols), converted(m > kRawRows32 ? chunk * 2 * kCols : 0);
    for (int64_t u = begin; u < end; ++u) {
      std::fill(tot.begin(), tot.end(), 0.f);
      for (int64_t p0 = 0; p0 < pairs; p0 += chunk) {
        const int64_t len = std::min(chunk, pairs - p0), s0 = p0 / seg;  // its first segment
        const uint8_t* c = codes + u * unit + p0 / Src::kPairs * Src::kBytes;
        const Groups g = chunk_groups(u, s0, groups == 1 ? len : seg, groups, q, sums);
        if (m <= kRawRows32) {  // converted in registers as the tile reads them
          tile32_of<Src>(m, std::make_integer_sequence<int, kRawRows32>{}, xp + 2 * p0,
                         2 * pairs, c, len, g, tot.data(), kAhead, codes + end * unit);
          continue;
        }
        convert32<Src>(c, len, converted.data(), codes + end * unit);
        const auto* buffer = reinterpret_cast<const uint8_t*>(converted.data());
        for (int64_t r = 0; r < m; r += kRows) {
          Groups rows = g;
          if (rows.sums) rows.sums += r * groups;
          tile32_of<Converted32>(std::min(kRows, m - r), std::make_integer_sequence<int, kRows>{},
                                 xp + r * 2 * pairs + 2 * p0, 2 * pairs, buffer, len, rows,
                                 tot.data() + r * kCols, 0, nullptr);
        }
      }
      const int64_t c0 = u * kCols, cols = std::min(kCols, n - c0);
      const __mmask32 mask = cols >= kCols ? ~0u : (1u << cols) - 1;
      for (int64_t r = 0; r < m; ++r) {
        float* o = out + r * n + c0;
        _mm512_mask_storeu_ps(o, static_cast<__mmask16>(mask), _mm512_loadu_ps(tot.data() + r * kCols));
        _mm512_mask_storeu_ps(o + kLanes, static_cast<__mmask16>(mask >> kLanes),
                              _mm512_loadu_ps(tot.data() + r * kCols + kLanes));
      }
    }
  });
}

}  // namespace

torch::Tensor qpanel_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                            std::optional<torch::Tensor> mins, int64_t n, bool tiles,
                            std::optional<bool> paired) {
  const bool q8 = codes.scalar_type() == torch::kChar;
  TORCH_CHECK(codes.dim() == 3 && codes.is_contiguous() && codes.size(2) == 64 &&
                  (q8 || codes.scalar_type() == torch::kByte),
              "codes: int8 [U, K / 2, 64] or uint8 [U, K / 4, 64] (quant.py's panels)");
  const int64_t units = codes.size(0), pairs = codes.size(1) * (q8 ? Q8::kPairs : Q4::kPairs);
  const bool half = scales.scalar_type() == torch::kHalf;
  TORCH_CHECK((half || scales.scalar_type() == torch::kFloat) && scales.dim() == 3 &&
                  scales.size(0) == units && scales.size(2) == kCols && scales.is_contiguous(),
              "scales: float16 or float32 [U, G, 32]");
  const int64_t groups = scales.size(1);
  TORCH_CHECK(groups > 0 && pairs % groups == 0 && (q8 || pairs / groups % 8 == 0),
              "groups must tile the pairs of inputs (int4: groups of a multiple of 16 inputs)");
  TORCH_CHECK(q8 != mins.has_value(), "mins: int4 only, and int4 needs them");
  if (mins)
    TORCH_CHECK(mins->sizes() == scales.sizes() && mins->is_contiguous() &&
                    mins->scalar_type() == scales.scalar_type(),
                "mins: shaped like scales, in their dtype");
  const bool f32 = x.scalar_type() == torch::kFloat;
  TORCH_CHECK(x.dim() == 2 && (f32 || x.scalar_type() == torch::kBFloat16) &&
                  x.size(1) == 2 * pairs,
              "x: bfloat16 or float32 [M, K] with K the layer's inputs");
  TORCH_CHECK(n > 0 && n <= units * kCols, "n past the packed columns");
#ifndef __AVX512BF16__
  // no bf16 dot products: bfloat16 rows widened to float32 (exact), the float32 sums rounded
  // once to bfloat16, as the dot products' sums are
  if (!f32)
    return qpanel_linear(x.to(torch::kFloat), codes, scales, mins, n, tiles, paired)
        .to(torch::kBFloat16);
#endif
  x = x.contiguous();
  auto out = torch::empty({x.size(0), n}, x.options());
  const Params q{scales.data_ptr(), mins ? mins->data_ptr() : nullptr, half};
  const auto* cp = static_cast<const uint8_t*>(codes.data_ptr());
  if (f32) {
    float* op = out.data_ptr<float>();
    if (q8)
      multiply32<Q8>(x, cp, pairs, q, groups, units, n, op);
    else
      multiply32<Q4>(x, cp, pairs, q, groups, units, n, op);
    return out;
  }
#ifdef __AVX512BF16__
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  if (q8)
    multiply<Q8>(x, cp, pairs, q, groups, units, n, op, tiles, paired);
  else
    multiply<Q4>(x, cp, pairs, q, groups, units, n, op, tiles, paired);
#endif
  return out;
}

bool qpanel_paired() {
#ifdef __AVX512BF16__
  return paired_faster();
#else
  return false;
#endif
}

}  // namespace pytgi

#endif
