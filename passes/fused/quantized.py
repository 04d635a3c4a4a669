"""Linears and embeddings over quantized weights -> `mlx.quantized_linear` / `mlx.quantized_embedding`, run as
`k.quantized_linear(x, w["P.weight"], w["P.scales"], w["P.biases"], bits=4, group_size=64)` and
`k.quantized_embedding(...)` (MLX's quantized matmul, and a gather of quantized rows + dequantize).

Which weights are quantized is a property of the program (`Program.quantized`: weight path -> the weight in
MLX's affine format, see `Quantized`), set by whoever captures it from a quantized checkpoint or quantizes
one at load (lowering/quantize.py). This pass puts the format into the graph: every linear or embedding
that reads such a weight reads its packed codes, scales and biases instead; a weight with any other reader
stays in full precision. A tied LM head is the embedding's weight read by a linear: both go quantized.

MLX's affine format: `wq` holds the unsigned `bits`-bit codes q of `w[N, K]` row by row as one little-endian
bit stream in 32-bit words ([N, K * bits / 32], uint32 in MLX, int32 of the same bits in torch), `scales` and
`biases` are [N, K / group_size], and w[n, k] = scales[n, k // group_size] * q[n, k] + biases[n, k // group_size].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from passes.fused import FusedOp, declare
from passes.manager import FunctionPass
from passes.pattern import record
from passes.program import Program, value_of

aten = torch.ops.aten


@dataclass(frozen=True)
class Quantized:
    """A weight in MLX's affine format, as torch tensors (see the module docstring)."""

    wq: torch.Tensor  # int32 [N, K * bits / 32]: MLX's uint32 words, the same bits
    scales: torch.Tensor  # [N, K / group_size]
    biases: torch.Tensor
    bits: int
    group_size: int


def dequantize(wq: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """w [N, K] in float32 from the affine triple (codes of 2, 4 or 8 bits: whole codes in every word)."""
    if 32 % bits:
        raise NotImplementedError(f"the torch reference unpacks 2-, 4- and 8-bit codes, not {bits}-bit")
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = wq.to(torch.int64) & 0xFFFFFFFF
    codes = ((words[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2).float()  # [N, K]
    groups = codes.unflatten(-1, (-1, group_size))
    return (groups * scales.float()[..., None] + biases.float()[..., None]).flatten(-2)


@torch.library.custom_op("mlx::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, wq: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor,
                     bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """x @ w.T (+ bias) for w given in MLX's affine format, accumulated in float32, returned in x's dtype."""
    out = x.float() @ dequantize(wq, scales, biases, bits, group_size).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@quantized_linear.register_fake
def _(x, wq, scales, biases, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


@torch.library.custom_op("mlx::quantized_embedding", mutates_args=())
def quantized_embedding(wq: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, indices: torch.Tensor,
                        bits: int, group_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The rows `indices` of w, given in MLX's affine format, dequantized to `out_dtype`."""
    rows = dequantize(wq[indices.flatten()], scales[indices.flatten()], biases[indices.flatten()], bits, group_size)
    return rows.reshape(*indices.shape, -1).to(out_dtype)


@quantized_embedding.register_fake
def _(wq, scales, biases, indices, bits, group_size, out_dtype):
    return wq.new_empty((*indices.shape, wq.shape[-1] * 32 // bits), dtype=out_dtype)


LINEAR = declare(FusedOp("quantized_linear", torch.ops.mlx.quantized_linear.default))
EMBEDDING = declare(FusedOp("quantized_embedding", torch.ops.mlx.quantized_embedding.default))


def _users_convertible(weight: fx.Node) -> bool:
    """Every reader of the weight is a linear reading it as its weight or an embedding reading it as its table."""
    return all((u.target == aten.linear.default and u.args[1] is weight and weight not in u.args[2:] and
                weight not in (u.args[0],)) or (u.target == aten.embedding.default and u.args[0] is weight)
               for u in weight.users)


def quantizable(program: Program, group_size: int) -> list[str]:
    """Paths of the full-precision weights only linears and embeddings read, whose input size is a multiple
    of the group (what on-the-fly quantization takes; norms, biases and convolutions stay as they are)."""
    found = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in program.weights or not node.users:
            continue
        value = program.weights[node.name]
        if not value.is_floating_point() or value.dim() != 2 or value.shape[1] % group_size:
            continue
        if _users_convertible(node):
            found.append(program.weight_paths[node.name])
    return found


def placeholders(program: Program, bits: int, group_size: int) -> dict[str, Quantized]:
    """Shape-correct uninitialised triples for every quantizable weight: what lowering needs of a quantized
    model when the values come later (a benchmark quantizes random weights on its device)."""
    out = {}
    by_path = {program.weight_paths[n]: t for n, t in program.weights.items()}
    for path in quantizable(program, group_size):
        n, k = by_path[path].shape
        groups = torch.empty((n, k // group_size), dtype=by_path[path].dtype)
        out[path] = Quantized(torch.empty((n, k * bits // 32), dtype=torch.int32), groups, torch.empty_like(groups),
                              bits, group_size)
    return out


def quantize(program: Program) -> int:
    """Rewrite the readers of every weight in `program.quantized`; returns how many nodes were rewritten."""
    graph, count = program.graph, 0
    for weight in [n for n in graph.nodes if n.op == "placeholder" and n.name in program.weights]:
        path = program.weight_paths[weight.name]
        q = program.quantized.get(path)
        if q is None or not weight.users or not _users_convertible(weight):
            continue
        base = path.removesuffix(".weight")  # the codes take the weight's own path, as MLX checkpoints name them
        wq, scales, biases = (program.add_weight(p, value, near=path) for p, value in
                              ((path, q.wq), (f"{base}.scales", q.scales), (f"{base}.biases", q.biases)))
        for user in list(weight.users):
            with graph.inserting_before(user):
                if user.target == aten.linear.default:
                    bias = user.args[2] if len(user.args) > 2 else None
                    new = record(graph, lambda x, a, s, b, c: torch.ops.mlx.quantized_linear.default(
                        x, a, s, b, c, q.bits, q.group_size), user.args[0], wq, scales, biases, bias)
                else:
                    dtype = value_of(user).dtype
                    new = record(graph, lambda a, s, b, i: torch.ops.mlx.quantized_embedding.default(
                        a, s, b, i, q.bits, q.group_size, dtype), wq, scales, biases, user.args[1])
            new.meta.update(nn_module_stack=user.meta.get("nn_module_stack", {}), stack_trace=user.meta.get("stack_trace"),
                            fused_from="quantize")
            user.replace_all_uses_with(new)
            graph.erase_node(user)
            count += 1
        graph.erase_node(weight)  # the full-precision weight is read by nothing now
        del program.weights[weight.name], program.weight_paths[weight.name]
    return count


def _expected(program: Program) -> int | None:
    """Readers of quantized weights; one left in full precision shows as MISSED."""
    if not program.quantized:
        return None
    done = sum(1 for n in program.graph.nodes if n.target in (torch.ops.mlx.quantized_linear.default,
                                                               torch.ops.mlx.quantized_embedding.default))
    left = sum(len(n.users) for n in program.graph.nodes  # full-precision weights still read
               if n.op == "placeholder" and program.weight_paths.get(n.name) in program.quantized
               and value_of(n) is not None and value_of(n).is_floating_point())
    return done + left


PASS = FunctionPass("quantize", quantize, expect=_expected)
