// Prefill attention on CPU (kernels.h: prefill_attention), with AVX-512: float32, and
// bfloat16: by bf16 dot products where the CPU has them (AVX512_BF16), else widened to
// float32 lanes as q, K and V are packed, the output rounded once (as the panels widen;
// SDPA's bfloat16 path there took 1.09x float32's prefill of 512 tokens).
// Without AVX-512 prefill rows take PyTorch's SDPA.
//
// Shapes: q [n, H, D] (D contiguous, heads adjacent, any row stride); k, v [ctx, KVH, D]
// (ctx >= n: a cached prefix, then the n new tokens; D contiguous); out [n, H, D]
// contiguous. Query i sees keys 0 .. ctx - n + i. H = KVH * G: query head h reads KV head
// h / G. Work is split over (query head, block of kPrefillRows queries) with ATen's pool.
//
// Per task, kPrefillRows query rows of one query head: scores of 16 keys at a time from keys
// packed with a key per 32-bit lane (kt: [KVH][ctx16 / 16][D / W][16], W dims per lane: one
// float32, or a pair of bfloat16 for vdpbf16ps; a chunk of 16 keys' lanes contiguous, so a
// chunk's scores read one stream, not D / W rows ctx16 lanes apart that share L1 sets), each
// query's lane of dims (the task's rows gathered as lanes first) broadcast against them, so
// no horizontal sums; a float32 softmax over each row's causal prefix, in 16 lanes; its
// probabilities (bfloat16 dot products: rounded, in pairs of keys) against the values
// packed with W keys per lane (vt: [KVH][ctx16 / W][D]), a few rows x D / 16 sums in
// registers. ctx16: the keys rounded up to 32, zeros past ctx. Against PyTorch's SDPA (its CPU flash attention),
// SmolLM2's 9 query heads over 3 KV heads of 64, bfloat16, Zen 5, 2 threads: 5.9x its speed
// at 128 tokens, 5.8x at 512, 3.2x at 2048. With AMX, bfloat16 on the tiles (PrefillTiles):
// 2.2x / 2.6x / 2.8x the dot products' speed at 128 / 512 / 2048 tokens (Xeon, 2 threads).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernels.h"
#include "vec_exp.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>

namespace pytgi {
namespace {

constexpr int64_t kPrefillRows = 8;

// float32 q, K, V: a lane holds one dim (kt) or one key (vt); sums by multiply-adds.
struct F32 {
  using Elem = float;                 // of q, k, v and out
  static constexpr int64_t kPer = 1;  // dims (kt) or keys (vt) per 32-bit lane
  // The lane of kPer elements from p.
  static uint32_t lane(const Elem* p) {
    uint32_t bits;
    std::memcpy(&bits, p, sizeof bits);
    return bits;
  }
  static __m512 madd(__m512 acc, uint32_t lane, const uint32_t* vec) {
    float x;
    std::memcpy(&x, &lane, sizeof x);
    return _mm512_fmadd_ps(_mm512_set1_ps(x), _mm512_loadu_ps(vec), acc);
  }
  // 32 probabilities s[0..32) times inv into 32 lanes at out.
  static void probs(const float* s, __m512 inv, uint32_t* out) {
    _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_loadu_ps(s), inv));
    _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_loadu_ps(s + 16), inv));
  }
  static void store(__m512 sums, float* out) { _mm512_storeu_ps(out, sums); }
};

#ifdef __AVX512BF16__
// bfloat16 q, K, V: a lane holds a pair of dims (kt) or of keys (vt); sums by bf16 dot
// products (each product exact in float32); probabilities rounded to bfloat16.
struct Bf16 {
  using Elem = uint16_t;
  static constexpr int64_t kPer = 2;
  static uint32_t lane(const Elem* p) {
    uint32_t bits;
    std::memcpy(&bits, p, sizeof bits);
    return bits;
  }
  static __m512 madd(__m512 acc, uint32_t lane, const uint32_t* vec) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_set1_epi32(static_cast<int>(lane)),
                            (__m512bh)_mm512_loadu_si512(vec));
  }
  // 32 probabilities s[0..32) times inv as 16 lanes of pairs at out.
  static void probs(const float* s, __m512 inv, uint32_t* out) {
    const __m512 lo = _mm512_mul_ps(_mm512_loadu_ps(s), inv);
    const __m512 hi = _mm512_mul_ps(_mm512_loadu_ps(s + 16), inv);
    _mm512_storeu_si512(out, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
  static void store(__m512 sums, uint16_t* out) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(sums));
  }
};
#else
// bfloat16 q, K, V without bf16 dot products: each element widened to a float32 lane (exact)
// as it is packed, the float32 form's sums, each output rounded once as c10 rounds.
struct Bf16Wide : F32 {
  using Elem = uint16_t;
  static uint32_t lane(const Elem* p) { return static_cast<uint32_t>(*p) << 16; }
  static void store(__m512 sums, uint16_t* out) {
    store_bf16(out, _mm512_castps512_ps256(sums));
    store_bf16(out + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(sums), 1)));
  }
};
#endif

// scores[r][0 .. chunks * 16) = scale * q_r . k_j for the R (<= kPrefillRows) rows q_r (each
// `lanes` lanes at q + r * q_row), keys from kt (one KV head's [ctx16 / 16][lanes][16]).
template <typename Form, int R>
inline void prefill_scores(const uint32_t* q, int64_t q_row, const uint32_t* kt, int64_t lanes,
                           int64_t chunks, float scale, float* scores, int64_t s_row) {
  for (int64_t c = 0; c < chunks; ++c) {
    const uint32_t* chunk = kt + c * lanes * 16;
    __m512 a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < lanes; p += 2)  // two chains per row
      for (int r = 0; r < R; ++r) {
        a[r][0] = Form::madd(a[r][0], q[r * q_row + p], chunk + p * 16);
        a[r][1] = Form::madd(a[r][1], q[r * q_row + p + 1], chunk + (p + 1) * 16);
      }
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(scores + r * s_row + c * 16,
                       _mm512_mul_ps(_mm512_add_ps(a[r][0], a[r][1]), _mm512_set1_ps(scale)));
  }
}

// out rows r < R = sum over lanes jp < n_lanes of probs[r][jp] times vt's lane row jp, D =
// 16 * U dims.
template <typename Form, int R, int U>
inline void prefill_values(const uint32_t* probs, int64_t p_row, const uint32_t* vt,
                           int64_t n_lanes, typename Form::Elem* out, int64_t out_row) {
  __m512 a[R][U];
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) a[r][u] = _mm512_setzero_ps();
  for (int64_t jp = 0; jp < n_lanes; ++jp)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u)
        a[r][u] = Form::madd(a[r][u], probs[r * p_row + jp], vt + (jp * U + u) * 16);
  for (int r = 0; r < R; ++r)
    for (int u = 0; u < U; ++u) Form::store(a[r][u], out + r * out_row + u * 16);
}

// Row r's scores [0, keys) -> its softmax, as Form::probs lays it out, into
// probs[0 .. lanes_out) (zeros past keys); s has room for kPer * lanes_out >= keys floats,
// a multiple of 32.
template <typename Form>
inline void prefill_softmax(float* s, int64_t keys, int64_t lanes_out, uint32_t* probs) {
  auto in = [keys](int64_t j) {  // the lanes of s[j .. j + 16) below keys
    return static_cast<__mmask16>(keys - j >= 16 ? 0xFFFF : (1u << (keys - j)) - 1);
  };
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 tops = lowest;
  for (int64_t j = 0; j < keys; j += 16)
    tops = _mm512_max_ps(tops, _mm512_mask_loadu_ps(lowest, in(j), s + j));
  const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(tops));
  __m512 total = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j < keys; j += 16) {  // e^(s - top), zero past keys
    const __m512 e = _mm512_maskz_mov_ps(in(j), exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), top)));
    _mm512_storeu_ps(s + j, e);
    total = _mm512_add_ps(total, e);
  }
  const int64_t values = Form::kPer * lanes_out;
  for (; j < values; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(total));
  for (int64_t v = 0; v < values; v += 32) Form::probs(s + v, inv, probs + v / Form::kPer);
}

// kt and vt (layouts above) of every KV head of k, v [ctx, KVH, D].
template <typename Form>
void pack(const torch::Tensor& k, const torch::Tensor& v, int64_t ctx16, std::vector<uint32_t>& kt,
          std::vector<uint32_t>& vt) {
  using E = typename Form::Elem;
  constexpr int64_t W = Form::kPer;
  const int64_t ctx = k.size(0), kv_heads = k.size(1), d = k.size(2), lanes = d / W;
  const auto* kp = static_cast<const E*>(k.data_ptr());
  const auto* vp = static_cast<const E*>(v.data_ptr());
  kt.assign(kv_heads * lanes * ctx16, 0);
  vt.assign(kv_heads * ctx16 / W * d, 0);
  at::parallel_for(0, kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      for (int64_t j = 0; j < ctx; ++j) {
        const E* key = kp + j * k.stride(0) + h * k.stride(1);
        const E* val = vp + j * v.stride(0) + h * v.stride(1);
        for (int64_t p = 0; p < lanes; ++p)
          kt[((h * ctx16 + j / 16 * 16) * lanes + p * 16) + j % 16] = Form::lane(key + W * p);
        uint32_t* row = vt.data() + (h * ctx16 / W + j / W) * d;
        if constexpr (W == 1) {
          for (int64_t i = 0; i < d; ++i) row[i] = Form::lane(val + i);
        } else {  // key j's values at the (j % W)th element of each lane
          auto* elems = reinterpret_cast<E*>(row);
          for (int64_t i = 0; i < d; ++i) elems[W * i + j % W] = val[i];
        }
      }
  });
}

// One call's shapes and packed keys; `rows` attends one task's queries.
template <typename Form>
struct Prefill {
  using FormT = Form;
  using E = typename Form::Elem;
  static constexpr int64_t kRows = kPrefillRows;  // a task's query rows
  static void enter() {}                          // each thread, before and after its tasks
  static void leave() {}
  int64_t n, ctx, heads, d, group, ctx16;
  const E* q;  // [n, H, D], rows q_row elements apart
  int64_t q_row;
  const std::vector<uint32_t>& kt;
  const std::vector<uint32_t>& vt;
  float scale;
  E* out;  // [n, H, D]

  // out rows i0 .. i0 + rows (<= kPrefillRows) of query head hq; scores, probs: room for
  // kPrefillRows rows of ctx16 floats and ctx16 / kPer lanes.
  void rows(int64_t hq, int64_t i0, int64_t rows, float* scores, uint32_t* probs) const {
    constexpr int64_t W = Form::kPer;
    const int64_t h = hq / group, lanes = d / W, p_row = ctx16 / W;
    const int64_t last_keys = ctx - n + i0 + rows;  // keys the block's last row sees
    const int64_t chunks = (last_keys + 15) / 16, n_lanes = (last_keys + W - 1) / W;
    uint32_t qr[kPrefillRows * 128];  // the block's queries as lanes, `lanes` a row
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t p = 0; p < lanes; ++p)
        qr[r * lanes + p] = Form::lane(q + (i0 + r) * q_row + hq * d + W * p);
    const uint32_t* kh = kt.data() + h * lanes * ctx16;
#define PYTGI_PREFILL_SCORES(R) \
  if (rows == R) prefill_scores<Form, R>(qr, lanes, kh, lanes, chunks, scale, scores, ctx16);
    PYTGI_PREFILL_SCORES(1) PYTGI_PREFILL_SCORES(2) PYTGI_PREFILL_SCORES(3) PYTGI_PREFILL_SCORES(4)
    PYTGI_PREFILL_SCORES(5) PYTGI_PREFILL_SCORES(6) PYTGI_PREFILL_SCORES(7) PYTGI_PREFILL_SCORES(8)
#undef PYTGI_PREFILL_SCORES
    const int64_t lanes_out = (n_lanes * W + 31) / 32 * 32 / W;
    for (int64_t r = 0; r < rows; ++r)
      prefill_softmax<Form>(scores + r * ctx16, ctx - n + i0 + r + 1, lanes_out, probs + r * p_row);
    const uint32_t* vh = vt.data() + h * p_row * d;
    const int64_t per_pass = d <= 64 ? 4 : 2;  // rows x D / 16 sums within the 32 registers
    for (int64_t r0 = 0; r0 < rows; r0 += per_pass) {
      const int64_t rr = std::min(per_pass, rows - r0);
      const uint32_t* pr = probs + r0 * p_row;
      E* o = out + ((i0 + r0) * heads + hq) * d;
#define PYTGI_PREFILL_VALUES(R, U) \
  if (rr == R && d == 16 * U) prefill_values<Form, R, U>(pr, p_row, vh, n_lanes, o, heads * d);
      PYTGI_PREFILL_VALUES(1, 2) PYTGI_PREFILL_VALUES(2, 2) PYTGI_PREFILL_VALUES(3, 2)
      PYTGI_PREFILL_VALUES(4, 2) PYTGI_PREFILL_VALUES(1, 4) PYTGI_PREFILL_VALUES(2, 4)
      PYTGI_PREFILL_VALUES(3, 4) PYTGI_PREFILL_VALUES(4, 4) PYTGI_PREFILL_VALUES(1, 6)
      PYTGI_PREFILL_VALUES(2, 6) PYTGI_PREFILL_VALUES(1, 8) PYTGI_PREFILL_VALUES(2, 8)
#undef PYTGI_PREFILL_VALUES
    }
  }
};

#ifdef PYTGI_AMX
// bfloat16 on AMX tiles (amx.cpp's eight tiles of 16 rows x 64 bytes), a task 16 query rows
// of one head. Bf16's packed keys are the scores' B operands as they are: a chunk of 16 keys
// is D / 2 rows of 16 lanes, each lane a pair of dims (a tile of 16 pairs: 64 bytes a row).
// The values' B operands too: vt's row of D lanes, each a pair of keys, so 16 key pairs x 16
// dims is a tile with a stride of D lanes. A operands: the task's queries gathered into 16
// zero-padded rows of D (32 dims a tile), then its probabilities (16 pairs of keys a tile,
// Bf16::probs' layout, zeros past each row's keys). The tile unit rounds its float32 sums
// its own way (amx.cpp): outputs within bfloat16's rounding of the dot products'.
constexpr int64_t kTileRows = 16;

// gcc's tile intrinsics stringify their tile numbers: a literal each, hence the macros.
#define PYTGI_TILE_MADD(T, b, bs) \
  do {                            \
    _tile_loadd(6, b, bs);        \
    _tile_dpbf16ps(T, 4, 6);      \
  } while (0)

inline void tile_zero4() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Sum tiles 0 .. count - 1 (count <= 4): += A tile 4 x B tile at b[t] (stride bs bytes).
inline void tiles_madd(int64_t count, const void* const b[4], int64_t bs) {
  PYTGI_TILE_MADD(0, b[0], bs);
  if (count > 1) PYTGI_TILE_MADD(1, b[1], bs);
  if (count > 2) PYTGI_TILE_MADD(2, b[2], bs);
  if (count > 3) PYTGI_TILE_MADD(3, b[3], bs);
}
#undef PYTGI_TILE_MADD

// Sum tiles 0 .. count - 1 -> sums[t] (16 x 16 float32 each).
inline void tiles_store(int64_t count, float (*sums)[kTileRows * kTileRows]) {
  constexpr int64_t stride = kTileRows * sizeof(float);
  _tile_stored(0, sums[0], stride);
  if (count > 1) _tile_stored(1, sums[1], stride);
  if (count > 2) _tile_stored(2, sums[2], stride);
  if (count > 3) _tile_stored(3, sums[3], stride);
}

struct PrefillTiles {
  using FormT = Bf16;
  using E = uint16_t;
  static constexpr int64_t kRows = kTileRows;
  static void enter() { configure_tiles(); }
  static void leave() { _tile_release(); }
  int64_t n, ctx, heads, d, group, ctx16;
  const E* q;  // [n, H, D], rows q_row elements apart
  int64_t q_row;
  const std::vector<uint32_t>& kt;  // Bf16's layouts (pack<Bf16>)
  const std::vector<uint32_t>& vt;
  float scale;
  E* out;  // [n, H, D]

  // out rows i0 .. i0 + rows (<= 16) of query head hq; scores: room for 16 rows of ctx16
  // floats, probs for 16 rows of ctx16 / 2 lanes.
  void rows(int64_t hq, int64_t i0, int64_t rows, float* scores, uint32_t* probs) const {
    const int64_t h = hq / group, lanes = d / 2, p_row = ctx16 / 2;
    const int64_t last_keys = ctx - n + i0 + rows;  // keys the block's last row sees
    const int64_t chunks = (last_keys + 15) / 16;
    alignas(64) E qr[kTileRows * 128] = {};  // the task's queries, zero rows past `rows`
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(qr + r * d, q + (i0 + r) * q_row + hq * d, d * sizeof(E));
    const uint32_t* kh = kt.data() + h * lanes * ctx16;
    alignas(64) float sums[4][kTileRows * kTileRows];
    for (int64_t c0 = 0; c0 < chunks; c0 += 4) {  // scores of up to 4 chunks of 16 keys
      const int64_t count = std::min<int64_t>(4, chunks - c0);
      tile_zero4();
      for (int64_t t = 0; t < d / 32; ++t) {  // 32 dims: A tile 4, a B tile per chunk
        _tile_loadd(4, qr + 32 * t, d * sizeof(E));
        const void* b[4];
        for (int64_t c = 0; c < count; ++c) b[c] = kh + ((c0 + c) * lanes + 16 * t) * 16;
        tiles_madd(count, b, 64);
      }
      tiles_store(count, sums);
      const __m512 s = _mm512_set1_ps(scale);
      for (int64_t c = 0; c < count; ++c)
        for (int64_t r = 0; r < kTileRows; ++r)
          _mm512_storeu_ps(scores + r * ctx16 + (c0 + c) * 16,
                           _mm512_mul_ps(_mm512_load_ps(sums[c] + r * kTileRows), s));
    }
    const int64_t n_lanes = (last_keys + 1) / 2, lanes_out = (n_lanes + 15) / 16 * 16;
    for (int64_t r = 0; r < rows; ++r)
      prefill_softmax<Bf16>(scores + r * ctx16, ctx - n + i0 + r + 1, lanes_out, probs + r * p_row);
    for (int64_t r = rows; r < kTileRows; ++r)
      std::memset(probs + r * p_row, 0, lanes_out * sizeof(uint32_t));
    const uint32_t* vh = vt.data() + h * p_row * d;
    for (int64_t u0 = 0; u0 < d / 16; u0 += 4) {  // up to 4 blocks of 16 output dims
      const int64_t count = std::min<int64_t>(4, d / 16 - u0);
      tile_zero4();
      for (int64_t b0 = 0; b0 < lanes_out; b0 += 16) {  // 16 pairs of keys
        _tile_loadd(4, probs + b0, p_row * sizeof(uint32_t));
        const void* b[4];
        for (int64_t u = 0; u < count; ++u) b[u] = vh + b0 * d + (u0 + u) * 16;
        tiles_madd(count, b, d * sizeof(uint32_t));
      }
      tiles_store(count, sums);
      for (int64_t u = 0; u < count; ++u)
        for (int64_t r = 0; r < rows; ++r)
          Bf16::store(_mm512_load_ps(sums[u] + r * kTileRows),
                      out + ((i0 + r) * heads + hq) * d + (u0 + u) * 16);
    }
  }
};

#endif  // PYTGI_AMX

// One call: K and V packed for the job's form, then its tasks (Job::kRows query rows of one
// head each) over ATen's pool.
template <typename Job>
torch::Tensor attend_prefill(const torch::Tensor& q, const torch::Tensor& k,
                             const torch::Tensor& v, double scale) {
  using Form = typename Job::FormT;
  using E = typename Form::Elem;
  const int64_t n = q.size(0), heads = q.size(1), d = q.size(2), ctx = k.size(0);
  const int64_t ctx16 = (ctx + 31) / 32 * 32;
  std::vector<uint32_t> kt, vt;
  pack<Form>(k, v, ctx16, kt, vt);
  auto out = torch::empty({n, heads, d}, q.options().memory_format(at::MemoryFormat::Contiguous));
  const Job job{n, ctx, heads, d, heads / k.size(1), ctx16,
                static_cast<const E*>(q.data_ptr()), q.stride(0), kt, vt,
                static_cast<float>(scale), static_cast<E*>(out.data_ptr())};
  const int64_t blocks = (n + Job::kRows - 1) / Job::kRows;
  at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
    Job::enter();
    std::vector<float> scores(Job::kRows * ctx16);
    std::vector<uint32_t> probs(Job::kRows * ctx16);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t hq = task / blocks, i0 = task % blocks * Job::kRows;
      job.rows(hq, i0, std::min(Job::kRows, n - i0), scores.data(), probs.data());
    }
    Job::leave();
  });
  return out;
}

}  // namespace

torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                                bool tiles) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q [n, H, D], k and v [ctx, KVH, D]");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype, "q, k and v dtypes differ");
  const int64_t n = q.size(0), heads = q.size(1), d = q.size(2), ctx = k.size(0);
  TORCH_CHECK(v.sizes() == k.sizes() && k.size(2) == d && ctx >= n && heads % k.size(1) == 0,
              "k, v [ctx >= n, KVH | H, D]");
  TORCH_CHECK(d % 32 == 0 && d <= 128, "head size a multiple of 32, at most 128");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && q.stride(1) == d,
              "each head's D values contiguous, heads adjacent");
  if (dtype == torch::kFloat) return attend_prefill<Prefill<F32>>(q, k, v, scale);
#ifdef PYTGI_AMX
  if (dtype == torch::kBFloat16 && tiles && amx_ready())
    return attend_prefill<PrefillTiles>(q, k, v, scale);
#endif
#ifdef __AVX512BF16__
  if (dtype == torch::kBFloat16) return attend_prefill<Prefill<Bf16>>(q, k, v, scale);
#else
  if (dtype == torch::kBFloat16) return attend_prefill<Prefill<Bf16Wide>>(q, k, v, scale);
#endif
  TORCH_CHECK(false, "prefill_attention: ", dtype, " is not among prefill_dtypes here");
}

}  // namespace pytgi
#endif
