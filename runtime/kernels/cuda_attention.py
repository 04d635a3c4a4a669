"""Fused paged decode attention for MLX's CUDA backend: one kernel launch per layer.

The composed decode path (runtime/kernels/paged.py `attend_decode`) gathers each sequence's K and V
through the block table (two copies) and, because the padded keys of the last block need a mask,
falls back from MLX's one-kernel decode SDPA to the composed one (~6 kernels). On MLX-CUDA each
kernel costs microseconds of host time, more than the attention's GPU work at decode. This kernel reads
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

import struct

import mlx.core as mx

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

LOAD_Q
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
NEW_KV

    float m = NEG_INF, l = 0.f, acc[E];
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = 0.f;

    // U keys per warp per iteration, K and V rows loaded together up front: one memory latency per iteration
    for (int base = lo + warp * U; base <= last; base += NW * U) {
        float s[U];
        Vec vv[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = min(base + u, last);     // past the last key: recompute it, dropped below
            const int blk = in_smem ? sm_table[j / BS] : table[j / BS];
            const size_t off = head + ((size_t)blk * BS + j % BS) * D;
LOAD_KV
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
            if (base + u > last) s[u] = NEG_INF;
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
NEW_KEY
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

# the plain kernel: q rotated already, this step's K/V in the cache already
_PLAIN = {
    "LOAD_Q": """
    float qv[E];
    const size_t qo = ((size_t)t * gridDim.x + h) * D + lane * E;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        // no cap: scores go straight to the log2 domain; with one, tanh needs the scaled logit first
        qv[e] = static_cast<float>(q[qo + e]) * (CAP ? scale : scale * log2e);
    }""",
    "NEW_KV": """
    const int last = p;                             // every key is in the cache""",
    "LOAD_KV": """
            const Vec kk = *reinterpret_cast<const Vec*>(k_cache + off);
            vv[u] = *reinterpret_cast<const Vec*>(v_cache + off);""",
    "NEW_KEY": "",
}

# with RoPE: q, k and v arrive as the projection left them (strided column slices, un-rotated). Each block
# rotates its q head and its KV head's new key as runtime/rope_kernel.py does (f32, sincosf, rounded once;
# one angle per dim for both); the first q head of each KV head writes the new K and V rows into the cache
# (in place, at kv_rows, as rope_kernel.rope_qkv_into_cache does). The key loop reads keys lo..p-1 from the
# cache exactly as the plain kernel does, and warp 0 adds key p from registers after it: no block reads
# what another writes, and the hot loop stays branch-free. NeoX pairs (d, d + R/2) sit in lanes R/(2E)
# apart (one shuffle); GPT-J pairs (2j, 2j + 1) inside a lane.
_ROPE = {
    "LOAD_Q": """
    constexpr int P2 = R / 2;
    const int d0 = lane * E;                        // this lane's first head dim
    const int partner = (TRAD || d0 >= R) ? lane : (d0 < P2 ? lane + P2 / E : lane - P2 / E);
    const float pos = static_cast<float>(positions[(size_t)t * positions_strides[0]]);
    const float msc = __int_as_float(MSCALE_BITS);
    float cs[E], sn[E];                             // one angle per dim pair, for q and k alike
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int d = d0 + e, jj = TRAD ? d / 2 : d % P2;
        cs[e] = 1.f, sn[e] = 0.f;
        if (d < R) sincosf(pos * static_cast<float>(inv_freq[(size_t)jj * inv_freq_strides[0]]), &sn[e], &cs[e]);
    }
    auto rotate = [&](const OutT* src, int64_t col, float* y, bool rope_it) {
        float x[E];
#pragma unroll
        for (int e = 0; e < E; ++e) x[e] = static_cast<float>(src[(d0 + e) * col]);
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const float other = TRAD ? x[e ^ 1] : __shfl_sync(0xffffffff, x[e], partner);
            const int d = d0 + e;
            const bool first = TRAD ? (d % 2 == 0) : d < P2;
            y[e] = (!rope_it || d >= R) ? x[e]
                   : (first ? x[e] * cs[e] - other * sn[e] : x[e] * cs[e] + other * sn[e]) * msc;
        }
    };
    float qv[E], kr[E], vr[E];
    rotate(q + (size_t)t * q_strides[0] + (size_t)h * D * q_strides[1], q_strides[1], qv, true);
    rotate(k + (size_t)t * k_strides[0] + (size_t)kvh * D * k_strides[1], k_strides[1], kr, true);
    rotate(v + (size_t)t * v_strides[0] + (size_t)kvh * D * v_strides[1], v_strides[1], vr, false);
#pragma unroll
    for (int e = 0; e < E; ++e) {                   // q as the rope kernel would have stored it
        qv[e] = static_cast<float>(static_cast<OutT>(qv[e])) * (CAP ? scale : scale * log2e);
    }""",
    "NEW_KV": """
    Vec nk, nv;                                     // this step's key and value, as the cache holds them
#pragma unroll
    for (int e = 0; e < E; ++e) { nk[e] = static_cast<KT>(kr[e]); nv[e] = static_cast<KT>(vr[e]); }
    if (h % G == 0) {
        KT* rows = const_cast<KT*>(cache) + d0;
        *reinterpret_cast<Vec*>(rows + (size_t)kv_rows[(size_t)kvh * gridDim.y + t] * D) = nk;
        *reinterpret_cast<Vec*>(rows + (size_t)kv_rows[(size_t)(cache_shape[1] + kvh) * gridDim.y + t] * D) = nv;
    }
    const int last = p - 1;                         // the cache's keys; key p comes after the loop""",
    "LOAD_KV": _PLAIN["LOAD_KV"],
    "NEW_KEY": """
    if (warp == 0) {                                // key p from registers: one more online-softmax step
        float sp = 0.f;
#pragma unroll
        for (int e = 0; e < E; ++e) sp += qv[e] * static_cast<float>(nk[e]);
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sp += __shfl_xor_sync(0xffffffff, sp, o);
        if (CAP) sp = tanhf(sp / cap) * cap * log2e;
        const float mx_ = fmaxf(m, sp);
        const float corr = exp2f(m - mx_), w = exp2f(sp - mx_);
        l = l * corr + w;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = acc[e] * corr + w * static_cast<float>(nv[e]);
        m = mx_;
    }""",
}


def _source(parts: dict) -> str:
    out = _SOURCE
    for marker, code in parts.items():  # each marker is a line of its own
        out = out.replace(marker + "\n", code.strip("\n") + "\n" if code else "")
    return out


_KERNEL = None
_ROPE_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:  # built on first use: mx.fast.cuda_kernel exists on every build, runs only on CUDA
        _KERNEL = mx.fast.cuda_kernel(
            name="paged_decode_attention_v4",  # a new name per source change: MLX caches compiled kernels by name
            input_names=["q", "cache", "blocks", "q_pos"],
            output_names=["out"],
            source=_source(_PLAIN),
        )
    return _KERNEL


def _rope_kernel():
    global _ROPE_KERNEL
    if _ROPE_KERNEL is None:
        _ROPE_KERNEL = mx.fast.cuda_kernel(
            name="paged_decode_rope_attention_v2",
            input_names=["q", "k", "v", "positions", "inv_freq", "cache", "blocks", "q_pos", "kv_rows"],
            output_names=["out"],
            source=_source(_ROPE),
            ensure_row_contiguous=False,  # q, k, v: column slices read in place; the rest are contiguous
        )
    return _ROPE_KERNEL


def float_bits(x: float) -> int:
    """A positive float as an int template constant: templates take int/bool/dtype, and their values
    name the compiled kernel, so two scales never share one (a negative int would put '-' in the name)."""
    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def fits(head_dim: int) -> bool:
    """The kernels serve this head size: it splits over a warp's 32 lanes, at most 8 elements a lane."""
    return head_dim % 32 == 0 and head_dim <= 256


# Above this many CUDA blocks (query heads x sequences) a decode layer runs RoPE + in-place write and the plain
# kernel instead of the fused one: every block of the fused kernel rotates its q head and its KV head's key
# before its first key load, work the RoPE kernel does once, and once the grid spans a few waves of the
# GPU the step is GPU-bound and that costs more than the launch it saves (docs/benchmarks.md).
FUSED_MAX_BLOCKS = 2048


def rope_fits(head_dim: int, rotary_dims: int, traditional: bool) -> bool:
    """Whether `paged_decode_rope_attention` serves this layer's shapes: the plain kernel does, and the rotated
    pairs map onto a lane's E = D / 32 elements (GPT-J: pairs inside a lane; NeoX: R/2 a multiple of E)."""
    e = head_dim // 32
    return fits(head_dim) and (e % 2 == 0 if traditional else (rotary_dims // 2) % e == 0)


def paged_decode_rope_attention(q, k, v, positions, inv_freq, traditional: bool, mscale: float, cache, kv_rows,
                                blocks, q_pos, *, num_heads: int, scale: float, window: int = -1, cap: float = 0.0,
                                tune: tuple[int, int] = (8, 4)):
    """A decode layer in one kernel: RoPE of q [T, H*D] and k [T, KVH*D] (un-rotated, any strides) at
    `positions` [T], this step's K/V written into `cache` in place at `kv_rows` (as
    cuda_rope.rope_qkv_into_cache writes them), and the attention of `paged_decode_attention`; `tune`: (warps
    per block, keys in flight per warp). Returns [T, H * D] in q's dtype; the caller keeps `cache` itself as
    the updated cache."""
    t, d = q.shape[0], cache.shape[-1]
    _, kvh, _, block_size, _ = cache.shape
    blocks = blocks if blocks.dtype == mx.int32 else blocks.astype(mx.int32)
    q_pos = q_pos if q_pos.dtype == mx.int32 else q_pos.astype(mx.int32)
    q, k, v = q.reshape(t, num_heads * d), k.reshape(t, kvh * d), v.reshape(t, kvh * d)  # same shapes: no nodes
    nw, u = tune
    out = _rope_kernel()(
        inputs=[q, k, v, positions, inv_freq, cache, blocks, q_pos, kv_rows],
        template=_template(q.dtype, cache.dtype, d, block_size, num_heads // kvh, nw, u, window, scale, cap)
        + [("R", 2 * inv_freq.shape[0]), ("TRAD", bool(traditional)), ("MSCALE_BITS", float_bits(mscale))],
        grid=(num_heads * nw * 32, t, 1),
        threadgroup=(nw * 32, 1, 1),
        output_shapes=[(t, num_heads * d)],
        output_dtypes=[q.dtype],
    )
    return out[0]


def _template(out_dtype, cache_dtype, d, block_size, g, nw, u, window, scale, cap) -> list:
    return [("OutT", out_dtype), ("KT", cache_dtype), ("D", d), ("BS", block_size), ("G", g), ("NW", nw), ("U", u),
            ("WINDOW", max(int(window), 0)), ("CAP", bool(cap > 0)), ("SCALE_BITS", float_bits(scale)),
            ("CAP_BITS", float_bits(cap if cap > 0 else 1.0))]


def paged_decode_attention(q, cache, blocks, q_pos, *, scale: float, window: int = -1, cap: float = 0.0,
                           tune: tuple[int, int] = (8, 4)):
    """q [T, H, D] (one query per sequence); cache [2, KVH, blocks, block_size, D] (K, V); blocks [T, n]
    int32 block table; q_pos [T] or [T, 1] int32 position of each query (its context is q_pos + 1 keys);
    `tune`: (warps per block, keys in flight per warp). Returns [T, H * D] in q's dtype."""
    t, h, d = q.shape
    _, kvh, _, block_size, _ = cache.shape
    nw, u = tune
    blocks = blocks if blocks.dtype == mx.int32 else blocks.astype(mx.int32)
    q_pos = q_pos if q_pos.dtype == mx.int32 else q_pos.astype(mx.int32)
    out = _kernel()(
        inputs=[q, cache, blocks, q_pos],
        template=_template(q.dtype, cache.dtype, d, block_size, h // kvh, nw, u, window, scale, cap),
        grid=(h * nw * 32, t, 1),
        threadgroup=(nw * 32, 1, 1),
        output_shapes=[(t, h * d)],
        output_dtypes=[q.dtype],
    )
    return out[0]
