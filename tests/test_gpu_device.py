"""The GPU device path. Without a GPU: VLLM_MLX_DEVICE=gpu is refused where MLX has no GPU backend,
the GPU suite's correctness check (benchmarks/gpu_check.py: lowered logits vs transformers, same weights) runs
on the CPU, and the CPU's kernel table uses none of the CUDA kernels. With MLX's CUDA backend as the default
device (a GPU machine; docs/benchmarks.md runs these first): each CUDA kernel (runtime/kernels/cuda_*.py) against
MLX's own ops or the generic composed path, the CUDA table with a kernel off (RuntimeConfig.kernels_off) serving
as the other side.

The check runs on the GPU too (`python benchmarks/gpu.py check`; results in docs/benchmarks.md, GPU section)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from runtime import kernels
from runtime.batch import StepInput, attention_arrays, to_mlx
from runtime.config import ConfigError, RuntimeConfig
from runtime.device import gpu_available
from runtime.kernels import cuda_attention, cuda_norm, cuda_quantized, cuda_rope, cuda_silu, paged
from runtime.model import CacheLayout, device_batch

ROOT = Path(__file__).resolve().parent.parent


def _gpu_check(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the benchmarks import their siblings by name
    return importlib.import_module("gpu_check")


@pytest.mark.skipif(gpu_available(), reason="this MLX build has a GPU backend")
def test_gpu_refused_without_gpu_backend():
    with pytest.raises(ConfigError) as info:
        RuntimeConfig.from_env({"VLLM_MLX_DEVICE": "gpu"})
    message = str(info.value)
    assert "VLLM_MLX_DEVICE='gpu'" in message and "no GPU backend" in message and "cpu" in message, message
    assert "\n" not in message
    assert RuntimeConfig.from_env({"VLLM_MLX_DEVICE": "cpu"}).device == "cpu"
    assert RuntimeConfig.from_env({}).device == "cpu"  # unset: the CPU, no error


@pytest.mark.parametrize("dtype,quantize", [("float32", None), ("bfloat16", None), ("float32", "q4:64"),
                                            ("bfloat16", "q8:32")])
def test_benchmark_check_on_cpu(dtype, quantize, monkeypatch):
    """The GPU suite's check on the CPU: a 4,090-token sequence and a short one to position 4,096, every linear
    and embedding quantized where asked (transformers then holds the dequantized weights)."""
    from runtime.config import parse_quantize_spec

    bench = _gpu_check(monkeypatch)
    vllm_before = "vllm" in sys.modules
    out = bench.check("tiny", dtype, "cpu", artefacts=None, quantize=parse_quantize_spec(quantize))  # captured here
    assert out["ok"], out
    assert out["lowering"].startswith("captured here")
    assert out["rows_compared"] == 16 and out["max_abs_logit"] > 0 and out["last_position"] == 4096
    # q, k, v, o, gate, up, down in each of the 2 layers, and the embedding the LM head is tied to
    assert out["quantized_weights"] == (0 if quantize is None else 7 * 2 + 1)
    assert out["rel_err"] <= (1e-5 if dtype == "float32" else 2e-2)
    if not vllm_before:
        assert not out["vllm_imported"]  # the HF front end never imports vLLM


# ----------------------------------------------------------------------------- the fused paged decode kernel
def _cuda() -> bool:
    return kernels.current().name == "cuda"


GENERIC = kernels.Generic(RuntimeConfig())


def _cuda_table(*off: str):
    """The CUDA kernel table with the kernels named in `off` turned off."""
    return kernels.select(RuntimeConfig(device="gpu", kernels_off=frozenset(off)))


def test_cpu_table_takes_no_cuda_kernel():
    """Where the CUDA table has a kernel of its own, the CPU's table runs the generic entry or a CPU kernel
    (runtime/kernels/cpu.py), never CUDA's."""
    table = kernels.select(RuntimeConfig(device="cpu"))
    assert isinstance(table, kernels.Cpu) and not isinstance(table, kernels.Cuda)
    cuda_own = [e for e in ("add_rms_norm", "silu_mul", "rope_paged_attention", "new_kv", "attend_decode",
                            "quantized_linear") if getattr(kernels.Cuda, e) is not getattr(kernels.Generic, e)]
    assert len(cuda_own) == 6, cuda_own
    for entry in cuda_own:
        ours = getattr(type(table), entry)
        assert ours is not getattr(kernels.Cuda, entry), entry
        assert ours is getattr(kernels.Generic, entry) or ours.__qualname__.startswith("Cpu."), (entry, ours)


def _decode_case(batch, kv_heads, groups, head_dim, contexts, dtype, block_size=16, num_blocks=None, seed=0):
    """Random head-major caches and a shuffled block table per sequence, as runtime.batch lays a decode
    group out (table width = the Lk bucket, unused entries block 0)."""
    rng = np.random.default_rng(seed)
    need = [-(-c // block_size) for c in contexts]
    width = 1 << max(0, (max(need) - 1).bit_length())
    num_blocks = num_blocks or sum(need) + 3
    pool = rng.permutation(np.arange(1, num_blocks))  # block 0: the padding block, never a context block
    table = np.zeros((batch, width), np.int32)
    at = 0
    for i, n in enumerate(need):
        table[i, :n] = pool[at:at + n]
        at += n
    h = kv_heads * groups
    shape = (2, kv_heads, num_blocks, block_size, head_dim)  # K, then V
    cache = mx.array(rng.standard_normal(shape, np.float32)).astype(dtype)
    q = mx.array(rng.standard_normal((batch, h, head_dim), np.float32)).astype(dtype)
    q_pos = np.array(contexts, np.int32)[:, None] - 1
    group = {"q_index": mx.arange(batch, dtype=mx.int32)[:, None], "q_pos": mx.array(q_pos),
             "blocks": mx.array(table), "key_pos": mx.arange(width * block_size, dtype=mx.int32)}
    return q, cache, group


def _reference(q, cache, group, scale, window, cap):
    """The composed decode path (runtime/kernels/paged.py: block gather + masked SDPA) in float32."""
    f32 = mx.float32
    t, h, d = q.shape
    keys, values, mask = paged._from_cache(cache.astype(f32), group, window, f32)
    return paged._sdpa(GENERIC, q.astype(f32).reshape(t, h, 1, d), keys, values, scale, mask, cap).reshape(t, h * d)


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("batch,kv_heads,groups,head_dim", [
    (1, 8, 4, 128), (8, 8, 4, 128), (32, 8, 4, 128), (8, 2, 1, 64), (32, 4, 1, 128), (1, 3, 4, 64)])
def test_paged_kernel_matches_composed(dtype_name, batch, kv_heads, groups, head_dim):

    dtype = getattr(mx, dtype_name)
    rng = np.random.default_rng(batch * 1000 + head_dim + groups)
    # contexts: 1 key, a block edge, non-multiples of the block, one long enough for 8 warps (> 256 keys)
    contexts = ([1, 16, 17, 100, 171, 255, 256, 300] * 4)[:batch] if batch > 1 else [171]
    if batch >= 8:
        contexts[-1] = 700
    contexts = [int(c) for c in rng.permutation(contexts)]
    q, cache, group = _decode_case(batch, kv_heads, groups, head_dim, contexts, dtype, seed=batch + head_dim)
    scale = head_dim ** -0.5
    want = _reference(q, cache, group, scale, -1, 0.0)
    got = cuda_attention.paged_decode_attention(q, cache, group["blocks"], group["q_pos"], scale=scale)
    assert got.shape == (batch, kv_heads * groups * head_dim) and got.dtype == dtype
    err = mx.abs(got.astype(mx.float32) - want).max().item()
    # same inputs in both: f32 differs by summation order, f16/bf16 by rounding the output (half an ulp)
    tol = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 8e-3}[dtype_name] * max(1.0, mx.abs(want).max().item())
    assert err <= tol, (dtype_name, err, tol)


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
@pytest.mark.parametrize("warps,unroll", [(8, 2), (4, 4), (32, 1), (16, 4)])
def test_paged_kernel_block_shapes(warps, unroll):
    """Every (warps, unroll) the sweep and the size rule pick from gives the composed result."""

    q, cache, group = _decode_case(8, 8, 4, 128, [1, 2, 15, 16, 17, 171, 256, 700], mx.float32, seed=7)
    want = _reference(q, cache, group, 128 ** -0.5, -1, 0.0)
    got = cuda_attention.paged_decode_attention(q, cache, group["blocks"], group["q_pos"], scale=128 ** -0.5,
                                                tune=(warps, unroll))
    assert mx.abs(got - want).max().item() <= 1e-5


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
@pytest.mark.parametrize("window,cap", [(33, 0.0), (8, 0.0), (-1, 2.0), (40, 3.0)])
def test_paged_kernel_window_and_cap(window, cap):

    q, cache, group = _decode_case(8, 4, 2, 64, [5, 16, 33, 34, 100, 200, 257, 9], mx.float32, seed=3)
    want = _reference(q * 4, cache, group, 0.125, window, cap)  # q * 4: logits large enough for the cap to bite
    got = cuda_attention.paged_decode_attention(q * 4, cache, group["blocks"], group["q_pos"], scale=0.125,
                                              window=window, cap=cap)
    assert mx.abs(got - want).max().item() <= 1e-5


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_paged_attention_decode_compiled_kernel_vs_composed(dtype_name):
    """The whole layer (`paged_attention`: K/V write + decode attention) under mx.compile, the fused kernel
    against the composed path (the `paged_decode` kernel off), including the caches it returns."""
    dtype = getattr(mx, dtype_name)
    kvh, g, d, bs = 8, 4, 128, 16
    contexts = [3, 16, 17, 64, 90, 129, 200, 256]
    q, cache, group = _decode_case(len(contexts), kvh, g, d, contexts, dtype, seed=11)
    t = len(contexts)
    table = np.array(group["blocks"])
    pos = np.array(group["q_pos"])[:, 0]
    slots = table[np.arange(t), pos // bs] * bs + pos % bs  # this step's token is the context's last key
    rows = (np.arange(2 * kvh)[:, None] * (cache.shape[2] * bs) + slots[None, :]).reshape(-1).astype(np.int32)
    batch = {"slot_mapping": mx.array(slots.astype(np.int32)), "kv_rows": mx.array(rows),
             "out_index": mx.arange(t, dtype=mx.int32), "groups": [group]}
    rng = np.random.default_rng(5)
    new_k = mx.array(rng.standard_normal((t, kvh * d), np.float32)).astype(dtype)
    new_v = mx.array(rng.standard_normal((t, kvh * d), np.float32)).astype(dtype)

    def make_layer(table):  # a new function per trace: mx.compile caches traces by function
        def layer(q, k, v, cache):
            return table.paged_attention(q.reshape(t, -1), k, v, cache, batch, num_heads=kvh * g, num_kv_heads=kvh,
                                         head_dim=d, scale=d ** -0.5, sliding_window=-1, logit_cap=0.0)
        return layer

    assert cuda_attention.fits(d)
    fused_fn = mx.compile(make_layer(_cuda_table()))
    fused = fused_fn(q, new_k, new_v, cache)
    mx.eval(fused)
    composed_fn = mx.compile(make_layer(_cuda_table("paged_decode")))
    composed = composed_fn(q, new_k, new_v, cache)
    mx.eval(fused, composed)
    err = mx.abs(fused[0].astype(mx.float32) - composed[0].astype(mx.float32)).max().item()
    assert err <= (1e-5 if dtype_name == "float32" else 2e-2), err
    assert mx.array_equal(fused[1], composed[1]).item()


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("rows,n", [(1, 4096), (3, 576), (64, 4096), (5, 100), (2, 8192), (4096, 576)])
def test_add_rms_norm_kernel_matches_mlx(dtype_name, rows, n):
    """runtime/kernels/cuda_norm.py's kernel vs MLX's own add + mx.fast.rms_norm: the sum bit for bit, the norm within its
    two roundings (T(h * inv), then T(w * .)): the f32 sum of squares is added up in another order, which
    can move inv by an f32 ulp and flip the first rounding."""

    dtype = getattr(mx, dtype_name)
    rng = np.random.default_rng(rows * 7 + n)
    x, r = (mx.array(rng.standard_normal((1, rows, n), np.float32) * 3).astype(dtype) for _ in range(2))
    w = mx.array(1 + rng.standard_normal(n, np.float32) / 4).astype(dtype)
    assert cuda_norm.fits(x, r, w) and not cuda_norm.fits(*(mx.zeros((1, 8200), dtype),) * 2, mx.ones(8200, dtype))
    h, normed = cuda_norm.add_rms_norm(x, r, w, 1e-5)
    want_h = x + r
    want = mx.fast.rms_norm(want_h, w, 1e-5)
    assert mx.array_equal(h, want_h).item(), f"sum differs: max {mx.abs(h - want_h).max().item()}"
    ulp = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 2.0 ** -22}[dtype_name]
    err = mx.abs(normed.astype(mx.float32) - want.astype(mx.float32))
    bound = 2 * ulp * mx.abs(want.astype(mx.float32)) + 1e-6
    assert mx.all(err <= bound).item(), f"max abs error {err.max().item()} (max |out| {mx.abs(want).max().item()})"
    compiled = mx.compile(lambda a, b, c: _cuda_table().add_rms_norm(a, b, c, eps=1e-5))(x, r, w)  # the step's form
    assert mx.array_equal(compiled[0], h).item() and mx.array_equal(compiled[1], normed).item()


# ----------------------------------------------------------------------------- RoPE + K/V rows in one kernel
def _merged_qkv(t, heads, kv_heads, d, dtype, seed):
    """q, k, v as column slices of one [T, (H + 2 KVH) * D] projection (strided, as the merged q/k/v
    linear leaves them), and the positions of a chunk deep into a sequence."""

    rng = np.random.default_rng(seed)
    qkv = mx.array(rng.standard_normal((t, (heads + 2 * kv_heads) * d), np.float32)).astype(dtype)
    q, k, v = qkv[:, :heads * d], qkv[:, heads * d:(heads + kv_heads) * d], qkv[:, (heads + kv_heads) * d:]
    positions = mx.array(np.sort(rng.choice(5000, t, replace=False)).astype(np.int32))
    return q, k, v, positions


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("t,heads,kv_heads,d,rot,traditional,mscale", [
    (1, 32, 8, 128, 128, False, 1.0), (37, 9, 3, 64, 64, False, 1.0), (300, 8, 8, 64, 32, True, 1.0),
    (5, 4, 2, 128, 64, False, 0.7), (16, 12, 4, 64, 64, True, 1.3)])
def test_rope_kernel_matches_mlx_rope(dtype_name, t, heads, kv_heads, d, rot, traditional, mscale):
    """runtime/rope_kernel.py vs the runtime's MLX path (`mx.fast.rope`, then K and V laid out as cache
    rows): within one rounding of the output, from strided slices of a merged projection."""

    from runtime import rope_kernel
    from runtime.attention import rotate

    dtype = getattr(mx, dtype_name)
    q, k, v, positions = _merged_qkv(t, heads, kv_heads, d, dtype, seed=t + d + rot)
    inv_freq = mx.array((1.0 / 10000 ** (np.arange(0, rot, 2) / rot)).astype(np.float32))
    rope = (positions, inv_freq, traditional, mscale)
    assert cuda_rope.fits(q, k, v, rope, d)
    q_out, rows = cuda_rope.rope_qkv(q, k, v, *rope, num_heads=heads, num_kv_heads=kv_heads, head_dim=d)
    kw = dict(head_dim=d, traditional=traditional, mscale=mscale)
    want_q = GENERIC.rope(q, positions, inv_freq, **kw).reshape(t, heads, d)
    want_k = GENERIC.rope(k, positions, inv_freq, **kw).reshape(t, kv_heads, d).swapaxes(0, 1)
    want_rows = mx.concatenate([want_k, v.reshape(t, kv_heads, d).swapaxes(0, 1)]).reshape(-1, d)
    assert q_out.shape == (t, heads, d) and rows.shape == (2 * kv_heads * t, d) and q_out.dtype == rows.dtype == dtype
    # one rounding of the output (MLX's rope gets 1 / inv_freq and inverts it back: theta's last bit may
    # differ, up to position x 1e-7 rad at positions < 5000)
    ulp = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 2.0 ** -21}[dtype_name]
    for name, got, want in (("q", q_out, want_q), ("rows", rows, want_rows)):
        err = mx.abs(got.astype(mx.float32) - want.astype(mx.float32))
        bound = 2 * ulp * mx.abs(want.astype(mx.float32)) + (1e-3 if dtype_name == "float32" else 2 * ulp)
        assert mx.all(err <= bound).item(), f"{name}: max abs error {err.max().item()}"
    v_rows = rows.reshape(2, kv_heads, t, d)[1]
    assert mx.array_equal(v_rows, v.reshape(t, kv_heads, d).swapaxes(0, 1)).item()  # V copied bit for bit


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
@pytest.mark.parametrize("decode", [True, False])
def test_paged_attention_rope_kernel_vs_rotating_first(decode):
    """The whole layer under mx.compile, bf16: `rope=` (the kernel rotates and lays out the rows) against
    q and k rotated by `mx.fast.rope` first (rope=None: MLX's layout): the output and the cache."""

    from runtime.attention import paged_attention, rotate
    from runtime.batch import StepInput, attention_arrays, to_mlx
    from runtime.model import CacheLayout, device_batch

    kvh, g, d, bs, blocks = 8, 4, 128, 16, 160
    layout = CacheLayout(1, kvh, d, bs, mx.bfloat16)
    rng = np.random.default_rng(1)
    if decode:  # 6 sequences, one new token each, after 1..300 cached
        ctx = np.array([1, 16, 17, 90, 200, 300])
        lens, new = ctx + 1, np.ones(6, np.int64)
    else:  # two prompts with earlier context, chunks of 7 and 33
        ctx, new = np.array([20, 0]), np.array([7, 33])
        lens = ctx + new
    s = len(lens)
    per = -(-lens.max() // bs)
    table = rng.permutation(np.arange(1, blocks))[:s * per].reshape(s, per)
    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(ctx, new)])
    seq = np.repeat(np.arange(s), new)
    step = StepInput(input_ids=np.zeros(len(positions), np.int64), positions=positions,
                     query_start_loc=np.concatenate([[0], np.cumsum(new)]), seq_lens=lens, block_table=table,
                     slot_mapping=table[seq, positions // bs] * bs + positions % bs, logits_indices=np.array([0]))
    batch = to_mlx(device_batch(attention_arrays(step, bs), layout, blocks))
    q, k, v, _ = _merged_qkv(len(positions), kvh * g, kvh, d, mx.bfloat16, seed=2)
    pos = mx.array(positions.astype(np.int32))
    inv_freq = mx.array((1.0 / 500000 ** (np.arange(0, d, 2) / d)).astype(np.float32))
    cache = mx.array(rng.standard_normal(layout.cache_shape(blocks), np.float32)).astype(mx.bfloat16)
    kw = dict(num_heads=kvh * g, num_kv_heads=kvh, head_dim=d, scale=d ** -0.5, sliding_window=-1, logit_cap=0.0)
    table, rot = _cuda_table(), dict(head_dim=d, traditional=False, mscale=1.0)
    fused = mx.compile(lambda q, k, v, c: table.rope_paged_attention(q, k, v, pos, inv_freq, c, batch, traditional=False,
                                                                     mscale=1.0, **kw))(q, k, v, cache)
    first = mx.compile(lambda q, k, v, c: table.paged_attention(GENERIC.rope(q, pos, inv_freq, **rot),
                                                                GENERIC.rope(k, pos, inv_freq, **rot), v, c, batch,
                                                                **kw))(q, k, v, cache)
    mx.eval(fused, first)
    err = mx.abs(fused[0].astype(mx.float32) - first[0].astype(mx.float32)).max().item()
    assert err <= 2e-2, f"output: max abs error {err}"
    cache_err = mx.abs(fused[1].astype(mx.float32) - first[1].astype(mx.float32)).max().item()
    assert cache_err <= 2 * 2.0 ** -7 * 4, f"cache: max abs error {cache_err}"  # rows of |x| < ~4, an ulp or two


def _decode_batch(ctx, layout, blocks, width, rng):
    """The attention batch of a pure decode step: one new token per sequence after `ctx` cached ones, each
    sequence's `width` blocks drawn at random (block 0 left unused), as runtime.model builds it."""

    from runtime.batch import StepInput, attention_arrays, to_mlx
    from runtime.model import device_batch

    s, bs = len(ctx), layout.block_size
    table = rng.permutation(np.arange(1, blocks))[:s * width].reshape(s, width)
    step = StepInput(input_ids=np.zeros(s, np.int64), positions=ctx, query_start_loc=np.arange(s + 1), seq_lens=ctx + 1,
                     block_table=table, slot_mapping=table[np.arange(s), ctx // bs] * bs + ctx % bs,
                     logits_indices=np.array([0]))
    return to_mlx(device_batch(attention_arrays(step, bs), layout, blocks))


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
def test_rope_kernel_writes_decode_kv_into_the_cache(dtype_name):
    """A decode layer under mx.compile: the RoPE kernel writing K/V straight into the cache (no scatter)
    against the rows + scatter path, each on its own copy of the cache: the same output and the same
    cache, bit for bit (the same kernel math), and the in-place layer hands back the cache it was given."""

    dtype = getattr(mx, dtype_name)
    kvh, g, d, bs, blocks = 8, 4, 128, 16, 160
    layout = CacheLayout(1, kvh, d, bs, dtype)
    rng = np.random.default_rng(3)
    ctx = np.array([0, 15, 16, 90, 200, 300, 7])
    s, batch = len(ctx), _decode_batch(ctx, layout, blocks, 20, rng)
    q, k, v, _ = _merged_qkv(s, kvh * g, kvh, d, dtype, seed=4)
    rope = (mx.array(ctx.astype(np.int32)), mx.array((1.0 / 500000 ** (np.arange(0, d, 2) / d)).astype(np.float32)),
            False, 1.0)
    kw = dict(traditional=False, mscale=1.0, num_heads=kvh * g, num_kv_heads=kvh, head_dim=d, scale=d ** -0.5,
              sliding_window=-1, logit_cap=0.0)
    start = mx.array(rng.standard_normal(layout.cache_shape(blocks), np.float32)).astype(dtype)
    in_place_cache, scatter_cache = start + 0, start + 0
    mx.eval(in_place_cache, scatter_cache)

    def layer(table):
        return mx.compile(lambda q, k, v, c: table.rope_paged_attention(q, k, v, *rope[:2], c, batch, **kw))

    # the write alone: both sides attend with the plain kernel (the one-kernel layer has its own test below)
    in_place = layer(_cuda_table("decode_layer"))(q, k, v, in_place_cache)
    mx.eval(in_place)
    scattered = layer(_cuda_table("decode_layer", "kv_in_place"))(q, k, v, scatter_cache)
    mx.eval(scattered)
    assert in_place[1] is in_place_cache or mx.array_equal(in_place[1], in_place_cache).item()
    assert mx.array_equal(in_place[0], scattered[0]).item(), \
        f"output: max abs diff {mx.abs(in_place[0].astype(mx.float32) - scattered[0].astype(mx.float32)).max().item()}"
    diff = mx.abs(in_place_cache.astype(mx.float32) - scattered[1].astype(mx.float32))
    assert diff.max().item() == 0, f"cache: {int((diff > 0).sum().item())} elements differ, max {diff.max().item()}"
    assert not mx.array_equal(in_place_cache, start).item()  # the step's rows were written


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("kvh,g,d,rot,traditional,window,cap", [
    (8, 4, 128, 128, False, -1, 0.0), (3, 3, 64, 64, False, -1, 0.0), (2, 2, 128, 64, True, -1, 0.0),
    (4, 2, 64, 32, False, -1, 0.0), (8, 4, 128, 128, False, 40, 0.0), (2, 4, 128, 128, True, -1, 2.0)])
def test_rope_attention_kernel_matches_two_kernels(dtype_name, kvh, g, d, rot, traditional, window, cap):
    """runtime/kernels/cuda_attention.py's decode layer in one kernel (RoPE, K/V into the cache, attention) against
    the RoPE kernel writing K/V in place + the plain attention kernel (`decode_layer` off), each on its own
    copy of the cache, under mx.compile: the output within an ulp or two of the attention's dtype, the
    cache within an ulp of the new rows (the two kernels round the same f32 values; only FMA contraction
    may differ), every other cache row untouched."""

    from runtime import paged_kernel
    from runtime.attention import paged_attention
    from runtime.model import CacheLayout

    dtype = getattr(mx, dtype_name)
    bs, blocks = 16, 600
    layout = CacheLayout(1, kvh, d, bs, dtype)
    rng = np.random.default_rng(d + rot + kvh)
    ctx = np.array([0, 1, 15, 16, 17, 90, 300, 1000])
    s, batch = len(ctx), _decode_batch(ctx, layout, blocks, 64, rng)
    q, k, v, _ = _merged_qkv(s, kvh * g, kvh, d, dtype, seed=6)
    rope = (mx.array(ctx.astype(np.int32)), mx.array((1.0 / 10000 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)),
            traditional, 1.0)
    kw = dict(traditional=traditional, mscale=1.0, num_heads=kvh * g, num_kv_heads=kvh, head_dim=d, scale=d ** -0.5,
              sliding_window=window, logit_cap=cap)
    start = mx.array(rng.standard_normal(layout.cache_shape(blocks), np.float32)).astype(dtype)
    one_cache, two_cache = start + 0, start + 0
    mx.eval(one_cache, two_cache)

    def layer(table):
        return mx.compile(lambda q, k, v, c: table.rope_paged_attention(q, k, v, *rope[:2], c, batch, **kw))

    assert cuda_attention.rope_fits(d, rot, traditional) and kvh * g * s <= cuda_attention.FUSED_MAX_BLOCKS
    one = layer(_cuda_table())(q, k, v, one_cache)
    mx.eval(one)
    two = layer(_cuda_table("decode_layer"))(q, k, v, two_cache)
    mx.eval(two)
    ulp = {"bfloat16": 2.0 ** -7, "float32": 2.0 ** -21}[dtype_name]
    got, want = one[0].astype(mx.float32), two[0].astype(mx.float32)
    err = mx.abs(got - want)
    assert mx.all(err <= 4 * ulp * (mx.abs(want) + 1)).item(), f"output: max abs error {err.max().item()}"
    written = np.zeros(2 * kvh * blocks * bs, bool)
    written[np.array(batch["kv_rows"])] = True
    a = np.array(one_cache.astype(mx.float32)).reshape(-1, d)
    b = np.array(two[1].astype(mx.float32)).reshape(-1, d)
    assert np.array_equal(a[~written], b[~written])  # nothing else written
    cache_err = np.abs(a[written] - b[written])
    assert (cache_err <= 2 * ulp * np.abs(b[written])).all(), f"new rows: max abs error {cache_err.max()}"
    assert not np.array_equal(a[written], np.array(start.astype(mx.float32)).reshape(-1, d)[written])


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("f", [14336, 1536, 100])
def test_silu_mul_row_kernel_matches_mlx(dtype_name, f):
    """runtime/gated.py's one-row kernel on the [1, F] column slices of a merged gate/up projection: within 2 ulp
    of silu(g) * u computed in f32 from the same inputs (it rounds three times: the sigmoid, g * sigmoid, the
    product), never further from it than 1 ulp past MLX's own fused `fm.silu(g) * u` (which for float16 may
    compute the sigmoid in half precision), and its output a contiguous [1, F] row."""

    from runtime import fastmath as fm
    from runtime import gated

    dtype = getattr(mx, dtype_name)
    x = mx.array(np.random.default_rng(f).standard_normal((1, 2 * f), np.float32) * 3).astype(dtype)
    g, u = x[:, :f], x[:, f:]
    assert cuda_silu.fits(g, u)
    out = mx.compile(cuda_silu.silu_mul)(g, u)
    assert out.shape == (1, f) and out.dtype == dtype
    got = out.astype(mx.float32)
    mlx_own = mx.compile(GENERIC.silu_mul)(g, u).astype(mx.float32)
    g32, u32 = g.astype(mx.float32), u.astype(mx.float32)
    truth = g32 * mx.sigmoid(g32) * u32
    ulp = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 2.0 ** -21}[dtype_name]
    err, mlx_err = mx.abs(got - truth), mx.abs(mlx_own - truth)
    bound = ulp * mx.abs(truth) + 1e-6
    assert mx.all(err <= 2 * bound).item(), f"max abs error {err.max().item()} (MLX's own: {mlx_err.max().item()})"
    assert mx.all(err <= mlx_err + bound).item(), f"max abs error {err.max().item()} (MLX's own: {mlx_err.max().item()})"


# ----------------------------------------------------------------------------- the quantized GEMV
def _quantized_case(m, n, k, bits, group, x_dtype, scale_dtype, seed):
    """Activations [m, k] and a weight [n, k] of N(0, 0.02) quantized by MLX (scales and biases in
    `scale_dtype`), and the float64 truth from the dequantized weight; also sum(|x| |w|) per output, the scale
    of the f32 accumulation error."""
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((m, k), np.float32)).astype(x_dtype)
    w = mx.array(rng.standard_normal((n, k), np.float32) * 0.02).astype(scale_dtype)
    wq, scales, biases = mx.quantize(w, group_size=group, bits=bits)
    # scales and biases widened first: dequantizing in their own dtype would round every weight to it
    w64 = np.array(mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group,
                                 bits=bits), np.float64)
    x64 = np.array(x.astype(mx.float32), np.float64)
    return x, wq, scales, biases, x64 @ w64.T, np.abs(x64) @ np.abs(w64).T


def _check_quantized(got, truth, magnitude, dtype_name, what):
    """Within the output's rounding (one ulp) plus 1e-6 of sum(|x| |w|) (f32 accumulation), with no NaN."""
    ulp = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 2.0 ** -22}[dtype_name]
    got = np.array(got.astype(mx.float32), np.float64)
    err = np.abs(got - truth)
    bound = ulp * np.abs(truth) + 1e-6 * magnitude
    assert np.isfinite(got).all() and (err <= bound).all(), (
        f"{what}: max abs error {err.max():.3g} (max |out| {np.abs(truth).max():.3g}, worst error / bound "
        f"{(err / bound).max():.3g})")
    return err.max()


QUANTIZED_CASES = (
    # every bits x group once at M = 1, K = 4096, odd N, each dtype with both bit widths
    [(1, 1001, 4096, 4, 64, "bfloat16", "bfloat16"), (1, 1001, 4096, 4, 32, "bfloat16", "bfloat16"),
     (1, 1001, 4096, 4, 64, "float16", "float16"), (1, 1001, 4096, 4, 128, "float32", "float32"),
     (1, 1001, 4096, 8, 32, "float16", "float16"), (1, 1001, 4096, 8, 64, "float32", "float32"),
     (1, 1001, 4096, 8, 128, "bfloat16", "bfloat16")]
    # M = 2..8 at K = 14336 (the 8B shape's down projection)
    + [(m, 333, 14336, 4, 64, "bfloat16", "bfloat16") for m in range(2, 9)]
    + [(5, 257, 14336, 8, 128, "bfloat16", "bfloat16"), (8, 129, 14336, 4, 32, "float32", "float32")]
    # K = 576 (SmolLM2's hidden size): 18 vectors of 16 bytes a row, fewer than a warp's lanes
    + [(1, 577, 576, 4, 64, "bfloat16", "bfloat16"), (3, 49, 576, 8, 32, "float32", "float32"),
       (8, 1153, 576, 4, 32, "float16", "float16"), (4, 3, 576, 4, 128, "bfloat16", "bfloat16")]
    # float32 scales with bfloat16 activations (MLX then computes in float32), and one row of output
    + [(2, 4097, 4096, 4, 64, "bfloat16", "float32"), (1, 1, 4096, 8, 64, "float32", "float32")])


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
@pytest.mark.parametrize("m,n,k,bits,group,dtype_name,scale_dtype", QUANTIZED_CASES)
def test_quantized_gemv_matches_reference(m, n, k, bits, group, dtype_name, scale_dtype):
    """runtime/kernels/cuda_quantized.py vs the float64 product with the dequantized weight, every poisoned
    output written; where MLX's own kernel is fast to build, the generic entry (mx.quantized_matmul) too."""
    dtype = getattr(mx, dtype_name)
    x, wq, scales, biases, truth, magnitude = _quantized_case(m, n, k, bits, group, dtype, getattr(mx, scale_dtype),
                                                              seed=m * 100003 + n * 7 + k + bits + group)
    assert cuda_quantized.fits(x, wq, scales, biases, bits, group)
    got = cuda_quantized.quantized_matmul(x, wq, scales, biases, bits=bits, group_size=group)
    assert got.shape == (m, n) and got.dtype == dtype
    ours = _check_quantized(got, truth, magnitude, dtype_name, "ours")
    if (bits, group, m, dtype_name, scale_dtype) in ((4, 64, 1, "bfloat16", "bfloat16"), (4, 64, 8, "bfloat16", "bfloat16")):
        generic = GENERIC.quantized_linear(x, wq, scales, biases, bits=bits, group_size=group)
        theirs = _check_quantized(generic, truth, magnitude, dtype_name, "mx.quantized_matmul")
        diff = mx.abs(got.astype(mx.float32) - generic.astype(mx.float32)).max().item()
        assert diff <= ours + theirs + 1e-6, (diff, ours, theirs)


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
@pytest.mark.parametrize("tune", [(1, 1), (2, 2), (4, 4), (4, 1), (1, 4)])
def test_quantized_gemv_tunes(tune):
    """Every (warps, rows) block shape gives the reference, rows past N and K split over warps included."""
    x, wq, scales, biases, truth, magnitude = _quantized_case(3, 1031, 14336, 4, 64, mx.bfloat16, mx.bfloat16, seed=5)
    got = cuda_quantized.quantized_matmul(x, wq, scales, biases, bits=4, group_size=64, tune=tune)
    _check_quantized(got, truth, magnitude, "bfloat16", f"tune {tune}")


@pytest.mark.skipif(not _cuda(), reason="needs MLX's CUDA backend as the default device")
def test_cuda_table_quantized_linear():
    """The CUDA table's entry, compiled as the step runs it: up to MAX_M rows (any leading shape, with a bias)
    through the kernel, more rows or the switch off through MLX's quantized matmul."""
    table, off = _cuda_table(), _cuda_table("quantized_gemv")
    x, wq, scales, biases, truth, magnitude = _quantized_case(8, 300, 4096, 4, 64, mx.bfloat16, mx.bfloat16, seed=9)
    bias = mx.array(np.random.default_rng(1).standard_normal(300, np.float32)).astype(mx.bfloat16)
    for t in (table, off):
        fn = mx.compile(lambda a, t=t: t.quantized_linear(a, wq, scales, biases, bias, bits=4, group_size=64))
        got = fn(x[:3].reshape(1, 3, 4096))
        assert got.shape == (1, 3, 300) and got.dtype == mx.bfloat16
        bias64 = np.array(bias.astype(mx.float32), np.float64)
        _check_quantized(got.reshape(3, 300) - bias, truth[:3] + bias64 - bias64, magnitude[:3] + np.abs(bias64),
                         "bfloat16", t.config.kernels_off or "table")
    direct = cuda_quantized.quantized_matmul(x[:3], wq, scales, biases, bits=4, group_size=64)
    assert mx.array_equal(mx.compile(lambda a: table.quantized_linear(a, wq, scales, biases, bits=4, group_size=64))(
        x[:3]), direct).item()
    many = mx.concatenate([x, x[:1]])  # 9 rows: MLX's kernel
    assert not cuda_quantized.fits(many, wq, scales, biases, 4, 64)
    assert mx.array_equal(table.quantized_linear(many, wq, scales, biases, bits=4, group_size=64),
                          GENERIC.quantized_linear(many, wq, scales, biases, bits=4, group_size=64)).item()


def test_quantized_gemv_fits():
    """What the kernel takes: 4 or 8 bits, groups 32/64/128, 1..MAX_M float rows of the weight's K."""
    w = mx.zeros((64, 256), mx.float32)
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    x = mx.zeros((2, 256), mx.bfloat16)
    assert cuda_quantized.fits(x, wq, scales, biases, 4, 64)
    assert not cuda_quantized.fits(x, wq, scales, biases, 4, 32)  # K / group disagrees with the scales
    assert not cuda_quantized.fits(mx.zeros((9, 256), mx.bfloat16), wq, scales, biases, 4, 64)
    assert not cuda_quantized.fits(mx.zeros((2, 128), mx.bfloat16), wq, scales, biases, 4, 64)
    assert not cuda_quantized.fits(x.astype(mx.int32), wq, scales, biases, 4, 64)
    wq3, s3, b3 = mx.quantize(w, group_size=64, bits=3)
    assert not cuda_quantized.fits(x, wq3, s3, b3, 3, 64)
