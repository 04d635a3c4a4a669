"""Weight bytes before and after quantization (what `lower-model` prints and puts in its JSON)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import mlx.core as mx

from weights.quantized import QuantizedWeight

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


@dataclass(frozen=True)
class WeightBytes:
    """`full_precision`: every tensor at the model dtype; `quantized`: quantized weights at their packed
    size (codes + scales + biases), every other tensor at the model dtype."""

    dtype: str
    full_precision: int
    quantized: int
    tensors: int
    quantized_tensors: int

    @property
    def ratio(self) -> float:
        return self.quantized / self.full_precision if self.full_precision else 1.0

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        mib = 1 << 20
        return (
            f"weights: {self.full_precision / mib:.1f} MiB as {self.dtype} -> {self.quantized / mib:.1f} MiB "
            f"({self.quantized_tensors} of {self.tensors} tensors quantized, {self.ratio:.2f}x)"
        )


def _dtype(dtype) -> mx.Dtype:
    if isinstance(dtype, mx.Dtype):
        return dtype
    name = str(dtype).removeprefix("torch.").removeprefix("mlx.core.")
    if name not in _DTYPES:
        raise ValueError(f"model dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def weight_bytes(tensors: Mapping[str, mx.array | QuantizedWeight], dtype="float32") -> WeightBytes:
    """Bytes of a model's weights in full precision (`dtype`) and as loaded, quantized where they are."""
    dt = _dtype(dtype)
    full = stored = n_quantized = 0
    for t in tensors.values():
        size = math.prod(t.shape) * dt.size
        full += size
        if isinstance(t, QuantizedWeight):
            stored += t.nbytes
            n_quantized += 1
        else:
            stored += size
    return WeightBytes(str(dt).removeprefix("mlx.core."), full, stored, len(tensors), n_quantized)
