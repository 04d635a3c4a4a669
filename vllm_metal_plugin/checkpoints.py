"""Quantized checkpoints through vLLM: GGUF files, MLX-format, AWQ and GPTQ directories.

vLLM builds its torch model from a config; the weights of these formats go straight into MLX instead
(weights.load: converted to MLX's affine format, one tensor at a time). So for a quantized checkpoint the
platform has vLLM build the model in full precision with dummy weights and no quantization method of its own
(`serve_quantized`), and the model runner loads the checkpoint into MLX and hands it to the lowering.

A GGUF file has no config.json, which vLLM (0.32) reads before any plugin is asked: the platform's
pre-registration hook points vLLM's model argument at the file's model directory (weights.model_dir), which
vLLM reads like any other, so `LLM(model="x.gguf", tokenizer=dir)` works as vLLM documents it.
"""

from __future__ import annotations

import os

from weights import load
from weights.gguf import is_gguf
from weights.model_dir import gguf_model_dir, quantized_source

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


def load_sources(model_dir: str):
    """The weights of a quantized checkpoint model directory, loaded into MLX (weights.LoadedWeights)."""
    found = quantized_source(model_dir)
    if found is None:
        raise ValueError(f"{model_dir} is not a quantized checkpoint (GGUF, MLX-format, AWQ or GPTQ)")
    return load(found[1])


def redirect_gguf(model: str, tokenizer: str | None) -> tuple[str, str | None]:
    """(model, tokenizer) with a .gguf model file replaced by its gguf_model_dir (which holds the tokenizer)."""
    if not (isinstance(model, str) and model.endswith(".gguf") and os.path.isfile(model) and is_gguf(model)):
        return model, tokenizer
    directory = str(gguf_model_dir(model, tokenizer))
    return directory, directory
