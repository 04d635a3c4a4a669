"""Matrix products."""

import torch

from lowering.ops.registry import register

aten = torch.ops.aten


@register(aten.linear.default)
def linear(e, node, x, weight, bias=None):
    out = f"{e.r(x)} @ {e.r(weight)}.T"
    return out if bias is None else f"mx.addmm({e.r(bias)}, {e.r(x)}, {e.r(weight)}.T)"


@register(aten.mm.default, aten.matmul.default, aten.bmm.default)
def matmul(e, node, a, b):
    return f"{e.r(a)} @ {e.r(b)}"


@register(aten.addmm.default)
def addmm(e, node, bias, a, b, beta=1, alpha=1):
    return f"mx.addmm({e.r(bias)}, {e.r(a)}, {e.r(b)}, alpha={alpha}, beta={beta})"
