"""MLX-format checkpoints (as mlx-lm writes them): already MLX affine, read as they are.

config.json carries `"quantization": {"group_size": 64, "bits": 4}` (mode "affine" when absent) and,
for modules quantized differently, one entry per module path, e.g.
`"model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 8}`. A quantized module `P` stores
`P.weight` (uint32 codes), `P.scales` and `P.biases`; every other tensor is full precision.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import mlx.core as mx

from weights.checkpoint import open_tensors, read_config
from weights.errors import UnsupportedQuantizationError, WeightsError
from weights.quantized import QuantizedWeight

_PARAMS = ("group_size", "bits", "mode")


def is_mlx_quantized(config: dict) -> bool:
    return isinstance(config.get("quantization"), dict)


class MLXCheckpoint:
    """An mlx-lm checkpoint directory: `config` and `tensors()` (module path, tensor) pairs."""

    def __init__(self, directory: str | os.PathLike, config: dict | None = None):
        self.path = Path(directory)
        self.config = read_config(self.path) if config is None else config
        quant = self.config.get("quantization")
        if not isinstance(quant, dict):
            raise WeightsError(f"{self.path}/config.json has no 'quantization' entry: not an MLX-format checkpoint")
        self.default = {k: quant[k] for k in _PARAMS if k in quant}
        self.overrides = {k: v for k, v in quant.items() if k not in _PARAMS}
        self._lazy = open_tensors(self.path)
        self.modules = sorted(n[: -len(".scales")] for n in self._lazy if n.endswith(".scales"))
        self.conversions = [f"MLX affine: {len(self.modules)} quantized weights read as stored"]

    def params(self, module: str) -> dict:
        """group_size, bits and mode of one quantized module (its override, else the default)."""
        p = self.overrides.get(module, self.default)
        if p is False or not isinstance(p, dict):
            raise WeightsError(
                f"{self.path}: {module}.scales exists but config.json's quantization entry for {module} is {p!r}"
            )
        p = {**self.default, **p}
        if p.get("mode", "affine") != "affine":
            raise UnsupportedQuantizationError(
                f"{self.path}: {module} is quantized in MLX mode {p['mode']!r}; supported: affine"
            )
        if "bits" not in p or "group_size" not in p:
            raise WeightsError(f"{self.path}/config.json: quantization for {module} lacks bits or group_size")
        return p

    def tensors(self) -> Iterator[tuple[str, mx.array | QuantizedWeight]]:
        lazy = self._lazy
        for module in self.modules:
            p = self.params(module)
            parts = [lazy.pop(f"{module}.{k}", None) for k in ("weight", "scales", "biases")]
            if any(x is None for x in parts):
                raise WeightsError(f"{self.path}: {module} has scales but lacks its weight or biases")
            try:
                out = QuantizedWeight(*parts, bits=p["bits"], group_size=p["group_size"])
            except ValueError as exc:
                raise WeightsError(f"{self.path}: {module}: {exc}") from None
            mx.eval(out.wq, out.scales, out.biases)
            yield f"{module}.weight", out
        for name in list(lazy):
            arr = lazy.pop(name)
            mx.eval(arr)
            yield name, arr
