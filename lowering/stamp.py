"""Capture a deep model fast: export it with its first few of N identical decoder layers, then stamp the
last exported layer's subgraph (the template) into the remaining ones, with their weights.

torch.export spends a large share of a deep model's capture on symbolic-shape bookkeeping, per decoder
layer (docs/architecture.md). Layers that are the same modules with the same
settings trace to the same graph up to their weights, so the rest are copies: layer k's copy reads
what the template read from its predecessor from layer k - 1's copy, and its own weights. The HF front
exports layers 0 and 1 (template 1); the vLLM front layers 0-2 (template 2: its layer 0 starts the
residual stream and traces differently), and renames the layer each copy's attention op names. Only a
stack whose layers have the same module types, parameter shapes and scalar settings (a string naming
the layer itself aside; one `layer_types` entry) is stamped; anything else is exported whole.
tests/test_stamp.py checks the result against a whole export (same graph, same emitted source).
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.fx as fx

_INDEX_ATTRS = {"layer_idx", "layer_id", "layer_index", "idx"}  # a layer's own number: no effect on the graph


def uniform_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """(module path, list) of the model's stack of N > 2 interchangeable decoder layers, or None."""
    config = _text_config(model)
    n = getattr(config, "num_hidden_layers", 0)
    if n <= 2 or len(set(getattr(config, "layer_types", None) or [None])) > 1:
        return None
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            first = _signature(module[0], f"{path}.0")
            return (path, module) if all(_signature(layer, f"{path}.{i}") == first for i, layer in enumerate(module)) else None
    return None


def _text_config(model: torch.nn.Module):
    """The config that holds the decoder stack's settings (a multimodal model nests it)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _signature(layer: torch.nn.Module, own: str) -> list:
    """What makes two layers trace alike: module types, scalar settings, parameter/buffer shapes. A string
    naming the layer's own path (`own`, e.g. vLLM's attention `layer_name` "model.layers.3.self_attn.attn")
    counts as the same setting in every layer: stamping renames it (`stamp`)."""
    sig = []
    for name, module in layer.named_modules():
        settings = sorted((k, _own_path(v, own) if isinstance(v, str) else v) for k, v in vars(module).items()
                          if isinstance(v, (int, float, bool, str, type(None))) and k not in _INDEX_ATTRS
                          and not k.startswith("_"))
        sig.append((name, type(module).__qualname__, tuple(settings)))
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        sig.append((name, tuple(t.shape), t.dtype))
    return sig


def _own_path(s: str, own: str) -> str:
    return re.sub(rf"{re.escape(own)}(?=\.|$)", "<layer>", s)


@contextlib.contextmanager
def first_layers(model: torch.nn.Module, path: str, layers: torch.nn.ModuleList, count: int = 2):
    """The model with only its first `count` decoder layers, for the length of the block."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    config = _text_config(model)
    n, types = config.num_hidden_layers, getattr(config, "layer_types", None)
    setattr(parent, attr, torch.nn.ModuleList(list(layers)[:count]))
    config.num_hidden_layers = count
    if types is not None:
        config.layer_types = types[:count]
    try:
        yield
    finally:
        setattr(parent, attr, layers)
        config.num_hidden_layers = n
        if types is not None:
            config.layer_types = types


def stamp(gm: fx.GraphModule, weights: dict, paths: dict, model: torch.nn.Module, path: str, n: int,
          prefix: str = "model.", template: int = 1) -> bool:
    """Grow a graph exported with layers 0..`template` of the stack at `path` to n layers, in place
    (`weights` and `paths` gain the new placeholders): layer `template` is copied for layers template+1..n-1,
    each copy reading from its predecessor what the template read from layer template-1. `template` = 2
    where layer 0 traces differently (vLLM's first layer has no residual input yet). `prefix` is the
    capture wrapper's attribute in module paths. Returns False, changing nothing, when the template and its
    predecessor did not trace alike (export the whole model)."""
    graph = gm.graph
    layer_re = re.compile(rf"^{re.escape(prefix + path)}\.(\d+)(?:\.|$)")
    members = {template - 1: [], template: []}
    for node in graph.nodes:
        if node.op == "call_function":
            stack = node.meta.get("nn_module_stack") or {}
            match = layer_re.match(list(stack.values())[-1][0]) if stack else None
            if match and int(match.group(1)) in members:
                members[int(match.group(1))].append(node)
    l0, l1 = members[template - 1], members[template]  # the predecessor and the template
    in_l1 = set(l1)
    # a size torch computed in layer 0 and reused in layer 1 (MoE routing) is shared by all layers
    l0 = [n for n in l0 if isinstance(n.meta.get("val"), torch.Tensor) or not any(u in in_l1 for u in n.users)]
    if not l1 or len(l0) != len(l1) or any(a.target != b.target for a, b in zip(l0, l1)):
        return False
    order = {node: i for i, node in enumerate(graph.nodes)}
    outside = [(u, node) for node in l1 for u in node.users if u not in in_l1]
    if any(order[u] < order[l1[-1]] for u, _ in outside):
        return False  # something outside the layer runs between its ops: not a plain stack
    pos0, pos1 = {node: i for i, node in enumerate(l0)}, {node: i for i, node in enumerate(l1)}
    own = {node: p for node in graph.nodes if node.op == "placeholder"
           for p in [paths.get(node.name, "")] if p.startswith(f"{path}.{template}.")}
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    last_placeholder = [node for node in graph.nodes if node.op == "placeholder"][-1]
    prev, anchor = l1, l1[-1]
    for k in range(template + 1, n):
        placeholders = {}
        for old, old_path in own.items():
            new_path = f"{path}.{k}." + old_path[len(f"{path}.{template}."):]
            with graph.inserting_after(last_placeholder):
                node = graph.placeholder(_layer_name(old.name, path, template, k))
            node.meta = dict(old.meta)
            weights[node.name], paths[node.name] = state[new_path].detach(), new_path
            placeholders[old] = last_placeholder = node
        cur: list[fx.Node] = []

        def remap(a, cur=cur, prev=prev, placeholders=placeholders):
            if a in pos1:
                return cur[pos1[a]]
            if a in pos0:
                return prev[pos0[a]]
            return placeholders.get(a, a)

        for node in l1:
            with graph.inserting_after(anchor):
                new = graph.node_copy(node, remap)
            new.meta["nn_module_stack"] = {_layer_path(key, path, template, k): (_layer_path(v[0], path, template, k), v[1])
                                           for key, v in node.meta.get("nn_module_stack", {}).items()}
            # arguments naming the template (vLLM's attention op finds its layer by name) name layer k
            new.args, new.kwargs = fx.node.map_aggregate((new.args, new.kwargs), lambda a: _renamed(a, path, template, k))
            cur.append(new)
            anchor = new
        prev = cur
    for user, node in outside:
        user.replace_input_with(node, prev[pos1[node]])
    gm.recompile()
    return True


def _renamed(a, path: str, template: int, k: int):
    """A string naming the template layer, or a wrapper of one (vLLM's `LayerName(value)`), naming layer k."""
    if isinstance(a, str):
        return _layer_path(a, path, template, k)
    if isinstance(getattr(a, "value", None), str):
        return type(a)(_layer_path(a.value, path, template, k))
    return a


def _layer_path(s: str, path: str, template: int, k: int) -> str:
    return re.sub(rf"({re.escape(path)})\.{template}(?=\.|$)", rf"\g<1>.{k}", s)


def _layer_name(name: str, path: str, template: int, k: int) -> str:
    token = "_" + path.replace(".", "_") + "_"
    return name.replace(f"{token}{template}_", f"{token}{k}_", 1)
