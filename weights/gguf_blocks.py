"""llama.cpp block formats that are MLX affine groups of 32 already: their codes, scales and biases.

Each decoder takes one tensor's raw rows (uint8 `[N, bytes per row]`, as `gguf.GGUFReader` maps them)
and returns `(q, scales, biases)`: uint8 codes `[N, K]` in element order and per-32-element scales and
biases `[N, K / 32]` with `w = scales * q + biases`, the same float32 value `gguf.quants.dequantize`
computes, bit for bit:
- Q4_0 `d * (q - 8)`, Q5_0 `d * (q - 16)`, Q8_0 `d * (q - 128)` (int8 codes shifted to unsigned):
  bias `-8 d` (`-16 d`, `-128 d`) is a power-of-two multiple of an f16, so f16 holds it exactly;
  `s * q` has at most 11 + 8 significant bits, exact in f32, and the exact sum `d * (q - c)` is an
  f32 value, so the one rounding of the add gives it back.
- Q4_1, Q5_1 `d * q + m`: scale and bias are the stored f16 values, one rounding as in gguf's code.
- Q4_K, Q5_K `(d * sc) * q - dmin * m` per 32-element sub-block (6-bit sc and m): `d * sc` and
  `dmin * m` have at most 17 significant bits, exact in float32 (not in f16), so these keep f32.
Everything here works on the quantized bytes (at most one uint8 code per weight): no float copy of
the tensor is made.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

GROUP = 32


def _f16(b: np.ndarray) -> np.ndarray:
    """Two-byte fields `[..., 2]` -> float16 `[...]`."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """`[..., 16]` bytes -> 32 codes: low nibbles are elements 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4-byte little-endian mask -> bit j (the fifth bit of element j) for j < 32."""
    word = np.ascontiguousarray(qh).view("<u4")[..., 0]
    return ((word[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _scaled_bias(d: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """`(d, -offset * d)` in f16 (exact: a power-of-two multiple), or f32 where -offset * d overflows f16."""
    with np.errstate(over="ignore"):
        bias = d * np.float16(-offset)
    if np.array_equal(np.isfinite(bias), np.isfinite(d)):
        return d, bias
    d32 = d.astype(np.float32)
    return d32, d32 * np.float32(-offset)


def _k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit sub-block scales and mins -> two `[..., 8]` uint8 arrays."""
    s = scales.reshape(*scales.shape[:-1], 3, 4)
    d, m, md = s[..., 0, :], s[..., 1, :], s[..., 2, :]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """`[..., 128]` bytes -> 256 codes: each 32-byte chunk gives a sub-block of low, then one of high nibbles."""
    c = qs.reshape(*qs.shape[:-1], 4, 1, 32)
    return np.concatenate([c & 0x0F, c >> 4], axis=-2).reshape(*qs.shape[:-1], 256)


def _k_scales(d16, dmin16, sc, mn) -> tuple[np.ndarray, np.ndarray]:
    d, dmin = d16.astype(np.float32)[..., None], dmin16.astype(np.float32)[..., None]
    return d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))


def q4_0(b):
    return _nibbles(b[..., 2:18]), *_scaled_bias(_f16(b[..., 0:2]), 8)


def q4_1(b):
    return _nibbles(b[..., 4:20]), _f16(b[..., 0:2]), _f16(b[..., 2:4])


def q5_0(b):
    q = _nibbles(b[..., 6:22]) | (_high_bits(b[..., 2:6]) << 4)
    return q, *_scaled_bias(_f16(b[..., 0:2]), 16)


def q5_1(b):
    q = _nibbles(b[..., 8:24]) | (_high_bits(b[..., 4:8]) << 4)
    return q, _f16(b[..., 0:2]), _f16(b[..., 2:4])


def q8_0(b):
    q = b[..., 2:34] ^ np.uint8(0x80)  # int8 v -> unsigned v + 128, on the raw byte
    return q, *_scaled_bias(_f16(b[..., 0:2]), 128)


def q4_k(b):
    sc, mn = _k_scale_min(b[..., 4:16])
    return _k_low_nibbles(b[..., 16:144]), *_k_scales(_f16(b[..., 0:2]), _f16(b[..., 2:4]), sc, mn)


def q5_k(b):
    sc, mn = _k_scale_min(b[..., 4:16])
    qh = b[..., 16:48][..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]  # [..., 8, 32]: bit j of byte i
    high = (qh & 1).reshape(*b.shape[:-1], 256)
    q = _k_low_nibbles(b[..., 48:176]) | (high << 4)
    return q, *_k_scales(_f16(b[..., 0:2]), _f16(b[..., 2:4]), sc, mn)


# ggml type -> (decoder, MLX bits, elements per block, bytes per block)
EXACT = {
    T.Q4_0: (q4_0, 4, 32, 18),
    T.Q4_1: (q4_1, 4, 32, 20),
    T.Q5_0: (q5_0, 5, 32, 22),
    T.Q5_1: (q5_1, 5, 32, 24),
    T.Q8_0: (q8_0, 8, 32, 34),
    T.Q4_K: (q4_k, 4, 256, 144),
    T.Q5_K: (q5_k, 5, 256, 176),
}


def decode(rows: np.ndarray, qtype: T) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw rows of an EXACT type -> `(q [N, K], scales [N, K/32], biases [N, K/32])`."""
    fn, _, block, size = EXACT[qtype]
    lead, nbytes = rows.shape[:-1], rows.shape[-1]
    blocks = rows.reshape(*lead, nbytes // size, size)
    q, scales, biases = fn(blocks)
    k = nbytes // size * block
    return q.reshape(*lead, k), scales.reshape(*lead, k // GROUP), biases.reshape(*lead, k // GROUP)
