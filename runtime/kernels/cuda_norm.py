"""`add_rms_norm(x, residual, weight, eps) -> (h, normed)`: a residual add and the RMSNorm of its result
(passes/fused/add_rms_norm.py) as one kernel on MLX's CUDA backend.

On CUDA, MLX runs the add and the norm as two kernels (the add cannot fuse into the norm, a fast
primitive) at microseconds of host time each; a Llama step has one such pair per sublayer (64 for 32
layers). The kernel gives the same numbers as the two: h = T(x + residual) is written and
normalised as written, the sum of squares in f32, out = T(w * T(h * rsqrt(mean(h^2) + eps))), which
is how MLX's CUDA rms_norm rounds (only the order of the f32 sum differs). One CUDA block per row,
each thread keeping its strided elements of the row in registers between the two passes.
"""

from __future__ import annotations

import mlx.core as mx

from runtime.kernels.cuda_attention import float_bits

_SOURCE = r"""
    constexpr int PER = (N + BLOCK - 1) / BLOCK;   // elements of the row per thread
    const size_t row = (size_t)blockIdx.x * N;
    // every load first: the outputs may alias the inputs as far as the compiler knows, so a load after
    // a store waits for it (interleaved, each element cost a full memory latency: 13 us for 4096)
    float hv[PER], wv[PER];
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = min((int)threadIdx.x + k * BLOCK, N - 1);  // past the row: a harmless reload, never stored
        hv[k] = static_cast<float>(x[row + i]) + static_cast<float>(residual[row + i]);
        wv[k] = static_cast<float>(weight[i]);
    }
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = threadIdx.x + k * BLOCK;
        const T h = static_cast<T>(hv[k]);
        hv[k] = static_cast<float>(h);
        if (i < N) {
            h_out[row + i] = h;
            ss += hv[k] * hv[k];
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    __shared__ float part[BLOCK / 32];
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = ss;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < BLOCK / 32; ++w) total += part[w];
    const float inv = rsqrtf(total / N + __int_as_float(EPS_BITS));
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = threadIdx.x + k * BLOCK;
        if (i < N) normed[row + i] = static_cast<T>(wv[k] * static_cast<float>(static_cast<T>(hv[k] * inv)));
    }
"""

_KERNEL = None
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_MAX_BLOCK, _PER = 512, 16  # 16 elements a thread in registers (x 2: h and w); a 1024-thread block ran out of them
_MAX_N = _MAX_BLOCK * _PER  # hidden sizes up to 8192 (Llama 70B); larger ones take MLX's add and rms_norm


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = mx.fast.cuda_kernel(
            name="add_rms_norm_v2",  # a new name per source change: MLX caches compiled kernels by name
            input_names=["x", "residual", "weight"],
            output_names=["h_out", "normed"],
            source=_SOURCE,
        )
    return _KERNEL


def fits(x: mx.array, residual: mx.array, weight: mx.array) -> bool:
    """The kernel serves this call: one dtype, the shapes of a residual add."""
    return (x.dtype in _FLOATS and x.dtype == residual.dtype == weight.dtype
            and x.shape == residual.shape and weight.shape == x.shape[-1:] and x.shape[-1] <= _MAX_N)


def add_rms_norm(x, residual, weight, eps):
    n = x.shape[-1]
    rows = x.size // n
    block = min(_MAX_BLOCK, max(32, 1 << (max(n // _PER, 1) - 1).bit_length()))  # <= 16 elements a thread: 4096 -> 256
    return tuple(_kernel()(
        inputs=[x, residual, weight],
        template=[("T", x.dtype), ("N", n), ("BLOCK", block), ("EPS_BITS", float_bits(eps))],
        grid=(rows * block, 1, 1),
        threadgroup=(block, 1, 1),
        output_shapes=[x.shape, x.shape],
        output_dtypes=[x.dtype, x.dtype],
    ))
