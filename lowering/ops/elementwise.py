"""Elementwise arithmetic, activations and casts."""

import operator

import torch

from lowering.ops.registry import functional, register

aten = torch.ops.aten


def _binary(sym):
    def lower(e, node, a, b, alpha=1):
        rhs = e.r(b) if alpha == 1 else f"({e.r(b)} * {e.r(alpha)})"
        return f"{e.r(a)} {sym} {rhs}"

    return lower


register(aten.add.Tensor, aten.add.Scalar, operator.add)(_binary("+"))
register(aten.sub.Tensor, aten.sub.Scalar, operator.sub)(_binary("-"))
register(aten.mul.Tensor, aten.mul.Scalar, operator.mul)(_binary("*"))


def _inplace(sym):
    def lower(e, node, a, b, alpha=1):
        functional(node)
        return _binary(sym)(e, node, a, b, alpha)

    return lower


register(aten.add_.Tensor, aten.add_.Scalar)(_inplace("+"))
register(aten.sub_.Tensor, aten.sub_.Scalar)(_inplace("-"))
register(aten.mul_.Tensor, aten.mul_.Scalar)(_inplace("*"))


@register(aten.div.Tensor, aten.div.Scalar, operator.truediv)
def div(e, node, a, b):
    return f"{e.r(a)} / {e.r(b)}"


@register(aten.div_.Tensor, aten.div_.Scalar)
def div_inplace(e, node, a, b):
    functional(node)
    return f"{e.r(a)} / {e.r(b)}"


@register(aten.floor_divide.default, aten.floor_divide.Scalar)
def floor_divide(e, node, a, b):
    return f"mx.floor_divide({e.r(a)}, {e.r(b)})"


@register(aten.rsub.Scalar, aten.rsub.Tensor)
def rsub(e, node, a, b, alpha=1):
    return f"{e.r(b)} - {e.r(a)}" if alpha == 1 else f"{e.r(b)} - {e.r(a)} * {e.r(alpha)}"


@register(aten.pow.Tensor_Scalar)
def pow_(e, node, x, p):
    return f"mx.square({e.r(x)})" if p == 2 else f"mx.power({e.r(x)}, {e.r(p)})"


def _unary(fn):
    return lambda e, node, x: f"{fn}({e.r(x)})"


for _target, _fn in {
    aten.neg.default: "mx.negative", aten.rsqrt.default: "mx.rsqrt", aten.sqrt.default: "mx.sqrt",
    aten.exp.default: "k.exp", aten.log.default: "mx.log", aten.tanh.default: "mx.tanh",
    aten.sigmoid.default: "k.sigmoid", aten.cos.default: "mx.cos", aten.sin.default: "mx.sin",
    aten.abs.default: "mx.abs", aten.reciprocal.default: "mx.reciprocal", aten.erf.default: "mx.erf",
    aten.logical_not.default: "mx.logical_not", aten.expm1.default: "mx.expm1", aten.square.default: "mx.square",
}.items():
    register(_target)(_unary(_fn))


@register(aten.softplus.default)
def softplus(e, node, x, beta=1, threshold=20):
    """log(1 + exp(beta x)) / beta, linear where beta x > threshold (as torch computes it)."""
    bx = e.r(x) if beta == 1 else f"({e.r(x)} * {e.r(beta)})"
    soft = f"mx.logaddexp({bx}, 0.0)" if beta == 1 else f"(mx.logaddexp({bx}, 0.0) / {e.r(beta)})"
    return f"mx.where({bx} > {e.r(threshold)}, {e.r(x)}, {soft}.astype({e.r(x)}.dtype))"


@register(aten.silu.default)
def silu(e, node, x):
    return f"k.silu({e.r(x)})"


@register(aten.relu.default)
def relu(e, node, x):
    return f"mx.maximum({e.r(x)}, 0)"


@register(aten.gelu.default)
def gelu(e, node, x, approximate="none"):
    return f"k.gelu({e.r(x)}, {approximate!r})"


@register(aten.clamp.default, aten.clamp.Tensor)
def clamp(e, node, x, lo=None, hi=None):
    return f"mx.clip({e.r(x)}, {e.r(lo)}, {e.r(hi)})"


@register(aten.clamp_.default)
def clamp_inplace(e, node, x, lo=None, hi=None):
    functional(node)
    return clamp(e, node, x, lo, hi)


@register(aten.minimum.default, aten.min.other)
def minimum(e, node, a, b):
    return f"mx.minimum({e.r(a)}, {e.r(b)})"


@register(aten.maximum.default, aten.max.other)
def maximum(e, node, a, b):
    return f"mx.maximum({e.r(a)}, {e.r(b)})"


@register(aten.logical_and.default)
def logical_and(e, node, a, b):
    return f"mx.logical_and({e.r(a)}, {e.r(b)})"


@register(aten.logical_or.default)
def logical_or(e, node, a, b):
    return f"mx.logical_or({e.r(a)}, {e.r(b)})"


@register(aten.bitwise_not.default)
def bitwise_not(e, node, x):
    return f"mx.logical_not({e.r(x)})" if node.meta["val"].dtype == torch.bool else f"mx.bitwise_invert({e.r(x)})"


@register(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(e, node, x, mask, value):
    return f"mx.where({e.r(mask)}, mx.array({e.r(value)}, dtype={e.r(x)}.dtype), {e.r(x)})"


@register(aten.where.self)
def where(e, node, cond, a, b):
    return f"mx.where({e.r(cond)}, {e.r(a)}, {e.r(b)})"


for _target, _sym in {
    aten.eq.Tensor: "==", aten.eq.Scalar: "==", aten.ne.Tensor: "!=", aten.ne.Scalar: "!=",
    aten.lt.Tensor: "<", aten.lt.Scalar: "<", aten.le.Tensor: "<=", aten.le.Scalar: "<=",
    aten.gt.Tensor: ">", aten.gt.Scalar: ">", aten.ge.Tensor: ">=", aten.ge.Scalar: ">=",
    aten.bitwise_and.Tensor: "&", aten.__and__.Tensor: "&", aten.bitwise_or.Tensor: "|", aten.__or__.Tensor: "|",
    operator.floordiv: "//", operator.mod: "%",
}.items():
    register(_target)(_binary(_sym))


@register(aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default)
def cast(e, node, x, *args, **kwargs):
    return f"{e.r(x)}.astype({e.dtype(node.meta['val'].dtype)})"


@register(aten.view.dtype)
def view_dtype(e, node, x, dtype):
    return f"{e.r(x)}.view({e.dtype(dtype)})"
