"""Paged attention of the kernel tables (runtime/kernels: the device's and the generic one) vs a dense torch
reference, over random batches: block sizes, sequence and chunk lengths, GQA ratios, shuffled block tables
and shared prefix blocks, with and without attention sinks."""

import runtime  # noqa: F401  (fast BLAS before mlx)

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from passes.fused.rope import rope
from runtime import kernels
from runtime.batch import StepInput, attention_arrays, to_mlx
from runtime.config import RuntimeConfig

HEAD_DIM = 32
# the device's own table and the generic one (every device runs the generic table)
TABLES = {"device": kernels.current(), "generic": kernels.Generic(RuntimeConfig())}


@st.composite
def batches(draw):
    block_size = draw(st.sampled_from([8, 16, 32]))
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 4]))
    num_seqs = draw(st.integers(1, 4))
    share = draw(st.booleans()) and num_seqs > 1
    prefix = draw(st.integers(1, 3)) * block_size if share else 0
    # per sequence: tokens already cached (context) and new tokens this step (a chunk or a decode)
    cached = [draw(st.integers(0, 70)) for _ in range(num_seqs)]
    if share:
        cached = [max(c, prefix) for c in cached]
    # powers of two: a step whose prompts all fill their bucket takes the in-order layout (no gathers)
    new = [draw(st.sampled_from([1, 1, 2, 5, 16, 17, 32, 40])) for _ in range(num_seqs)]
    window = draw(st.sampled_from([-1, -1, 8, 33]))
    seed = draw(st.integers(0, 2**16))
    return block_size, kv_heads, groups, cached, new, prefix, window, seed


def _layout(block_size, cached, new, prefix, rng):
    """Block tables over a shuffled pool; with a prefix, every sequence shares sequence 0's first blocks."""
    lens = [c + n for c, n in zip(cached, new)]
    need = [-(-n // block_size) for n in lens]
    shared = prefix // block_size
    pool = list(rng.permutation(sum(need) + 4))
    tables = []
    for s, n in enumerate(need):
        if s > 0 and shared:
            tables.append(tables[0][:shared] + [pool.pop() for _ in range(n - shared)])
        else:
            tables.append([pool.pop() for _ in range(n)])
    width = max(need)
    table = np.array([t + [0] * (width - len(t)) for t in tables], dtype=np.int64)
    return lens, table, sum(need) + 4


@settings(max_examples=60, deadline=None)
@given(batches())
@example((16, 2, 2, [0, 0], [16, 16], 0, -1, 1))  # in-order layout: fresh prompts (causal, no gathers)
@example((16, 2, 2, [20], [32], 0, 8, 2))  # in-order layout: a chunk over earlier context, windowed
@pytest.mark.parametrize("with_sinks", [False, True])
def test_paged_attention_matches_dense(with_sinks, case):
    block_size, kv_heads, groups, cached, new, prefix, window, seed = case
    rng = np.random.default_rng(seed)
    heads = kv_heads * groups
    lens, table, num_blocks = _layout(block_size, cached, new, prefix, rng)

    # Every sequence's full K/V history; shared-prefix sequences share sequence 0's prefix rows.
    hist_k = [rng.standard_normal((n, kv_heads, HEAD_DIM), dtype=np.float32) for n in lens]
    hist_v = [rng.standard_normal((n, kv_heads, HEAD_DIM), dtype=np.float32) for n in lens]
    for s in range(1, len(lens)):
        if prefix:
            hist_k[s][:prefix], hist_v[s][:prefix] = hist_k[0][:prefix], hist_v[0][:prefix]

    def slot(s, p):
        return table[s, p // block_size] * block_size + p % block_size

    k_cache = np.zeros((num_blocks * block_size, kv_heads, HEAD_DIM), np.float32)
    v_cache = np.zeros_like(k_cache)
    for s, c in enumerate(cached):  # earlier steps wrote the context
        for p in range(c):
            k_cache[slot(s, p)], v_cache[slot(s, p)] = hist_k[s][p], hist_v[s][p]

    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(cached, new)])
    seq_of = np.repeat(np.arange(len(new)), new)
    q = rng.standard_normal((len(positions), heads * HEAD_DIM), dtype=np.float32)
    k = np.stack([hist_k[s][p] for s, p in zip(seq_of, positions)]).reshape(len(positions), -1)
    v = np.stack([hist_v[s][p] for s, p in zip(seq_of, positions)]).reshape(len(positions), -1)
    step = StepInput(
        input_ids=np.zeros(len(positions), np.int64), positions=positions,
        query_start_loc=np.concatenate([[0], np.cumsum(new)]), seq_lens=np.array(lens),
        block_table=table, slot_mapping=np.array([slot(s, p) for s, p in zip(seq_of, positions)]),
        logits_indices=np.array([0]),
    )
    batch = to_mlx(attention_arrays(step, block_size))
    def head_major(c):  # the runtime's layout: [KVH, blocks, block_size, D]
        return mx.array(np.ascontiguousarray(c.reshape(num_blocks, block_size, kv_heads, HEAD_DIM).transpose(2, 0, 1, 3)))

    cache = mx.stack([head_major(k_cache), head_major(v_cache)])  # [2, KVH, blocks, block_size, D]
    scale = HEAD_DIM**-0.5
    sinks = rng.standard_normal(heads, dtype=np.float32) if with_sinks else None
    for table in TABLES.values():
        out, written = table.paged_attention(
            mx.array(q), mx.array(k), mx.array(v), cache, batch, None if sinks is None else mx.array(sinks),
            num_heads=heads, num_kv_heads=kv_heads, head_dim=HEAD_DIM, scale=scale, sliding_window=window,
            logit_cap=0.0,
        )
        _check_against_torch(table, np.array(out), written, q, k, v, hist_k, hist_v, step, cached, new, heads, kv_heads,
                             groups, window, scale, sinks)


def _check_against_torch(table, out, cache, q, k, v, hist_k, hist_v, step, cached, new, heads, kv_heads, groups,
                         window, scale, sinks=None):
    start = 0
    for s, (c, n) in enumerate(zip(cached, new)):
        qs = torch.from_numpy(q[start:start + n]).view(n, heads, HEAD_DIM).transpose(0, 1)
        ks = torch.from_numpy(hist_k[s]).transpose(0, 1).repeat_interleave(groups, 0)
        vs = torch.from_numpy(hist_v[s]).transpose(0, 1).repeat_interleave(groups, 0)
        qpos = torch.arange(c, c + n)[:, None]
        kpos = torch.arange(c + n)[None, :]
        mask = kpos <= qpos
        if window > 0:
            mask &= kpos > qpos - window
        if sinks is None:
            ref = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        else:  # each head's sink logit joins the softmax and attends to nothing
            scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))
            sink = torch.from_numpy(sinks).reshape(heads, 1, 1).expand(heads, n, 1)
            ref = torch.cat([scores, sink], -1).softmax(-1)[..., :-1] @ vs
        ref = ref.transpose(0, 1).reshape(n, -1).numpy()
        err = np.abs(out[start:start + n] - ref).max()
        assert err <= 1e-5, f"{table}: sequence {s} (cached {c}, new {n}): max abs error {err}"
        start += n
    # the new K/V landed in their slots
    for new, plane in ((k, 0), (v, 1)):
        written = np.array(cache[plane]).transpose(1, 2, 0, 3).reshape(-1, kv_heads, HEAD_DIM)[step.slot_mapping]
        assert np.array_equal(written, new.reshape(-1, kv_heads, HEAD_DIM))


@pytest.mark.parametrize("traditional, rot, mscale", [(False, HEAD_DIM, 1.0), (True, HEAD_DIM // 2, 1.0),
                                                      (False, HEAD_DIM // 2, 1.0), (False, HEAD_DIM, 0.7),
                                                      (False, HEAD_DIM // 2, 0.7)])
@pytest.mark.parametrize("kernel_table", list(TABLES))
def test_rope_inside_matches_rotating_first(traditional, rot, mscale, kernel_table):
    """`rope_paged_attention`: un-rotated q and k, rotated by the kernel table, give what the torch reference
    rope (passes/fused/rope.py) applied first gives: the output and the K written to the cache."""
    kernels_ = TABLES[kernel_table]
    rng = np.random.default_rng(rot)
    kv_heads, heads, block_size, t = 2, 4, 8, 11
    positions = np.arange(9, 9 + t)  # one sequence: a chunk after 9 cached tokens (zeros), read through the cache
    table = np.array([[3, 0, 2, 1]])
    slots = table[0, positions // block_size] * block_size + positions % block_size
    step = StepInput(input_ids=np.zeros(t, np.int64), positions=positions, query_start_loc=np.array([0, t]),
                     seq_lens=np.array([9 + t]), block_table=table, slot_mapping=slots, logits_indices=np.array([0]))
    batch = to_mlx(attention_arrays(step, block_size))
    q, k, v = (rng.standard_normal((t, h * HEAD_DIM), dtype=np.float32) for h in (heads, kv_heads, kv_heads))
    inv_freq = (1.0 / 10000 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)
    kw = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=HEAD_DIM, scale=HEAD_DIM**-0.5, sliding_window=-1,
              logit_cap=0.0)
    cache = mx.zeros((2, kv_heads, 4, block_size, HEAD_DIM))
    got, got_cache = kernels_.rope_paged_attention(mx.array(q), mx.array(k), mx.array(v),
                                                mx.array(positions.astype(np.int32)), mx.array(inv_freq), cache, batch,
                                                traditional=traditional, mscale=mscale, **kw)
    pos, freq = torch.from_numpy(positions), torch.from_numpy(inv_freq)
    q_rot, k_rot = (rope(torch.from_numpy(x), pos, freq, HEAD_DIM, traditional, mscale).numpy() for x in (q, k))
    want, want_cache = kernels_.paged_attention(mx.array(q_rot), mx.array(k_rot), mx.array(v), cache, batch, **kw)
    for name, a, b in (("out", got, want), ("cache", got_cache, want_cache)):
        err = np.abs(np.array(a) - np.array(b)).max()
        assert err <= 2e-5, f"{name}: max abs error {err} (traditional {traditional}, rot {rot}, mscale {mscale})"
