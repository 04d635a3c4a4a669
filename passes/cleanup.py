"""Cleanups: no-op casts/views/asserts, dead code, common subexpressions, constant folding, and copies into
slices (`x[..., a:b] = y`) made functional."""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.program import Program, value_of as _val

aten = torch.ops.aten

_ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}
_ALLOCATIONS = {aten.empty.memory_format, aten.empty_like.default}
_IDENTITY = {aten.alias.default, aten.contiguous.default, aten.clone.default, aten.detach.default, aten.lift_fresh_copy.default}
_SAME_SHAPE_NOOP = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.to.device, aten.type_as.default}


def _is_noop(node: fx.Node) -> bool:
    if node.target in _IDENTITY:
        return True
    if node.target == aten.dropout.default:
        return not node.args[2]  # inference: dropout(x, p, train=False) is x
    src, out = _val(node.args[0]) if node.args else None, _val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    if node.target in CASTS or node.target == aten.view.dtype:
        return src.dtype == out.dtype
    if node.target in _SAME_SHAPE_NOOP or node.target == aten.slice.Tensor:
        return src.shape == out.shape  # a slice this size is the whole dim
    return False


def _drop_empty_cat_inputs(node: fx.Node) -> bool:
    tensors = node.args[0]
    keep = [t for t in tensors if not (isinstance(_val(t), torch.Tensor) and 0 in _val(t).shape)]
    if len(keep) == len(tensors) or not keep:
        return False
    if len(keep) == 1:
        node.replace_all_uses_with(keep[0])
    else:
        node.args = (keep, *node.args[1:])
    return True


def _collapse(node: fx.Node) -> bool:
    """transpose(transpose(x, a, b), a, b) -> x; reshape(reshape(x)) -> one reshape."""
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node) or src.op != "call_function":
        return False
    if node.target == aten.transpose.int and src.target == aten.transpose.int:
        if sorted(node.args[1:3]) == sorted(src.args[1:3]):
            node.replace_all_uses_with(src.args[0])
            return True
    reshapes = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
    if node.target in reshapes and src.target in reshapes:
        node.args = (src.args[0], *node.args[1:])
        return True
    return False


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor, aten.select.int,
          aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim}


def _functional_slice_copy(graph: fx.Graph, node: fx.Node, order: dict) -> bool:
    """`copy_(slice(base, dim, start, end), src)` (`base[..., a:b] = src`) -> `base2 = slice_scatter(base, src, dim,
    start, end)`, which the readers of `base` after the copy read instead. Only when nothing reads `base`'s own
    bases (the tensors it views) after the copy: their values change too."""
    if node.target != aten.copy_.default or not isinstance(node.args[0], fx.Node):
        return False
    view, src = node.args[:2]
    if view.target != aten.slice.Tensor or (len(view.args) > 4 and view.args[4] != 1) or len(view.users) != 1:
        return False
    base = view.args[0]
    ancestor = base
    while isinstance(ancestor, fx.Node) and ancestor.target in _VIEWS:
        parent = ancestor.args[0]
        if any(order[u] > order[node] for u in parent.users if u is not ancestor):
            return False
        ancestor = parent
    dim, start = view.args[1], view.args[2] if len(view.args) > 2 else 0
    dim %= _val(base).dim()
    with graph.inserting_after(node):
        if _val(src).shape != _val(view).shape:
            src = graph.call_function(aten.expand.default, (src, list(_val(view).shape)))
            src.meta["val"] = _val(view)
        new = graph.call_function(aten.slice_scatter.default, (base, src, dim, start or 0, view.args[3]))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    new.meta["val"] = _val(base)
    for user in [u for u in base.users if u is not view and u is not new and order.get(u, -1) > order[node]]:
        user.replace_input_with(base, new)
    if node.users:
        with graph.inserting_after(new):
            again = graph.call_function(aten.slice.Tensor, (new, *view.args[1:]))
        again.meta = dict(view.meta)
        node.replace_all_uses_with(again)
    graph.erase_node(node)
    graph.erase_node(view)
    return True


def canonicalize(graph: fx.Graph) -> int:
    """Remove runtime asserts and ops that do nothing here (same-dtype casts, identity views)."""
    removed = 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if _functional_slice_copy(graph, node, order):
            removed += 1
        elif node.target in _ALLOCATIONS and not node.users:  # DCE keeps allocations; unused ones go
            graph.erase_node(node)
            removed += 1
        elif node.target in _ASSERTS:
            graph.erase_node(node)
            removed += 1
        elif _is_noop(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
        elif node.target == aten.cat.default and _drop_empty_cat_inputs(node):
            removed += 1
        elif _collapse(node):
            removed += 1
    graph.eliminate_dead_code()
    return removed


def _key(node: fx.Node):
    def freeze(a):
        if isinstance(a, (list, tuple)):
            return tuple(freeze(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, freeze(v)) for k, v in a.items()))
        return a if isinstance(a, (fx.Node, int, float, bool, str, type(None), torch.dtype)) else repr(a)

    return node.target, freeze(node.args), freeze(node.kwargs)


def eliminate_common_subexpressions(graph: fx.Graph) -> int:
    seen: dict = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.is_impure():
            continue
        if node.target in (aten.empty.memory_format, aten.empty_like.default):
            continue  # buffers that an impure op writes into must stay distinct
        key = _key(node)
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return merged


def _static(val) -> bool:
    return isinstance(val, torch.Tensor) and all(isinstance(s, int) for s in val.shape)


def fold_constants(program: Program) -> int:
    """Evaluate ops whose inputs are all weights/constants once, at lowering time."""
    graph = program.graph
    const = {n for n in graph.nodes if n.op == "placeholder" and n.name in program.weights}
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.is_impure() or not _static(_val(node)):
            continue
        inputs = node.all_input_nodes
        if not inputs or not all(i in const for i in inputs):
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: program.weights[n.name])
        value = node.target(*args, **kwargs)
        new = program.add_constant(f"folded_{node.name}", value.detach().contiguous())
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        const.add(new)
        folded += 1
    drop_unused_weights(program)
    return folded


def drop_unused_weights(program: Program) -> None:
    """Weights nothing reads go, except those an attention layer names (its sinks, read once attention is fused)."""
    named = {layer.sinks for layer in program.attention if layer.sinks}
    for node in list(program.graph.nodes):
        if node.op == "placeholder" and node.name in program.weights and not node.users \
                and program.weight_paths.get(node.name) not in named:
            program.graph.erase_node(node)
            del program.weights[node.name]
            program.weight_paths.pop(node.name, None)


def cleanup(program: Program) -> int:
    """The cleanup pass: returns how many nodes it removed or folded."""
    changed = canonicalize(program.graph)
    changed += eliminate_common_subexpressions(program.graph)
    changed += fold_constants(program)
    program.graph.eliminate_dead_code()
    drop_unused_weights(program)
    return changed
