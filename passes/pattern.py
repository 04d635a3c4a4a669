"""A small pattern language over ATen FX graphs: patterns are plain torch functions.

A `Pattern` is data: a `search` function written in ordinary torch, traced to a graph (once per
example-input variant, e.g. per dtype, to the same pre-dispatch ATen IR models are captured in, then
cleaned the same way); a `replace` function called on the matched values, which records new graph nodes
(usually one fused `torch.ops.mlx.*` call); optional `derive` that checks a match and computes extra
arguments for `replace` (returning None rejects the match).

Tensor arguments of `search` match any node; scalar arguments (named in `scalars`) are traced with
sentinel values and match any literal, so one pattern covers every eps or dimension. `add` and `mul`
match in either operand order. Matching starts from the node the pattern returns (the anchor) and
walks producers; a match whose inner nodes are used outside the match is skipped (the rewrite would
have to keep them alive, so it would not be a fusion).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from passes.program import Program, fake_mode_of

aten = torch.ops.aten
COMMUTATIVE = {aten.add.Tensor, aten.mul.Tensor}
_SENTINELS = {float: [0.0012345678, 0.0023456789, 0.0034567891], int: [99991, 99989, 99971]}


@dataclass
class Match:
    anchor: fx.Node
    bindings: dict[str, Any]  # pattern argument name -> target node or literal
    nodes: set[fx.Node] = field(default_factory=set)  # matched target nodes (anchor included)


@dataclass
class Pattern:
    name: str
    search: Callable
    replace: Callable[..., Any]
    example_inputs: Callable[[], list[tuple]]  # variants: tuples of tensors for search's tensor args
    scalars: dict[str, type] = field(default_factory=dict)  # trailing scalar args of search
    derive: Callable[[Match, Program], dict | None] | None = None

    @functools.cached_property
    def graphs(self) -> list[fx.Graph]:
        return [_trace(self, inputs) for inputs in self.example_inputs()]


def _trace(pattern: Pattern, tensors: tuple) -> fx.Graph:
    from passes.cleanup import canonicalize  # patterns are cleaned exactly as model graphs are

    sentinels = [_SENTINELS[kind][i] for i, kind in enumerate(pattern.scalars.values())]

    # make_fx at pre-dispatch level is the tracer under torch.export (same ATen IR, compared op by op
    # for every pattern) without export's fixed cost: 0.5 s for the 12 pattern variants instead of 2.9 s.
    gm = make_fx(lambda *args: pattern.search(*args, *sentinels), tracing_mode="fake", pre_dispatch=True)(*tensors)
    canonicalize(gm.graph)
    gm.graph._anchor = _anchor(gm.graph)
    names = list(_tensor_arg_names(pattern.search, len(tensors)))
    for node, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"], names):
        node.meta["pattern_arg"] = name
    scalar_of = {value: name for name, value in zip(pattern.scalars, sentinels)}
    for node in gm.graph.nodes:
        node.meta["scalar_args"] = scalar_of
    return gm.graph


def _tensor_arg_names(fn: Callable, count: int):
    import inspect

    return list(inspect.signature(fn).parameters)[:count]


def _anchor(graph: fx.Graph) -> fx.Node:
    (out,) = [n for n in graph.nodes if n.op == "output"]
    result = out.args[0]
    return result[0] if isinstance(result, (tuple, list)) else result


def match_at(graph: fx.Graph, target: fx.Node) -> Match | None:
    """Match `graph` (a traced pattern) with its anchor at `target`."""
    anchor = graph._anchor
    m = Match(anchor=target, bindings={})
    if not _match(anchor, target, m, anchor.meta["scalar_args"]):
        return None
    for node in m.nodes:  # inner nodes must not escape the match
        if node is not target and any(user not in m.nodes for user in node.users):
            return None
    return m


def _match(p: fx.Node, t: Any, m: Match, scalars: dict) -> bool:
    if p.op == "placeholder":
        name = p.meta["pattern_arg"]
        if name in m.bindings:
            return m.bindings[name] is t
        m.bindings[name] = t
        return True
    if not isinstance(t, fx.Node) or t.op != "call_function" or t.target != p.target:
        return False
    if t in m.nodes:
        return True  # a shared producer already matched on another path
    if set(p.kwargs) != set(t.kwargs):
        return False
    orders = [p.args]
    if p.target in COMMUTATIVE and len(p.args) == 2:
        orders.append((p.args[1], p.args[0]))
    for p_args in orders:
        trial = Match(m.anchor, dict(m.bindings), set(m.nodes) | {t})
        if _match_args(p_args, t.args, trial, scalars) and all(
            _match_args((p.kwargs[k],), (t.kwargs[k],), trial, scalars) for k in p.kwargs
        ):
            m.bindings, m.nodes = trial.bindings, trial.nodes
            return True
    return False


def _match_args(p_args, t_args, m: Match, scalars: dict) -> bool:
    if len(p_args) != len(t_args):
        return False
    for pa, ta in zip(p_args, t_args):
        if isinstance(pa, fx.Node):
            if not _match(pa, ta, m, scalars):
                return False
        elif isinstance(pa, (list, tuple)):
            if not isinstance(ta, (list, tuple)) or not _match_args(pa, ta, m, scalars):
                return False
        elif type(pa) in (int, float) and pa in scalars and not isinstance(pa, bool):
            name = scalars[pa]
            if isinstance(ta, fx.Node) or isinstance(ta, bool) or not isinstance(ta, (int, float)):
                return False
            if m.bindings.setdefault(name, ta) != ta:
                return False
        elif isinstance(ta, fx.Node) or pa != ta or type(pa) is not type(ta):
            return False
    return True


def record(graph: fx.Graph, fn: Callable, *args, **kwargs) -> fx.Node:
    """Call `fn` with graph nodes standing in for tensors; the ops it calls become new nodes.

    `fn` may only call torch ops (`torch.ops.aten.*`, `torch.ops.mlx.*`): that keeps the IR canonical.
    Each new node gets `meta["val"]` by running its op on the fake values of its inputs. Returns the
    node of fn's result, or a tuple of nodes when fn returns a tuple.
    """
    tracer = GraphAppendingTracer(graph)
    wrap = lambda a: Proxy(a, tracer) if isinstance(a, fx.Node) else a  # noqa: E731
    before = set(graph.nodes)
    out = fn(*[wrap(a) for a in args], **{k: wrap(v) for k, v in kwargs.items()})
    node = tuple(o.node for o in out) if isinstance(out, (tuple, list)) else out.node
    mode = fake_mode_of(graph)
    for new in graph.nodes:
        if new not in before and new.op == "call_function":
            vals = fx.node.map_arg((new.args, new.kwargs), lambda n: n.meta["val"])
            with mode:
                new.meta["val"] = new.target(*vals[0], **vals[1])
    return node


def rewrite(program: Program, pattern: Pattern) -> int:
    """Replace every match of `pattern` in the program; returns the number of matches."""
    graph = program.graph
    count = 0
    for target in list(graph.nodes):
        if target.op != "call_function" or target._erased:
            continue
        for variant in pattern.graphs:
            if variant._anchor.target != target.target:
                continue
            m = match_at(variant, target)
            if m is None:
                continue
            extra = pattern.derive(m, program) if pattern.derive else {}
            if extra is None:
                continue
            args = {**m.bindings, **extra}
            for key, value in args.items():  # derived tensors become new constants
                if isinstance(value, torch.Tensor):
                    args[key] = program.add_constant(f"{pattern.name}_{key}", value)
            with graph.inserting_before(target):
                new = record(graph, pattern.replace, **args)
            new.meta["nn_module_stack"] = target.meta.get("nn_module_stack", {})
            new.meta["stack_trace"] = target.meta.get("stack_trace")
            new.meta["fused_from"] = pattern.name
            target.replace_all_uses_with(new)
            _erase_dead(graph, m.nodes)  # the matched producers are dead now: never match them again
            count += 1
            break
    return count


def _erase_dead(graph: fx.Graph, nodes: set[fx.Node]) -> None:
    """Erase the matched nodes that nothing uses any more (consumers before producers)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sorted(nodes, key=lambda n: order.get(n, -1), reverse=True):
        if not node._erased and not node.users:
            graph.erase_node(node)
