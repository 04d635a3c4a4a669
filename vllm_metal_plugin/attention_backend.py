"""The attention backend vLLM sees: it only packages vLLM's batch metadata for our runner.

With MLX (the default) the attention math runs inside the lowered step (runtime/kernels/paged.py);
the metadata built here is what the runner turns into a runtime StepInput. With
VLLM_METAL_USE_MLX=0 the torch model runs eagerly and `MetalAttentionImpl.forward` does paged
attention in torch over the same cache layout: the baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)


@dataclass
class MetalAttentionMetadata:
    num_actual_tokens: int
    num_reqs: int
    query_start_loc: torch.Tensor  # int32 [num_reqs + 1], CPU
    seq_lens: torch.Tensor  # int32 [num_reqs]: context length after this step
    block_table: torch.Tensor  # int32 [num_reqs, max_blocks]
    slot_mapping: torch.Tensor  # int64 [num_actual_tokens]


class MetalAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True  # one op per layer writes the cache and attends
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", "float32"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM looks this up in AttentionBackendEnum

    @staticmethod
    def get_impl_cls():
        return MetalAttentionImpl

    @staticmethod
    def get_builder_cls():
        return MetalAttentionMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(8)]

    @classmethod
    def get_supported_head_sizes(cls):
        return []  # any

    @classmethod
    def supports_attn_type(cls, attn_type) -> bool:
        return attn_type == AttentionType.DECODER


class MetalAttentionMetadataBuilder(AttentionMetadataBuilder[MetalAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> MetalAttentionMetadata:
        cm = common_attn_metadata
        seq_lens = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens.cpu()
        return MetalAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            num_reqs=cm.num_reqs,
            query_start_loc=cm.query_start_loc_cpu[: cm.num_reqs + 1],
            seq_lens=seq_lens[: cm.num_reqs],
            block_table=cm.block_table_tensor[: cm.num_reqs],
            slot_mapping=cm.slot_mapping[: cm.num_actual_tokens],
        )


class MetalAttentionImpl(AttentionImpl):
    """Torch paged attention for the VLLM_METAL_USE_MLX=0 baseline (kv_cache: [2, blocks, block, kv_heads, dim])."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, **kwargs):
        if alibi_slopes is not None:
            raise NotImplementedError("vllm-metal: ALiBi attention is not supported yet")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.sliding_window = sliding_window
        self.logits_soft_cap = logits_soft_cap
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.sinks = kwargs.get("sinks")  # [heads]: one more logit in each softmax, attending to nothing

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if attn_metadata is None or kv_cache.numel() == 0:  # profiling / dummy run
            return output.zero_()
        md = attn_metadata
        n = md.num_actual_tokens
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        block = k_cache.shape[1]
        slots = md.slot_mapping.long()
        k_cache.view(-1, self.num_kv_heads, self.head_size)[slots] = key[:n].to(k_cache.dtype)
        v_cache.view(-1, self.num_kv_heads, self.head_size)[slots] = value[:n].to(v_cache.dtype)
        starts = md.query_start_loc.tolist()
        for i in range(md.num_reqs):
            s, e = starts[i], starts[i + 1]
            length = int(md.seq_lens[i])
            blocks = md.block_table[i, : -(-length // block)].long()
            k = k_cache[blocks].reshape(-1, self.num_kv_heads, self.head_size)[:length].transpose(0, 1)
            v = v_cache[blocks].reshape(-1, self.num_kv_heads, self.head_size)[:length].transpose(0, 1)
            q = query[s:e].transpose(0, 1)
            qpos = torch.arange(length - (e - s), length)[:, None]
            kpos = torch.arange(length)[None, :]
            mask = kpos <= qpos
            if self.sliding_window:
                mask &= kpos > qpos - self.sliding_window
            if self.logits_soft_cap or self.sinks is not None:  # SDPA has neither a cap nor sinks
                rep = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(rep, 0).to(q.dtype), v.repeat_interleave(rep, 0).to(q.dtype)
                scores = (q @ k.transpose(1, 2)).float() * self.scale
                if self.logits_soft_cap:  # Gemma 2: cap * tanh(scores / cap) before the mask
                    scores = torch.tanh(scores / self.logits_soft_cap) * self.logits_soft_cap
                scores = scores.masked_fill(~mask, float("-inf"))
                if self.sinks is not None:  # the sink's column takes part in the softmax, then goes
                    sink = self.sinks.float().reshape(-1, 1, 1).expand(-1, scores.shape[1], 1)
                    out = torch.cat([scores, sink], -1).softmax(-1)[..., :-1].to(q.dtype) @ v
                else:
                    out = scores.softmax(-1).to(q.dtype) @ v
            else:
                out = torch.nn.functional.scaled_dot_product_attention(
                    q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=self.scale, enable_gqa=True
                )
            output[s:e] = out.transpose(0, 1).to(output.dtype)
        return output
