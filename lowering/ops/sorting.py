"""Sorting, top-k and histograms: the routing half of mixture-of-experts layers.

Multi-output ops (`sort`, `topk`) lower to a tuple that `operator.getitem` indexes; the indices
come from one `mx.argsort` and the values are gathered with them, so both outputs agree.
"""

import torch

from lowering.ops.registry import register

aten = torch.ops.aten


def _leading(x_node, dim: int, item: str) -> str:
    """Index `item` on axis `dim` (e.g. `:3`), every other axis whole."""
    dim = dim % x_node.meta["val"].dim()
    return "[" + ", ".join([":"] * dim + [item]) + "]"


@register(aten.sort.default, aten.sort.stable)
def sort(e, node, x, *args, dim=-1, descending=False, stable=None):
    if node.target == aten.sort.default and args:
        dim = args[0]
        descending = args[1] if len(args) > 1 else descending
    key = f"-{e.r(x)}" if descending else e.r(x)
    idx = e.temp(node, "order")
    e.line(f"{idx} = mx.argsort({key}, axis={dim}).astype({e.dtype(node.meta['val'][1].dtype)})")
    return f"(mx.take_along_axis({e.r(x)}, {idx}, axis={dim}), {idx})"


@register(aten.topk.default)
def topk(e, node, x, k, dim=-1, largest=True, sorted=True):
    key = f"-{e.r(x)}" if largest else e.r(x)
    idx = e.temp(node, "index")
    e.line(f"{idx} = mx.argsort({key}, axis={dim}){_leading(node.args[0], dim, ':' + e.r(k))}"
           f".astype({e.dtype(node.meta['val'][1].dtype)})")
    return f"(mx.take_along_axis({e.r(x)}, {idx}, axis={dim}), {idx})"


@register(aten.histc.default)
def histc(e, node, x, bins=100, lo=0, hi=0):
    """Counts of the flattened input in `bins` equal bins over [lo, hi] (values outside are dropped;
    the top edge belongs to the last bin), as torch does. lo == hi (range from the data) is not supported."""
    if not hi > lo:
        raise NotImplementedError("histc with min >= max (range taken from the data) has no MLX lowering")
    flat, which = e.temp(node, "flat"), e.temp(node, "bin")
    e.line(f"{flat} = {e.r(x)}.flatten()")
    e.line(f"{which} = mx.where(({flat} >= {lo!r}) & ({flat} <= {hi!r}), "
           f"mx.clip(mx.floor(({flat} - {lo!r}) * {bins / (hi - lo)!r}), 0, {bins - 1}), -1)")
    return f"mx.sum({which}[:, None] == mx.arange({bins})[None, :], axis=0).astype({e.dtype(node.meta['val'].dtype)})"
