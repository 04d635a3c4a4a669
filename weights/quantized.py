"""The one quantized-weight representation every source is converted to: MLX's affine triple.

For a weight `w[N, K]` quantized with `bits` and `group_size` (MLX's `mx.quantize` layout):
`wq` uint32 `[N, K * bits / 32]` holds the unsigned codes q, row by row as one little-endian bit
stream (code k at bits `k * bits ... k * bits + bits - 1`); `scales` and `biases` are `[N, K / group_size]`
and `w[n, k] = scales[n, k // group_size] * q[n, k] + biases[n, k // group_size]`.
Leading axes (stacked experts) ride along: `wq` `[..., N, K * bits / 32]`.

Scales and biases keep whatever dtype represents the source exactly (float16 for GGUF's f16 block
scales, float32 where a product such as AWQ's `-scale * zero` needs more than f16's 11 bits); the
kernels cast them to the activation dtype, where MLX's quantized matmul computes anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

BITS = (1, 2, 3, 4, 5, 6, 8)  # what mx.quantize accepts in affine mode
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """One linear or embedding weight in MLX's affine format (see the module docstring)."""

    wq: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int

    def __post_init__(self):
        if self.bits not in BITS or self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"MLX affine quantization has bits {BITS} and group sizes {GROUP_SIZES}; "
                f"got bits={self.bits}, group_size={self.group_size}"
            )
        if self.wq.dtype != mx.uint32:
            raise ValueError(f"wq must be uint32, got {self.wq.dtype}")
        k = self.wq.shape[-1] * 32 // self.bits
        groups = (*self.wq.shape[:-1], k // self.group_size)
        if k % self.group_size or tuple(self.scales.shape) != groups or tuple(self.biases.shape) != groups:
            raise ValueError(
                f"wq {tuple(self.wq.shape)} at {self.bits} bits holds K={k}; with group size {self.group_size} "
                f"scales and biases must be {groups}, got {tuple(self.scales.shape)} and {tuple(self.biases.shape)}"
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """The full-precision shape (N, K) (with any leading axes)."""
        return (*self.wq.shape[:-1], self.wq.shape[-1] * 32 // self.bits)

    @property
    def nbytes(self) -> int:
        return self.wq.nbytes + self.scales.nbytes + self.biases.nbytes

    def dequantize(self, dtype: mx.Dtype = mx.float32) -> mx.array:
        """`scales * q + biases`, computed in `dtype` (float32 reproduces exact conversions bit for bit)."""
        return mx.dequantize(
            self.wq,
            self.scales.astype(dtype),
            self.biases.astype(dtype),
            group_size=self.group_size,
            bits=self.bits,
        )

    def take_rows(self, index: np.ndarray) -> QuantizedWeight:
        """The weight with its output rows reordered (`w[index]`): groups run along K, so this is exact."""
        idx = mx.array(np.asarray(index, dtype=np.int32))
        return QuantizedWeight(
            self.wq[..., idx, :], self.scales[..., idx, :], self.biases[..., idx, :], self.bits, self.group_size
        )

    def __repr__(self) -> str:
        return (
            f"QuantizedWeight(shape={self.shape}, bits={self.bits}, group_size={self.group_size}, "
            f"scales={self.scales.dtype})"
        )


def pack_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes `[..., K]` (uint8, each < 2**bits) -> MLX's packed uint32 `[..., K * bits / 32]`.

    Code k sits at bits `k * bits ...` of the row's little-endian bit stream: for 1, 2, 4 and 8 bits that
    is `32 / bits` codes per word, lowest first; for 3, 5 and 6 bits eight codes fill `bits` bytes."""
    if q.shape[-1] * bits % 32:
        raise ValueError(f"a row of {q.shape[-1]} codes at {bits} bits does not fill whole uint32 words")
    lead = q.shape[:-1]
    if bits == 8:  # bytes in order are the little-endian stream already
        return np.ascontiguousarray(q, dtype=np.uint8).view(np.uint32)
    if 32 % bits == 0:
        per = 32 // bits
        q = q.reshape(*lead, -1, per)
        words = np.zeros(q.shape[:-1], dtype=np.uint32)
        for i in range(per):
            words |= q[..., i].astype(np.uint32) << np.uint32(i * bits)
        return words
    q8 = q.reshape(*lead, -1, 8)
    word = np.zeros(q8.shape[:-1], dtype=np.uint64)
    for i in range(8):
        word |= q8[..., i].astype(np.uint64) << np.uint64(i * bits)
    stream = word.view(np.uint8).reshape(*word.shape, 8)[..., :bits]  # little-endian: low bytes first
    return np.ascontiguousarray(stream).reshape(*lead, -1).view(np.uint32)


def unpack_codes(wq: np.ndarray, bits: int) -> np.ndarray:
    """The inverse of `pack_codes`: packed uint32 `[..., W]` -> uint8 codes `[..., W * 32 / bits]`."""
    lead = wq.shape[:-1]
    stream = np.ascontiguousarray(wq).view(np.uint8).reshape(*lead, -1, bits)
    padded = np.zeros((*stream.shape[:-1], 8), dtype=np.uint8)
    padded[..., :bits] = stream
    word = padded.view(np.uint64)[..., 0]
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    codes = (word[..., None] >> shifts) & np.uint64((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(*lead, -1)


def from_numpy(
    q: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int
) -> QuantizedWeight:
    """A QuantizedWeight from uint8 codes and per-group scales/biases held in NumPy."""
    return QuantizedWeight(mx.array(pack_codes(q, bits)), mx.array(scales), mx.array(biases), bits, group_size)


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack weights along their output rows (merged q/k/v or gate/up projections): exact when all share
    bits and group size; anything else is refused, naming what differs."""
    kinds = {(p.bits, p.group_size, p.shape[-1]) for p in parts}
    if len(kinds) != 1:
        raise ValueError(
            "cannot merge quantized weights of different layouts (bits, group size, K): "
            + ", ".join(map(str, sorted(kinds)))
        )
    bits, group, _ = kinds.pop()
    stack = [mx.concatenate([getattr(p, a) for p in parts], axis=-2) for a in ("wq", "scales", "biases")]
    if len({p.scales.dtype for p in parts}) != 1:
        stack[1:] = [a.astype(mx.float32) for a in stack[1:]]
    return QuantizedWeight(*stack, bits, group)
