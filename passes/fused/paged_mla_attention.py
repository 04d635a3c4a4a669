"""Multi-head latent attention (DeepSeek-V2/V3's MLA) over a paged latent cache -> one `mlx.paged_mla_attention`
node per layer, run as `out, kv[i] = k.paged_mla_attention(q, kv_c, k_pe, kv_b_weight, kv[i], batch, ...)`.

No pass makes it: vLLM's MLA layer reaches its backend through opaque ops that find the layer (and its `kv_b_proj`
weight) by name, so the vLLM capture (lowering/capture.py) puts this op in its place, on the layer's `kv_b_proj`
Parameter (a named graph input).

The cache is what vLLM's MLA KV spec asks for: one row per token, the compressed latent `kv_c` (kv_lora_rank
values) then the rotated shared key `k_pe` (qk_rope_head_dim), no per-head keys or values. Attention reads it
absorbed: each head's query `q_nope` goes through its slice of the key up-projection into the latent space, the
scores are over [latent, rope] rows (one shared KV head), and the attended latents come back through the value
up-projection. `kv_b_weight` is [heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank], each head's key rows then
its value rows, as vLLM's `kv_b_proj` holds them.
"""

from __future__ import annotations

import math

import torch

from passes.fused import FusedOp, declare


@torch.library.custom_op("mlx::paged_mla_attention", mutates_args=())
def paged_mla_attention(
    q: torch.Tensor,
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    kv_b_weight: torch.Tensor,
    layer: str,
    num_heads: int,
    qk_nope_head_dim: int,
    qk_rope_head_dim: int,
    v_head_dim: int,
    kv_lora_rank: int,
    scale: float,
) -> torch.Tensor:
    """Write [kv_c, k_pe] of this step into the latent cache of the layer named `layer` (vLLM's layer name, which
    stamped copies of a layer rename), attend, return [T, heads * v_head_dim].

    q [T, heads * (nope + rope)] (its rope part rotated), kv_c [T, kv_lora_rank] (normed), k_pe [T, rope]
    (rotated). This torch reference treats the T tokens as ONE new sequence (causal prefill) and computes the
    keys and values per head from the latent, as vLLM's MLA prefill does.
    """
    t, h, dtype = q.shape[0], num_heads, q.dtype
    q = q.reshape(t, h, qk_nope_head_dim + qk_rope_head_dim).float()
    kv = (kv_c.float() @ kv_b_weight.float().T).reshape(t, h, qk_nope_head_dim + v_head_dim)
    k_nope, v = kv[..., :qk_nope_head_dim], kv[..., qk_nope_head_dim:]
    k = torch.cat([k_nope, k_pe.reshape(t, 1, qk_rope_head_dim).float().expand(t, h, qk_rope_head_dim)], dim=-1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, -math.inf)
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out.reshape(t, h * v_head_dim).to(dtype)


@paged_mla_attention.register_fake
def _(q, kv_c, k_pe, kv_b_weight, layer, num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank,
      scale):
    return q.new_empty((q.shape[0], num_heads * v_head_dim))


OP = declare(FusedOp("paged_mla_attention", torch.ops.mlx.paged_mla_attention.default, cache=True))
