"""exp, sigmoid, SiLU, softmax, attention and RoPE for MLX's CPU backend, in arithmetic that mx.compile fuses.

MLX's CPU `exp` (and `sigmoid`, `softmax`, which use it) costs tens of nanoseconds an element on x86,
against ~1 ns for `negative`: in a prefill the softmax of attention and the SiLU of the MLP took most of the
time. Built from multiplies, adds and a bit shift instead, exp compiles into one vectorised kernel several
times faster. The CPU kernel table (runtime/kernels/cpu.py) uses these; on a GPU MLX's own ops are fast.
"""

from __future__ import annotations

import math

import mlx.core as mx

_LN2_HI = 0.693145751953125  # ln 2 split so that n * _LN2_HI is exact for |n| < 2^11 (Cody-Waite)
_LN2_LO = 1.4286068203094173e-06
# 1/k! for k = 7..2: Taylor on |r| <= ln2/2 leaves < 3e-9 relative, below f32's half-ulp
_COEFFS = [1 / math.factorial(k) for k in range(7, 1, -1)]


def _exp_f32(x: mx.array) -> mx.array:
    """exp of f32 x: x = n ln2 + r, exp(x) = 2^n exp(r), 2^n made in the exponent bits; within 1e-7
    relative (1 ulp). Below -87.68 the result is 0 (-inf gives 0), from 88.38 it is inf
    (f32 overflows at 88.72); NaN stays NaN (through r)."""
    x = mx.clip(x, -88.0, 88.8)
    n = mx.round(x * 1.4426950408889634)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    p = _COEFFS[0]
    for c in _COEFFS[1:]:
        p = p * r + c
    p = (p * r + 1.0) * r + 1.0
    scale = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)  # n = -127 -> 0.0
    return p * scale


def exp(x: mx.array) -> mx.array:
    return _exp_f32(x.astype(mx.float32)).astype(x.dtype)


def sigmoid(x: mx.array) -> mx.array:
    return (1.0 / (1.0 + _exp_f32(-x.astype(mx.float32)))).astype(x.dtype)


def silu(x: mx.array) -> mx.array:
    """x * sigmoid(x), computed in f32 and rounded once to x's dtype, as torch does for f16/bf16."""
    x32 = x.astype(mx.float32)
    return (x32 / (1.0 + _exp_f32(-x32))).astype(x.dtype)


def softmax(x: mx.array, axis: int = -1) -> mx.array:
    """Softmax in f32 (MLX's `precise=True`), result in x's dtype."""
    x32 = x.astype(mx.float32)
    e = _exp_f32(x32 - mx.max(x32, axis=axis, keepdims=True))
    return (e / mx.sum(e, axis=axis, keepdims=True)).astype(x.dtype)


def attention(q, k, v, *, scale: float, mask) -> mx.array:
    """`mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)` for q [S, H, Lq, D],
    k and v [S, KVH, Lk, D] (GQA: query head h reads kv head h // (H / KVH)), boolean mask broadcast to
    [S, 1, Lq, Lk] or "causal". On the CPU MLX composes that from its slow softmax; here: scores in f32 through BLAS,
    the softmax above, and the query heads of one kv head stacked as rows of one product (no K/V repeat)."""
    s, h, lq, d = q.shape
    kvh, lk = k.shape[1], k.shape[2]
    if isinstance(mask, str):  # "causal" (queries and keys the same positions)
        mask = (mx.arange(lk)[None, :] <= mx.arange(lq)[:, None])[None, None]
    g = h // kvh
    qg = (q.astype(mx.float32) * scale).reshape(s, kvh, g * lq, d)
    scores = (qg @ k.astype(mx.float32).swapaxes(-1, -2)).reshape(s, kvh, g, lq, lk)
    # masked keys get a large finite negative, not -inf: a row with nothing visible stays finite
    scores = mx.where(mask[:, :, None], scores, -1e30)
    probs = softmax(scores).reshape(s, kvh, g * lq, lk)
    return (probs @ v.astype(mx.float32)).reshape(s, h, lq, v.shape[-1]).astype(q.dtype)


def rope(x: mx.array, positions: mx.array, inv_freq: mx.array, traditional: bool, mscale: float = 1.0) -> mx.array:
    """RoPE of x [T, heads, D] at positions [T]: the first R = 2 * len(inv_freq) dims of each head rotate by
    theta = position * inv_freq (GPT-NeoX pairs (j, j + R/2), GPT-J (2j, 2j + 1) if `traditional`), scaled
    by `mscale` (YaRN); theta in f32 as the model computes it, cos/sin rounded to x's dtype as the model
    rounds them, the rotation in f32, rounded once to x's dtype. Faster on the CPU than MLX's `mx.fast.rope`
    with a position per token: these elementwise ops fuse, and mx.compile computes their cos/sin table [T, R/2]
    once a step, since every layer's is the same expression."""
    half = inv_freq.shape[0]
    rot = 2 * half
    theta = positions.astype(mx.float32)[:, None] * inv_freq.astype(mx.float32)[None, :]
    cos, sin = mx.cos(theta)[:, None, :], mx.sin(theta)[:, None, :]
    if mscale != 1.0:
        cos, sin = cos * mscale, sin * mscale
    if x.dtype != mx.float32:  # the model casts its cos/sin to the activation dtype: the same values here
        cos, sin = cos.astype(x.dtype).astype(mx.float32), sin.astype(x.dtype).astype(mx.float32)
    x32 = x.astype(mx.float32)
    if traditional:
        x1, x2 = x32[..., 0:rot:2], x32[..., 1:rot:2]
        y = mx.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(*x.shape[:-1], rot)
    else:
        x1, x2 = x32[..., :half], x32[..., half:rot]
        y = mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    if rot < x.shape[-1]:
        y = mx.concatenate([y, x32[..., rot:]], axis=-1)
    return y.astype(x.dtype)
