// The Python module of the CPU kernels (shard/cpu_kernels.py loads it).

#include <torch/extension.h>

#include <pybind11/stl.h>

#include "decode_step.h"
#include "kernels.h"
#include "quant.h"

namespace py = pybind11;
using namespace pytgi;

// Every kernel runs without the GIL: its arguments are converted before and its result
// after, and it touches no Python object. The shard's gRPC handlers (its event loop's
// thread: the next call's request, Info) then run while the engine's thread is inside a
// kernel, not after it (a bfloat16 step of 32 is tens of ms, a long prefill's attention
// more). Served decode at concurrency 1 moved by no more than the noise (RESULTS.md).
const auto nogil = py::call_guard<py::gil_scoped_release>();

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "paged decode attention on CPU", nogil);
#ifdef __AVX512F__
  m.def("prefill_attention", &prefill_attention, "causal prefill attention (kernels.h)", nogil,
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("tiles") = true);
  m.def("pack_panels", &pack_panels, "weights [N, K] -> panel_linear's panels (kernels.h)", nogil);
  m.def("panel_linear", &panel_linear, "x [M, K] @ packed w^T (kernels.h)", nogil, py::arg("x"),
        py::arg("packed"), py::arg("n"), py::arg("tiles") = true);
#endif
#ifdef PYTGI_AMX
  m.def("amx_ready", &amx_ready, "whether Linux lets this process use AMX tiles");
  m.attr("amx_rows") = kAmxRows;  // bfloat16 panel products of this many rows take the tiles
#else
  m.attr("amx_rows") = 0;  // this build has no AMX path
#endif
#ifdef __AVX512F__
  // bfloat16 prefills by bf16 dot products, else widened to float32 (prefill.cpp)
  m.attr("prefill_dtypes") = std::vector<std::string>{"float32", "bfloat16"};
  // bfloat16 panels by bf16 dot products, else widened to float32 (AVX-512 BW; panels.cpp)
#if defined(__AVX512BF16__) || defined(__AVX512BW__)
  m.attr("panel_dtypes") = std::vector<std::string>{"float32", "bfloat16"};
#else
  m.attr("panel_dtypes") = std::vector<std::string>{"float32"};
#endif
#ifdef __AVX512BF16__
  m.attr("panel_widens_bfloat16") = false;
#else
  m.attr("panel_widens_bfloat16") = true;
#endif
#endif
  m.def("store_kv", &store_kv, "new K/V rows into caches of their dtype at their slots", nogil);
  m.def("store_fp8", &store_fp8, "new K/V rows into fp8 caches at their slots", nogil);
  m.def("linear_small", &linear_small, "x [M, K] @ w[N, K]^T for small M", nogil);
  m.def("rms_norm", &rms_norm, "RMSNorm of x [T, H] scaled by weight [H]", nogil);
  m.def("add_rms_norm", &add_rms_norm, "(x + delta, RMSNorm(x + delta)) for x, delta [T, H]",
        nogil);
  m.def("rotate", &rotate, "rotary embedding of x [T, heads, D] -> contiguous copy", nogil);
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up for gate_up [T, 2I]", nogil);
  m.def("greedy", &greedy, "each row's first argmax of float32 logits and its log-probability",
        nogil);
  m.def("q8_linear", &q8_linear, "x [M, K] @ int8 w[N, K]^T (quant.h)", nogil);
  m.def("q4_linear", &q4_linear, "x [M, K] @ int4 w[N, K]^T (quant.h)", nogil);
  m.def("bf16_linear", &bf16_linear, "x [M, K] @ bfloat16 w[N, K]^T, rows widened (quant.h)",
        nogil);
#ifdef PYTGI_QPANELS
  m.def("qpanel_linear", &qpanel_linear, "x [M, K] @ quantized panels^T (quant.h)", nogil,
        py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("mins"), py::arg("n"),
        py::arg("tiles") = true, py::arg("paired") = py::none());
  m.def("qpanel_paired", &qpanel_paired,
        "whether few-row bfloat16 int8 panel products take float32 multiply-adds on this CPU");
#ifdef PYTGI_AMX
  m.attr("amx_qpanel_rows") = kQTileRows;  // bfloat16 rows of quantized panels on the tiles
#else
  m.attr("amx_qpanel_rows") = 0;
#endif
  // bfloat16 rows by bf16 dot products, else widened to float32 (qpanels.cpp)
  m.attr("qpanel_dtypes") = std::vector<std::string>{"float32", "bfloat16"};
#endif
  m.attr("max_rows") = kKernelRows;  // of q8_linear and q4_linear (quant.h)
  m.def("q8_dequantize", &q8_dequantize, "int8 weights -> [N, K] in like's dtype", nogil);
  m.def("q4_dequantize", &q4_dequantize, "int4 weights -> [N, K] in like's dtype", nogil);
  py::class_<Projection>(m, "Projection");
  m.def("projection", &projection, "a linear layer for DecodeStack (decode_step.h)",
        py::arg("kind"), py::arg("weight"), py::arg("scales") = py::none(),
        py::arg("mins") = py::none(), py::arg("bias") = py::none(),
        py::arg("panels") = py::none(), py::arg("n") = 0);
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, double, double, torch::Tensor>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("forward", &DecodeStack::forward, nogil)
      .def("products", &DecodeStack::products, nogil, py::arg("rows"), py::arg("widths"))
      .def_property_readonly("num_layers", &DecodeStack::num_layers);
}
