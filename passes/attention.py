"""Attention (+ KV-cache write) -> one `mlx.paged_attention` node per layer.

Two spellings of attention reach us:
- vLLM: the opaque `vllm.unified_attention_with_output(q, k, v, output, layer_name)` op, which writes
  the cache and attends in one call (functionalised by export into `auto_functionalized_v2`);
- Hugging Face: `aten.scaled_dot_product_attention(q, repeat_kv(k), repeat_kv(v), mask)` over one
  dense sequence; the GQA repeat and the mask become dead once the node is replaced.
Both become `mlx.paged_attention(q [T, H*D], k [T, KVH*D], v, layer, ...)`, which the runtime runs
over the paged cache for any mix of prefill and decode sequences.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from passes.pattern import record
from passes.program import AttentionLayer, Program

aten = torch.ops.aten


def _strip_repeat_kv(node: fx.Node) -> fx.Node:
    """repeat_kv(x) = reshape(expand(unsqueeze(x, 2))) -> x."""
    if node.target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        inner = node.args[0]
        if inner.target == aten.expand.default and inner.args[0].target == aten.unsqueeze.default:
            if inner.args[0].args[1] == 2:
                return inner.args[0].args[0]
    return node


def _paged(layer: AttentionLayer, scale: float):
    def call(q, k, v):
        return torch.ops.mlx.paged_attention.default(
            q, k, v, layer.index, layer.num_heads, layer.num_kv_heads, layer.head_dim,
            scale, layer.sliding_window, layer.logit_cap,
        )

    return call


def _replace_hf_sdpa(program: Program, node: fx.Node, layer: AttentionLayer) -> fx.Node:
    q, k, v = node.args[:3]
    k, v = _strip_repeat_kv(k), _strip_repeat_kv(v)
    scale = node.kwargs.get("scale") or layer.scale
    h, kvh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim

    def replace(q, k, v):
        tokens_first = lambda x, heads: aten.reshape.default(aten.transpose.int(x, 1, 2), [-1, heads * d])  # noqa
        out = _paged(layer, scale)(tokens_first(q, h), tokens_first(k, kvh), tokens_first(v, kvh))
        return aten.transpose.int(aten.reshape.default(out, [1, -1, h, d]), 1, 2)

    return record(program.graph, replace, q, k, v)


def _vllm_attention(node: fx.Node):
    """(q, k, v, output buffer, layer name) of a vLLM unified attention call, or None."""
    target = node.target
    if target is torch.ops.higher_order.auto_functionalized_v2 or target is torch.ops.higher_order.auto_functionalized:
        op, kw = node.args[0], node.kwargs
        if "unified_attention_with_output" in str(op):
            return kw["query"], kw["key"], kw["value"], node, kw["layer_name"]
    if "unified_attention_with_output" in str(target):
        q, k, v, out, name = node.args[:5]
        return q, k, v, out, name
    return None


def _replace_vllm(program: Program, node: fx.Node, layer: AttentionLayer, q, k, v, holder) -> None:
    def flat(x):
        return aten.reshape.default(x, [-1, x.node.meta["val"].shape[-1] if x.node.meta["val"].dim() == 2
                                        else x.node.meta["val"].shape[-2] * x.node.meta["val"].shape[-1]])

    new = record(program.graph, lambda q, k, v: _paged(layer, layer.scale)(flat(q), flat(k), flat(v)), q, k, v)
    if holder is node:  # functionalised: users read getitem(node, i) -> the written output buffer
        for user in list(node.users):
            if user.target is operator.getitem and user.args[1] != 0:
                buf = user
                out_shape = list(buf.meta["val"].shape)
                with program.graph.inserting_after(new):
                    shaped = record(program.graph, lambda o: aten.reshape.default(o, out_shape), new)
                buf.replace_all_uses_with(shaped)
    else:  # in-place form: later reads of the output buffer read the attention result
        out_shape = list(holder.meta["val"].shape)
        with program.graph.inserting_after(new):
            shaped = record(program.graph, lambda o: aten.reshape.default(o, out_shape), new)
        holder.replace_all_uses_with(shaped, delete_user_cb=lambda user: user is not node)
    program.graph.erase_node(node) if not node.users else None


class AttentionPass:
    name = "attention"
    version = 1

    def run(self, program: Program) -> int:
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
            layer = layers.get(name)
            if layer is None:
                continue
            with program.graph.inserting_before(node):
                _replace_vllm(program, node, layer, q, k, v, holder)
            count += 1
        program.graph.eliminate_dead_code()
        return count

    def expected(self, program: Program) -> int | None:
        return len(program.attention) or None


PASS = AttentionPass()
