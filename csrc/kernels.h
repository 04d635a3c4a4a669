// The matmul kernels' interface: plain pointers and sizes, no MLX, no standard library.
//
// One kernel set is compiled per instruction set (kernels_avx512.cpp, kernels_avx2.cpp,
// kernels_generic.cpp, each from kernels_impl.h with its own compiler flags); ops.cpp picks the
// best one the CPU supports at run time. Everything in those files has internal linkage, so no
// function compiled for a wider instruction set can be chosen by the linker for another.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace cpu_ext {

enum WeightFormat : int { W_F32 = 0, W_BF16 = 1, W_F16 = 2, W_Q4 = 3, W_Q8 = 4 };
enum ScaleType : int { S_F32 = 0, S_BF16 = 1, S_F16 = 2 };

// Row length of the prepared activations is padded to a multiple of this (zeros), so kernels
// read whole vectors past K.
constexpr int kPad = 16;

// out[M, N] = x[M, K] @ w[N, K]^T, with w dense or MLX affine-quantized
// (w[n, k] = scales[n, k / group] * q[n, k] + biases[n, k / group], q packed little-end first
// into uint32 words).
struct Problem {
  int M, N, K;
  const float* x; // [M][ldx] float32, zero from K to ldx
  int ldx; // a multiple of kPad
  const float* xsum; // [M][K / group] sums of x over each group (quantized formats)
  bool x_finite; // every x is finite: the quantized GEMV may take the biases out of the sum
  int format; // WeightFormat
  const void* w; // [N][K] dense, or [N][K * bits / 32] uint32 words
  const void* scales; // [N][K / group] (quantized formats)
  const void* biases; // [N][K / group]
  int scale_type; // ScaleType of scales and biases
  int group; // 32, 64 or 128
  float* out; // [M][ldo] float32
  int ldo;
  int kc; // GEMM k chunk (gemm_kc)
};

// GEMM k chunk for M rows of x: a multiple of 512 over which M rows of x take at most 256 KiB,
// half of a typical L2.
inline int gemm_kc(int M) {
  int kc = (64 * 1024 / (M > 0 ? M : 1)) / 512 * 512;
  return kc < 512 ? 512 : kc;
}

// Floats of scratch a matmul task needs: a weight tile (4 x 512), the accumulators (M x 4
// vectors of up to 16 lanes), or the GEMV's permuted x (K) and float32 scales and biases
// (2 x 4 rows x (K / 32 groups + 16)).
inline size_t scratch_floats(const Problem& p) {
  size_t gemv = size_t(p.K) + size_t(8) * (p.K / 32 + 16);
  size_t gemm = size_t(4) * 512 + size_t(p.M) * 4 * 16;
  return gemv > gemm ? gemv : gemm;
}

// Decode attention over a paged K/V cache, read in place through the block table: one query
// token per sequence, GQA (query head h reads KV head h / (H / KVH)), online softmax in float32.
// A task is one (sequence, KV head, key partition); with one partition it writes the final rows,
// with several the partial softmax state that ops.cpp merges.
struct Attention {
  int T, H, KVH, D; // sequences (one query each), query heads, KV heads, head dim
  const float* q; // [T][H][D] float32, already multiplied by the softmax scale
  const void* cache; // [2][KVH][blocks][block_size][D] in cache_type: K, then V
  int cache_type; // ScaleType: S_F32, S_BF16 or S_F16
  int blocks, block_size;
  const int32_t* table; // [T][n] cache block of each key block of a sequence
  int n;
  const int32_t* pos; // [T] the query's position p: keys 0..p are its context; < 0: invalid
  int window; // > 0: only keys j > p - window
  float cap; // > 0: scores soft-capped as tanh(s / cap) * cap
  int parts; // key partitions per (sequence, KV head)
  int part_keys; // keys per partition, a multiple of block_size
  float* out; // parts == 1: [T][H][D] float32, the result
  float* acc; // parts > 1: [T * KVH * parts][G][D] unnormalised sums of p * v
  float* ml; // parts > 1: [T * KVH * parts][G][2] running max and sum of exp
};

// Keys converted to float32 at a time (a chunk never crosses a cache block).
constexpr int kAttnChunk = 64;

inline size_t attention_scratch_floats(const Attention& a) {
  int G = a.H / a.KVH;
  return size_t(2) * kAttnChunk * (a.D + 16) + size_t(G) * (kAttnChunk + 16) + size_t(G) * (a.D + 4) + 64;
}

struct KernelSet {
  const char* name;
  // out[:, n0:n1] for the columns [n0, n1); independent ranges may run concurrently.
  void (*matmul)(const Problem& p, int n0, int n1, float* scratch);
  // dst[n, :] = the dequantized rows [n0, n1) of w, float32, dst row stride ld.
  void (*dequantize)(const Problem& p, int n0, int n1, float* dst, size_t ld);
  // Task `task` of a decode attention: (sequence, KV head, partition) in that order, partition fastest.
  void (*attention)(const Attention& a, int task, float* scratch);
};

extern const KernelSet kernels_generic;
#if defined(__x86_64__) || defined(_M_X64)
extern const KernelSet kernels_avx2;
extern const KernelSet kernels_avx512;
#endif

} // namespace cpu_ext
