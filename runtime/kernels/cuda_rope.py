"""RoPE of q and k and the layout of this step's K/V cache rows, as one kernel on MLX's CUDA backend.

Paged attention with `rope` (passes/fused/rope_paged_attention.py) receives q, k, v as the projections left them
(usually column slices of one merged q/k/v projection, so strided) and needs q rotated, plus K (rotated)
and V as the rows one scatter writes into the cache: [2 * KVH * T, D], K heads then V heads, each head's
T tokens in order (runtime/kernels/paged.py). With MLX's ops that is a rope per tensor and a copy or two
for the layout: 3-4 kernels a layer, each costing microseconds of host time at decode. Here it is one.

One thread per (token, head, pair of dims) over the q, k and v heads. The pair is (j, j + R/2)
(GPT-NeoX) or (2j, 2j + 1) (GPT-J, `traditional`) for j < R/2; the other threads copy two of the head's
unrotated dims. theta = position * inv_freq[j] and sin/cos in f32, the rotation in f32, rounded once
to the input dtype: MLX's rope kernel computes the same way (it is given 1 / inv_freq and inverts it
back, so theta may differ in the last bit). `mscale` scales the rotated dims (YaRN), as the torch
reference (passes/fused/rope.py) does.
Inputs are read through their strides: a column slice of the merged projection is not copied first.
"""

from __future__ import annotations

import mlx.core as mx

from runtime.kernels.cuda_attention import float_bits

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
        STORE_KV
    }
"""

# K heads then V heads, each head's tokens in order: the rows one scatter writes into the cache
_TO_ROWS = """const size_t o = ((size_t)(head - H) * T + t) * D;
        rows[o + a] = static_cast<X>(y1);
        rows[o + b] = static_cast<X>(y2);"""
# straight into the cache's row kv_rows[row] (the scatter's index): the cache buffer is written in place
_TO_CACHE = """C* dst = const_cast<C*>(cache) + (size_t)kv_rows[(size_t)(head - H) * T + t] * D;
        dst[a] = static_cast<C>(y1);
        dst[b] = static_cast<C>(y2);"""

_KERNELS = {}
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_THREADS = 256


def _kernel(into_cache: bool = False):
    if into_cache not in _KERNELS:
        _KERNELS[into_cache] = mx.fast.cuda_kernel(
            # a new name per source change: MLX caches compiled kernels by name
            name="rope_qkv_cache_v1" if into_cache else "rope_qkv_v1",
            input_names=["q", "k", "v", "positions", "inv_freq"] + (["cache", "kv_rows"] if into_cache else []),
            output_names=["q_out"] if into_cache else ["q_out", "rows"],
            source=_SOURCE.replace("STORE_KV", _TO_CACHE if into_cache else _TO_ROWS),
            ensure_row_contiguous=False,  # strided slices are read in place (q_strides ...)
        )
    return _KERNELS[into_cache]


def fits(q: mx.array, k: mx.array, v: mx.array, rope: tuple, head_dim: int) -> bool:
    """The kernel serves this call: one float dtype for q, k and v, an even head dim that holds the rotated
    dims, one position per token."""
    positions, inv_freq = rope[:2]
    return (q.dtype in _FLOATS and q.dtype == k.dtype == v.dtype and head_dim % 2 == 0
            and 2 * inv_freq.shape[0] <= head_dim and positions.ndim == 1)


def rope_qkv(q, k, v, positions, inv_freq, traditional: bool, mscale: float, *, num_heads: int,
             num_kv_heads: int, head_dim: int) -> tuple[mx.array, mx.array]:
    """q [T, H*D], k and v [T, KVH*D] (any strides), positions [T] int, inv_freq [R/2] -> (q rotated
    [T, H, D], rows [2 * KVH * T, D]: k rotated then v, head-major), in q's dtype."""
    return _call(q, k, v, positions, inv_freq, traditional, mscale, num_heads, num_kv_heads, head_dim)


def rope_qkv_into_cache(q, k, v, positions, inv_freq, traditional: bool, mscale: float, cache, kv_rows, *,
                        num_heads: int, num_kv_heads: int, head_dim: int) -> mx.array:
    """As `rope_qkv`, but this step's K (rotated) and V go straight into `cache` [2, KVH, blocks,
    block_size, D] (row-contiguous, as runtime.model allocates it) at the rows `kv_rows` [2 * KVH * T]
    of its [2 * KVH * slots, D] view: the scatter's kernel, and its graph nodes, drop out of the step.
    Returns q rotated [T, H, D].

    MLX arrays are immutable, so this writes under MLX's feet, as vLLM's reshape_and_cache does under
    torch's: the caller keeps using `cache` itself as the updated cache, and only a reader that depends
    on the returned q (the fused decode attention) is ordered after the write. Hence decode steps only
    (runtime/kernels/cuda.py), where that one kernel is the cache's only reader in the layer."""
    (q_out,) = _call(q, k, v, positions, inv_freq, traditional, mscale, num_heads, num_kv_heads, head_dim,
                     cache=cache, kv_rows=kv_rows)
    return q_out


def _call(q, k, v, positions, inv_freq, traditional, mscale, num_heads, num_kv_heads, head_dim, cache=None,
          kv_rows=None):
    t = q.shape[0]
    # views of the projection's columns; explicit sizes: a reshape to the same shape adds no graph node
    q, k, v = q.reshape(t, num_heads * head_dim), k.reshape(t, num_kv_heads * head_dim), v.reshape(t, num_kv_heads * head_dim)
    threads = t * (num_heads + 2 * num_kv_heads) * (head_dim // 2)
    template = [("X", q.dtype), ("H", num_heads), ("KVH", num_kv_heads), ("D", head_dim),
                ("R", 2 * inv_freq.shape[0]), ("TRAD", bool(traditional)), ("MSCALE_BITS", float_bits(mscale))]
    into_cache = cache is not None
    return _kernel(into_cache)(
        inputs=[q, k, v, positions, inv_freq] + ([cache, kv_rows] if into_cache else []),
        template=template + ([("C", cache.dtype)] if into_cache else []),
        grid=(max(threads, 1), 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(t, num_heads, head_dim)] + ([] if into_cache else [(2 * num_kv_heads * t, head_dim)]),
        output_dtypes=[q.dtype] * (1 if into_cache else 2),
    )
