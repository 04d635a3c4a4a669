"""The model shapes and workloads of the GPU suite.

Shapes: SmolLM2-135M's config (configs/smollm2-135m.json), a Llama-3-8B shape (configs/llama3-8b-shape.json)
and two tiny Llamas for tests, as transformers `LlamaForCausalLM` models. Workloads (the commands' defaults:
batches 1, 8, 32, 128; prefills of 512 and 4096 tokens): a prefill is one forward of a batch-1 prompt; a
decode at batch B starts from B prompts of PROMPT random tokens prefilled together, then runs WARMUP steps
and timed segments of SEGMENT steps. With these numbers every context stays within 256 keys: one compiled
shape per batch size.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from common import ROOT

CONFIGS = {"smollm2": ROOT / "benchmarks/configs/smollm2-135m.json",
           "llama8b": ROOT / "benchmarks/configs/llama3-8b-shape.json"}
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": 512, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048, "tie_word_embeddings": True,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}}
TINY_LLAMA3 = dict(TINY, tie_word_embeddings=False, rope_parameters={
    "rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 1024})
PROMPT = 96
SEGMENT, REPEATS, WARMUP = 24, 3, 4
BLOCK = 16


def load_config(name: str) -> dict:
    if name in ("tiny", "tiny_llama3"):
        return dict(TINY if name == "tiny" else TINY_LLAMA3)
    if name not in CONFIGS:
        raise SystemExit(f"unknown model {name!r}; known: {', '.join([*CONFIGS, 'tiny', 'tiny_llama3'])}")
    return json.loads(CONFIGS[name].read_text())


def prompts_for(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length)).tolist()


def torch_model(cfg: dict, dtype, device: str, init: str, seed: int = 0):
    """LlamaForCausalLM from a config dict. init="seed": transformers' own initialisation under
    torch.manual_seed(seed), built on the CPU (correctness: the same weights go to MLX). init="random":
    built on the meta device, materialised on `device`, N(0, 0.02) matrices and unit norms drawn there
    (speed: no pass of the 8B shape's 16 GB through the host). init="empty": materialised, not initialised
    (capture only needs shapes). The rotary embedding is rebuilt for real in every case."""
    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    if init == "seed":
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype).to(device)
    else:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model = model.to(dtype).to_empty(device=device)  # cast on meta: no f32 copy of the 8B shape
    model.tie_weights()  # materialising unties SmolLM2's lm_head from its embedding: tie again
    rotary = model.model.rotary_emb  # its inv_freq stays float32, as from_pretrained keeps it
    model.model.rotary_emb = type(rotary)(config=model.config).to(device)
    if init == "random":
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():  # tied weights appear once
                if p.dim() == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=gen)
    return model.eval()
