"""Quantized checkpoints through vLLM: GGUF files, MLX-format, AWQ and GPTQ directories.

vLLM builds its torch model from a config; the weights of these formats go straight into MLX instead
(weights.load: converted to MLX's affine format, one tensor at a time). So for a quantized checkpoint the
platform has vLLM build the model in full precision with dummy weights and no quantization method of its own
(`serve_quantized`), and the model runner loads the checkpoint into MLX and hands it to the lowering.

AWQ and GPTQ checkpoints name a quantization method vLLM would build its own layers for (and refuse in
float32, or for asymmetric GPTQ on the CPU): `MLXAffineConfig`, a quantization config of this platform
registered under vLLM's own extension point, claims them and builds plain full-precision layers instead.

A GGUF file has no config.json, which vLLM (0.32) reads before any plugin is asked: the platform's
pre-registration hook points vLLM's model argument at the file's model directory (weights.model_dir), which
vLLM reads like any other, so `LLM(model="x.gguf", tokenizer=dir)` works as vLLM documents it.
"""

from __future__ import annotations

import os

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod, VocabParallelEmbedding

from lowering.quantize import for_model
from weights import load
from weights.gguf import is_gguf
from weights.awq_gptq import METHODS
from weights.model_dir import gguf_model_dir, quantized_source

log = init_logger("vllm.plugins.metal")

MLX_AFFINE = "mlx_affine"


class MLXAffineConfig(QuantizationConfig):
    """A checkpoint whose weights this platform loads into MLX's affine format itself: vLLM builds plain
    full-precision layers for it (the platform gives them dummy weights; weights.load reads the real ones)."""

    def get_name(self):
        return MLX_AFFINE

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return -1

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict) -> "MLXAffineConfig":
        return cls()

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        method = str(hf_quant_cfg.get("quant_method", "")).lower()
        return MLX_AFFINE if method in METHODS and user_quant in (None, MLX_AFFINE) else None

    def get_quant_method(self, layer, prefix):
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        if isinstance(layer, VocabParallelEmbedding):
            return UnquantizedEmbeddingMethod()
        return None


def register_quantization() -> None:
    """Register MLXAffineConfig with vLLM (once): from then on it claims AWQ and GPTQ checkpoints."""
    if MLX_AFFINE not in QUANTIZATION_METHODS:
        register_quantization_config(MLX_AFFINE)(MLXAffineConfig)


def serve_quantized(vllm_config) -> str | None:
    """If the model is a quantized checkpoint of ours, have vLLM build it in full precision with dummy weights
    and no quantization method (the runner loads the real weights into MLX). Returns the format, or None."""
    found = quantized_source(vllm_config.model_config.model)
    if found is None:
        return None
    vllm_config.model_config.quantization = None
    vllm_config.quant_config = None
    vllm_config.load_config.load_format = "dummy"
    return found[0]


def checkpoint_sources(model, model_dir: str) -> tuple[dict | None, str | None]:
    """The weights of a quantized checkpoint model directory, loaded into MLX by the torch model's parameter
    paths (lowering.quantize.for_model), and the checkpoint's format; (None, None) for any other model."""
    found = quantized_source(model_dir)
    if found is None:
        return None, None
    loaded = load(found[1])
    quantized, plain, missing = for_model(model, loaded.tensors)
    if missing:
        raise RuntimeError(f"vllm-metal: {found[1]} ({found[0]}) lacks {len(missing)} of the model's weights: "
                           + ", ".join(missing))
    log.info("vllm-metal: %s weights from %s: %d quantized, %d in full precision (%s)", found[0], found[1],
             len(quantized), len(plain), "; ".join(loaded.conversions) or "no conversion")
    return {**quantized, **plain}, found[0]


def redirect_gguf(model: str, tokenizer: str | None) -> tuple[str, str | None]:
    """(model, tokenizer) with a .gguf model file replaced by its gguf_model_dir (which holds the tokenizer)."""
    if not (isinstance(model, str) and model.endswith(".gguf") and os.path.isfile(model) and is_gguf(model)):
        return model, tokenizer
    directory = str(gguf_model_dir(model, tokenizer))
    return directory, directory
