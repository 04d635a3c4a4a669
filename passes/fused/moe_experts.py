"""The experts of a mixture-of-experts MLP -> one `mlx.moe_experts` node, run as `k.moe_experts`.

No pass makes it: vLLM runs its experts through an opaque op that finds the expert weights by layer name,
so the capture (lowering/capture.py) puts this op in its place, on the layer's Parameters (named graph
inputs). The Hugging Face front's grouped experts lower op by op instead.
"""

from __future__ import annotations

import torch

from passes.fused import FusedOp, declare

_GATED = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


SWIGLUOAI_ALPHA, SWIGLUOAI_LIMIT = 1.702, 7.0  # vLLM's SwigluOAIAndMul (GPT-OSS); the kernels hold their own copy


def gated(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The gated activation of the first projection's output h [..., 2I] -> [..., I]: `act(gate) * up` with gate
    rows then up rows, or "swigluoai" (gate and up interleaved, clamped: `gate * sigmoid(alpha gate) * (up + 1)`)."""
    if activation == "swigluoai":
        gate = h[..., ::2].clamp(max=SWIGLUOAI_LIMIT)
        up = h[..., 1::2].clamp(-SWIGLUOAI_LIMIT, SWIGLUOAI_LIMIT)
        return gate * torch.sigmoid(SWIGLUOAI_ALPHA * gate) * (up + 1)
    gate, up = h.chunk(2, dim=-1)
    return _GATED[activation](gate) * up


@torch.library.custom_op("mlx::moe_experts", mutates_args=())
def moe_experts(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
    activation: str, w13_bias: torch.Tensor | None = None, w2_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The experts of a mixture-of-experts MLP: token t goes through experts `topk_ids[t]` (gated:
    `gated(x @ w13.T + b13) @ w2.T + b2`), weighted by `topk_weights[t]`, summed in float32.

    x [T, H]; topk_weights [T, k]; topk_ids [T, k]; w13 [E, 2I, H] (gate rows, then up rows; interleaved for
    "swigluoai"); w2 [E, H, I]; activation: "silu", "gelu", "gelu_tanh" or "swigluoai"; w13_bias [E, 2I] and
    w2_bias [E, H], optional. This reference loops over experts; the MLX lowering is one gather-matmul over all
    (token, expert) pairs.
    """
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32)
    for expert in range(w13.shape[0]):
        token, slot = torch.where(topk_ids == expert)
        if token.numel() == 0:
            continue
        h = x[token] @ w13[expert].T
        if w13_bias is not None:
            h = h + w13_bias[expert]
        y = gated(h, activation) @ w2[expert].T
        if w2_bias is not None:
            y = y + w2_bias[expert]
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


@moe_experts.register_fake
def _(x, topk_weights, topk_ids, w13, w2, activation, w13_bias=None, w2_bias=None):
    return x.new_empty((x.shape[0], w2.shape[1]))


OP = declare(FusedOp("moe_experts", torch.ops.mlx.moe_experts.default))
