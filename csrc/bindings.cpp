// The Python module runtime._cpu_ext. It shares nanobind's "mlx" domain with mlx.core, so its
// functions take and return mlx.core arrays; import mlx.core first (runtime/cpu_ext.py does).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "ops.h"
#include "pool.h"

namespace nb = nanobind;
using namespace nb::literals;

NB_MODULE(_cpu_ext, m) {
  m.doc() = "CPU kernels for MLX as lazy ops: quantized and bf16/f16/f32 matmul, paged decode attention.";

  m.def(
      "quantized_matmul",
      &cpu_ext::quantized_matmul,
      "x"_a,
      "w"_a,
      "scales"_a,
      "biases"_a,
      "group_size"_a,
      "bits"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "x[..., K] @ dequantize(w, scales, biases).T with MLX's affine layout (float32 accumulation).");
  m.def(
      "linear",
      &cpu_ext::linear,
      "x"_a,
      "w"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "x[..., K] @ w[N, K].T for float32, bfloat16 or float16 w (float32 accumulation).");
  m.def(
      "dequantize",
      &cpu_ext::dequantize,
      "w"_a,
      "scales"_a,
      "biases"_a,
      "group_size"_a,
      "bits"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "The float32 matrix [N, K] of MLX affine-quantized weights.");
  m.def(
      "paged_decode_attention",
      &cpu_ext::paged_decode_attention,
      "q"_a,
      "cache"_a,
      "blocks"_a,
      "pos"_a,
      "scale"_a,
      "window"_a,
      "cap"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      "Decode attention of q [T, H, D] over the paged cache [2, KVH, blocks, block_size, D] read in "
      "place through the block table blocks [T, n]; keys 0..pos[t] (the last window of them when "
      "window > 0), scores soft-capped when cap > 0. Returns [T, H * D] in q's dtype.");
  m.def("isa", &cpu_ext::isa, "The kernel set in use: avx512, avx2 or generic.");
  m.def("supported_isas", &cpu_ext::supported_isas, "The kernel sets this CPU can run, best first.");
  m.def("set_isa", &cpu_ext::set_isa, "name"_a, "Use the named kernel set.");
  m.def("num_threads", &cpu_ext::num_threads, "Threads a kernel uses, the calling one included.");
  m.def(
      "set_num_threads",
      &cpu_ext::set_num_threads,
      "n"_a,
      "Use n threads (1: the calling thread alone); n < 1 restores the default.");
  m.def(
      "default_num_threads",
      &cpu_ext::default_num_threads,
      "The default thread count: the CPUs this process may run on.");
}
