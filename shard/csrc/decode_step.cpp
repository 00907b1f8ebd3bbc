// A decode step of a Llama-style decoder, every layer in one C++ call
// (shard/models/cpu_step.py). It calls the kernels LlamaModel.forward calls through CpuOps,
// the linear layers and the reference backend, with the same inputs in the same order, so
// its hidden states equal that path's bit for bit; what it saves is the Python between
// them (~40 operations per layer, about 0.2 ms per layer on a 2-core AVX2 CPU).
//
// Per layer (B requests of one new token each, H query heads, KVH KV heads of D):
//   x = norm(hidden) | (hidden, x) = add_norm(hidden, mlp_out)
//   qkv = x Wqkv^T [B, (H + 2 KVH) D] -> q, k (per-head norms), rotated; v
//   k, v -> the caches at `slots`; attn = paged_decode(q) [B, H, D]
//   (hidden, x) = add_norm(hidden, attn Wo^T); mlp_out = down(SiLU(gate) * up)

#include "decode_step.h"

#include "kernels.h"
#include "quant.h"

#include <cstring>

namespace pytgi {

namespace {

// Plain weights: their panels (panel_linear) past one row, or for every row where the layer
// kept no row-major copy; else the single-row kernel.
torch::Tensor plain_product(const Projection& p, const torch::Tensor& x) {
#ifdef __AVX512F__
  if (p.panels.defined() && (x.size(0) > 1 || !p.weight.defined()))
    return panel_linear(x, p.panels, p.n);
#endif
  return linear_small(x, p.weight);
}

// Quantized weights: their panels (qpanel_linear) where packed, else quant.cpp's products.
torch::Tensor quantized_product(const Projection& p, const torch::Tensor& x) {
#ifdef PYTGI_QPANELS
  if (p.panels.defined())
    return qpanel_linear(x, p.panels, p.scales,
                         p.kind == Projection::kInt4 ? std::optional(p.mins) : std::nullopt, p.n);
#endif
  if (p.kind == Projection::kInt8) return q8_linear(x, p.weight, p.scales);
  return q4_linear(x, p.weight, p.scales, p.mins);
}

}  // namespace

torch::Tensor Projection::operator()(const torch::Tensor& x) const {
  torch::Tensor out;
  switch (kind) {
    case kPlain: out = plain_product(*this, x); break;
    case kInt8:
    case kInt4: out = quantized_product(*this, x); break;
    default: TORCH_CHECK(false, "unknown projection kind ", kind);
  }
  if (bias.defined()) out.add_(bias);
  return out;
}

Projection projection(int64_t kind, std::optional<torch::Tensor> weight,
                      std::optional<torch::Tensor> scales, std::optional<torch::Tensor> mins,
                      std::optional<torch::Tensor> bias, std::optional<torch::Tensor> panels,
                      int64_t n) {
  TORCH_CHECK(kind >= Projection::kPlain && kind <= Projection::kInt4, "unknown kind ", kind);
  TORCH_CHECK(kind == Projection::kPlain || scales.has_value(), "quantized forms need scales");
  TORCH_CHECK(kind != Projection::kInt4 || mins.has_value(), "int4 needs its mins");
  TORCH_CHECK(weight.has_value() || panels.has_value(), "a weight, or its panels");
#ifndef __AVX512F__
  TORCH_CHECK(!panels.has_value(), "panels need AVX-512, which this build lacks");
#endif
#ifndef PYTGI_QPANELS
  TORCH_CHECK(kind == Projection::kPlain || !panels.has_value(),
              "quantized panels need AVX-512 with bf16 dot products, which this build lacks");
#endif
  Projection p;
  p.kind = kind;
  if (weight) p.weight = weight->contiguous();
  if (panels) {
    TORCH_CHECK(n > 0, "panels: n > 0 output columns");
    p.panels = *panels;
    p.n = n;
  }
  if (scales) p.scales = *scales;
  if (mins) p.mins = *mins;
  if (bias) p.bias = *bias;
  return p;
}

DecodeStack::DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps,
                         double scale, torch::Tensor final_norm)
    : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale),
      final_norm_(final_norm) {
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "heads must be a multiple of KV heads");
}

void DecodeStack::add_layer(torch::Tensor input_norm, torch::Tensor post_norm, Projection qkv,
                            Projection o, Projection gate_up, Projection down, int64_t window,
                            std::optional<torch::Tensor> q_norm,
                            std::optional<torch::Tensor> k_norm) {
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q and k norms come together");
  DecodeLayer layer{input_norm, post_norm, {}, {}, qkv, o, gate_up, down, window};
  if (q_norm) {
    layer.q_norm = *q_norm;
    layer.k_norm = *k_norm;
  }
  layers_.push_back(std::move(layer));
}

namespace {

// Each new token's K or V row x[b] [KVH, D] (D and KVH contiguous within a row) into
// `cache` [N, BS, KVH, D] at slots[b]; slot -1 writes nothing.
void store_rows(const torch::Tensor& x, torch::Tensor& cache, const int64_t* slots) {
  TORCH_CHECK(x.scalar_type() == cache.scalar_type(), "K/V rows in the cache's dtype");
  const int64_t width = cache.size(2) * cache.size(3), bytes = width * cache.element_size();
  TORCH_CHECK(x.size(1) * x.size(2) == width && x.stride(2) == 1 && x.stride(1) == x.size(2),
              "K/V rows [B, KVH, D] with each row contiguous");
  auto* base = static_cast<char*>(cache.data_ptr());
  const auto* src = static_cast<const char*>(x.data_ptr());
  for (int64_t b = 0; b < x.size(0); ++b) {
    if (slots[b] < 0) continue;
    TORCH_CHECK(slots[b] < cache.size(0) * cache.size(1), "slot ", slots[b], " past the cache");
    std::memcpy(base + slots[b] * bytes, src + b * x.stride(0) * x.element_size(), bytes);
  }
}

}  // namespace

void store_kv(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor k, torch::Tensor v,
              torch::Tensor slots) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0) && v.size(0) == k.size(0),
              "slots [T] for k, v [T, KVH, D]");
  const auto slots64 = slots.to(torch::kInt64).contiguous();
  store_rows(k, k_cache, slots64.data_ptr<int64_t>());
  store_rows(v, v_cache, slots64.data_ptr<int64_t>());
}

namespace {

// 1 / scale rounded to float32, as shard.kv_cache.inverse (every fp8 writer multiplies by it).
double inverse(double scale) { return static_cast<double>(static_cast<float>(1.0 / scale)); }

}  // namespace

torch::Tensor DecodeStack::attention(const DecodeLayer& layer, const torch::Tensor& x,
                                     const torch::Tensor& cos, const torch::Tensor& sin,
                                     const torch::Tensor& slots, const torch::Tensor& tables,
                                     const torch::Tensor& context, torch::Tensor k_cache,
                                     torch::Tensor v_cache, double k_scale,
                                     double v_scale) const {
  const int64_t d = head_dim_, q_width = heads_ * d, kv_width = kv_heads_ * d, b = x.size(0);
  auto qkv = layer.qkv(x);  // [B, (H + 2 KVH) D]
  auto qk = qkv.narrow(1, 0, q_width + kv_width).view({b, heads_ + kv_heads_, d});
  if (layer.q_norm.defined()) {  // Qwen3: each head normalized with its weight, then joined
    // contiguous: with one KV head, k of several rows reshapes to a strided view
    auto q = rms_norm(qkv.narrow(1, 0, q_width).reshape({b * heads_, d}).contiguous(),
                      layer.q_norm, eps_);
    auto k = rms_norm(qkv.narrow(1, q_width, kv_width).reshape({b * kv_heads_, d}).contiguous(),
                      layer.k_norm, eps_);
    qk = torch::cat({q.view({b, heads_, d}), k.view({b, kv_heads_, d})}, 1);
  }
  auto rotated = rotate(qk, cos, sin);  // [B, H + KVH, D], contiguous
  auto k = rotated.narrow(1, heads_, kv_heads_);
  auto v = qkv.narrow(1, q_width + kv_width, kv_width).view({b, kv_heads_, d});
  if (k_cache.scalar_type() == torch::kFloat8_e4m3fn) {
    store_fp8(k_cache, v_cache, k, v, slots, inverse(k_scale), inverse(v_scale));
  } else {
    store_rows(k, k_cache, slots.data_ptr<int64_t>());
    store_rows(v, v_cache, slots.data_ptr<int64_t>());
  }
  auto attn = paged_decode(rotated.narrow(1, 0, heads_), k_cache, v_cache, tables, context,
                           scale_, layer.window, 0.0, k_scale, v_scale);
  return layer.o(attn.view({b, q_width}));
}

void DecodeStack::products(int64_t rows, const std::vector<int64_t>& widths) const {
  TORCH_CHECK(widths.size() == 4 && rows > 0, "products: rows > 0 and four input widths");
  std::vector<torch::Tensor> x;
  for (const int64_t width : widths) x.push_back(torch::zeros({rows, width}, final_norm_.options()));
  for (const DecodeLayer& layer : layers_) {
    layer.qkv(x[0]);
    layer.o(x[1]);
    layer.gate_up(x[2]);
    layer.down(x[3]);
  }
}

torch::Tensor DecodeStack::forward(torch::Tensor hidden, torch::Tensor cos, torch::Tensor sin,
                                   torch::Tensor slots, torch::Tensor tables,
                                   torch::Tensor context, const std::vector<torch::Tensor>& keys,
                                   const std::vector<torch::Tensor>& values,
                                   const std::vector<double>& k_scales,
                                   const std::vector<double>& v_scales) {
  const size_t n = layers_.size();
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous(), "hidden states [B, H]");
  const int64_t b = hidden.size(0);
  TORCH_CHECK(keys.size() == n && values.size() == n && k_scales.size() == n &&
                  v_scales.size() == n, "a cache and scales per layer");
  TORCH_CHECK(slots.numel() == b && slots.scalar_type() == torch::kInt64 &&
                  slots.is_contiguous(), "slots [B] int64");
  TORCH_CHECK(tables.size(0) == b && context.numel() == b && cos.size(0) == b,
              "a block table, context length and rotary row per request");
  torch::Tensor x, mlp_out;
  for (size_t i = 0; i < n; ++i) {
    const DecodeLayer& layer = layers_[i];
    if (i == 0) {
      x = rms_norm(hidden, layer.input_norm, eps_);
    } else {
      std::tie(hidden, x) = add_rms_norm(hidden, mlp_out, layer.input_norm, eps_);
    }
    auto out = attention(layer, x, cos, sin, slots, tables, context, keys[i], values[i],
                         k_scales[i], v_scales[i]);
    std::tie(hidden, x) = add_rms_norm(hidden, out, layer.post_norm, eps_);
    mlp_out = layer.down(silu_mul(layer.gate_up(x)));
  }
  if (n == 0) return rms_norm(hidden, final_norm_, eps_);
  return std::get<1>(add_rms_norm(hidden, mlp_out, final_norm_, eps_));
}

}  // namespace pytgi
