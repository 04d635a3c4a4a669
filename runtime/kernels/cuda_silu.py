"""`silu_mul(gate, up) = silu(gate) * up` (passes/fused/silu_mul.py) for a single token on MLX's CUDA backend.

Elsewhere it is one MLX expression that mx.compile fuses into one kernel. For one token on MLX-CUDA, `gate`
and `up` are [1, F] column slices of the merged gate/up projection,
MLX counts them row-contiguous (one row) and gives the fused kernel's output their row stride 2F,
and the down projection's GEMV, which wants a row stride of F, copies it first: a copy kernel a layer. This
kernel writes a contiguous row instead; it computes sigmoid(g) * g, then * up, in f32, each rounded to the
dtype: within 2 ulp of MLX's fused kernel in bf16 and f32, closer to f32 than MLX's float16 sigmoid.
"""

from __future__ import annotations

import mlx.core as mx


_SOURCE = r"""
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N) return;
    const float g = static_cast<float>(gate[(size_t)i * gate_strides[1]]);
    const T s = static_cast<T>(1.f / (1.f + expf(-g)));
    const T a = static_cast<T>(g * static_cast<float>(s));
    out[i] = static_cast<T>(static_cast<float>(a) * static_cast<float>(up[(size_t)i * up_strides[1]]));
"""

_KERNEL = None
_FLOATS = (mx.float16, mx.bfloat16, mx.float32)


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = mx.fast.cuda_kernel(
            name="silu_mul_row_v1",  # a new name per source change: MLX caches compiled kernels by name
            input_names=["gate", "up"],
            output_names=["out"],
            source=_SOURCE,
            ensure_row_contiguous=False,  # the slices are read in place
        )
    return _KERNEL


def fits(gate: mx.array, up: mx.array) -> bool:
    """The kernel serves this call: one [1, F] row of one float dtype."""
    return (gate.ndim == 2 and gate.shape[0] == 1 and gate.shape == up.shape and gate.dtype == up.dtype
            and gate.dtype in _FLOATS)


def silu_mul(gate: mx.array, up: mx.array) -> mx.array:
    """silu(gate) * up for one [1, F] row (column slices of the merged projection, read in place)."""
    n = gate.shape[1]
    return _kernel()(inputs=[gate, up], template=[("T", gate.dtype), ("N", n)], grid=(n, 1, 1),
                     threadgroup=(256, 1, 1), output_shapes=[(1, n)], output_dtypes=[gate.dtype])[0]
