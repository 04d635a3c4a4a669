"""The kernel table of MLX's CPU backend: the generic table with the CPU's own math.

MLX's CPU `exp` (and the sigmoid, SiLU and softmax built on it) is slow, and its `mx.fast.rope` with a position
per token slower than elementwise ops that fuse: runtime/kernels/fastmath.py builds them from arithmetic
mx.compile fuses, and the attention from BLAS matmuls and that softmax. `mx.gather_mm` takes float32 only
here (MLX 0.32: "[GatherMM::eval] Currently only supports float32"), so other dtypes multiply in float32
and round back, as a float32-accumulating kernel would.
"""

from __future__ import annotations

import mlx.core as mx

from runtime.kernels import fastmath
from runtime.kernels.generic import Generic


class Cpu(Generic):
    name = "cpu"

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
