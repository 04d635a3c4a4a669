"""On-the-fly quantization: full-precision linear and embedding weights quantized at load with `mx.quantize`.

Asked for with `VLLM_METAL_QUANTIZE=q4|q8[:group]` (group 32, 64 or 128; default 64, as mlx-lm):
`q4` is 4-bit affine in groups of 64, `q8:32` 8-bit in groups of 32. Unset, empty or `none` keeps
full precision. What gets quantized: 2-D `.weight`s of linears and embeddings (a tied LM head reads
the quantized embedding), when their input size is a multiple of the group; norms, biases,
1-D and small tensors stay in full precision.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping

import mlx.core as mx
import numpy as np

from runtime.config import QUANTIZE_ACCEPTED as ACCEPTED
from runtime.config import QUANTIZE_ENV, ConfigError, QuantizeSpec
from runtime.config import parse_quantize_spec as parse_spec
from weights.errors import QuantizeSpecError
from weights.quantized import QuantizedWeight, pack_codes

MIN_ELEMENTS = 1 << 12  # matrices smaller than 64 x 64 save next to nothing and lose accuracy


def parse_quantize_spec(value: str | None, name: str = QUANTIZE_ENV) -> QuantizeSpec | None:
    """`q4`, `q8`, `q4:32`, ... -> QuantizeSpec; None, "" or "none" -> None; anything else -> QuantizeSpecError
    (runtime/config.py reads the variable; this is its parser, with this package's error type)."""
    try:
        return parse_spec(value, name)
    except ConfigError as e:
        raise QuantizeSpecError(str(e)) from None


def spec_from_env(env: Mapping[str, str] | None = None) -> QuantizeSpec | None:
    """The on-the-fly quantization the user asked for through VLLM_METAL_QUANTIZE (None: none)."""
    return parse_quantize_spec((os.environ if env is None else env).get(QUANTIZE_ENV))


def should_quantize(
    path: str, shape: tuple[int, ...], group_size: int, linear_paths: Collection[str] | None = None
) -> bool:
    """Whether a full-precision tensor is a linear/embedding weight worth quantizing.

    `linear_paths` (module paths of the model's linears and embeddings, when the caller knows them)
    replaces the name-based guess: 2-D, named `*.weight`, not a norm."""
    if not path.endswith(".weight") or len(shape) != 2 or shape[-1] % group_size:
        return False
    module = path[: -len(".weight")]
    if linear_paths is not None:
        return module in linear_paths
    return "norm" not in module.rsplit(".", 1)[-1] and shape[0] * shape[1] >= MIN_ELEMENTS


def quantize_weight(w: mx.array, spec: QuantizeSpec) -> QuantizedWeight:
    """`mx.quantize` one full-precision weight (evaluated, so its float copy can go right after)."""
    wq, scales, biases = mx.quantize(w, group_size=spec.group_size, bits=spec.bits)
    mx.eval(wq, scales, biases)
    return QuantizedWeight(wq, scales, biases, spec.bits, spec.group_size)


def quantize_minmax(w: mx.array, bits: int, group_size: int) -> QuantizedWeight:
    """Round-to-nearest affine quantization over each group's [min, max]: every value moves by at most
    half a step (the group's scale). Used to re-quantize already-quantized sources; scales and biases
    stay float32 so the bound holds."""
    *lead, k = w.shape
    g = w.astype(mx.float32).reshape(*lead, k // group_size, group_size)
    lo, hi = g.min(axis=-1, keepdims=True), g.max(axis=-1, keepdims=True)
    n = (1 << bits) - 1
    scale = (hi - lo) / n
    q = mx.clip(mx.round((g - lo) / mx.where(scale > 0, scale, 1)), 0, n).astype(mx.uint8)
    wq = pack_codes(np.array(q.reshape(*lead, k)), bits)
    return QuantizedWeight(mx.array(wq), scale.squeeze(-1), lo.squeeze(-1), bits, group_size)
