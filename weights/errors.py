"""Errors for weights we cannot use. Each message is one line naming the file or tensor and the fix."""

from __future__ import annotations


class WeightsError(ValueError):
    """A checkpoint, tensor or setting this package cannot convert."""


class UnsupportedQuantizationError(WeightsError):
    """A tensor or checkpoint is quantized in a way with no exact or re-quantized path to MLX."""


class DamagedFileError(WeightsError):
    """A weight file is truncated or not in the format its name or config claims."""


class QuantizeSpecError(WeightsError):
    """An on-the-fly quantization request (VLLM_METAL_QUANTIZE) we do not accept."""
