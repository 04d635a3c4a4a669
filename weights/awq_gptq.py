"""AWQ and GPTQ checkpoints (vLLM's `quantization_config.quant_method` "awq" / "gptq") -> MLX affine, exactly.

Both store integer codes q, per-group scales s and zero points z with `w = (q - z) * s`, which is
MLX's `s * q + b` with `b = -s * z`. For a linear with K inputs and N outputs, group g:
- AWQ (AutoAWQ GEMM layout, 4-bit): `qweight` int32 `[K, N/8]` packed along the *outputs*, eight
  codes per word in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7] (word bits 4i hold column
  AWQ_ORDER[i]); `qzeros` int32 `[K/g, N/8]` packed the same way (the zero itself, no offset);
  `scales` `[K/g, N]`. Without `zero_point` the zero is 8.
- GPTQ (AutoGPTQ / GPTQModel, 2/4/8-bit): `qweight` int32 `[K*bits/32, N]` packed along the
  *inputs* in ascending order, which is MLX's packing of the transpose (so `wq = qweight.T`);
  `qzeros` int32 `[K/g, N*bits/32]` packed along the outputs in ascending order; `scales` `[K/g, N]`;
  `g_idx` int32 `[K]`, the group of each input. Symmetric checkpoints (`sym`) use the zero
  2**(bits-1), as vLLM does; asymmetric ones store `zero - 1` (the original GPTQ convention) unless
  `checkpoint_format` is "gptq_v2" (the zero itself). Act-order checkpoints (`g_idx` other than
  k // g) are refused: their groups are not contiguous runs of inputs, which MLX's layout needs.
Exactness: s is f16 or bf16 (at most 11 significant bits) and |q - z| <= 256, so `s * z`, `s * q` and
`s * (q - z)` are float32 values: scales and biases are kept in float32 and `s * q + b` is exact.
A group of -1 (one per row) or a multiple of 128 is expressed with MLX groups of 128 holding
repeated scales and biases, still exact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np

from weights.checkpoint import open_tensors, read_config
from weights.errors import UnsupportedQuantizationError, WeightsError
from weights.quantized import GROUP_SIZES, QuantizedWeight, pack_codes

METHODS = ("awq", "gptq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_UNDO = np.argsort(AWQ_ORDER)  # code column c sits in nibble _AWQ_UNDO[c]
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def quantization_config(config: dict, directory: str | os.PathLike) -> dict | None:
    """config.json's `quantization_config`, or AutoGPTQ's separate quantize_config.json."""
    qc = config.get("quantization_config")
    if qc is None and (legacy := Path(directory) / "quantize_config.json").is_file():
        qc = {"quant_method": "gptq", **json.loads(legacy.read_text())}
    return qc


def mlx_group(group: int) -> int:
    """The largest MLX group size dividing the source group (scales repeat to fill it), or 0."""
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if group % g == 0), 0)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """int32 `[R, C]` with 32/bits ascending codes per word -> uint8 `[R, C * 32/bits]`."""
    words = packed.view(np.uint32)
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    codes = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return codes.astype(np.uint8).reshape(words.shape[0], -1)


def _awq_unpack(packed: np.ndarray) -> np.ndarray:
    """AWQ int32 `[R, C]` -> uint8 `[R, 8C]` in column order."""
    codes = _unpack(packed, 4).reshape(packed.shape[0], -1, 8)
    return codes[..., _AWQ_UNDO].reshape(packed.shape[0], -1)


def _np(a: mx.array, dtype=None) -> np.ndarray:
    if dtype is not None:
        a = a.astype(dtype)
    return np.array(a)


class AWQGPTQCheckpoint:
    """An AWQ or GPTQ checkpoint directory: `config` and `tensors()` (module path, tensor) pairs."""

    def __init__(self, directory: str | os.PathLike, config: dict | None = None):
        self.path = Path(directory)
        self.config = read_config(self.path) if config is None else config
        qc = quantization_config(self.config, self.path) or {}
        self.method = str(qc.get("quant_method", "")).lower()
        if self.method not in METHODS:
            raise UnsupportedQuantizationError(
                f"{self.path}: quant_method {qc.get('quant_method')!r} is not supported here; supported: "
                f"{', '.join(METHODS)} (and MLX-format checkpoints)"
            )
        self.bits = int(qc.get("bits", qc.get("w_bit", 4)))
        self.group = int(qc.get("group_size", qc.get("q_group_size", 128)))
        if self.method == "awq":
            self.symmetric = not qc.get("zero_point", True)
            version = str(qc.get("version", "gemm")).lower()
            if self.bits != 4 or version != "gemm":
                raise UnsupportedQuantizationError(
                    f"{self.path}: AWQ {self.bits}-bit version {version!r}; supported: 4-bit, version gemm"
                )
            self.zero_offset = 0
        else:
            self.symmetric = bool(qc.get("sym", True))
            if self.bits not in (2, 4, 8):
                raise UnsupportedQuantizationError(f"{self.path}: GPTQ {self.bits}-bit; supported: 2, 4, 8 bits")
            fmt = str(qc.get("checkpoint_format", "gptq")).lower()
            if fmt not in ("gptq", "gptq_v2"):
                raise UnsupportedQuantizationError(
                    f"{self.path}: GPTQ checkpoint_format {fmt!r}; supported: gptq, gptq_v2"
                )
            self.zero_offset = 1 if fmt == "gptq" else 0
        self._lazy = open_tensors(self.path)
        self.modules = sorted(n[: -len(".qweight")] for n in self._lazy if n.endswith(".qweight"))
        self.conversions = [
            f"{self.method.upper()} {self.bits}-bit group {self.group}: {len(self.modules)} weights converted "
            f"exactly to MLX affine {self.bits}-bit"
        ]

    def tensors(self) -> Iterator[tuple[str, mx.array | QuantizedWeight]]:
        lazy = self._lazy
        for module in self.modules:
            parts = {k: lazy.pop(f"{module}.{k}", None) for k in _PARTS}
            out = self._convert(module, parts)
            mx.eval(out.wq, out.scales, out.biases)
            yield f"{module}.weight", out
        for name in list(lazy):
            arr = lazy.pop(name)
            mx.eval(arr)
            yield name, arr

    def _convert(self, module: str, parts: dict) -> QuantizedWeight:
        if parts["scales"] is None or (parts["qzeros"] is None and not self.symmetric):
            raise WeightsError(f"{self.path}: {module} has a qweight but lacks its scales or qzeros")
        bits = self.bits
        scales = _np(parts["scales"], mx.float32)  # [K/g, N]
        qweight = _np(parts["qweight"])
        if self.method == "awq":
            k, n = qweight.shape[0], qweight.shape[1] * 8
            wq = pack_codes(np.ascontiguousarray(_awq_unpack(qweight).T), 4)
        else:
            k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
            wq = np.ascontiguousarray(qweight.view(np.uint32).T)
        group = k if self.group == -1 else self.group
        if scales.shape != (k // group, n) or k % group:
            raise WeightsError(
                f"{self.path}: {module}.scales is {scales.shape}, expected ({k // group}, {n}) for K={k}, group {group}"
            )
        if parts["g_idx"] is not None:
            g_idx = _np(parts["g_idx"]).astype(np.int64)
            if not np.array_equal(g_idx, np.arange(k) // group):
                raise UnsupportedQuantizationError(
                    f"{self.path}: {module}.g_idx is act-order (GPTQ desc_act: groups are not contiguous inputs), "
                    f"which MLX's affine layout cannot hold; use a checkpoint quantized with desc_act=false, or the "
                    f"full-precision model with VLLM_METAL_QUANTIZE"
                )
        if self.symmetric:
            zeros = np.float32(1 << (bits - 1))
        else:
            packed = _np(parts["qzeros"])
            codes = _awq_unpack(packed) if self.method == "awq" else _unpack(packed, bits)
            zeros = codes.astype(np.float32) + np.float32(self.zero_offset)
        s = np.ascontiguousarray(scales.T)  # [N, K/g]
        b = np.ascontiguousarray(-(scales * zeros).T)
        g = mlx_group(group)
        if not g:
            raise UnsupportedQuantizationError(
                f"{self.path}: {module} uses group size {group}; MLX needs a multiple of 32"
            )
        if g != group:
            s, b = np.repeat(s, group // g, axis=1), np.repeat(b, group // g, axis=1)
        return QuantizedWeight(mx.array(wq), mx.array(s), mx.array(b), bits, g)
