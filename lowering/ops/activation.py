"""Fused activations that passes create (passes/silu_mul.py)."""

import torch

import passes.silu_mul  # noqa: F401  (defines torch.ops.mlx.silu_mul)
from lowering.ops.registry import register


@register(torch.ops.mlx.silu_mul.default)
def silu_mul(e, node, gate, up):
    return f"silu_mul({e.r(gate)}, {e.r(up)})"  # runtime/gated.py: fm.silu(gate) * up, or one CUDA kernel
