// Weight-only quantized linear layers on CPU (quant.cpp); bound in cpu_kernels.cpp.
#pragma once
#include <torch/extension.h>

namespace pytgi {

// Rows up to which q8_linear / q4_linear multiply (more go through dequantized tiles and
// torch's GEMM: shard/models/quant.py). With AVX-512 their 12 x 16 panel product outran the
// tiles at every row count measured (Zen 5, 2 cores, SmolLM2 int8 prefill: 128 tokens 112
// vs 233 ms, 8 x 128 799 vs 1219); with AVX2 the tiles won from about 128 rows (measured
// against the earlier 4 x 3 tile, not yet against the 6 x 16 panel).
#if defined(__AVX512F__) && defined(__AVX512BW__)
constexpr int64_t kKernelRows = int64_t{1} << 30;
#else
constexpr int64_t kKernelRows = 64;
#endif

// x [M, K] float32 or bfloat16 -> [M, N] in x's dtype.
// int8: q int8 [N, K]; scales float16 (or float32: GGUF's Q6_K) [N, G], G = K / g groups of
//   g inputs (G = 1: one scale per output channel); w[n, k] = scales[n, k / g] * q[n, k].
torch::Tensor q8_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales);
// int4: q uint8 [N, K / 2], GGML's block layout: inputs in blocks of 32, byte j of a block
//   holding input j in its low nibble and input j + 16 in its high nibble; scales float16 (or
//   float32: GGUF's Q4_K, a float16 times a 6-bit integer) and
//   mins float32, [N, G] (g a multiple of 32); w[n, k] = scales[n, k / g] * nibble + mins[n, k / g]
//   (a float32 min holds GPTQ's and AWQ's -scale * zero exactly).
torch::Tensor q4_linear(torch::Tensor x, torch::Tensor q, torch::Tensor scales,
                        torch::Tensor mins);
// x [M, K] @ w [N, K]^T for bfloat16 w, in x's dtype, on CPUs without bf16 instructions
//   (where oneDNN's bfloat16 products are several times slower than float32): the rows of w
//   widened to float32 three at a time into L1 and multiplied as `q8_linear`'s many-row path
//   does; float32 products and sums, rounded once at the end.
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor w);
#if defined(__AVX512F__) && defined(__AVX512BW__)
// x [M, K] @ w^T -> [M, n] in x's dtype (float32 or bfloat16: by bf16 dot products where the
//   CPU has them, else widened to float32 rows; AVX-512 F and BW) for weights in quantized
//   panels (qpanels.cpp; packed by shard/models/qpanels.py): codes int8 [U, K / 2, 64]
//   (w = scale q) or uint8 [U, K / 4, 64] (int4: w = scale q + min), scales and int4's mins
//   [U, G, 32] in float16 or float32 (both the same), U = ceil(n / 32) units of 32 output
//   columns. float32 sums; bfloat16 outputs rounded once. `tiles`: bfloat16 batches of
//   kQTileRows rows or more on AMX tiles where the build and Linux allow (qpanels.cpp).
//   `paired`: bfloat16 int8 products of up to 4 rows by float32 multiply-adds (true) or bf16
//   dot products (false); unset: whichever this CPU runs faster (qpanel_paired()).
torch::Tensor qpanel_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales,
                            std::optional<torch::Tensor> mins, int64_t n, bool tiles = true,
                            std::optional<bool> paired = std::nullopt);
// Whether qpanel_linear's few-row bfloat16 int8 products take float32 multiply-adds here.
bool qpanel_paired();
// bfloat16 rows from which qpanel_linear multiplies on AMX tiles (where it can): from 8 rows
// they were faster than the dot products, at 4 slower (qpanels.cpp).
constexpr int64_t kQTileRows = 8;
#define PYTGI_QPANELS 1
#endif
// The weights [N, K] (in `like`'s dtype) that the two products above multiply by.
torch::Tensor q8_dequantize(torch::Tensor q, torch::Tensor scales, torch::Tensor like);
torch::Tensor q4_dequantize(torch::Tensor q, torch::Tensor scales, torch::Tensor mins,
                            torch::Tensor like);

}  // namespace pytgi
