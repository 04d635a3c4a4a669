"""The kernel table of MLX's CPU backend: the generic table with the CPU's own kernels and math.

Matrix products go through our compiled kernels (runtime/kernels/cpu_ext.py, C++ in csrc/): quantized
(4/8-bit affine) linears, and float32/bfloat16/float16 ones up to `cpu_ext.GEMM_MAX_M` rows, where
MLX's CPU backend multiplies quantized and 16-bit weights many times slower than float32 and float32
through a BLAS made for large matrices; above that many rows MLX's float32 matmul (OpenBLAS) is faster.

Decode attention reads the paged K/V cache in place through the block table (cpu_ext.paged_decode_attention),
where the generic path gathers every sequence's K/V into a copy and masks it; chunks of prompt over earlier
context go through the same kernel a query at a time.

MLX's CPU `exp` (and the sigmoid, SiLU and softmax built on it) is slow, and its `mx.fast.rope` with a position
per token slower than elementwise ops that fuse: runtime/kernels/fastmath.py builds them from arithmetic
mx.compile fuses, and the attention from BLAS matmuls and that softmax. `mx.gather_mm` takes float32 only
here (MLX 0.32: "[GatherMM::eval] Currently only supports float32"), so other dtypes multiply in float32
and round back, as a float32-accumulating kernel would.
"""

from __future__ import annotations

import mlx.core as mx

from runtime.kernels import cpu_ext, fastmath, paged
from runtime.kernels.generic import Generic


# Query rows a chunk needs for the kernel to attend it: each query reads its sequence's keys again, where the
# composed path gathers them once; measured a wash at 16-128 rows over 1024 keys, 2.6-3.8x faster at 512.
PREFILL_MIN_QUERIES = 256


class Cpu(Generic):
    name = "cpu"

    def __init__(self, config=None):
        cpu_ext.require()  # the CPU table is our compiled kernels: without them, say how to build them
        super().__init__(config)

    def _on(self, kernel: str) -> bool:
        return kernel not in self.config.kernels_off

    def linear(self, x, weight_t, bias=None):
        w = weight_t.T  # the weight as stored, [N, K] row by row (prepared as its transposed view)
        rows = x.size // x.shape[-1]
        if not self._on("cpu_matmul") or (w.dtype == mx.float32 and rows > cpu_ext.GEMM_MAX_M):
            return super().linear(x, weight_t, bias)
        out = cpu_ext.linear(x, w)
        return out if bias is None else out + bias

    def quantized_linear(self, x, wq, scales, biases, bias=None, *, bits: int, group_size: int):
        if not self._on("cpu_quantized") or bits not in cpu_ext.BITS:
            return super().quantized_linear(x, wq, scales, biases, bias, bits=bits, group_size=group_size)
        out = cpu_ext.quantized_matmul(x, wq, scales, biases, group_size=group_size, bits=bits)
        out = out if bias is None else out + bias
        return out if out.dtype == x.dtype else out.astype(x.dtype)

    def _paged_attention(self, q, cache) -> bool:
        return self._on("cpu_attention") and cache.dtype in cpu_ext.FLOAT_DTYPES and q.dtype in cpu_ext.FLOAT_DTYPES

    def attend_decode(self, q, cache, group, *, scale, window, cap):
        if not self._paged_attention(q, cache):
            return super().attend_decode(q, cache, group, scale=scale, window=window, cap=cap)
        return cpu_ext.paged_decode_attention(q, cache, group["blocks"], group["q_pos"], scale=scale, window=window,
                                              cap=cap)

    def attend_group(self, q, k, v, cache, group, *, scale, window, cap, in_order=False):
        """Chunks over earlier context (a group with `blocks`): every query token attends as its own decode
        query, at its position, through its sequence's block table (this step's K/V are in the cache already)."""
        s, lq = group["q_index"].shape
        if ("blocks" not in group or lq < PREFILL_MIN_QUERIES or not self._on("cpu_prefill")
                or not self._paged_attention(q, cache)):
            return super().attend_group(q, k, v, cache, group, scale=scale, window=window, cap=cap, in_order=in_order)
        queries = paged.lay_out(q, group, in_order).reshape(s * lq, *q.shape[1:])
        out = cpu_ext.paged_decode_attention(queries, cache, mx.repeat(group["blocks"], lq, axis=0),
                                             group["q_pos"].reshape(-1), scale=scale, window=window, cap=cap)
        return out.reshape(s, lq, *q.shape[1:])

    def exp(self, x):
        return fastmath.exp(x)

    def sigmoid(self, x):
        return fastmath.sigmoid(x)

    def silu(self, x):
        return fastmath.silu(x)

    def softmax(self, x, axis: int = -1):
        return fastmath.softmax(x, axis=axis)

    def attention(self, q, k, v, *, scale: float, mask):
        return fastmath.attention(q, k, v, scale=scale, mask=mask)

    def rope(self, x, positions, inv_freq, *, head_dim: int, traditional: bool, mscale: float):
        shape, t = x.shape, x.shape[0]
        heads = x.size // (t * head_dim)
        return fastmath.rope(x.reshape(t, heads, head_dim), positions, inv_freq, traditional, mscale).reshape(shape)

    def gather_mm(self, x, weight, rhs_indices, sorted_indices: bool = False):
        if x.dtype == mx.float32:
            return super().gather_mm(x, weight, rhs_indices, sorted_indices)
        out = mx.gather_mm(x.astype(mx.float32), weight.astype(mx.float32), rhs_indices=rhs_indices,
                           sorted_indices=sorted_indices)
        return out.astype(x.dtype)
