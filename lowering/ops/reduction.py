"""Reductions and normalisations."""

import torch

from lowering.ops.registry import register

aten = torch.ops.aten


def _axis(dim):
    return "None" if dim is None else repr(list(dim) if isinstance(dim, (list, tuple)) else [dim])


@register(aten.mean.dim)
def mean(e, node, x, dim=None, keepdim=False, dtype=None):
    return f"mx.mean({e.r(x)}, axis={_axis(dim)}, keepdims={keepdim})"


@register(aten.sum.dim_IntList)
def sum_(e, node, x, dim=None, keepdim=False, dtype=None):
    return f"mx.sum({e.r(x)}, axis={_axis(dim)}, keepdims={keepdim})"


@register(aten.amax.default)
def amax(e, node, x, dim=(), keepdim=False):
    return f"mx.max({e.r(x)}, axis={_axis(dim or None)}, keepdims={keepdim})"


@register(aten.logsumexp.default)
def logsumexp(e, node, x, dim, keepdim=False):
    return f"mx.logsumexp({e.r(x)}, axis={_axis(dim)}, keepdims={keepdim})"


@register(aten.max.dim, aten.min.dim)
def max_dim(e, node, x, dim, keepdim=False):
    """(values, indices) along `dim`, indexed by `operator.getitem`."""
    which = "max" if node.target == aten.max.dim else "min"
    index = f"mx.arg{which}({e.r(x)}, axis={dim}, keepdims={keepdim}).astype({e.dtype(node.meta['val'][1].dtype)})"
    return f"(mx.{which}({e.r(x)}, axis={dim}, keepdims={keepdim}), {index})"


@register(aten.argmax.default)
def argmax(e, node, x, dim=None, keepdim=False):
    return f"mx.argmax({e.r(x)}, axis={dim}, keepdims={keepdim})"


@register(aten.cumsum.default)
def cumsum(e, node, x, dim, dtype=None):
    x = e.r(x) if dtype is None else f"{e.r(x)}.astype({e.dtype(dtype)})"
    return f"mx.cumsum({x}, axis={dim})"


@register(aten._softmax.default, aten.softmax.int)
def softmax(e, node, x, dim, *rest):
    return f"k.softmax({e.r(x)}, axis={dim}).astype({e.dtype(node.meta['val'].dtype)})"


@register(aten.layer_norm.default)
def layer_norm(e, node, x, shape, weight=None, bias=None, eps=1e-5, *rest):
    return f"mx.fast.layer_norm({e.r(x)}, {e.r(weight)}, {e.r(bias)}, {eps!r})"
