"""Tensors made from nothing: ranges, fills."""

import torch

from lowering.ops.registry import register

aten = torch.ops.aten


@register(aten.arange.default, aten.arange.start, aten.arange.start_step)
def arange(e, node, *args, **kwargs):
    return f"mx.arange({', '.join(e.r(a) for a in args)}, dtype={e.dtype(node.meta['val'].dtype)})"


@register(aten.full.default)
def full(e, node, size, value, **kwargs):
    return f"mx.full({e.r(list(size))}, {e.r(value)}, dtype={e.dtype(node.meta['val'].dtype)})"


@register(aten.zeros.default, aten.new_zeros.default)
def zeros(e, node, *args, **kwargs):
    return f"mx.zeros({e.shape(node)}, dtype={e.dtype(node.meta['val'].dtype)})"


@register(aten.empty_like.default, aten.zeros_like.default, aten.empty.memory_format)
def empty(e, node, *args, **kwargs):
    """Uninitialised memory has no MLX counterpart: zeros (what a reader of it may not rely on anyway)."""
    return f"mx.zeros({e.shape(node)}, dtype={e.dtype(node.meta['val'].dtype)})"


@register(aten.ones.default, aten.new_ones.default, aten.ones_like.default)
def ones(e, node, *args, **kwargs):
    return f"mx.ones({e.shape(node)}, dtype={e.dtype(node.meta['val'].dtype)})"


@register(aten.scalar_tensor.default)
def scalar_tensor(e, node, value, **kwargs):
    return f"mx.array({e.r(value)}, dtype={e.dtype(node.meta['val'].dtype)})"
