"""RoPE of q and k and the layout of this step's K/V cache rows, as one kernel on MLX's CUDA backend.

Paged attention with `rope` (passes/rope_attention.py) receives q, k, v as the projections left them
(usually column slices of one merged q/k/v projection, so strided) and needs q rotated, plus K (rotated)
and V as the rows one scatter writes into the cache: [2 * KVH * T, D], K heads then V heads, each head's
T tokens in order (runtime/attention.py). With MLX's ops that is a rope per tensor and a copy or two
for the layout: 3-4 kernels a layer, at a few microseconds each on the GPU and ~6-10 us of host time
each at decode (docs/benchmarks.md). Here it is one.

One thread per (token, head, pair of dims) over the q, k and v heads. The pair is (j, j + R/2)
(GPT-NeoX) or (2j, 2j + 1) (GPT-J, `traditional`) for j < R/2; the other threads copy two of the head's
unrotated dims. theta = position * inv_freq[j] and sin/cos in f32, the rotation in f32, rounded once
to the input dtype: MLX's rope kernel computes the same way (it is given 1 / inv_freq and inverts it
back, so theta may differ in the last bit). `mscale` scales the rotated dims (YaRN), as passes/ops.py's
reference does.
Inputs are read through their strides: a column slice of the merged projection is not copied first.
"""

from __future__ import annotations

import mlx.core as mx

from runtime.config import on_cuda
from runtime.paged_kernel import float_bits

_SOURCE = r"""
    constexpr int P = D / 2;                         // dim pairs per head
    constexpr int HEADS = H + 2 * KVH;               // q heads, k heads, v heads
    const int T = positions_shape[0];
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)T * HEADS * P) return;
    const int j = i % P;
    const int head = (i / P) % HEADS;
    const int t = i / ((size_t)P * HEADS);
    const X* src;
    int hh;                                          // head within its tensor
    if (head < H) {
        src = q + (size_t)t * q_strides[0]; hh = head;
    } else if (head < H + KVH) {
        src = k + (size_t)t * k_strides[0]; hh = head - H;
    } else {
        src = v + (size_t)t * v_strides[0]; hh = head - H - KVH;
    }
    const size_t col = head < H ? q_strides[1] : (head < H + KVH ? k_strides[1] : v_strides[1]);
    const bool rotated = j < R / 2 && head < H + KVH;
    const int a = (TRAD || j >= R / 2) ? 2 * j : j;  // past R the dims are copied two by two
    const int b = (TRAD || j >= R / 2) ? 2 * j + 1 : j + R / 2;
    const float x1 = static_cast<float>(src[(size_t)(hh * D + a) * col]);
    const float x2 = static_cast<float>(src[(size_t)(hh * D + b) * col]);
    float y1 = x1, y2 = x2;
    if (rotated) {
        const float theta = static_cast<float>(positions[(size_t)t * positions_strides[0]])
                            * static_cast<float>(inv_freq[(size_t)j * inv_freq_strides[0]]);
        float sn, cs;
        sincosf(theta, &sn, &cs);                    // the precise one: positions reach the thousands
        const float m = __int_as_float(MSCALE_BITS);
        y1 = (x1 * cs - x2 * sn) * m;
        y2 = (x2 * cs + x1 * sn) * m;
    }
    if (head < H) {
        const size_t o = ((size_t)t * H + hh) * D;
        q_out[o + a] = static_cast<X>(y1);
        q_out[o + b] = static_cast<X>(y2);
    } else {
        const size_t o = ((size_t)(head - H) * T + t) * D;  // K heads then V heads, tokens in order
        rows[o + a] = static_cast<X>(y1);
        rows[o + b] = static_cast<X>(y2);
    }
"""

_KERNEL = None
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_THREADS = 256


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = mx.fast.cuda_kernel(
            name="rope_qkv_v1",  # a new name per source change: MLX caches compiled kernels by name
            input_names=["q", "k", "v", "positions", "inv_freq"],
            output_names=["q_out", "rows"],
            source=_SOURCE,
            ensure_row_contiguous=False,  # strided slices are read in place (q_strides ...)
        )
    return _KERNEL


def usable(q: mx.array, k: mx.array, v: mx.array, rope: tuple, head_dim: int) -> bool:
    """The kernel serves this call: a CUDA default device, one float dtype for q, k and v, an even head
    dim that holds the rotated dims, one position per token."""
    positions, inv_freq = rope[:2]
    return (on_cuda() and q.dtype in _FLOATS and q.dtype == k.dtype == v.dtype and head_dim % 2 == 0
            and 2 * inv_freq.shape[0] <= head_dim and positions.ndim == 1)


def rope_qkv(q, k, v, positions, inv_freq, traditional: bool, mscale: float, *, num_heads: int,
             num_kv_heads: int, head_dim: int) -> tuple[mx.array, mx.array]:
    """q [T, H*D], k and v [T, KVH*D] (any strides), positions [T] int, inv_freq [R/2] -> (q rotated
    [T, H, D], rows [2 * KVH * T, D]: k rotated then v, head-major), in q's dtype."""
    t = q.shape[0]
    # views of the projection's columns; explicit sizes: a reshape to the same shape adds no graph node
    q, k, v = q.reshape(t, num_heads * head_dim), k.reshape(t, num_kv_heads * head_dim), v.reshape(t, num_kv_heads * head_dim)
    threads = t * (num_heads + 2 * num_kv_heads) * (head_dim // 2)
    q_out, rows = _kernel()(
        inputs=[q, k, v, positions, inv_freq],
        template=[("X", q.dtype), ("H", num_heads), ("KVH", num_kv_heads), ("D", head_dim),
                  ("R", 2 * inv_freq.shape[0]), ("TRAD", bool(traditional)), ("MSCALE_BITS", float_bits(mscale))],
        grid=(max(threads, 1), 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(t, num_heads, head_dim), (2 * num_kv_heads * t, head_dim)],
        output_dtypes=[q.dtype, q.dtype],
    )
    return q_out, rows
