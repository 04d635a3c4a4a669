// The extension's MLX ops: lazy graph nodes whose primitives run on MLX's CPU stream.
#pragma once

#include <string>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace cpu_ext {

namespace mx = mlx::core;

// x[..., K] @ dequantize(w, scales, biases).T -> [..., N], MLX's affine layout as mx.quantize makes
// it (w uint32 [N, K * bits / 32]; scales, biases [N, K / group_size]). float32 accumulation; the
// result has the dtype mx.quantized_matmul gives (x's and the scales' promoted).
mx::array quantized_matmul(
    const mx::array& x,
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// x[..., K] @ w[N, K].T -> [..., N] for float32, bfloat16 or float16 w, float32 accumulation; the
// result has the dtype mx.matmul gives (x's and w's promoted).
mx::array linear(const mx::array& x, const mx::array& w, mx::StreamOrDevice s = {});

// The float32 weights [N, K] of an affine-quantized matrix.
mx::array dequantize(
    const mx::array& w,
    const mx::array& scales,
    const mx::array& biases,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// Which kernels run: "avx512", "avx2" or "generic"; the best this CPU supports unless set.
std::string isa();
std::vector<std::string> supported_isas();
void set_isa(const std::string& name);

class QuantizedMatmul : public mx::UnaryPrimitive {
 public:
  QuantizedMatmul(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "CpuExtQuantizedMatmul";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int group_size_;
  int bits_;
};

class Linear : public mx::UnaryPrimitive {
 public:
  explicit Linear(mx::Stream stream) : mx::UnaryPrimitive(stream) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "CpuExtLinear";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return true;
  }
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
};

class Dequantize : public mx::UnaryPrimitive {
 public:
  Dequantize(mx::Stream stream, int group_size, int bits)
      : mx::UnaryPrimitive(stream), group_size_(group_size), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "CpuExtDequantize";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int group_size_;
  int bits_;
};

} // namespace cpu_ext
