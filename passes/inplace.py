"""In-place ATen ops on fresh tensors -> their out-of-place forms, with later reads of the tensor reading the result.

Export keeps in-place ops (`out.masked_fill_(mask, 0)`, then `all_reduce(out)`): the op's own value is unused and
later nodes read the mutated tensor. MLX arrays are values, so the graph is made to say what it means: the
out-of-place op (`masked_fill`), read by every later user of the tensor. Only where that is the same program: the
tensor is made by an op of the graph (not an input or a view, whose base others hold), no view of it is taken, and
the op has an out-of-place overload of the same name. Others stay, and their lowering refuses them by name (lowering.ops.registry.functional).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.manager import FunctionPass
from passes.program import Program

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor, aten.select.int,
          aten.transpose.int, aten.permute.default, aten.expand.default, aten.t.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.dims, aten.alias.default, aten.as_strided.default, aten.diagonal.default}


def out_of_place(target) -> torch._ops.OpOverload | None:
    """`aten.masked_fill_.Scalar` -> `aten.masked_fill.Scalar`: the overload of the same name without the
    trailing underscore, for an ATen op that mutates its first argument; None for any other target."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    packet = target.overloadpacket.__name__
    schema = target._schema.arguments
    if not packet.endswith("_") or packet.startswith("_") or not schema or schema[0].alias_info is None \
            or not schema[0].alias_info.is_write:
        return None
    functional = getattr(aten, packet[:-1], None)
    return getattr(functional, target._overloadname, None) if functional is not None else None


def functionalize(program: Program) -> int:
    graph = program.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        op = out_of_place(node.target)
        target = node.args[0] if node.args else None
        if op is None or not isinstance(target, fx.Node) or target.op != "call_function" or target.target in _VIEWS:
            continue
        if any(u.target in _VIEWS for u in target.users):
            continue  # a view made of the tensor would see the mutation too
        later = [u for u in target.users if u is not node and order[u] > order[node]]
        with graph.inserting_before(node):
            new = graph.call_function(op, node.args, node.kwargs)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        for user in later:
            user.replace_input_with(target, new)
        graph.erase_node(node)
        count += 1
    return count


PASS = FunctionPass("functionalize", functionalize)
