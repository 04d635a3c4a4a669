"""Weight sources converted at load into MLX: GGUF, MLX-format, AWQ/GPTQ and on-the-fly quantization.

Every quantized linear or embedding weight arrives as one `QuantizedWeight` (MLX's affine triple);
everything else as a plain `mx.array`, by Hugging Face module path. See docs/weights.md.
"""

import runtime  # noqa: F401  (loads the optimized BLAS before mlx is imported)

from weights.errors import (
    DamagedFileError,
    QuantizeSpecError,
    UnsupportedQuantizationError,
    WeightsError,
)
from weights.load import LoadedWeights, iter_weights, load, open_source
from weights.quantize import QuantizeSpec, parse_quantize_spec, spec_from_env
from weights.quantized import QuantizedWeight
from weights.report import WeightBytes, weight_bytes

__all__ = [
    "DamagedFileError",
    "LoadedWeights",
    "QuantizeSpec",
    "QuantizeSpecError",
    "QuantizedWeight",
    "UnsupportedQuantizationError",
    "WeightBytes",
    "WeightsError",
    "iter_weights",
    "load",
    "open_source",
    "parse_quantize_spec",
    "spec_from_env",
    "weight_bytes",
]
