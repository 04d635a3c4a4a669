"""vLLM's own torch model run eagerly under this platform: the reference the lowered step is compared with.

Attention is the platform backend's torch paged attention (vllm_metal_plugin.attention_backend, the
VLLM_METAL_USE_MLX=0 path) over a real paged cache, so this is exactly what the plugin runs without MLX.
"""

from __future__ import annotations

import torch
from vllm.config import set_current_vllm_config
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention import Attention

from vllm_metal_plugin.attention_backend import MetalAttentionMetadata


def eager_logits(model, vllm_config, tokens: list[int], prompt_len: int, block_size: int = 16):
    """vLLM's torch model run eagerly, one request: a `prompt_len`-token prefill, then one decode
    step per remaining token. Attention is the platform backend's torch paged attention
    (vllm_metal_plugin.attention_backend, the VLLM_METAL_USE_MLX=0 path) over a real paged cache.
    Returns float32 logits [1 + decode steps, vocab] (the last prompt token, then each decode)."""
    layers = {name: layer for name, layer in vllm_config.compilation_config.static_forward_context.items()
              if isinstance(layer, Attention)}
    blocks = -(-len(tokens) // block_size)
    dtype = vllm_config.model_config.dtype
    saved = {name: layer.kv_cache for name, layer in layers.items()}
    for layer in layers.values():
        layer.kv_cache = torch.zeros(2, blocks, block_size, layer.num_kv_heads, layer.head_size, dtype=dtype)
    block_table = torch.arange(blocks, dtype=torch.int32)[None]
    rows = []
    try:
        with torch.no_grad(), set_current_vllm_config(vllm_config):
            start = 0
            for end in [prompt_len] + list(range(prompt_len + 1, len(tokens) + 1)):
                ids = torch.tensor(tokens[start:end], dtype=torch.int64)
                positions = torch.arange(start, end, dtype=torch.int64)
                md = MetalAttentionMetadata(
                    num_actual_tokens=end - start, num_reqs=1,
                    query_start_loc=torch.tensor([0, end - start], dtype=torch.int32),
                    seq_lens=torch.tensor([end], dtype=torch.int32), block_table=block_table,
                    slot_mapping=positions.clone())
                with set_forward_context({name: md for name in layers}, vllm_config, num_tokens=end - start):
                    hidden = model(ids, positions)
                    rows.append(model.compute_logits(hidden[-1:])[0].float())
                start = end
    finally:
        for name, layer in layers.items():
            layer.kv_cache = saved[name]
    return torch.stack(rows).numpy()
