"""The fused ops that passes create: straight onto MLX's fast kernels and the runtime's paged attention."""

import operator

import torch

import passes.ops  # noqa: F401  (defines torch.ops.mlx.*)
from lowering.ops.registry import register


@register(torch.ops.mlx.rms_norm.default)
def rms_norm(e, node, x, weight, eps, out_dtype):
    x_dtype, w_dtype = node.args[0].meta["val"].dtype, node.args[1].meta["val"].dtype
    w = e.r(weight) if w_dtype == x_dtype else f"{e.r(weight)}.astype({e.dtype(x_dtype)})"
    out = f"mx.fast.rms_norm({e.r(x)}, {w}, {eps!r})"
    return out if out_dtype == x_dtype else f"{out}.astype({e.dtype(out_dtype)})"


@register(torch.ops.mlx.add_rms_norm.default)
def add_rms_norm(e, node, x, residual, weight, eps):
    """`h, normed = add_rms_norm(...)`, named as the add and the norm were (`<layer>_add`, `<norm>_rms_norm`)."""
    parts = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    h, normed = (e.bind(parts[i], op) if i in parts else "_" for i, op in ((0, "add"), (1, "rms_norm")))
    e.line(f"{h}, {normed} = add_rms_norm({e.r(x)}, {e.r(residual)}, {e.r(weight)}, {eps!r})  # fused: add_rms_norm")
    return None  # the statement above defines both values


def _heads(node, head_dim: int) -> int:
    size = 1
    for d in node.meta["val"].shape[1:]:
        size *= int(d)
    return size // head_dim


@register(torch.ops.mlx.rope.default)
def rope(e, node, x, positions, inv_freq, head_dim, traditional, mscale):
    """The runtime's `rotate` (runtime/attention.py), which paged attention uses for the ropes it folds in."""
    return (f"rotate({e.r(x)}, {_heads(node, head_dim)}, {head_dim}, {e.r(positions)}, {e.r(inv_freq)}, "
            f"traditional={traditional}, mscale={mscale!r}).reshape({e.shape(node)})")


def _attention(e, node, q, k, v, layer, num_heads, num_kv_heads, head_dim, scale, window, cap, rope=""):
    e.line(
        f"{e.name(node)}, kv[{layer}] = paged_attention({e.r(q)}, {e.r(k)}, {e.r(v)}, kv[{layer}], batch, "
        f"num_heads={num_heads}, num_kv_heads={num_kv_heads}, head_dim={head_dim}, scale={scale!r}, "
        f"window={window}, cap={cap!r}{rope})" + ("  # fused: rope_attention" if rope else "")
    )
    return None  # the statement above defines the value


@register(torch.ops.mlx.paged_attention.default)
def paged_attention(e, node, q, k, v, *attention):
    return _attention(e, node, q, k, v, *attention)


@register(torch.ops.mlx.rope_paged_attention.default)
def rope_paged_attention(e, node, q, k, v, positions, inv_freq, traditional, mscale, *attention):
    """paged_attention with `rope=`: q and k come un-rotated; the runtime rotates them (on CUDA where it
    lays out the K/V rows)."""
    rope = f", rope=({e.r(positions)}, {e.r(inv_freq)}, {traditional}, {mscale!r})"
    return _attention(e, node, q, k, v, *attention, rope=rope)


_ACTIVATIONS = {
    "silu": "fm.silu({g})",
    "gelu": "0.5 * {g} * (1 + mx.erf({g} * 0.7071067811865476))",
    "gelu_tanh": "0.5 * {g} * (1 + mx.tanh(0.7978845608028654 * ({g} + 0.044715 * {g} * {g} * {g})))",
}


@register(torch.ops.mlx.moe_experts.default)
def moe_experts(e, node, x, topk_weights, topk_ids, w13, w2, activation):
    """All (token, expert) pairs at once, grouped by expert (one sort), through two `gather_mm`s
    over the stacked expert weights, back to token order, weighted and summed: mlx-lm's SwitchGLU."""
    k = node.args[2].meta["val"].shape[1]
    inter = node.args[4].meta["val"].shape[2]
    ids, order, pairs, h, gate, y = (e.temp(node, s) for s in ("ids", "order", "experts", "h", "gate", "y"))
    e.line(f"{ids} = {e.r(topk_ids)}.flatten()")
    e.line(f"{order} = mx.argsort({ids})  # pairs grouped by expert: sorted gathers")
    e.line(f"{pairs} = {ids}[{order}]")
    e.line(f"{h} = gather_mm(mx.take({e.r(x)}, {order} // {k}, axis=0)[:, None, :], "
           f"mx.swapaxes({e.r(w13)}, -1, -2), {pairs}, sorted_indices=True)")
    e.line(f"{gate} = {h}[..., :{inter}]")
    act = _ACTIVATIONS[activation].format(g=gate)
    e.line(f"{y} = gather_mm(({act}) * {h}[..., {inter}:], mx.swapaxes({e.r(w2)}, -1, -2), {pairs}, "
           f"sorted_indices=True)[:, 0, :]")
    unsorted = f"mx.take({y}, mx.argsort({order}), axis=0).reshape(-1, {k}, {y}.shape[-1])"
    return (f"mx.sum({unsorted} * {e.r(topk_weights)}[..., None].astype(mx.float32), axis=1)"
            f".astype({e.dtype(node.meta['val'].dtype)})")
