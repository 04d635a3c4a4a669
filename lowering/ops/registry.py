"""The op-lowering registry: one small function per torch/aten target, split by op family.

A lowering receives an `Emitter` (to render arguments as MLX source), the FX node, and the node's
args/kwargs; it returns one MLX expression. `register(*targets)` adds it for each target.
"""

from __future__ import annotations

from typing import Callable

import torch

LOWERINGS: dict = {}


def register(*targets) -> Callable:
    def deco(fn: Callable) -> Callable:
        for target in targets:
            if target in LOWERINGS:
                raise ValueError(f"{target} already has a lowering ({LOWERINGS[target].__name__})")
            LOWERINGS[target] = fn
        return fn

    return deco


def functional(node) -> None:
    """An in-place ATen op (`div_`, `index_put_`) lowers to its functional form: MLX arrays are
    values. That is only the same program when nothing reads the mutated tensor afterwards except
    through this node, and the tensor is not a view or an input (whose base someone else holds)."""
    target = node.args[0]
    later = [u for u in target.users if u is not node and _after(u, node)]
    view = getattr(target, "target", None) in _views() or target.op == "placeholder"
    if later or view:
        raise NotImplementedError(
            f"{node.target} at {node.name} mutates {target.name}, which "
            + (f"is read again by {', '.join(u.name for u in later)}" if later else "is a view or an input")
            + "; only in-place ops on fresh tensors lower to MLX values")


def _after(a, b) -> bool:
    node = b.next
    while node.op != "root":
        if node is a:
            return True
        node = node.next
    return False


def _views():
    aten = torch.ops.aten
    return {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor,
            aten.select.int, aten.transpose.int, aten.permute.default, aten.expand.default, aten.t.default,
            aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.alias.default}


def lowering_for(target):
    return LOWERINGS.get(target)


def supported_targets() -> list[str]:
    return sorted(str(t) for t in LOWERINGS)
