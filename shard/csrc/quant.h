// Weight-only quantized linear layers on CPU (quant.cpp); bound in cpu_kernels.cpp.
#pragma once
#include <torch/extension.h>

namespace pytgi {

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
// The weights [N, K] (in `like`'s dtype) that the two products above multiply by.
torch::Tensor q8_dequantize(torch::Tensor q, torch::Tensor scales, torch::Tensor like);
torch::Tensor q4_dequantize(torch::Tensor q, torch::Tensor scales, torch::Tensor mins,
                            torch::Tensor like);

}  // namespace pytgi
