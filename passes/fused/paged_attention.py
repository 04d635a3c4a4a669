"""Attention (+ KV-cache write) -> one `mlx.paged_attention` node per layer, run as
`out, kv[i] = k.paged_attention(q, k, v, kv[i], batch, ...)`.

Two spellings of attention reach us:
- vLLM: the opaque `vllm.unified_attention_with_output(q, k, v, output, layer_name)` op, which writes
  the cache and attends in one call, writing its result into the `output` buffer;
- Hugging Face: `aten.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), mask)` over one
  dense sequence; the GQA repeat and the mask become dead once the node is replaced.
Both become `mlx.paged_attention(q [T, H*D], k [T, KVH*D], v, layer, ...)`, which the runtime runs
over the paged cache for any mix of prefill and decode sequences.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.fx as fx

from passes.fused import FusedOp, declare
from passes.manager import FunctionPass
from passes.pattern import record
from passes.program import AttentionLayer, Program

aten = torch.ops.aten


@torch.library.custom_op("mlx::paged_attention", mutates_args=())
def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    sliding_window: int,
    logit_cap: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Write k/v of this step into layer `layer`'s paged cache, attend, return [T, heads * head_dim].

    The batch (which tokens belong to which sequence, their cache blocks) is implicit: the runtime
    supplies it. This torch reference treats all T tokens as ONE new sequence (causal prefill), which
    is what a standalone graph means, so rewritten graphs can be checked against the originals.
    `sliding_window` <= 0 means none; `logit_cap` <= 0 means no soft-capping; `sinks` [heads]: one more logit per
    head in each softmax's denominator, attending to nothing (attention sinks).
    """
    t = q.shape[0]
    qh = q.reshape(t, num_heads, head_dim).transpose(0, 1).float()
    kh = k.reshape(t, num_kv_heads, head_dim).transpose(0, 1).float()
    vh = v.reshape(t, num_kv_heads, head_dim).transpose(0, 1).float()
    rep = num_heads // num_kv_heads
    kh, vh = kh.repeat_interleave(rep, 0), vh.repeat_interleave(rep, 0)
    scores = (qh @ kh.transpose(1, 2)) * scale
    if logit_cap > 0:
        scores = torch.tanh(scores / logit_cap) * logit_cap
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    visible = j <= i
    if sliding_window > 0:
        visible &= j > i - sliding_window
    scores = scores.masked_fill(~visible, -math.inf)
    if sinks is not None:
        sink = sinks.float().reshape(num_heads, 1, 1).expand(num_heads, t, 1)
        out = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :t] @ vh
    else:
        out = scores.softmax(-1) @ vh
    return out.transpose(0, 1).reshape(t, num_heads * head_dim).to(q.dtype)


@paged_attention.register_fake
def _(q, k, v, layer, num_heads, num_kv_heads, head_dim, scale, sliding_window, logit_cap, sinks=None):
    return q.new_empty((q.shape[0], num_heads * head_dim))


OP = declare(FusedOp("paged_attention", torch.ops.mlx.paged_attention.default, cache=True))
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _strip_repeat_kv(node: fx.Node) -> fx.Node:
    """repeat_kv(x) = reshape(expand(unsqueeze(x, 2))) -> x."""
    if node.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        inner = node.args[0]
        if inner.target == aten.expand.default and inner.args[0].target == aten.unsqueeze.default:
            if inner.args[0].args[1] == 2:
                return inner.args[0].args[0]
    return node


def _paged(layer: AttentionLayer, scale: float):
    def call(q, k, v, sinks=None):
        extra = () if sinks is None else (sinks,)
        return torch.ops.mlx.paged_attention.default(
            q, k, v, layer.index, layer.num_heads, layer.num_kv_heads, layer.head_dim,
            scale, layer.sliding_window, layer.logit_cap, *extra,
        )

    return call


def _weight_node(program: Program, path: str) -> fx.Node | None:
    """The placeholder of the weight at module path `path`."""
    names = {name for name, p in program.weight_paths.items() if p == path}
    return next((n for n in program.graph.nodes if n.op == "placeholder" and n.name in names), None)


def _replace_hf_sdpa(program: Program, node: fx.Node, layer: AttentionLayer) -> fx.Node:
    q, k, v = node.args[:3]
    k, v = _strip_repeat_kv(k), _strip_repeat_kv(v)
    # Shapes from the graph itself ([1, heads, T, dim]): configs name these fields differently.
    _, h, _, d = q.meta["val"].shape
    kvh = k.meta["val"].shape[1]
    scale = node.kwargs.get("scale") or d**-0.5
    layer = dataclasses.replace(layer, num_heads=int(h), num_kv_heads=int(kvh), head_dim=int(d))
    program.attention[layer.index] = layer  # the runtime sizes the cache from these

    def replace(q, k, v):
        tokens_first = lambda x, heads: aten.reshape.default(aten.transpose.int(x, 1, 2), [-1, heads * d])  # noqa
        out = _paged(layer, scale)(tokens_first(q, h), tokens_first(k, kvh), tokens_first(v, kvh))
        return aten.transpose.int(aten.reshape.default(out, [1, -1, h, d]), 1, 2)

    return record(program.graph, replace, q, k, v)


def _vllm_attention(node: fx.Node):
    """(q, k, v, output buffer, layer name) of a vLLM unified attention call, or None.
    Export keeps the op in-place: it writes `output`, which later nodes read through views."""
    if "unified_attention_with_output" in str(node.target):
        q, k, v, out, name = node.args[:5]
        return q, k, v, out, name
    return None


def _replace_vllm(program: Program, node: fx.Node, layer: AttentionLayer, q, k, v, holder) -> None:
    def flat(x):
        return aten.reshape.default(x, [-1, x.node.meta["val"].shape[-1] if x.node.meta["val"].dim() == 2
                                        else x.node.meta["val"].shape[-2] * x.node.meta["val"].shape[-1]])

    sinks = _weight_node(program, layer.sinks) if layer.sinks else None
    if layer.sinks and sinks is None:
        raise NotImplementedError(f"attention layer {layer.name}: its sinks ({layer.sinks}) are not in the graph")
    new = record(program.graph, lambda q, k, v, s: _paged(layer, layer.scale)(flat(q), flat(k), flat(v), s),
                 q, k, v, sinks)
    # in-place op: reads of the output buffer (or any view of it) after the op read the result
    order = {n: i for i, n in enumerate(program.graph.nodes)}
    aliases = [holder]
    while aliases[-1].target in _VIEWS:
        aliases.append(aliases[-1].args[0])
    for alias in aliases:
        shape = [-1] + list(alias.meta["val"].shape[1:])
        readers = [u for u in alias.users if order[u] > order[node] and u not in aliases]
        if readers:
            with program.graph.inserting_after(new):
                shaped = record(program.graph, lambda o, shape=shape: aten.reshape.default(o, shape), new)
            for user in readers:
                user.replace_input_with(alias, shaped)
    program.graph.erase_node(node)
    _erase_chain(program.graph, holder)


def _erase_chain(graph: fx.Graph, node: fx.Node) -> None:
    """Erase a dead view chain down to its allocation (DCE keeps allocations)."""
    while node is not None and not node.users:
        parent = node.args[0] if node.target in _VIEWS and isinstance(node.args[0], fx.Node) else None
        graph.erase_node(node)
        node = parent


def fuse(program: Program) -> int:
    layers = {layer.name: layer for layer in program.attention}
    ordered = list(program.attention)
    count = 0
    for node in list(program.graph.nodes):
        if node.op != "call_function" or node._erased:
            continue
        if node.target == aten.scaled_dot_product_attention.default:
            layer = ordered[count] if count < len(ordered) else None
            if layer is None:
                continue
            with program.graph.inserting_before(node):
                new = _replace_hf_sdpa(program, node, layer)
            new.meta["fused_from"] = "attention"
            node.replace_all_uses_with(new)
            program.graph.erase_node(node)
            count += 1
            continue
        found = _vllm_attention(node)
        if found is None:
            continue
        q, k, v, holder, name = found
        layer = layers.get(getattr(name, "value", name))  # vLLM passes a LayerName wrapper
        if layer is None:
            continue
        with program.graph.inserting_before(node):
            _replace_vllm(program, node, layer, q, k, v, holder)
        count += 1
    program.graph.eliminate_dead_code()
    return count


# vLLM's op writes an output buffer that later nodes read through views: rewired by hand
PASS = FunctionPass("attention", fuse,
                    expect=lambda program: sum(layer.cache_planes == 2 for layer in program.attention) or None)
