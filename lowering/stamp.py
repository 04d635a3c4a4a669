"""Capture a deep model fast: export it with 2 of its N identical decoder layers, then stamp layer 1's
subgraph N - 2 more times with the weights of layers 2..N-1.

torch.export spends ~0.3 s per decoder layer on symbolic-shape bookkeeping on these machines
(SmolLM2's 30 layers: ~10 s of a ~20 s `lower-model`). Layers that are the same modules with the same
settings trace to the same graph up to their weights, so the other N - 2 are copies: layer k's copy
reads what layer 1 read from layer 0 from layer k - 1's copy, and its own weights. Only a stack whose
layers have the same module types, parameter shapes and scalar settings (and one `layer_types` entry)
is stamped; anything else is exported whole. tests/test_stamp.py checks the result against a whole
export (same graph, same emitted source).
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
            first = _signature(module[0])
            return (path, module) if all(_signature(layer) == first for layer in module) else None
    return None


def _text_config(model: torch.nn.Module):
    """The config that holds the decoder stack's settings (a multimodal model nests it)."""
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _signature(layer: torch.nn.Module) -> list:
    """What makes two layers trace alike: module types, scalar settings, parameter/buffer shapes."""
    sig = []
    for name, module in layer.named_modules():
        settings = sorted((k, v) for k, v in vars(module).items()
                          if isinstance(v, (int, float, bool, str, type(None))) and k not in _INDEX_ATTRS
                          and not k.startswith("_"))
        sig.append((name, type(module).__qualname__, tuple(settings)))
    for name, t in [*layer.named_parameters(), *layer.named_buffers()]:
        sig.append((name, tuple(t.shape), t.dtype))
    return sig


@contextlib.contextmanager
def two_layers(model: torch.nn.Module, path: str, layers: torch.nn.ModuleList):
    """The model with only its first two decoder layers, for the length of the block."""
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    config = _text_config(model)
    n, types = config.num_hidden_layers, getattr(config, "layer_types", None)
    setattr(parent, attr, torch.nn.ModuleList(list(layers)[:2]))
    config.num_hidden_layers = 2
    if types is not None:
        config.layer_types = types[:2]
    try:
        yield
    finally:
        setattr(parent, attr, layers)
        config.num_hidden_layers = n
        if types is not None:
            config.layer_types = types


def stamp(gm: fx.GraphModule, weights: dict, paths: dict, model: torch.nn.Module, path: str, n: int,
          prefix: str = "model.") -> bool:
    """Grow a graph exported with layers 0 and 1 of the stack at `path` to n layers, in place (`weights`
    and `paths` gain the new placeholders). `prefix` is the capture wrapper's attribute in module paths.
    Returns False, changing nothing, when the two layers did not trace alike (export the whole model)."""
    graph = gm.graph
    layer_re = re.compile(rf"^{re.escape(prefix + path)}\.(\d+)(?:\.|$)")
    members = {0: [], 1: []}
    for node in graph.nodes:
        if node.op == "call_function":
            stack = node.meta.get("nn_module_stack") or {}
            match = layer_re.match(list(stack.values())[-1][0]) if stack else None
            if match:
                members[int(match.group(1))].append(node)
    l0, l1 = members[0], members[1]
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
           for p in [paths.get(node.name, "")] if p.startswith(f"{path}.1.")}
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    last_placeholder = [node for node in graph.nodes if node.op == "placeholder"][-1]
    prev, anchor = l1, l1[-1]
    for k in range(2, n):
        placeholders = {}
        for old, old_path in own.items():
            new_path = f"{path}.{k}." + old_path[len(f"{path}.1."):]
            with graph.inserting_after(last_placeholder):
                node = graph.placeholder(_layer_name(old.name, path, k))
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
            new.meta["nn_module_stack"] = {_layer_path(key, path, k): (_layer_path(v[0], path, k), v[1])
                                           for key, v in node.meta.get("nn_module_stack", {}).items()}
            cur.append(new)
            anchor = new
        prev = cur
    for user, node in outside:
        user.replace_input_with(node, prev[pos1[node]])
    gm.recompile()
    return True


def _layer_path(s: str, path: str, k: int) -> str:
    return re.sub(rf"({re.escape(path)})\.1(?=\.|$)", rf"\g<1>.{k}", s)


def _layer_name(name: str, path: str, k: int) -> str:
    token = "_" + path.replace(".", "_") + "_"
    return name.replace(f"{token}1_", f"{token}{k}_", 1)
