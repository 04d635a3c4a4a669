"""Fused paged decode attention for MLX's CUDA backend (issue 10): one kernel launch per layer.

The composed decode path (runtime/attention.py `_attend_decode`) gathers each sequence's K and V
through the block table (two copies) and, because the padded keys of the last block need a mask,
falls back from MLX's one-kernel decode SDPA to the composed one (~6 kernels). On MLX-CUDA each
kernel costs ~9.5 us of host time, more than the attention's GPU work at decode. This kernel reads
the head-major cache in place through the block table and stops at the
sequence's own length (context = q_pos + 1), so it needs neither the gather nor a mask.
The cache is a layer's one array [2, KVH, blocks, block_size, D]: K, then V a plane further.

One CUDA block per (query head, sequence), NW warps splitting the keys; a lane holds D/32 elements of
the head dim; online softmax in f32 (exp2, log2(e) folded into the scale), warps merged through shared
memory at the end. GQA: query head h reads KV head h // (H / KVH); the q heads of one KV head are
neighbouring blocks, so their repeated K/V reads hit L2. Sliding window and logit soft-capping are
template constants. Row-contiguous inputs (MLX copies others first).
"""

from __future__ import annotations

import os
import struct

import mlx.core as mx

from runtime.config import ConfigError, on_cuda

_SOURCE = r"""
    constexpr int E = D / 32;                      // head-dim elements per lane
    const int h = blockIdx.x;                      // query head
    const int t = blockIdx.y;                      // sequence: its one query token
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n = blocks_shape[1];                 // block-table width of this group
    const int kvh = h / G;
    const int p = q_pos[t];                        // keys 0..p are this sequence's context
    const int lo = WINDOW > 0 ? max(0, p - WINDOW + 1) : 0;
    const float scale = __int_as_float(SCALE_BITS);
    const float cap = __int_as_float(CAP_BITS);
    const float log2e = 1.4426950408889634f;
    const float NEG_INF = -__int_as_float(0x7f800000);  // MLX 0.32.4's kernel header has no `inf`

    float qv[E];
    const size_t qo = ((size_t)t * gridDim.x + h) * D + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        // no cap: scores go straight to the log2 domain; with one, tanh needs the scaled logit first
        qv[e] = static_cast<float>(q[qo + e]) * (CAP ? scale : scale * log2e);
    }
    // this sequence's block ids in shared memory: a key's address then costs no global round trip
    constexpr int TABLE_CAP = 1024;
    __shared__ int sm_table[TABLE_CAP];
    const int* table = blocks + (size_t)t * n;
    const bool in_smem = p / BS < TABLE_CAP;
    if (in_smem) {
        for (int i = lo / BS + threadIdx.x; i <= p / BS; i += NW * 32) sm_table[i] = table[i];
    }
    __syncthreads();
    const size_t plane = (size_t)cache_shape[1] * cache_shape[2] * BS * D;  // K heads, then V heads
    const size_t head = (size_t)kvh * cache_shape[2] * BS * D + lane * E;
    const KT* k_cache = cache;
    const KT* v_cache = cache + plane;
    using Vec = AlignedVector<KT, E>;              // a lane's E elements of one K (or V) row, one load

    float m = NEG_INF, l = 0.f, acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.f;

    // U keys per warp per iteration, K and V rows loaded together up front: one memory latency per iteration
    for (int base = lo + warp * U; base <= p; base += NW * U) {
        float s[U];
        Vec vv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = min(base + u, p);        // past p: recompute key p, dropped below
            const int blk = in_smem ? sm_table[j / BS] : table[j / BS];
            const size_t off = head + ((size_t)blk * BS + j % BS) * D;
            const Vec kk = *reinterpret_cast<const Vec*>(k_cache + off);
            vv[u] = *reinterpret_cast<const Vec*>(v_cache + off);
            float dot = 0.f;
#pragma unroll
            for (int e = 0; e < E; ++e) dot += qv[e] * static_cast<float>(kk[e]);
            s[u] = dot;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) s[u] += __shfl_xor_sync(0xffffffff, s[u], o);
            if (CAP) s[u] = tanhf(s[u] / cap) * cap * log2e;
            if (base + u > p) s[u] = NEG_INF;
        }
        float mx_ = m;
#pragma unroll
        for (int u = 0; u < U; ++u) mx_ = fmaxf(mx_, s[u]);
        const float corr = exp2f(m - mx_);         // m = NEG_INF on the first keys: 0
        l *= corr;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] *= corr;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const float w = exp2f(s[u] - mx_);     // a dropped key: exp2(-inf) = 0
            l += w;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[e] += w * static_cast<float>(vv[u][e]);
        }
        m = mx_;
    }

    __shared__ float sm_m[NW], sm_l[NW], sm_acc[NW][D];
    if (lane == 0) { sm_m[warp] = m; sm_l[warp] = l; }
#pragma unroll
    for (int e = 0; e < E; ++e) sm_acc[warp][lane * E + e] = acc[e];
    __syncthreads();
    float big = NEG_INF;
#pragma unroll
    for (int w = 0; w < NW; ++w) big = fmaxf(big, sm_m[w]);
    for (int d = threadIdx.x; d < D; d += NW * 32) {
        float total = 0.f, o = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {             // a warp that saw no key has m = NEG_INF: weight 0
            const float c = exp2f(sm_m[w] - big);
            total += sm_l[w] * c;
            o += sm_acc[w][d] * c;
        }
        out[((size_t)t * gridDim.x + h) * D + d] = static_cast<OutT>(o / total);
    }
"""

_KERNEL = None
# Warps per (head, sequence) block and keys in flight per warp. The H200 sweep (`benchmarks/gpu.py kernel`,
# gpu-r4c-kernel.json: 8B attention shape, 32 heads, context 172, bf16; GPU us per call at batch 1 / 8 / 32 / 128):
# 8x4 9.6 / 7.0 / 19.0 / 68.6, within 4% of the best of 8 shapes at every batch (16x2: 9.6 / 7.4 / 21.4 / 82.7);
# the composed path 35.8 / 79.1 / 241 / 861; MLX's decode SDPA on a contiguous unmasked cache 6.0 / 9.7 / 32.5 / 126.
# MLX_PAGED_KERNEL_TUNE="NW,U" overrides both (the sweep).
_TUNE = os.environ.get("MLX_PAGED_KERNEL_TUNE", "8,4")
try:
    WARPS, UNROLL = (int(x) for x in _TUNE.split(","))
    assert WARPS in (1, 2, 4, 8, 16, 32) and UNROLL in (1, 2, 4, 8)
except (ValueError, AssertionError):
    raise ConfigError(f"MLX_PAGED_KERNEL_TUNE={_TUNE!r} is invalid; accepted: 'WARPS,KEYS' with WARPS in "
                      "1/2/4/8/16/32 and KEYS in 1/2/4/8 (default 8,4)") from None


def _kernel():
    global _KERNEL
    if _KERNEL is None:  # built on first use: mx.fast.cuda_kernel exists on every build, runs only on CUDA
        _KERNEL = mx.fast.cuda_kernel(
            name="paged_decode_attention_v3",  # a new name per source change: MLX caches compiled kernels by name
            input_names=["q", "cache", "blocks", "q_pos"],
            output_names=["out"],
            source=_SOURCE,
        )
    return _KERNEL


def float_bits(x: float) -> int:
    """A positive float as an int template constant: templates take int/bool/dtype, and their values
    name the compiled kernel, so two scales never share one (a negative int would put '-' in the name)."""
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def usable(head_dim: int) -> bool:
    """Whether the fused kernel serves this call: MLX's default device is a CUDA GPU and D splits over a
    warp. VLLM_MLX_PAGED_KERNEL=0 turns it off (the composed path, for A/B measurements)."""
    enabled = os.environ.get("VLLM_MLX_PAGED_KERNEL", "1")  # read at trace time: benchmarks/gpu.py A/Bs in one process
    if enabled not in ("0", "1"):
        raise ConfigError(f"VLLM_MLX_PAGED_KERNEL={enabled!r} is invalid; accepted: 1 (the fused kernel on CUDA, "
                          "the default) or 0 (the composed attention)")
    return enabled == "1" and head_dim % 32 == 0 and head_dim <= 256 and on_cuda()


def paged_decode_attention(q, cache, blocks, q_pos, *, scale: float, window: int = -1, cap: float = 0.0,
                           warps: int | None = None, unroll: int | None = None):
    """q [T, H, D] (one query per sequence); cache [2, KVH, blocks, block_size, D] (K, V); blocks [T, n]
    int32 block table; q_pos [T] or [T, 1] int32 position of each query (its context is q_pos + 1 keys).
    Returns [T, H * D] in q's dtype."""
    t, h, d = q.shape
    _, kvh, _, block_size, _ = cache.shape
    nw, u = warps or WARPS, unroll or UNROLL
    blocks = blocks if blocks.dtype == mx.int32 else blocks.astype(mx.int32)
    q_pos = q_pos if q_pos.dtype == mx.int32 else q_pos.astype(mx.int32)
    out = _kernel()(
        inputs=[q, cache, blocks, q_pos],
        template=[("OutT", q.dtype), ("KT", cache.dtype), ("D", d), ("BS", block_size), ("G", h // kvh), ("NW", nw), ("U", u),
                  ("WINDOW", max(int(window), 0)), ("CAP", bool(cap > 0)), ("SCALE_BITS", float_bits(scale)),
                  ("CAP_BITS", float_bits(cap if cap > 0 else 1.0))],
        grid=(h * nw * 32, t, 1),
        threadgroup=(nw * 32, 1, 1),
        output_shapes=[(t, h * d)],
        output_dtypes=[q.dtype],
    )
    return out[0]
