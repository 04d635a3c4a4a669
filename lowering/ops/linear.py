"""Matrix products."""

import torch

from lowering.ops.registry import register

aten = torch.ops.aten


@register(aten.linear.default)
def linear(e, node, x, weight, bias=None):
    return f"k.linear({e.r(x)}, {e.transposed(weight)}" + (f", {e.r(bias)})" if bias is not None else ")")


@register(aten.mm.default, aten.matmul.default, aten.bmm.default)
def matmul(e, node, a, b):
    return f"{e.r(a)} @ {e.r(b)}"


@register(aten.addmm.default)
def addmm(e, node, bias, a, b, beta=1, alpha=1):
    return f"mx.addmm({e.r(bias)}, {e.r(a)}, {e.r(b)}, alpha={alpha}, beta={beta})"


def _grouped(e, node, x, weight, offs):
    """Rows of x [S, in] are grouped by expert (sorted); rows offs[g-1]..offs[g] use weight[g]
    [E, in, out]. One `k.gather_mm` with a per-row expert index (no loop over experts or tokens);
    rows past offs[-1] are zeros, as in torch."""
    rows, group = e.temp(node, "rows"), e.temp(node, "expert")
    experts = node.args[1].meta["val"].shape[0]
    e.line(f"{rows} = mx.arange({e.r(x)}.shape[0])")
    e.line(f"{group} = mx.minimum(mx.sum({rows}[:, None] >= {e.r(offs)}[None, :], axis=1), {experts - 1})")
    out = f"k.gather_mm({e.r(x)}[:, None, :], {e.r(weight)}, {group}, sorted_indices=True)[:, 0, :]"
    return f"mx.where(({rows} < {e.r(offs)}[-1])[:, None], {out}, 0).astype({e.dtype(node.meta['val'].dtype)})"


@register(aten._grouped_mm.default)
def grouped_mm(e, node, x, weight, offs=None, bias=None, out_dtype=None):
    if offs is None or bias is not None or node.args[0].meta["val"].dim() != 2 or node.args[1].meta["val"].dim() != 3:
        raise NotImplementedError("_grouped_mm lowers for 2-D input x 3-D expert weights with offsets, no bias")
    return _grouped(e, node, x, weight, offs)


try:  # transformers' opaque fallback of the same op (MoE experts on CPU / in export)
    import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.*)

    register(torch.ops.transformers.grouped_mm_fallback.default)(
        lambda e, node, x, weight, offs: _grouped(e, node, x, weight, offs))
except (ImportError, AttributeError):
    pass
