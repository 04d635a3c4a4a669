"""Sibling projections -> one linear: HF's q/k/v_proj (and gate/up_proj) become vLLM's qkv_proj (gate_up_proj).

Linears that read the same input node, each over its own weight placeholder (2-D, same dtype, same
in-features; biases on all of them or on none), become ONE linear over the weights concatenated along
the output dim, followed by one slice per original linear, which takes over its users. The
concatenated weight (and bias) is made once, here, at lowering time (`Program.add_derived`, which also
records the recipe so a cached artefact rebuilds it from the model's state instead of storing a copy);
the original weights are dropped, so weight memory is not doubled. A weight that anything else reads
(tied weights) keeps its linear out of the merge. At decode every linear is one GEMV kernel: a Llama
layer goes from 7 to 4 (q, k, v, gate, up -> qkv, gate_up).

It runs after the fusions (attention, rms_norm, rope, silu_mul matched on the separate linears; the
slices feed the fused nodes), so they match the same way on both front ends. vLLM's models already
have merged projections: nothing merges there.

Quantized linears (`mlx.quantized_linear`, after the quantize pass) merge the same way when they share the
format (bits, group size, dtypes, K): MLX's affine format holds each output row's codes, scales and biases
on their own, so concatenating the three along the rows is exact.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.fx as fx

from passes.cleanup import drop_unused_weights
from passes.fused.quantized import Quantized
from passes.pattern import record
from passes.program import Program

aten = torch.ops.aten
QUANTIZED_LINEAR = torch.ops.mlx.quantized_linear.default
NAME = "merge_projections"


def replace(x, weight, bias, bounds, dim):
    """The replacement, in torch ops: one linear, then the slice each original linear's users read."""
    y = aten.linear.default(x, weight) if bias is None else aten.linear.default(x, weight, bias)
    return tuple(aten.slice.Tensor(y, dim, lo, hi) for lo, hi in bounds)


def replace_quantized(x, wq, scales, biases, bias, bounds, dim, bits, group_size):
    """The same for a quantized linear: one over the concatenated codes, scales and biases."""
    y = QUANTIZED_LINEAR(x, wq, scales, biases, bias, bits, group_size)
    return tuple(aten.slice.Tensor(y, dim, lo, hi) for lo, hi in bounds)


def _own_weight(program: Program, node, dims: int) -> bool:
    """A weight placeholder of `dims` dims (static shape) that only this linear reads."""
    return (isinstance(node, fx.Node) and node.op == "placeholder" and node.name in program.weights
            and program.weights[node.name].dim() == dims and len(node.users) == 1)


def _key(program: Program, node: fx.Node):
    """What a linear must share with its siblings to merge (None: it never merges)."""
    if node.op != "call_function" or node.kwargs or node.target not in (aten.linear.default, QUANTIZED_LINEAR):
        return None
    if node.target == QUANTIZED_LINEAR:
        x, wq, scales, biases, b, bits, group_size = node.args
        if not all(_own_weight(program, t, 2) for t in (wq, scales, biases)) or (
                b is not None and not _own_weight(program, b, 1)):
            return None
        fmt = tuple((program.weights[t.name].dtype, program.weights[t.name].shape[1]) for t in (wq, scales, biases))
        return x, "affine", bits, group_size, fmt, None if b is None else program.weights[b.name].dtype
    x, w, b = (*node.args, None)[:3]
    if not _own_weight(program, w, 2) or (b is not None and not _own_weight(program, b, 1)):
        return None
    wt = program.weights[w.name]
    return x, wt.dtype, wt.shape[1], None if b is None else program.weights[b.name].dtype


def groups(program: Program) -> list[list[fx.Node]]:
    """Linears that would merge, in graph order (two or more per group)."""
    found = defaultdict(list)
    for node in program.graph.nodes:
        key = _key(program, node)
        if key is not None:
            found[key].append(node)
    return [g for g in found.values() if len(g) > 1]


def _joined(paths: list[str]) -> str:
    """model.l.0.q_proj.weight, model.l.0.k_proj.weight -> model.l.0.q_proj+k_proj.weight"""
    parts = [p.split(".") for p in paths]
    pre = 0
    while all(len(p) > pre + 1 and p[pre] == parts[0][pre] for p in parts):
        pre += 1
    post = 0
    while all(len(p) > pre + post + 1 and p[-1 - post] == parts[0][-1 - post] for p in parts):
        post += 1
    middle = "+".join(".".join(p[pre:len(p) - post]) for p in parts)
    return ".".join(parts[0][:pre] + [middle] + (parts[0][len(parts[0]) - post:] if post else []))


def _merged_weight(program: Program, nodes: list[fx.Node]) -> fx.Node:
    paths = [program.weight_paths[n.name] for n in nodes]
    value = torch.cat([program.weights[n.name] for n in nodes], dim=0)
    return program.add_derived(_joined(paths), value, paths, dim=0)


def _module_stack(linears: list[fx.Node]) -> dict:
    """The first linear's module stack, its innermost entry renamed to the merged module
    (`...self_attn.q_proj+k_proj+v_proj`): the emitted code names the product after it."""
    stacks = [n.meta.get("nn_module_stack") or {} for n in linears]
    if not all(stacks):
        return dict(stacks[0])
    stack = dict(stacks[0])
    key, (path, cls) = list(stack.items())[-1]
    stack[key] = (_joined([list(s.values())[-1][0] for s in stacks]), cls)
    return stack


def _merged_quantized(program: Program, group: list[fx.Node]) -> list[fx.Node]:
    """The merged codes, scales and biases; the merged weight joins `program.quantized` like any other."""
    merged = [_merged_weight(program, [n.args[i] for n in group]) for i in (1, 2, 3)]
    bits, group_size = group[0].args[5:7]
    path = program.weight_paths[merged[0].name]
    program.quantized[path] = Quantized(*(program.weights[n.name] for n in merged), bits, group_size)
    return merged


def merge(program: Program) -> int:
    graph = program.graph
    merged = 0
    for group in groups(program):
        quantized = group[0].target == QUANTIZED_LINEAR
        x = group[0].args[0]
        weights = [n.args[1] for n in group]
        biases = [n.args[4] if quantized else n.args[2] if len(n.args) > 2 else None for n in group]
        b = None if biases[0] is None else _merged_weight(program, biases)
        bounds, lo = [], 0
        for n in weights:
            bounds.append((lo, lo + program.weights[n.name].shape[0]))
            lo = bounds[-1][1]
        dim = group[0].meta["val"].dim() - 1
        with graph.inserting_before(group[0]):
            if quantized:
                slices = record(graph, replace_quantized, x, *_merged_quantized(program, group), b, bounds, dim,
                                *group[0].args[5:7])
            else:
                slices = record(graph, replace, x, _merged_weight(program, weights), b, bounds, dim)
        product = slices[0].args[0]
        product.meta.update(nn_module_stack=_module_stack(group), stack_trace=group[0].meta.get("stack_trace"),
                            fused_from=NAME)
        for n in weights if quantized else ():  # read by nothing now: no longer the program's quantized weights
            program.quantized.pop(program.weight_paths[n.name], None)
        for old, new in zip(group, slices):
            new.meta.update(nn_module_stack=old.meta.get("nn_module_stack", {}), stack_trace=old.meta.get("stack_trace"))
            old.replace_all_uses_with(new)
            graph.erase_node(old)
        merged += 1
    drop_unused_weights(program)  # the originals: nothing reads them now
    return merged


def _expected(program: Program) -> int:
    """Merged linears plus groups that could still merge: a leftover group shows as MISSED."""
    done = sum(1 for n in program.graph.nodes if n.meta.get("fused_from") == NAME)
    return done + len(groups(program))


class MergeProjections:
    """Declared like the other passes (name, version, run, expected); the match is a group of
    sibling nodes rather than one pattern tree, so it groups instead of calling `passes.pattern.rewrite`."""

    name = NAME
    version = 2

    def run(self, program: Program) -> int:
        return merge(program)

    def expected(self, program: Program) -> int | None:
        return _expected(program)


PASS = MergeProjections()
