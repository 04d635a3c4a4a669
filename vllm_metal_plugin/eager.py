"""vLLM's own torch model run eagerly under this platform: the reference the lowered step is compared with.

Attention is the platform backend's torch paged attention (vllm_metal_plugin.attention_backend, the
VLLM_METAL_USE_MLX=0 path) over a real paged cache, so this is exactly what the plugin runs without MLX.
Mixture-of-experts layers run vLLM's routing and vLLM's own CPU experts kernel (`cpu_fused_moe`, what vLLM's
CPU platform runs): vLLM leaves an out-of-tree platform's unquantized experts without a kernel.
"""

from __future__ import annotations

import torch
from vllm.config import set_current_vllm_config
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.mla_attention import MLAAttention
from vllm.v1.attention.backend import CommonAttentionMetadata

from lowering.capture import moe_entries
from vllm_metal_plugin.attention_backend import MetalAttentionMetadata

_CPU_MOE_ISA = "vec"  # the portable one of vLLM's CPU experts kernels
_CPU_MOE_ALIGNMENT = 32  # its intermediate size is padded to a multiple of this (CPUUnquantizedExperts)


def eager_logits(model, vllm_config, tokens: list[int], prompt_len: int, block_size: int = 16):
    """vLLM's torch model run eagerly, one request: a `prompt_len`-token prefill, then one decode
    step per remaining token. Attention is the platform backend's torch paged attention
    (vllm_metal_plugin.attention_backend, the VLLM_METAL_USE_MLX=0 path) over a real paged cache; multi-head
    latent attention is vLLM's reference CPU MLA backend over its latent cache, with the metadata its own builder
    makes. Returns float32 logits [1 + decode steps, vocab] (the last prompt token, then each decode)."""
    context = vllm_config.compilation_config.static_forward_context
    layers = {name: layer for name, layer in context.items() if isinstance(layer, Attention)}
    latent = {name: layer for name, layer in context.items() if isinstance(layer, MLAAttention)}
    blocks = -(-len(tokens) // block_size)
    dtype = vllm_config.model_config.dtype
    saved = {name: layer.kv_cache for name, layer in {**layers, **latent}.items()}
    for layer in layers.values():
        layer.kv_cache = torch.zeros(2, blocks, block_size, layer.num_kv_heads, layer.head_size, dtype=dtype)
    for layer in latent.values():
        layer.kv_cache = torch.zeros(blocks, block_size, layer.head_size, dtype=dtype)
    builder = None
    if latent:
        first = next(iter(latent.values()))
        builder = first.attn_backend.get_builder_cls()(first.get_kv_cache_spec(vllm_config), list(latent),
                                                       vllm_config, torch.device("cpu"))
    block_table = torch.arange(blocks, dtype=torch.int32)[None]
    rows = []
    try:
        with torch.no_grad(), set_current_vllm_config(vllm_config), moe_entries(model, _cpu_experts):
            start = 0
            for end in [prompt_len] + list(range(prompt_len + 1, len(tokens) + 1)):
                n = end - start
                ids = torch.tensor(tokens[start:end], dtype=torch.int64)
                positions = torch.arange(start, end, dtype=torch.int64)
                query_start_loc = torch.tensor([0, n], dtype=torch.int32)
                seq_lens = torch.tensor([end], dtype=torch.int32)
                md = MetalAttentionMetadata(
                    num_actual_tokens=n, num_reqs=1, query_start_loc=query_start_loc, seq_lens=seq_lens,
                    block_table=block_table, slot_mapping=positions.clone())
                metadata = {name: md for name in layers}
                if builder is not None:
                    common = CommonAttentionMetadata(
                        query_start_loc=query_start_loc, query_start_loc_cpu=query_start_loc, seq_lens=seq_lens,
                        seq_lens_cpu_upper_bound=seq_lens, positions=positions,
                        num_reqs=1, num_actual_tokens=n, max_query_len=n, max_seq_len=end,
                        block_table_tensor=block_table, slot_mapping=positions.clone())
                    mla = builder.build(common_prefix_len=0, common_attn_metadata=common)
                    metadata.update({name: mla for name in latent})
                slots = {name: positions.clone() for name in latent}
                with set_forward_context(metadata, vllm_config, num_tokens=n, slot_mapping=slots):
                    hidden = model(ids, positions)
                    rows.append(model.compute_logits(hidden[-1:])[0].float())
                start = end
    finally:
        for name, layer in {**layers, **latent}.items():
            layer.kv_cache = saved[name]
    return torch.stack(rows).numpy()


def eager_greedy(model, vllm_config, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens of vLLM's torch model run eagerly, each prompt alone: every step a prefill of the whole
    sequence so far (`eager_logits`), its argmax appended. The judge where two engines differ."""
    out = []
    for prompt in prompts:
        tokens = list(prompt)
        for _ in range(steps):
            tokens.append(int(eager_logits(model, vllm_config, tokens, len(tokens))[-1].argmax()))
        out.append(tokens[len(prompt):])
    return out


def _cpu_experts(runner, hidden, topk_weights, topk_ids):
    """The routed experts of an MoE layer by vLLM's CPU kernel, on its prepacked copy of the layer's weights
    (made once per layer, as CPUUnquantizedExperts.process_weights_after_loading does)."""
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    experts = runner.routed_experts
    packed = getattr(experts, "_eager_cpu_weights", None)
    if packed is None:
        w13, w2 = experts.w13_weight.data, experts.w2_weight.data
        b13, b2 = getattr(experts, "w13_bias", None), getattr(experts, "w2_bias", None)
        inter = w2.shape[-1]
        padded = -(-inter // _CPU_MOE_ALIGNMENT) * _CPU_MOE_ALIGNMENT
        if runner.activation.value != "swigluoai" and padded != inter:
            w13 = torch.cat([_pad(w13[:, :inter], 1, padded), _pad(w13[:, inter:], 1, padded)], dim=1)
            w2 = _pad(w2, 2, padded)
            if b13 is not None:
                b13 = torch.cat([_pad(b13[:, :inter], 1, padded), _pad(b13[:, inter:], 1, padded)], dim=1)
        packed = (cpu_prepack_moe_weight(w13.contiguous(), _CPU_MOE_ISA),
                  cpu_prepack_moe_weight(w2.contiguous(), _CPU_MOE_ISA),
                  None if b13 is None else b13.data.contiguous(), None if b2 is None else b2.data.contiguous())
        experts._eager_cpu_weights = packed
    on_input = bool(getattr(experts, "apply_router_weight_on_input", False))
    if on_input:  # top-1 routing weighted before the experts (Llama 4)
        hidden = hidden * topk_weights.to(hidden.dtype)
    out = torch.empty_like(hidden)
    cpu_fused_moe(out, hidden.contiguous(), packed[0], packed[1], packed[2], packed[3], topk_weights.float(),
                  topk_ids.to(torch.int32), runner.activation.value, _CPU_MOE_ISA, on_input)
    return out


def _pad(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    shape = list(x.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)
