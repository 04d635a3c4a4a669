"""runtime/kernels/fastmath.py (exp, sigmoid, softmax, attention and RoPE from fusable arithmetic, the CPU
kernel table's math) against float64 numpy and MLX's own ops; runtime/batch.py's shape buckets."""

import mlx.core as mx
import numpy as np
import pytest

from runtime import kernels
from runtime.batch import bucket
from runtime.kernels import fastmath

pytestmark = pytest.mark.skipif(kernels.current().name != "cpu", reason="the CPU kernel table's math")


def test_cpu_table_uses_fastmath():
    table = kernels.current()
    x = mx.random.normal((64,), key=mx.random.key(3)) * 4
    assert mx.array_equal(table.exp(x), fastmath.exp(x)) and mx.array_equal(table.softmax(x), fastmath.softmax(x))


@pytest.mark.parametrize("compiled", [False, True])
def test_exp_within_one_ulp_and_specials(compiled):
    x = mx.concatenate([mx.random.normal((200_000,), key=mx.random.key(0)) * 30, mx.linspace(-87, 88.3, 10_000)])
    exp = mx.compile(fastmath._exp_f32) if compiled else fastmath._exp_f32
    got = np.array(exp(x)).astype(np.float64)
    ref = np.exp(np.array(x).astype(np.float64))
    normal = (ref > 1.2e-38) & (ref < 2.3e38)  # inf from 88.38 (exp(88.38) = 2.39e38)
    rel = np.max(np.abs(got[normal] - ref[normal]) / ref[normal])
    assert rel < 2e-7, f"max relative error {rel:.3g}"
    special = np.array(exp(mx.array([-np.inf, -100.0, np.inf, 100.0, np.nan, 0.0])))
    assert special[0] == 0 and special[1] == 0 and np.isposinf(special[2]) and np.isposinf(special[3])
    assert np.isnan(special[4]) and special[5] == 1.0, special


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_sigmoid_and_softmax_match(dtype):
    x = (mx.random.normal((64, 512), key=mx.random.key(1)) * 8).astype(dtype)
    x64 = np.array(x.astype(mx.float32)).astype(np.float64)
    tol = 2e-7 if dtype == mx.float32 else 8e-3  # bf16: one rounding of the result
    soft_tol = 2e-6 if dtype == mx.float32 else 8e-3  # f32: the sum over 512 (MLX's own softmax: 1.2e-6)
    sig = np.array(fastmath.sigmoid(x).astype(mx.float32))
    err = np.max(np.abs(sig - 1 / (1 + np.exp(-x64))))
    assert err < tol, f"sigmoid max abs error {err:.3g}"
    silu = np.array(fastmath.silu(x).astype(mx.float32))
    ref = x64 / (1 + np.exp(-x64))
    err = np.max(np.abs(silu - ref) / np.maximum(np.abs(ref), 1))
    assert err < tol, f"silu max error {err:.3g} (relative above 1)"
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    soft = np.array(mx.compile(fastmath.softmax)(x).astype(mx.float32))
    err = np.max(np.abs(soft - e / e.sum(-1, keepdims=True)))
    assert err < soft_tol, f"softmax max abs error {err:.3g}"
    assert fastmath.softmax(x).dtype == dtype


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,lq,lk", [(9, 3, 1, 80), (4, 4, 7, 40), (8, 2, 16, 16)])
def test_attention_matches_mlx_sdpa(dtype, heads, kv_heads, lq, lk):
    """GQA without repeating K/V, a causal mask over earlier context, padded keys no query sees."""
    keys = mx.random.split(mx.random.key(2), 3)
    q = mx.random.normal((3, heads, lq, 64), key=keys[0]).astype(dtype)
    k = mx.random.normal((3, kv_heads, lk, 64), key=keys[1]).astype(dtype)
    v = mx.random.normal((3, kv_heads, lk, 64), key=keys[2]).astype(dtype)
    q_pos = mx.array([[p + lk - lq - 3 * s for p in range(lq)] for s in range(3)])
    mask = (mx.arange(lk) <= q_pos[:, None, :, None])
    ref = mx.fast.scaled_dot_product_attention(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32),
                                               scale=0.125, mask=mask)
    got = fastmath.attention(q, k, v, scale=0.125, mask=mask)
    assert got.dtype == dtype and got.shape == q.shape
    err = mx.abs(got.astype(mx.float32) - ref).max().item()
    assert err < (2e-6 if dtype == mx.float32 else 2e-2), f"max abs error {err:.3g}"


def test_buckets_whole_powers_then_sixteenths():
    assert [bucket(n) for n in (1, 3, 9, 200, 256)] == [1, 4, 16, 256, 256]
    assert [bucket(n) for n in (257, 300, 513, 600, 1025)] == [288, 320, 576, 640, 1152]
    assert [bucket(n, 16) for n in (1, 17, 100, 513)] == [16, 32, 128, 576]
    assert all(bucket(n) >= n and bucket(n, 16) % 16 == 0 and bucket(n) <= max(n * 9 // 8 + 1, 256)
               for n in range(1, 5000))


def _rope_reference(x, pos, inv_freq, traditional, mscale):
    """RoPE in float64 numpy, written from the definition (HF's rotate_half for NeoX, interleaved pairs for GPT-J)."""
    x = x.astype(np.float64)
    rot = 2 * len(inv_freq)
    theta = pos.astype(np.float64)[:, None, None] * inv_freq.astype(np.float64)[None, None, :]
    cos, sin = np.cos(theta) * mscale, np.sin(theta) * mscale
    y = x.copy()
    if traditional:
        a, b = x[..., 0:rot:2], x[..., 1:rot:2]
        y[..., 0:rot:2], y[..., 1:rot:2] = a * cos - b * sin, b * cos + a * sin
    else:
        a, b = x[..., :rot // 2], x[..., rot // 2:rot]
        y[..., :rot // 2], y[..., rot // 2:rot] = a * cos - b * sin, b * cos + a * sin
    return y


@pytest.mark.parametrize("traditional", [False, True])
@pytest.mark.parametrize("dtype,rot,mscale", [("float32", 64, 1.0), ("float32", 32, 1.0), ("float32", 64, 1.2),
                                              ("bfloat16", 64, 1.0), ("float16", 48, 1.1)])
def test_rope_matches_the_definition_and_mlx(traditional, dtype, rot, mscale):
    """fastmath.rope (the CPU kernel table's `rope`) against float64 RoPE, under mx.compile, with
    positions into the thousands: within the dtype's rounding of the f32 math (the angle theta = pos * inv_freq is
    itself an f32 product, ~1e-7 relative, so ~pos * 1e-7 absolute). f32 also against mx.fast.rope (NeoX/GPT-J)."""
    rng = np.random.default_rng(rot)
    t, heads, d = 7, 5, 64
    x = rng.standard_normal((t, heads, d)).astype(np.float32)
    pos = np.array([0, 1, 17, 300, 1000, 4095, 9000], np.int32)
    inv_freq = (1.0 / 10000 ** (np.arange(0, rot, 2) / rot)).astype(np.float32)
    xm = mx.array(x).astype(getattr(mx, dtype))
    got = mx.compile(lambda a, p, f: fastmath.rope(a, p, f, traditional, mscale))(xm, mx.array(pos), mx.array(inv_freq))
    assert got.dtype == xm.dtype and got.shape == xm.shape
    ref = _rope_reference(np.array(xm.astype(mx.float32)), pos, inv_freq, traditional, mscale)
    err = np.abs(np.array(got.astype(mx.float32)) - ref)
    ulp = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}[dtype]
    bound = ulp * np.abs(ref) + 4 * 9000 * 2.0 ** -24 * np.abs(x).max() * mscale + 1e-6
    assert (err <= bound).all(), f"max abs error {err.max():.3g}"
    assert np.array_equal(np.array(got.astype(mx.float32))[..., rot:], np.array(xm.astype(mx.float32))[..., rot:])
    if dtype == "float32" and mscale == 1.0:
        fast = mx.fast.rope(xm.reshape(t, heads, 1, d), rot, traditional=traditional, base=None, scale=1.0,
                            offset=mx.array(pos), freqs=mx.reciprocal(mx.array(inv_freq))).reshape(t, heads, d)
        diff = np.abs(np.array(fast) - np.array(got)).max()
        assert diff < 2e-3, f"vs mx.fast.rope: max abs diff {diff:.3g}"
