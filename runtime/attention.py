"""Paged attention in MLX: write this step's K/V through the slot mapping, gather each sequence's
K/V through its block table, attend with `mx.fast.scaled_dot_product_attention` (on the CPU with
runtime/fastmath.py's equivalent: MLX's CPU softmax was most of a prefill).

The cache is head-major, [KVH, blocks, block_size, D] per layer: gathering a group's block table
gives [KVH, S, Lk, D] at once, which SDPA reads as [S, KVH, Lk, D] through strides (no transpose
copy; a token-major cache needs one per layer and step, which measured 4-7x slower at decode).
The batch (runtime/batch.py) splits sequences into groups (decodes, the rest); each group lays its
queries out as [S, Lq] (sequence, query position; padded rows point at token 0 and are dropped
again) and its keys as [S, Lk] positions covered by whole blocks. The mask follows from positions
alone: key j is visible to a query at position p iff j <= p (and j > p - window), which is exactly
causal prefill, chunked prefill over earlier context, and decode.
"""

from __future__ import annotations

import mlx.core as mx

from runtime import fastmath, paged_kernel


def paged_attention(q, k, v, cache, batch, *, num_heads, num_kv_heads, head_dim, scale, window=-1, cap=0.0):
    """q: [T, H*D]; k, v: [T, KVH*D]; cache: (k_cache, v_cache) each [KVH, blocks, block_size, D].

    Returns (out [T, H*D], updated cache). GQA is handled by SDPA without repeating K/V.
    """
    k_cache, v_cache = cache
    shape = k_cache.shape
    if "kv_rows" in batch:  # rows built once per step (runtime.model.device_batch): no per-layer index math
        k_cache = _write_rows(k_cache, k, batch["kv_rows"], num_kv_heads, head_dim)
        v_cache = _write_rows(v_cache, v, batch["kv_rows"], num_kv_heads, head_dim)
    else:
        k_flat = k_cache.reshape(num_kv_heads, -1, head_dim)  # [KVH, slots, D]
        v_flat = v_cache.reshape(num_kv_heads, -1, head_dim)
        slots = batch["slot_mapping"]
        k_flat[:, slots] = k.reshape(-1, num_kv_heads, head_dim).swapaxes(0, 1).astype(k_flat.dtype)
        v_flat[:, slots] = v.reshape(-1, num_kv_heads, head_dim).swapaxes(0, 1).astype(v_flat.dtype)
        k_cache, v_cache = k_flat.reshape(shape), v_flat.reshape(shape)

    q = q.reshape(-1, num_heads, head_dim)
    groups = batch["groups"]
    if len(groups) == 1 and groups[0]["q_index"].shape == (q.shape[0], 1):  # static: shapes only
        return _attend_decode(q, k_cache, v_cache, groups[0], scale, window, cap), (k_cache, v_cache)
    k, v = k.reshape(-1, num_kv_heads, head_dim), v.reshape(-1, num_kv_heads, head_dim)
    # One group whose [S, Lq] layout holds exactly the T tokens: every sequence has Lq of them, so the
    # layout is the token order itself (q_index = arange(T) as [S, Lq], out_index = arange(T)) and
    # reshapes replace the four gathers per layer (a batch-1 prefill, or equal prompts; static: shapes only)
    in_order = len(groups) == 1 and groups[0]["q_index"].size == q.shape[0]
    outs = [
        _attend(q, k, v, k_cache, v_cache, group, scale, window, cap, in_order).reshape(-1, num_heads * head_dim)
        for group in groups
    ]
    if in_order:
        return outs[0], (k_cache, v_cache)
    out = (outs[0] if len(outs) == 1 else mx.concatenate(outs))[batch["out_index"]]
    return out, (k_cache, v_cache)


def _attend(q, k, v, k_cache, v_cache, group, scale, window, cap, in_order=False):
    """One group of sequences: queries [S, H, Lq, D] against their keys [S, KVH, Lk, D]: gathered from
    the cache, or, for prompts with no earlier context (no `blocks`, runtime/batch.py), this step's own
    K/V laid out like the queries, under a causal mask (MLX's fused causal SDPA on a GPU; padded rows
    sit after every real query, so causality hides them). `in_order`: the layout is the token order."""
    index = group["q_index"]
    lay_out = (lambda x: x.reshape(*index.shape, *x.shape[1:])) if in_order else (lambda x: x[index])
    queries = lay_out(q).transpose(0, 2, 1, 3)
    if "blocks" not in group:
        keys = lay_out(k).transpose(0, 2, 1, 3).astype(queries.dtype)
        values = lay_out(v).transpose(0, 2, 1, 3).astype(queries.dtype)
        pos = mx.arange(index.shape[1], dtype=mx.int32)
        mask = "causal" if window <= 0 and cap <= 0 else _mask(pos[None], index.shape[1], window, pos)
    else:
        keys, values, mask = _from_cache(k_cache, v_cache, group, window, queries.dtype)  # mask [S, 1, Lq, Lk]
    return _sdpa(queries, keys, values, scale, mask, cap).transpose(0, 2, 1, 3)  # [S, Lq, H, D]


def _attend_decode(q, k_cache, v_cache, group, scale, window, cap):
    """A pure decode step (every token is its sequence's only query; GPU work, issue 10): the queries
    are q itself as [T, H, 1, D] and the output goes straight back to [T, H*D], so the per-layer query
    gather, the padded-row gather and two transposes drop out (q_index and out_index are aranges here).
    On MLX's CUDA backend one fused kernel (runtime/paged_kernel.py) reads the cache through the block
    table in place: no K/V gather copy, no mask, one launch instead of ~9 per layer."""
    t, h, d = q.shape
    if paged_kernel.usable(d):
        return paged_kernel.paged_decode_attention(
            q, k_cache, v_cache, group["blocks"], group["q_pos"], scale=scale, window=window, cap=cap)
    queries = q.reshape(t, h, 1, d)
    keys, values, mask = _from_cache(k_cache, v_cache, group, window, queries.dtype)  # mask [T, 1, 1, Lk]
    return _sdpa(queries, keys, values, scale, mask, cap).reshape(t, h * d)  # [T, H, 1, D] is [T, 1, H, D]


def _from_cache(k_cache, v_cache, group, window, dtype):
    """The group's keys and values gathered from the cache (in `dtype`) and the mask of what each
    query may see."""
    keys = _gather(k_cache, group).astype(dtype)
    values = _gather(v_cache, group).astype(dtype)
    return keys, values, _mask(group["q_pos"], keys.shape[2], window, group.get("key_pos"))


def _sdpa(queries, keys, values, scale, mask, cap):
    if cap > 0:
        return _softcapped(queries, keys, values, scale, mask, cap)
    return fastmath.attention(queries, keys, values, scale=scale, mask=mask)


def _write_rows(cache, new, rows, num_kv_heads, head_dim):
    """Scatter this step's K (or V) [T, KVH*D] into the cache viewed as [KVH * slots, D] rows; `rows`
    [KVH * T] lists them head-major. One index array and no slice: MLX's `cache[:, slots] = ...` builds
    an arange index per call, a kernel per layer and tensor that the GPU profile showed (issue 10)."""
    flat = cache.reshape(-1, head_dim)
    flat[rows] = new.reshape(-1, num_kv_heads, head_dim).swapaxes(0, 1).reshape(-1, head_dim).astype(flat.dtype)
    return flat.reshape(cache.shape)


def _gather(cache, group):
    """[KVH, blocks, block_size, D] cache -> [S, KVH, n * block_size, D] keys of the group's [S, n] block
    table (a view of one copy). The cache is taken as [KVH * blocks] rows of block_size * D: MLX's CPU
    `take` copies whole contiguous rows along axis 0 ~12x faster than it gathers along axis 1
    (0.05 vs 0.59 ms for 3 x 64 blocks of 16 x 64 f32). `block_rows` ([KVH * S * n], head-major) comes
    from runtime.model.device_batch, once per step; without it, it is made here."""
    kvh, num_blocks, block_size, d = cache.shape
    s, n = group["blocks"].shape
    rows = group.get("block_rows")
    if rows is None:
        rows = (mx.arange(kvh, dtype=mx.int32)[:, None, None] * num_blocks + group["blocks"][None]).reshape(-1)
    flat = cache.reshape(kvh * num_blocks, block_size * d)
    return mx.take(flat, rows, axis=0).reshape(kvh, s, n * block_size, d).transpose(1, 0, 2, 3)


def _mask(q_pos, kv_len: int, window: int, key_pos=None):
    if key_pos is None:  # runtime.model.device_batch passes it in, made once per step
        key_pos = mx.arange(kv_len, dtype=mx.int32)
    qp = q_pos[:, None, :, None]
    visible = key_pos <= qp
    if window > 0:
        visible = visible & (key_pos > qp - window)
    return visible


def _softcapped(q, k, v, scale, mask, cap):
    """Gemma-2 style logit soft-capping, which the fused SDPA kernel does not offer."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = mx.repeat(k, groups, axis=1)
        v = mx.repeat(v, groups, axis=1)
    scores = (q @ k.swapaxes(-1, -2)).astype(mx.float32) * scale
    scores = mx.tanh(scores / cap) * cap
    scores = mx.where(mask, scores, -mx.inf)
    return fastmath.softmax(scores, axis=-1).astype(v.dtype) @ v
