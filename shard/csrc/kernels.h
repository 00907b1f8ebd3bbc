// CPU kernels of a decoder layer's steps (cpu_kernels.cpp; the row-wise norms, rotary and
// SiLU in pointwise.cpp); bound in bindings.cpp.
// Shapes and rounding are documented where each is defined.
#pragma once
#include <torch/extension.h>

#include <tuple>

namespace pytgi {

// Decode attention: q [B, H, D] over paged caches [N, BS, KVH, D] -> [B, H, D].
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                           torch::Tensor tables, torch::Tensor context, double scale,
                           int64_t window, double softcap, double k_scale, double v_scale);
#ifdef __AVX512F__
// Causal attention of a prefill's n new tokens q [n, H, D] over its keys k, v [ctx, KVH, D]
// (ctx >= n: a cached prefix then the new tokens) -> [n, H, D], float32 and, where the CPU
// has bf16 dot products, bfloat16 (prefill.cpp; bindings.cpp lists them as prefill_dtypes).
// `tiles`: bfloat16 on AMX tiles where the build and Linux allow (else the dot products).
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale,
                                bool tiles = true);
#endif
#ifdef __AVX512F__
// Weights w [N, K] packed for panel_linear (panels.cpp): float32 [P, K, 16]; bfloat16 (K even,
// with bf16 dot products) [P, K / 2, 16] int32, a pair of inputs per word.
torch::Tensor pack_panels(torch::Tensor w);
// x [M, K] @ w^T for pack_panels(w) -> [M, N] in x's dtype (float32 sums; bfloat16 rounded
// once); x float32 with float32 panels, bfloat16 with bfloat16 ones. `tiles`: bfloat16
// products of kAmxRows rows or more on AMX tiles where the build and Linux allow (amx.cpp).
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor packed, int64_t n, bool tiles = true);
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define PYTGI_AMX 1
// AMX tiles (amx.cpp). panel_linear's bfloat16 products of kAmxRows rows or more take them
// where amx_ready(): whether Linux lets this process use them (asked once).
constexpr int64_t kAmxRows = 1;
bool amx_ready();
// This thread's eight tiles as 16 rows x 64 bytes (palette 1); _tile_release() when done.
void configure_tiles();
// x [m, k] bfloat16 (k a multiple of 32) @ bfloat16 panels [panels, k / 2, 16] -> out [m, n].
void amx_linear(const uint16_t* x, int64_t m, int64_t k, const int32_t* packed, int64_t panels,
                int64_t n, uint16_t* out);
#endif
// New K/V rows [T, KVH, D] (each row's KVH * D values contiguous) into caches of their dtype
// [N, BS, KVH, D] at `slots` [T] (-1: skipped); decode_step.cpp.
void store_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor slots);
// New K/V rows [T, KVH, D] into fp8 caches at `slots` [T], multiplied by inv_k / inv_v.
void store_fp8(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
               torch::Tensor slots, double inv_k, double inv_v);
// x [M, K] @ w [N, K]^T for a few rows M, in x's dtype (float32 or bfloat16).
torch::Tensor linear_small(torch::Tensor x, torch::Tensor w);
// RMSNorm of x [T, H] scaled by weight [H].
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
// (x + delta, RMSNorm(x + delta)) for x, delta [T, H].
std::tuple<torch::Tensor, torch::Tensor> add_rms_norm(torch::Tensor x, torch::Tensor delta,
                                                      torch::Tensor weight, double eps);
// Rotary embedding of x [T, heads, D] with cos, sin [T, R / 2] -> contiguous [T, heads, D].
torch::Tensor rotate(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
// gate_up [T, 2I] (gate first) -> SiLU(gate) * up [T, I].
torch::Tensor silu_mul(torch::Tensor gate_up);
// The greedy choice of each row of float32 logits [R, V]: (its first argmax int64 [R], that
// token's log-probability max - logsumexp float32 [R]), two passes over each row.
std::tuple<torch::Tensor, torch::Tensor> greedy(torch::Tensor logits);

}  // namespace pytgi
