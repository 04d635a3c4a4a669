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

// Decode attention over a paged cache, read in place: q [T, H, D] (one query token per sequence),
// cache [2, KVH, blocks, block_size, D] (K, then V), blocks [T, n] int32 (each sequence's cache
// block of key block i), pos (T int32: the query's position p; keys 0..p are its context, or the
// last `window` of them when window > 0). Scores q.k * scale, soft-capped to cap * tanh(s / cap)
// when cap > 0; float32 softmax and accumulation. Returns [T, H * D] in q's dtype. A sequence whose
// context its table does not cover (p < 0, p >= n * block_size, or a block id outside the cache)
// gets NaN.
mx::array paged_decode_attention(
    const mx::array& q,
    const mx::array& cache,
    const mx::array& blocks,
    const mx::array& pos,
    float scale,
    int window,
    float cap,
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

class PagedDecodeAttention : public mx::UnaryPrimitive {
 public:
  PagedDecodeAttention(mx::Stream stream, float scale, int window, float cap)
      : mx::UnaryPrimitive(stream), scale_(scale), window_(window), cap_(cap) {}
  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  const char* name() const override {
    return "CpuExtPagedDecodeAttention";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  float scale_;
  int window_;
  float cap_;
};

} // namespace cpu_ext
