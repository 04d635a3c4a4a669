"""Paged attention composed from MLX ops: write this step's K/V through the slot mapping, gather each
sequence's K/V through its block table, attend. The generic kernel table runs it as it is; a backend
replaces the pieces it has kernels for (`table.attention`, `table.new_kv`, `table.attend_decode`,
`table.attend_group`).

A layer's cache is one array, K then V, head-major: [2, KVH, blocks, block_size, D]. One scatter
writes this step's K and V; gathering a group's block table gives [2, KVH, S, Lk, D] in one copy,
which attention reads as [S, KVH, Lk, D] through strides (no transpose copy; a token-major cache needs
one per layer and step, several times slower at decode). With `rope`, q and k arrive un-rotated
(passes/fused/rope_paged_attention.py) and are rotated here, before the cache write.
The batch (runtime/batch.py) splits sequences into groups (decodes, the rest); each group lays its
queries out as [S, Lq] (sequence, query position; padded rows point at token 0 and are dropped
again) and its keys as [S, Lk] positions covered by whole blocks. The mask follows from positions
alone: key j is visible to a query at position p iff j <= p (and j > p - window), which is exactly
causal prefill, chunked prefill over earlier context, and decode.
"""

from __future__ import annotations

import mlx.core as mx


def is_decode(q, batch) -> bool:
    """Every token of the step is its sequence's only query (static: shapes only)."""
    groups = batch["groups"]
    return len(groups) == 1 and groups[0]["q_index"].shape == (q.shape[0], 1)


def paged_attention(table, q, k, v, cache, batch, *, num_heads, num_kv_heads, head_dim, scale, window=-1, cap=0.0,
                    rope=None, sinks=None):
    """q: [T, H*D]; k, v: [T, KVH*D]; cache: [2, KVH, blocks, block_size, D], K then V.
    rope: None, or (positions [T], inv_freq [R/2], traditional, mscale) when q and k come un-rotated.
    sinks: None, or [H] logits each softmax also counts (attention sinks; composed here, not a backend's kernel).

    Returns (out [T, H*D], updated cache). GQA is handled by the attention without repeating K/V.
    """
    t = q.shape[0]
    groups = batch["groups"]
    q, k, v, rows = table.new_kv(q, k, v, rope, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
    cache = write(cache, rows, batch)
    if is_decode(q, batch):
        if sinks is not None:
            return attend_decode(table, q, cache, groups[0], scale=scale, window=window, cap=cap, sinks=sinks), cache
        return table.attend_decode(q, cache, groups[0], scale=scale, window=window, cap=cap), cache
    # One group whose [S, Lq] layout holds exactly the T tokens: every sequence has Lq of them, so the
    # layout is the token order itself (q_index = arange(T) as [S, Lq], out_index = arange(T)) and
    # reshapes replace the four gathers per layer (a batch-1 prefill, or equal prompts; static: shapes only)
    in_order = len(groups) == 1 and groups[0]["q_index"].size == t
    outs = [
        (table.attend_group(q, k, v, cache, group, scale=scale, window=window, cap=cap, in_order=in_order)
         if sinks is None else _attend(table, q, k, v, cache, group, scale, window, cap, in_order, sinks=sinks))
        .reshape(-1, num_heads * head_dim)
        for group in groups
    ]
    if in_order:
        return outs[0], cache
    out = (outs[0] if len(outs) == 1 else mx.concatenate(outs))[batch["out_index"]]
    return out, cache


def new_kv(table, q, k, v, rope, *, num_heads, num_kv_heads, head_dim):
    """q [T, H, D], k and v [T, KVH, D], and `rows` [2 * KVH * T, D]: this step's K then V as the cache
    writes them (head-major), rotated first by `table.rope` when `rope` is given."""
    t = q.shape[0]
    if rope is not None:
        positions, inv_freq, traditional, mscale = rope
        q = table.rope(q, positions, inv_freq, head_dim=head_dim, traditional=traditional, mscale=mscale)
        k = table.rope(k, positions, inv_freq, head_dim=head_dim, traditional=traditional, mscale=mscale)
    q = q.reshape(t, num_heads, head_dim)
    k, v = k.reshape(t, num_kv_heads, head_dim), v.reshape(t, num_kv_heads, head_dim)
    rows = mx.concatenate([k.swapaxes(0, 1), v.swapaxes(0, 1)]).reshape(-1, head_dim)
    return q, k, v, rows


def write(cache, rows, batch):
    """Scatter `rows` [2 * KVH * T, D] into the cache viewed as [2 * KVH * slots, D] rows, at
    `batch["kv_rows"]` (made once per step by runtime.model.device_batch) or, without it, at the rows
    of `slot_mapping`: one scatter writes K and V (MLX's `cache[:, slots] = ...` would build an arange
    index per call, a kernel per layer and tensor on a GPU)."""
    index = batch.get("kv_rows")
    if index is None:
        planes, blocks, block_size = cache.shape[0] * cache.shape[1], cache.shape[2], cache.shape[3]
        index = (mx.arange(planes, dtype=mx.int32)[:, None] * (blocks * block_size) + batch["slot_mapping"]).reshape(-1)
    flat = cache.reshape(-1, cache.shape[-1])
    flat[index] = rows.astype(flat.dtype)
    return flat.reshape(cache.shape)


def lay_out(q, group, in_order: bool):
    """The group's rows of q [T, ...] as [S, Lq, ...]: a reshape when the layout is the token order."""
    index = group["q_index"]
    return q.reshape(*index.shape, *q.shape[1:]) if in_order else q[index]


def attend_group(table, q, k, v, cache, group, *, scale, window, cap, in_order=False):
    """One group of a step that is not a pure decode: [S, Lq, H, D]."""
    return _attend(table, q, k, v, cache, group, scale, window, cap, in_order)


def _attend(table, q, k, v, cache, group, scale, window, cap, in_order=False, latent=0, sinks=None):
    """One group of sequences: queries [S, H, Lq, D] against their keys [S, KVH, Lk, D]: gathered from
    the cache, or, for prompts with no earlier context (no `blocks`, runtime/batch.py), this step's own
    K/V laid out like the queries, under a causal mask (MLX's fused causal SDPA on a GPU; padded rows
    sit after every real query, so causality hides them). `in_order`: the layout is the token order."""
    index = group["q_index"]
    queries = lay_out(q, group, in_order).transpose(0, 2, 1, 3)
    if "blocks" not in group:
        keys = lay_out(k, group, in_order).transpose(0, 2, 1, 3).astype(queries.dtype)
        values = lay_out(v, group, in_order).transpose(0, 2, 1, 3).astype(queries.dtype)
        pos = mx.arange(index.shape[1], dtype=mx.int32)
        mask = "causal" if window <= 0 and cap <= 0 else _mask(pos[None], index.shape[1], window, pos)
    else:
        keys, values, mask = _from_cache(cache, group, window, queries.dtype, latent)  # mask [S, 1, Lq, Lk]
    return _sdpa(table, queries, keys, values, scale, mask, cap, sinks).transpose(0, 2, 1, 3)  # [S, Lq, H, D]


def attend_decode(table, q, cache, group, *, scale, window, cap, latent=0, sinks=None):
    """A pure decode step (every token is its sequence's only query): the queries are q itself as
    [T, H, 1, D] and the output goes straight back to [T, H*D], so the per-layer query gather, the
    padded-row gather and two transposes drop out (q_index and out_index are aranges here)."""
    t, h, d = q.shape
    queries = q.reshape(t, h, 1, d)
    keys, values, mask = _from_cache(cache, group, window, queries.dtype, latent)  # mask [T, 1, 1, Lk]
    out = _sdpa(table, queries, keys, values, scale, mask, cap, sinks)  # [T, H, 1, Dv] is [T, 1, H, Dv]
    return out.reshape(t, h * out.shape[-1])


def _from_cache(cache, group, window, dtype, latent=0):
    """The group's keys and values gathered from the cache (in `dtype`) and the mask of what each
    query may see. `latent`: a one-plane latent cache whose first `latent` values of each row are the values."""
    both = _gather(cache, group).astype(dtype)
    keys, values = (both[0], both[0][..., :latent]) if latent else (both[0], both[1])
    return keys, values, _mask(group["q_pos"], keys.shape[2], window, group.get("key_pos"))


def _sdpa(table, queries, keys, values, scale, mask, cap, sinks=None):
    if sinks is not None:
        return _with_sinks(queries, keys, values, scale, mask, cap, sinks)
    if cap > 0:
        return _softcapped(table, queries, keys, values, scale, mask, cap)
    return table.attention(queries, keys, values, scale=scale, mask=mask)


def _with_sinks(queries, keys, values, scale, mask, cap, sinks):
    """Attention whose softmax also counts one logit per head that attends to nothing (the head's sink): queries
    [S, H, Lq, D] over keys and values [S, KVH, Lk, D] (GQA), in float32; mask boolean (True: visible) or
    "causal" (Lq == Lk here). A row with no visible key gives zeros."""
    s, h, lq, d = queries.shape
    kvh, lk = keys.shape[1], keys.shape[2]
    q = queries.astype(mx.float32).reshape(s, kvh, (h // kvh) * lq, d)
    scores = (q @ keys.astype(mx.float32).swapaxes(-1, -2)).reshape(s, h, lq, lk) * scale
    if cap > 0:
        scores = mx.tanh(scores / cap) * cap
    if isinstance(mask, str):
        mask = mx.arange(lk)[None, :] <= mx.arange(lq)[:, None] + (lk - lq)
    scores = mx.where(mask, scores, -mx.inf)
    sink = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, h, 1, 1), (s, h, lq, 1))
    top = mx.maximum(scores.max(axis=-1, keepdims=True), sink)
    probs = mx.exp(scores - top)
    total = probs.sum(axis=-1, keepdims=True) + mx.exp(sink - top)
    out = (probs / total).reshape(s, kvh, (h // kvh) * lq, lk) @ values.astype(mx.float32)
    return out.reshape(s, h, lq, values.shape[-1]).astype(queries.dtype)


def _gather(cache, group):
    """[2, KVH, blocks, block_size, D] cache -> [2, S, KVH, n * block_size, D]: the keys and values of the
    group's [S, n] block table (views of one copy). The cache is taken as [2 * KVH * blocks] rows of
    block_size * D: MLX's CPU `take` copies whole contiguous rows along axis 0 many times faster than it
    gathers along axis 1. `block_rows` ([2 * KVH * S * n], head-major) comes from
    runtime.model.device_batch, once per step; without it, it is made here."""
    two, kvh, num_blocks, block_size, d = cache.shape
    s, n = group["blocks"].shape
    rows = group.get("block_rows")
    if rows is None:
        rows = (mx.arange(two * kvh, dtype=mx.int32)[:, None, None] * num_blocks + group["blocks"][None]).reshape(-1)
    flat = cache.reshape(two * kvh * num_blocks, block_size * d)
    return mx.take(flat, rows, axis=0).reshape(two, kvh, s, n * block_size, d).transpose(0, 2, 1, 3, 4)


def latent_attention(table, q, kv_c, k_pe, kv_b_weight, cache, batch, *, num_heads, qk_nope_head_dim,
                     qk_rope_head_dim, v_head_dim, kv_lora_rank, scale):
    """Multi-head latent attention, absorbed, over a latent cache [1, 1, blocks, block_size, kv_lora_rank + rope]
    (passes/fused/paged_mla_attention.py): each head's q_nope goes into the latent space through its key rows of
    kv_b_weight, the heads attend over [kv_c, k_pe] rows as one shared KV head (MQA), and the attended latents come
    out through the value rows. Returns (out [T, heads * v_head_dim], updated cache)."""
    t, h, nope, r = q.shape[0], num_heads, qk_nope_head_dim, kv_lora_rank
    q = q.reshape(t, h, nope + qk_rope_head_dim)
    w = kv_b_weight.reshape(h, nope + v_head_dim, r).astype(q.dtype)
    q_latent = (q[..., :nope].transpose(1, 0, 2) @ w[:, :nope]).transpose(1, 0, 2)  # [T, H, r]
    queries = mx.concatenate([q_latent, q[..., nope:]], axis=-1)  # [T, H, r + rope]
    rows = mx.concatenate([kv_c, k_pe.reshape(t, qk_rope_head_dim).astype(kv_c.dtype)], axis=-1)  # [T, r + rope]
    cache = write(cache, rows, batch)
    keys = rows.reshape(t, 1, -1)
    groups = batch["groups"]
    if is_decode(q, batch):
        out = attend_decode(table, queries, cache, groups[0], scale=scale, window=-1, cap=0.0, latent=r)
    else:
        in_order = len(groups) == 1 and groups[0]["q_index"].size == t
        outs = [_attend(table, queries, keys, keys[..., :r], cache, group, scale, -1, 0.0, in_order, latent=r)
                .reshape(-1, h * r) for group in groups]
        out = outs[0] if in_order else (outs[0] if len(outs) == 1 else mx.concatenate(outs))[batch["out_index"]]
    out = out.reshape(t, h, r).transpose(1, 0, 2) @ w[:, nope:].swapaxes(1, 2)  # [H, T, v]
    return out.transpose(1, 0, 2).reshape(t, h * v_head_dim), cache


def _mask(q_pos, kv_len: int, window: int, key_pos=None):
    if key_pos is None:  # runtime.model.device_batch passes it in, made once per step
        key_pos = mx.arange(kv_len, dtype=mx.int32)
    qp = q_pos[:, None, :, None]
    visible = key_pos <= qp
    if window > 0:
        visible = visible & (key_pos > qp - window)
    return visible


def _softcapped(table, q, k, v, scale, mask, cap):
    """Gemma-2 style logit soft-capping, which the fused SDPA kernel does not offer."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = mx.repeat(k, groups, axis=1)
        v = mx.repeat(v, groups, axis=1)
    scores = (q @ k.swapaxes(-1, -2)).astype(mx.float32) * scale
    scores = mx.tanh(scores / cap) * cap
    scores = mx.where(mask, scores, -mx.inf)
    return table.softmax(scores, axis=-1).astype(v.dtype) @ v
