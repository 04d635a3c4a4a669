"""The compiled paged decode attention (runtime/kernels/cpu_ext.py, csrc/attention_impl.h) against a float64
NumPy reference, and the CPU kernel table's decode through it against the generic composed path.

Every cache and query dtype, GQA ratios, odd head dims, block sizes (one key to longer than a chunk),
contexts from 1 key to past 4096, sliding windows, soft-capping, every thread count (the key partitions
included), every kernel set this CPU runs, NaN, tables that do not cover the context, mx.compile, and
SmolLM2 lowered and decoded with the kernel on and off; chunks over earlier context through the same kernel.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from runtime import kernels
from runtime.config import RuntimeConfig
from runtime.kernels import cpu_ext, paged

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
TOL = {mx.float32: (1e-5, 1.3e-6), mx.float16: (1e-3, 1e-3), mx.bfloat16: (1e-3, 1.6e-2)}
EPS32 = 2.0**-24


@pytest.fixture(autouse=True)
def _restore_defaults():
    isa = cpu_ext.isa()
    yield
    cpu_ext.set_num_threads(None)
    cpu_ext.set_isa(isa)


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def make_case(contexts, kvh: int, g: int, d: int, bs: int, cache_dtype=mx.float32, q_dtype=mx.float32, seed=0,
              spare_blocks: int = 3):
    """q [T, H, D], a cache with each sequence's blocks scattered over it (a random permutation, so no two
    sequences share one), blocks [T, n] (0 past a sequence's own blocks, as runtime/batch.py pads) and pos."""
    rng = np.random.default_rng(seed)
    used = [-(-c // bs) for c in contexts]
    n, nb = max(used), sum(used) + spare_blocks
    perm = rng.permutation(nb)
    table = np.zeros((len(contexts), n), np.int32)
    at = 0
    for t, u in enumerate(used):
        table[t, :u] = perm[at:at + u]
        at += u
    cache = mx.array(rng.standard_normal((2, kvh, nb, bs, d), np.float32)).astype(cache_dtype)
    q = mx.array(rng.standard_normal((len(contexts), kvh * g, d), np.float32)).astype(q_dtype)
    pos = mx.array(np.array(contexts, np.int32) - 1)
    return q, cache, mx.array(table), pos


def reference(q, cache, blocks, pos, scale, window=-1, cap=0.0):
    """float64 [T, H, D] and the error scale of each row: sum_j w_j |v_j| * (2 + max_j scale * sum |q| |k_j|)
    bounds what float32 scores, exp and sums may move it by, in units of float32's epsilon."""
    q64, c64, table, p = f64(q), f64(cache), np.array(blocks), np.array(pos).reshape(-1)
    t_count, h, d = q64.shape
    kvh, bs = c64.shape[1], c64.shape[3]
    g = h // kvh
    out, mag = np.zeros((t_count, h, d)), np.zeros((t_count, h, 1))
    for t in range(t_count):
        lo = max(0, p[t] - window + 1) if window > 0 else 0
        j = np.arange(lo, p[t] + 1)
        rows = table[t, j // bs]
        keys = c64[0][:, rows, j % bs]  # [KVH, L, D]
        vals = c64[1][:, rows, j % bs]
        qt = q64[t].reshape(kvh, g, d)
        s = np.einsum("kgd,kld->kgl", qt, keys) * scale
        sabs = np.einsum("kgd,kld->kgl", np.abs(qt), np.abs(keys)) * scale
        if cap > 0:
            s = np.tanh(s / cap) * cap
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[t] = np.einsum("kgl,kld->kgd", w, vals).reshape(h, d)
        mag[t] = (np.einsum("kgl,kld->kgd", w, np.abs(vals)).max(-1) * (2 + sabs.max(-1))).reshape(h, 1)
    return out, mag


def check(got: mx.array, want: np.ndarray, mag: np.ndarray, what: str) -> None:
    t, h, d = want.shape
    assert got.shape == (t, h * d), f"{what}: shape {got.shape}, want {(t, h * d)}"
    atol, rtol = TOL[got.dtype]
    g64 = f64(got).reshape(want.shape)
    err = np.abs(g64 - want)
    bound = atol + rtol * np.abs(want) + 32 * EPS32 * mag
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"{what}: max error {err.max():.3g} (at {worst}: got {g64[worst]:.6g}, want {want[worst]:.6g}, "
        f"allowed {bound[worst]:.3g})")


def attend(q, cache, blocks, pos, scale, window=-1, cap=0.0):
    return cpu_ext.paged_decode_attention(q, cache, blocks, pos, scale=scale, window=window, cap=cap)


def run_and_check(contexts, kvh, g, d, bs, what, cache_dtype=mx.float32, q_dtype=mx.float32, window=-1, cap=0.0,
                  seed=0, q_mul=1.0):
    q, cache, blocks, pos = make_case(contexts, kvh, g, d, bs, cache_dtype, q_dtype, seed)
    q = q * q_mul if q_mul != 1.0 else q
    scale = d**-0.5
    want, mag = reference(q, cache, blocks, pos, scale, window, cap)
    got = attend(q, cache, blocks, pos, scale, window, cap)
    assert got.dtype == q.dtype
    check(got, want, mag, f"{what} contexts {contexts} KVH={kvh} G={g} D={d} block {bs} window {window} cap {cap}")


# ---------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("q_dtype", ["float32", "bfloat16", "float16"])
def test_dtypes(cache_dtype, q_dtype):
    contexts = [1, 2, 15, 16, 17, 100, 300]
    for isa in cpu_ext.supported_isas():
        cpu_ext.set_isa(isa)
        run_and_check(contexts, 2, 3, 64, 16, f"{isa} cache {cache_dtype} q {q_dtype}", DTYPES[cache_dtype],
                      DTYPES[q_dtype])


@pytest.mark.parametrize("kvh,g", [(1, 1), (4, 1), (1, 2), (3, 3), (2, 4), (1, 5), (2, 8), (1, 16)])
def test_gqa_ratios(kvh, g):
    for isa in cpu_ext.supported_isas():
        cpu_ext.set_isa(isa)
        run_and_check([1, 33, 129, 250], kvh, g, 32, 16, f"{isa}", mx.bfloat16, seed=kvh * 10 + g)


@pytest.mark.parametrize("d", [1, 5, 17, 63, 80, 96, 128, 256])
def test_head_dims(d):
    for isa in cpu_ext.supported_isas():
        cpu_ext.set_isa(isa)
        for cache_dtype in (mx.float32, mx.float16):
            run_and_check([1, 9, 70], 2, 2, d, 8, f"{isa}", cache_dtype, seed=d)


@pytest.mark.parametrize("bs", [1, 3, 16, 32, 64, 128, 200])
def test_block_sizes(bs):
    # 200: longer than a chunk of keys, so a block is taken in several.
    run_and_check([1, bs, bs + 1, 3 * bs - 1, 411], 2, 2, 64, bs, "", mx.bfloat16, seed=bs)


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_long_contexts(cache_dtype):
    # One sequence (its keys split over partitions), and several (one task each), past position 4096.
    for isa in cpu_ext.supported_isas():
        cpu_ext.set_isa(isa)
        run_and_check([5000], 1, 3, 64, 16, f"{isa} {cache_dtype}", DTYPES[cache_dtype], seed=1)
        run_and_check([4097, 1, 4096, 257, 6001], 2, 2, 64, 32, f"{isa} {cache_dtype}", DTYPES[cache_dtype], seed=2)


def test_contexts_1_to_300():
    contexts = list(range(1, 301))
    run_and_check(contexts, 1, 2, 16, 16, "", mx.float16, seed=4)


@pytest.mark.parametrize("window", [1, 7, 64, 1000])
def test_sliding_window(window):
    for isa in cpu_ext.supported_isas():
        cpu_ext.set_isa(isa)
        run_and_check([1, 5, 7, 8, 64, 65, 200, 1500], 2, 3, 32, 16, f"{isa}", mx.bfloat16, window=window,
                      seed=window)
        run_and_check([3000], 1, 2, 32, 16, f"{isa} one sequence", window=window, seed=window)


@pytest.mark.parametrize("cap", [5.0, 30.0, 50.0])
def test_soft_cap(cap):
    # q * 8: scores large enough that tanh bites, and small ones where it is near the identity.
    for isa in cpu_ext.supported_isas():
        cpu_ext.set_isa(isa)
        run_and_check([1, 17, 300, 2000], 2, 2, 64, 16, f"{isa}", mx.float32, cap=cap, q_mul=8.0, seed=7)
        run_and_check([40, 900], 1, 4, 64, 16, f"{isa} window", mx.bfloat16, window=33, cap=cap, q_mul=8.0)


def test_every_thread_count():
    for threads in range(1, cpu_ext.default_num_threads() + 2):
        cpu_ext.set_num_threads(threads)
        run_and_check([2500], 1, 3, 64, 16, f"{threads} threads partitions")
        run_and_check([1, 700], 3, 3, 64, 16, f"{threads} threads", mx.bfloat16)
        run_and_check([10, 20, 30, 40, 50, 60, 70], 3, 3, 64, 16, f"{threads} threads many")


def test_strided_q_and_scale():
    q, cache, blocks, pos = make_case([5, 80], 2, 2, 16, 16)
    wide = mx.concatenate([q, q * 2], axis=-1)[..., 16:]  # q * 2 as a strided view
    want, mag = reference(wide, cache, blocks, pos, 0.3)
    check(attend(wide, cache, blocks, pos, 0.3), want, mag, "strided q")
    qt = mx.array(np.ascontiguousarray(np.array(q).transpose(1, 0, 2))).transpose(1, 0, 2)
    want, mag = reference(qt, cache, blocks, pos, 0.3)
    check(attend(qt, cache, blocks, pos, 0.3), want, mag, "transposed q")
    check(attend(q, cache, blocks, pos[:, None], 0.3), *reference(q, cache, blocks, pos, 0.3), "pos [T, 1]")


# ---------------------------------------------------------------- special values and bad tables


def test_nan_reaches_only_what_reads_it():
    kvh, g, d, bs = 2, 2, 16, 4
    contexts = [10, 10]
    q, cache, blocks, pos = make_case(contexts, kvh, g, d, bs, seed=3)
    table = np.array(blocks)
    for plane, what in ((0, "K"), (1, "V")):
        c = np.array(cache)
        c[plane, 1, table[0, 1], 2] = np.nan  # key 6 of sequence 0, KV head 1: visible
        c[plane, 0, table[1, 2], 2] = np.nan  # key 10 of sequence 1: past its context (keys 0..9)
        c[plane, 0, table[1, 2] + 0, 3] = np.nan
        spare = [b for b in range(c.shape[2]) if b not in table[:, :3]][0]
        c[plane, :, spare] = np.nan  # a block no sequence uses
        for threads in (1, 2):
            cpu_ext.set_num_threads(threads)
            out = np.array(attend(q, mx.array(c), blocks, pos, 0.25)).reshape(2, kvh * g, d)
            assert np.isnan(out[0, 2:]).all(), f"NaN in {what}: KV head 1's query heads of sequence 0 must be NaN"
            assert not np.isnan(out[0, :2]).any() and not np.isnan(out[1]).any(), f"NaN in {what} spread: {out}"
            win = np.array(attend(q, mx.array(c), blocks, pos, 0.25, window=3)).reshape(2, kvh * g, d)
            assert not np.isnan(win).any(), f"NaN in {what} outside the window reached the output"
    qn = np.array(q)
    qn[1, 3, 5] = np.nan
    out = np.array(attend(mx.array(qn), cache, blocks, pos, 0.25)).reshape(2, kvh * g, d)
    assert np.isnan(out[1, 3]).all() and not np.isnan(np.delete(out.reshape(-1, d), 7, axis=0)).any()


def test_keys_of_minus_inf_weigh_nothing():
    # A key row of -inf scores -inf against a positive query: weight 0, also in a sequence's first chunk.
    q, cache, blocks, pos = make_case([40], 1, 1, 8, 16, seed=5)
    c = np.array(cache)
    qa = np.abs(np.array(q)) + 0.1
    c[0, 0, np.array(blocks)[0, 0], 0:16] = -np.inf  # the whole first chunk
    got = attend(mx.array(qa), mx.array(c), blocks, pos, 0.5)
    keep = np.arange(16, 40)
    bt = np.array(blocks)[0]
    k = np.array(cache)[1, 0, bt[keep // 16], keep % 16].astype(np.float64)
    kk = c[0, 0, bt[keep // 16], keep % 16].astype(np.float64)
    s = kk @ qa[0, 0].astype(np.float64) * 0.5
    w = np.exp(s - s.max())
    want = (w / w.sum()) @ k
    assert np.allclose(np.array(got)[0], want, rtol=1e-5, atol=1e-6), (np.array(got)[0], want)


def test_uncovered_context_gives_nan_not_a_wild_read():
    q, cache, blocks, pos = make_case([20, 20, 20, 20], 1, 2, 8, 8)
    table = np.array(blocks)
    table[1, 1] = cache.shape[2]  # past the cache's last block
    table[2, 0] = -1
    p = np.array(pos)
    p[3] = table.shape[1] * 8  # past what the table covers
    out = np.array(attend(q, cache, mx.array(table), mx.array(p), 0.3))
    assert not np.isnan(out[0]).any() and np.isnan(out[1:]).all()
    # a window that starts after the bad blocks never reads them
    ok = np.array(attend(q, cache, mx.array(table), mx.array(p), 0.3, window=4))
    assert not np.isnan(ok[:3]).any() and np.isnan(ok[3]).all()


def test_empty_batch():
    _, cache, _, _ = make_case([4], 1, 1, 8, 4)
    out = attend(mx.zeros((0, 2, 8)), cache, mx.zeros((0, 1), mx.int32), mx.zeros((0,), mx.int32), 0.5)
    assert out.shape == (0, 16)


def test_bad_arguments_name_the_problem():
    q, cache, blocks, pos = make_case([4, 8], 2, 2, 8, 4)
    cases = [
        (lambda: attend(q[0], cache, blocks, pos, 1.0), ValueError, "q must be a float32, bfloat16 or float16 array [T, H, D]"),
        (lambda: attend(q.astype(mx.int32), cache, blocks, pos, 1.0), ValueError, "q must be a float32"),
        (lambda: attend(q[..., :4], cache, blocks, pos, 1.0), ValueError, "with D = 4 (q's last dimension)"),
        (lambda: attend(q[:, :3], cache, blocks, pos, 1.0), ValueError, "q's 3 heads must be a multiple of the cache's 2"),
        (lambda: attend(q, cache, blocks.astype(mx.int64), pos, 1.0), ValueError, "blocks must be an int32 block table"),
        (lambda: attend(q, cache, blocks[:1], pos, 1.0), ValueError, "with T = 2 rows"),
        (lambda: attend(q, cache, blocks, pos[:1], 1.0), ValueError, "pos must hold one int32 position per sequence"),
        (lambda: attend(q, cache, blocks, pos, 1.0, cap=-1.0), ValueError, "cap >= 0"),
        (lambda: attend(np.array(q), cache, blocks, pos, 1.0), TypeError, "q must be an mlx.core.array"),
        (lambda: attend(q, cache, blocks, pos, 1.0, window=2.5), TypeError, "window must be an int"),
    ]
    for call, exc, words in cases:
        with pytest.raises(exc) as info:
            mx.eval(call())
        assert words in str(info.value), f"{words!r} not in {str(info.value)!r}"
        assert "\n" not in str(info.value).strip()


# ---------------------------------------------------------------- in the graph: compile, the kernel table


def test_inside_mx_compile():
    q, cache, blocks, pos = make_case([3, 50, 200], 2, 2, 32, 16, mx.bfloat16)

    def step(q, cache, blocks, pos):
        return attend(q * 2.0, cache, blocks, pos, 0.2, window=100) + 1.0

    want, mag = reference(q * 2.0, cache, blocks, pos, 0.2, 100)
    for fn in (mx.compile(step), mx.compile(step, shapeless=True)):
        got = fn(q, cache, blocks, pos) - 1.0
        check(got, want, mag * 4, "compiled")
        assert mx.array_equal(fn(q, cache, blocks, pos), step(q, cache, blocks, pos)).item()
    q2, cache2, blocks2, pos2 = make_case([7, 9, 11, 400], 2, 2, 32, 16, mx.bfloat16, seed=9)
    got = mx.compile(step, shapeless=True)(q2, cache2, blocks2, pos2) - 1.0
    check(got, *reference(q2 * 2.0, cache2, blocks2, pos2, 0.2, 100), "shapeless, new shapes")


def _tables():
    on = kernels.select(RuntimeConfig(device="cpu"))
    off = kernels.select(RuntimeConfig(device="cpu", kernels_off=frozenset({"cpu_attention"})))
    return on, off


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("window,cap", [(-1, 0.0), (24, 0.0), (-1, 20.0)])
def test_table_decode_layer_vs_generic(dtype_name, window, cap):
    """A whole decode layer (`paged_attention`: K/V write, then attention) under mx.compile, the kernel against
    the generic composed path (the switch off), the caches it returns included."""
    dtype = DTYPES[dtype_name]
    kvh, g, d, bs = 3, 3, 64, 16
    contexts = [1, 16, 17, 90, 129, 300]
    t = len(contexts)
    q, cache, group_blocks, pos = make_case(contexts, kvh, g, d, bs, dtype, dtype, seed=11)
    table, p = np.array(group_blocks), np.array(pos)
    slots = table[np.arange(t), p // bs] * bs + p % bs  # this step's token is the context's last key
    rows = (np.arange(2 * kvh)[:, None] * (cache.shape[2] * bs) + slots[None, :]).reshape(-1).astype(np.int32)
    group = {"q_index": mx.arange(t, dtype=mx.int32)[:, None], "q_pos": pos[:, None], "blocks": group_blocks}
    batch = {"slot_mapping": mx.array(slots.astype(np.int32)), "kv_rows": mx.array(rows),
             "out_index": mx.arange(t, dtype=mx.int32), "groups": [group]}
    rng = np.random.default_rng(5)
    new_k = mx.array(rng.standard_normal((t, kvh * d), np.float32)).astype(dtype)
    new_v = mx.array(rng.standard_normal((t, kvh * d), np.float32)).astype(dtype)

    def make_layer(table):
        def layer(q, k, v, cache):
            return table.paged_attention(q.reshape(t, -1), k, v, cache, batch, num_heads=kvh * g, num_kv_heads=kvh,
                                         head_dim=d, scale=d**-0.5, sliding_window=window, logit_cap=cap)
        return layer

    on, off = _tables()
    ours = mx.compile(make_layer(on))(q, new_k, new_v, cache)
    composed = mx.compile(make_layer(off))(q, new_k, new_v, cache)
    mx.eval(ours, composed)
    assert mx.array_equal(ours[1], composed[1]).item()
    want, mag = reference(q, ours[1], group_blocks, pos, d**-0.5, window, cap)  # against the written cache
    check(ours[0], want, mag, f"table {dtype_name}")
    err = mx.abs(ours[0].astype(mx.float32) - composed[0].astype(mx.float32)).max().item()
    assert err <= (1e-5 if dtype_name == "float32" else 3e-2), f"kernel vs generic: max error {err:.3g}"


def test_switch_off_runs_the_generic_entry():
    on, off = _tables()
    q, cache, blocks, pos = make_case([5, 40], 1, 2, 16, 16)
    group = {"q_pos": pos[:, None], "blocks": blocks}
    generic = paged.attend_decode(off, q, cache, group, scale=0.25, window=-1, cap=0.0)  # the composed path
    assert mx.array_equal(off.attend_decode(q, cache, group, scale=0.25, window=-1, cap=0.0), generic).item()
    assert not mx.array_equal(on.attend_decode(q, cache, group, scale=0.25, window=-1, cap=0.0), generic).item()
    check(on.attend_decode(q, cache, group, scale=0.25, window=-1, cap=0.0), *reference(q, cache, blocks, pos, 0.25),
          "table")


# ---------------------------------------------------------------- a lowered model


@pytest.fixture(scope="module")
def smollm2_lowered(smollm2_path):
    from lowering.api import lower
    from lowering.capture import capture_vllm
    from lowering.vllm_build import build_vllm_model

    model, config = build_vllm_model(str(smollm2_path), max_model_len=1024)
    return lower(capture_vllm(model, config, name="SmolLM2-135M"))


def test_smollm2_decode_with_and_without_the_kernel(smollm2_lowered):
    """SmolLM2 lowered, prefilled with 100- and 37-token prompts and decoded 6 greedy steps, with the kernel
    table's paged attention (`cpu_attention`) on and off: the float32 logits agree at every step."""
    from lowering.api import mlx_weights
    from lowering.compile import load_step
    from lowering.driver import Driver
    from runtime.model import LoweredModel
    from lowering.api import cache_layout

    weights = mlx_weights(smollm2_lowered.program)
    layout = cache_layout(smollm2_lowered.program, 16, mx.float32)
    on, off = _tables()
    drivers = [Driver(LoweredModel(load_step(smollm2_lowered.source, kernels=table), weights, layout, 64))
               for table in (on, off)]
    prompts = {1: [(7 * i) % 4000 + 20 for i in range(100)], 2: [(13 * i) % 3000 + 5 for i in range(37)]}
    for drv in drivers:
        for seq, ids in prompts.items():
            drv.add(seq, ids)
    rows = [drv.step({seq: len(ids) for seq, ids in prompts.items()}) for drv in drivers]
    for step in range(6):
        for seq in prompts:
            a, b = (np.array(r[seq].astype(mx.float32)) for r in rows)
            err = np.abs(a - b).max()
            assert err <= 1e-4 * max(1.0, np.abs(b).max()), f"step {step} sequence {seq}: max logit difference {err:.3g}"
            token = int(np.argmax(b))
            for drv in drivers:
                drv.seqs[seq].tokens.append(token)
        rows = [drv.step({seq: 1 for seq in prompts}) for drv in drivers]


@pytest.mark.parametrize("window", [-1, 40])
def test_table_chunks_over_context_vs_generic(window, monkeypatch):
    """A step mixing a decode, a chunk of 70 tokens over 100 earlier ones and a fresh prompt (runtime/batch.py
    groups them), through `paged_attention` under mx.compile: `cpu_prefill` on (each chunk query through the
    kernel) against off (gather + mask + attention), and the chunk's rows against the float64 reference."""
    from runtime.batch import StepInput, attention_arrays, to_mlx
    from runtime.kernels import cpu
    from runtime.model import CacheLayout, device_batch

    monkeypatch.setattr(cpu, "PREFILL_MIN_QUERIES", 1)  # this chunk's 70 rows through the kernel too

    kvh, g, d, bs, num_blocks = 2, 3, 32, 16, 40
    rng = np.random.default_rng(8)
    earlier = {0: 50, 1: 100, 2: 0}  # tokens already in the cache
    new = {0: 1, 1: 70, 2: 23}
    tables = {0: [3, 7, 9, 30], 1: [1, 2, 11, 12, 13, 20, 21, 22, 23, 24, 25], 2: [5, 6]}
    pos = np.concatenate([np.arange(earlier[s], earlier[s] + new[s]) for s in new])
    slots = np.concatenate([np.array(tables[s])[np.arange(earlier[s], earlier[s] + new[s]) // bs] * bs
                            + np.arange(earlier[s], earlier[s] + new[s]) % bs for s in new])
    width = max(len(t) for t in tables.values())
    step = StepInput(input_ids=np.zeros(len(pos), np.int64), positions=pos,
                     query_start_loc=np.concatenate([[0], np.cumsum([new[s] for s in new])]),
                     seq_lens=np.array([earlier[s] + new[s] for s in new]),
                     block_table=np.array([t + [0] * (width - len(t)) for t in tables.values()]),
                     slot_mapping=slots, logits_indices=np.cumsum([new[s] for s in new]) - 1)
    layout = CacheLayout(1, kvh, d, bs, mx.float32)
    batch = to_mlx(device_batch(attention_arrays(step, bs), layout, num_blocks))
    assert any("blocks" in gr and gr["q_index"].shape[1] > 1 for gr in batch["groups"])
    t = len(pos)
    q = mx.array(rng.standard_normal((t, kvh * g * d), np.float32))
    k = mx.array(rng.standard_normal((t, kvh * d), np.float32))
    v = mx.array(rng.standard_normal((t, kvh * d), np.float32))
    cache = mx.array(rng.standard_normal(layout.cache_shape(num_blocks), np.float32))

    def make_layer(table):
        def layer(q, k, v, cache):
            return table.paged_attention(q, k, v, cache, batch, num_heads=kvh * g, num_kv_heads=kvh, head_dim=d,
                                         scale=d**-0.5, sliding_window=window, logit_cap=0.0)
        return layer

    on = kernels.select(RuntimeConfig(device="cpu"))
    off = kernels.select(RuntimeConfig(device="cpu", kernels_off=frozenset({"cpu_prefill"})))
    ours = mx.compile(make_layer(on))(q, k, v, cache)
    composed = mx.compile(make_layer(off))(q, k, v, cache)
    mx.eval(ours, composed)
    assert mx.array_equal(ours[1], composed[1]).item()
    err = mx.abs(ours[0] - composed[0]).max().item()
    assert err <= 1e-5, f"kernel vs generic: max error {err:.3g}"
    assert not mx.array_equal(ours[0], composed[0]).item()  # the kernel ran (its rounding differs)
    chunk = slice(new[0], new[0] + new[1])  # sequence 1's tokens
    blocks = mx.array(np.tile(np.array(tables[1], np.int32), (new[1], 1)))
    want, mag = reference(q[chunk].reshape(-1, kvh * g, d), ours[1], blocks, mx.array(pos[chunk].astype(np.int32)),
                          d**-0.5, window)
    check(ours[0][chunk], want, mag, "chunk over context")
