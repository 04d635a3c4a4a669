"""The fused ops that passes create: straight onto MLX's fast kernels and the runtime's paged attention."""

import torch

import passes.ops  # noqa: F401  (defines torch.ops.mlx.*)
from lowering.ops.registry import register


@register(torch.ops.mlx.rms_norm.default)
def rms_norm(e, node, x, weight, eps, out_dtype):
    x_dtype, w_dtype = node.args[0].meta["val"].dtype, node.args[1].meta["val"].dtype
    w = e.r(weight) if w_dtype == x_dtype else f"{e.r(weight)}.astype({e.dtype(x_dtype)})"
    out = f"mx.fast.rms_norm({e.r(x)}, {w}, {eps!r})"
    return out if out_dtype == x_dtype else f"{out}.astype({e.dtype(out_dtype)})"


def _heads(node, head_dim: int) -> int:
    size = 1
    for d in node.meta["val"].shape[1:]:
        size *= int(d)
    return size // head_dim


@register(torch.ops.mlx.rope.default)
def rope(e, node, x, positions, inv_freq, head_dim, traditional, mscale):
    # One token per "sequence" so that each gets its own position offset.
    rot = 2 * node.args[2].meta["val"].shape[0]
    out = (
        f"mx.fast.rope({e.r(x)}.reshape(-1, {_heads(node, head_dim)}, 1, {head_dim}), "
        f"{rot}, traditional={traditional}, base=None, scale=1.0, offset={e.r(positions)}, "
        f"freqs=mx.reciprocal({e.r(inv_freq)})).reshape({e.shape(node)})"
    )
    return out if mscale == 1.0 else f"{out} * {mscale!r}"


@register(torch.ops.mlx.paged_attention.default)
def paged_attention(e, node, q, k, v, layer, num_heads, num_kv_heads, head_dim, scale, window, cap):
    out = e.name(node)
    e.line(
        f"{out}, kv[{layer}] = paged_attention({e.r(q)}, {e.r(k)}, {e.r(v)}, kv[{layer}], batch, "
        f"num_heads={num_heads}, num_kv_heads={num_kv_heads}, head_dim={head_dim}, scale={scale!r}, "
        f"window={window}, cap={cap!r})"
    )
    return None  # the statement above defines the value
