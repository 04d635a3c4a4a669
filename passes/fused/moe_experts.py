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


OP = declare(FusedOp("moe_experts", torch.ops.mlx.moe_experts.default))
