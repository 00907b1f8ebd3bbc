// A decode step of a Llama-style decoder in one call (decode_step.cpp).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace pytgi {

// A linear layer as the step reads it: y = x w^T (+ bias) through the kernel for its form.
struct Projection {
  enum Kind : int64_t { kPlain = 0, kInt8 = 1, kInt4 = 2 };
  int64_t kind = kPlain;
  torch::Tensor weight;  // plain [N, K] in x's dtype; int8 [N, K]; int4 uint8 [N, K / 2]
  torch::Tensor scales, mins, bias;  // as quant.h (undefined where the form has none)
  // plain weights: pack_panels(weight) (kernels.h), which rows past one (every row without
  // `weight`) go through; quantized ones: qpanel_linear's codes (quant.h; `scales` and
  // `mins` then in its panels too), which every row goes through; else undefined
  torch::Tensor panels;
  int64_t n = 0;  // output columns
  torch::Tensor operator()(const torch::Tensor& x) const;
};

Projection projection(int64_t kind, std::optional<torch::Tensor> weight,
                      std::optional<torch::Tensor> scales, std::optional<torch::Tensor> mins,
                      std::optional<torch::Tensor> bias, std::optional<torch::Tensor> panels,
                      int64_t n);

struct DecodeLayer {
  torch::Tensor input_norm, post_norm;  // [hidden]
  torch::Tensor q_norm, k_norm;  // [D] per-head norms (Qwen3), else undefined
  Projection qkv, o, gate_up, down;
  int64_t window = 0;  // sliding-window keys, 0: all
};

// Every layer of a dense Llama-style decoder (Llama, Mistral, Qwen2/3, Phi-3) for one new
// token: the kernels and the order of LlamaModel.forward with CpuOps and the reference
// backend's CPU attention, so the hidden states are those, bit for bit.
class DecodeStack {
 public:
  DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale,
              torch::Tensor final_norm);
  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm, Projection qkv,
                 Projection o, Projection gate_up, Projection down, int64_t window,
                 std::optional<torch::Tensor> q_norm, std::optional<torch::Tensor> k_norm);
  // B requests of one new token each: hidden [B, H] (their embeddings); cos, sin [B, R / 2]
  // in hidden's dtype; slots [B] int64 (each token's cache slot, -1: not stored); tables
  // [B, W] int64 block ids; context [B] int64 (tokens attended, the new one included);
  // keys, values: each layer's cache [N, BS, KVH, D]; k_scales, v_scales: each layer's fp8
  // scales (1 for caches in hidden's dtype). Returns the final norm's output [B, H]; writes
  // the tokens' K/V into every layer's cache.
  torch::Tensor forward(torch::Tensor hidden, torch::Tensor cos, torch::Tensor sin,
                        torch::Tensor slots, torch::Tensor tables, torch::Tensor context,
                        const std::vector<torch::Tensor>& keys,
                        const std::vector<torch::Tensor>& values,
                        const std::vector<double>& k_scales, const std::vector<double>& v_scales);
  // Every layer's four projections, back to back, each on `rows` zero rows of its input
  // width: widths = {hidden, H D, hidden, intermediate} (QKV, output, gate/up, down). What
  // forward's products cost without the rest of the step (benchmarks/cpu_limits.py).
  void products(int64_t rows, const std::vector<int64_t>& widths) const;
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  torch::Tensor attention(const DecodeLayer& layer, const torch::Tensor& x,
                          const torch::Tensor& cos, const torch::Tensor& sin,
                          const torch::Tensor& slots, const torch::Tensor& tables,
                          const torch::Tensor& context, torch::Tensor k_cache,
                          torch::Tensor v_cache, double k_scale, double v_scale) const;

  int64_t heads_, kv_heads_, head_dim_;
  double eps_, scale_;
  torch::Tensor final_norm_;
  std::vector<DecodeLayer> layers_;
};

}  // namespace pytgi
