"""The fused ops that passes put into graphs: `torch.ops.mlx.rms_norm`, `.add_rms_norm`, `.rope`,
`.paged_attention`, `.rope_paged_attention`, `.moe_experts`.

Each is a real torch op with a reference implementation, so a rewritten graph still runs in torch
(pass tests compare it with the original), and a fake implementation for shape propagation. The
lowering turns them into `mx.fast.rms_norm`, `mx.fast.rope` and the runtime's paged attention.
"""

from __future__ import annotations

import math

import torch


@torch.library.custom_op("mlx::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """RMS-normalise the last dim in float32, scale by `weight`, return `out_dtype`."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed.to(out_dtype) * weight).to(out_dtype)


@rms_norm.register_fake
def _(x, weight, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.custom_op("mlx::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual) * weight): a residual add and the norm that reads it, all in x's dtype."""
    h = x + residual
    return h, rms_norm(h, weight, eps, h.dtype)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("mlx::rope", mutates_args=())
def rope(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, head_dim: int, traditional: bool, mscale: float
) -> torch.Tensor:
    """Rotary embedding of x [T, heads * head_dim] (or [T, heads, head_dim]) at per-token positions.

    Rotates the first `2 * len(inv_freq)` dims of each head; `traditional` pairs adjacent dims
    (GPT-J), otherwise the two halves (GPT-NeoX); `mscale` scales the rotated part (YaRN).
    """
    shape = x.shape
    xh = x.reshape(shape[0], -1, head_dim)
    rot = 2 * inv_freq.shape[0]
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    cos = (angles.cos() * mscale)[:, None, :].to(x.dtype)
    sin = (angles.sin() * mscale)[:, None, :].to(x.dtype)
    xr, xp = xh[..., :rot], xh[..., rot:]
    if traditional:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, xp), dim=-1).reshape(shape)


@rope.register_fake
def _(x, positions, inv_freq, head_dim, traditional, mscale):
    return torch.empty_like(x)


@torch.library.custom_op("mlx::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    sliding_window: int,
    logit_cap: float,
) -> torch.Tensor:
    """Write k/v of this step into layer `layer`'s paged cache, attend, return [T, heads * head_dim].

    The batch (which tokens belong to which sequence, their cache blocks) is implicit: the runtime
    supplies it. This torch reference treats all T tokens as ONE new sequence (causal prefill), which
    is what a standalone graph means, so rewritten graphs can be checked against the originals.
    `sliding_window` <= 0 means none; `logit_cap` <= 0 means no soft-capping.
    """
    t = q.shape[0]
    qh = q.reshape(t, num_heads, head_dim).transpose(0, 1).float()
    kh = k.reshape(t, num_kv_heads, head_dim).transpose(0, 1).float()
    vh = v.reshape(t, num_kv_heads, head_dim).transpose(0, 1).float()
    rep = num_heads // num_kv_heads
    kh, vh = kh.repeat_interleave(rep, 0), vh.repeat_interleave(rep, 0)
    scores = (qh @ kh.transpose(1, 2)) * scale
    if logit_cap > 0:
        scores = torch.tanh(scores / logit_cap) * logit_cap
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    visible = j <= i
    if sliding_window > 0:
        visible &= j > i - sliding_window
    scores = scores.masked_fill(~visible, -math.inf)
    out = scores.softmax(-1) @ vh
    return out.transpose(0, 1).reshape(t, num_heads * head_dim).to(q.dtype)


@paged_attention.register_fake
def _(q, k, v, layer, num_heads, num_kv_heads, head_dim, scale, sliding_window, logit_cap):
    return q.new_empty((q.shape[0], num_heads * head_dim))


@torch.library.custom_op("mlx::rope_paged_attention", mutates_args=())
def rope_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    traditional: bool,
    mscale: float,
    layer: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    sliding_window: int,
    logit_cap: float,
) -> torch.Tensor:
    """`paged_attention` of q and k rotated by `rope` first (passes/rope_attention.py): q [T, H*D] and
    k [T, KVH*D] come un-rotated, so a backend can rotate them where it writes the cache."""
    q = rope(q, positions, inv_freq, head_dim, traditional, mscale)
    k = rope(k, positions, inv_freq, head_dim, traditional, mscale)
    return paged_attention(q, k, v, layer, num_heads, num_kv_heads, head_dim, scale, sliding_window, logit_cap)


@rope_paged_attention.register_fake
def _(q, k, v, positions, inv_freq, traditional, mscale, layer, num_heads, num_kv_heads, head_dim, scale,
      sliding_window, logit_cap):
    return q.new_empty((q.shape[0], num_heads * head_dim))


_GATED = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


@torch.library.custom_op("mlx::moe_experts", mutates_args=())
def moe_experts(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
    activation: str,
) -> torch.Tensor:
    """The experts of a mixture-of-experts MLP: token t goes through experts `topk_ids[t]` (gated:
    `act(x @ gate.T) * (x @ up.T) @ down.T`), weighted by `topk_weights[t]`, summed in float32.

    x [T, H]; topk_weights [T, k]; topk_ids [T, k]; w13 [E, 2I, H] (gate rows, then up rows);
    w2 [E, H, I]; activation: "silu", "gelu" or "gelu_tanh". This reference loops over experts;
    the MLX lowering is one gather-matmul over all (token, expert) pairs.
    """
    act = _GATED[activation]
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32)
    for expert in range(w13.shape[0]):
        token, slot = torch.where(topk_ids == expert)
        if token.numel() == 0:
            continue
        gate, up = (x[token] @ w13[expert].T).chunk(2, dim=-1)
        y = (act(gate) * up) @ w2[expert].T
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


@moe_experts.register_fake
def _(x, topk_weights, topk_ids, w13, w2, activation):
    return x.new_empty((x.shape[0], w2.shape[1]))


FUSED_OPS = {
    "rms_norm": torch.ops.mlx.rms_norm.default,
    "rope": torch.ops.mlx.rope.default,
    "paged_attention": torch.ops.mlx.paged_attention.default,
    "rope_paged_attention": torch.ops.mlx.rope_paged_attention.default,
    "moe_experts": torch.ops.mlx.moe_experts.default,
}
