"""One entry point for every weight source: `load(path)` -> module path -> mx.array | QuantizedWeight.

Sources, told apart by what is on disk:
- a `.gguf` file (GGUF magic): weights/gguf.py;
- a directory whose config.json has `quantization` (mlx-lm): weights/mlx_format.py;
- a directory whose `quantization_config.quant_method` is awq or gptq: weights/awq_gptq.py;
- a directory of full-precision safetensors, optionally quantized at load (weights/quantize.py).
Tensors stream through one at a time; on-the-fly quantization happens in the stream, so at most one
full-precision copy of a quantizable weight exists at any moment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from weights.awq_gptq import METHODS, AWQGPTQCheckpoint, quantization_config
from weights.checkpoint import open_tensors, read_config
from weights.errors import UnsupportedQuantizationError, WeightsError
from weights.gguf import GGUFFile, is_gguf
from weights.mlx_format import MLXCheckpoint, is_mlx_quantized
from weights.quantize import QuantizeSpec, quantize_weight, should_quantize
from weights.quantized import QuantizedWeight

log = logging.getLogger(__name__)

Tensor = mx.array | QuantizedWeight
DEFAULT_BITS = (4, 8)  # the widths the quantized kernels run; GGUF types of other widths are re-quantized


@dataclass
class LoadedWeights:
    """What a source holds: tensors by module path, its Hugging Face config, and how it was converted."""

    tensors: dict[str, Tensor]
    config: dict
    format: str  # "gguf" | "mlx" | "awq" | "gptq" | "safetensors"
    conversions: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> dict[str, QuantizedWeight]:
        return {k: v for k, v in self.tensors.items() if isinstance(v, QuantizedWeight)}


class _FullPrecision:
    """A plain safetensors checkpoint."""

    def __init__(self, directory: Path, config: dict):
        self.config = config
        self._lazy = open_tensors(directory)
        self.conversions: list[str] = []

    def tensors(self) -> Iterator[tuple[str, mx.array]]:
        for name in list(self._lazy):
            yield name, self._lazy.pop(name)  # evaluated by the caller, after any quantization


def open_source(path: str | os.PathLike, bits: tuple[int, ...] = DEFAULT_BITS):
    """(format, source) for a checkpoint path; the source has `.config`, `.conversions` and `.tensors()`."""
    path = Path(path)
    if is_gguf(path):
        return "gguf", GGUFFile(path, bits=bits)
    if path.is_file():
        raise WeightsError(f"{path}: not a GGUF file (no GGUF magic) and not a checkpoint directory")
    if not path.is_dir():
        raise WeightsError(f"{path}: no such file or directory")
    config = read_config(path)
    if is_mlx_quantized(config):
        return "mlx", MLXCheckpoint(path, config)
    qc = quantization_config(config, path)
    if qc is not None:
        method = str(qc.get("quant_method", "")).lower()
        if method not in METHODS:
            raise UnsupportedQuantizationError(
                f"{path}: quant_method {qc.get('quant_method')!r} has no MLX conversion; supported: "
                f"{', '.join(METHODS)}, MLX-format (config 'quantization'), GGUF, or full precision"
            )
        return method, AWQGPTQCheckpoint(path, config)
    return "safetensors", _FullPrecision(path, config)


def _stream(source, quantize: QuantizeSpec | None, linear_paths: Collection[str] | None):
    for name, t in source.tensors():
        if (
            quantize is not None
            and not isinstance(t, QuantizedWeight)
            and should_quantize(name, tuple(t.shape), quantize.group_size, linear_paths)
        ):
            yield name, quantize_weight(t, quantize), True
        else:
            if not isinstance(t, QuantizedWeight):
                mx.eval(t)
            yield name, t, False


def iter_weights(
    source, quantize: QuantizeSpec | None = None, linear_paths: Collection[str] | None = None
) -> Iterator[tuple[str, Tensor]]:
    """A source's (module path, tensor) pairs, each evaluated, quantized on the fly where asked."""
    for name, t, _ in _stream(source, quantize, linear_paths):
        yield name, t


def load(
    path: str | os.PathLike,
    *,
    quantize: QuantizeSpec | None = None,
    bits: tuple[int, ...] = DEFAULT_BITS,
    linear_paths: Collection[str] | None = None,
) -> LoadedWeights:
    """Load a checkpoint (GGUF file, MLX / AWQ / GPTQ / full-precision directory) into MLX.

    `quantize` quantizes the full-precision linear and embedding weights at load (see weights/quantize.py);
    `bits` are the MLX widths GGUF blocks may map to (others are re-quantized); `linear_paths`, when given,
    names the modules that may be quantized on the fly."""
    fmt, source = open_source(path, bits)
    tensors, on_the_fly = {}, 0
    for name, t, quantized_here in _stream(source, quantize, linear_paths):
        tensors[name] = t
        on_the_fly += quantized_here
    conversions = list(source.conversions)
    if quantize is not None:
        conversions.append(f"on the fly: {on_the_fly} full-precision weights quantized to MLX affine {quantize}")
    for line in conversions:
        log.info("%s: %s", Path(path).name, line)
    return LoadedWeights(tensors, source.config, fmt, conversions)
