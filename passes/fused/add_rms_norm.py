"""A residual add and the RMSNorm that reads it -> one `mlx.add_rms_norm` node (both results), run as
`h, normed = k.add_rms_norm(x, residual, weight, eps)`.

Every pre-norm decoder layer (Llama, Qwen, Mistral, ...) does `h = h + sublayer(h)`, then normalises h
for the next sublayer; the add's result is also the next residual, so it has other users and a
pattern (whose inner nodes must not escape) cannot take it. This pass rewrites the pair into one node
with two outputs, `getitem` 0 taking the add's users and 1 the norm's. On MLX's CUDA backend the
kernel table runs it as one kernel (runtime/kernels/cuda_norm.py): 2 of a Llama layer's ~14 decode kernels
become 1, and MLX pays several microseconds of host time per kernel there. Elsewhere it is the add and
`mx.fast.rms_norm`.

Only the plain case fuses: an add of two tensors of the norm's shape and dtype, and a norm whose weight
and output have that dtype too (mixed-dtype norms keep their separate nodes). It runs after the
fusions, on the `mlx.rms_norm` nodes the rms_norm pass made, so both front ends take it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from passes.fused import FusedOp, declare
from passes.fused.rms_norm import rms_norm
from passes.manager import FunctionPass
from passes.program import Program, value_of as _val

aten = torch.ops.aten
NAME = "add_rms_norm"


@torch.library.custom_op("mlx::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual) * weight): a residual add and the norm that reads it, all in x's dtype."""
    h = x + residual
    return h, rms_norm(h, weight, eps, h.dtype)


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


OP = declare(FusedOp(NAME, torch.ops.mlx.add_rms_norm.default, outputs=("add", "rms_norm")))


def candidates(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """(norm, add) pairs that fuse, in graph order; an add that two norms read fuses with the first."""
    found, taken = [], set()
    order = {n: i for i, n in enumerate(graph.nodes)}
    for norm in graph.nodes:
        if norm.target != torch.ops.mlx.rms_norm.default:
            continue
        add, weight, _eps, out_dtype = norm.args
        if add.op != "call_function" or add.target != aten.add.Tensor or add.kwargs or len(add.args) != 2:
            continue
        h, vals = _val(add), [_val(a) for a in add.args]
        if h is None or any(v is None or v.shape != h.shape or v.dtype != h.dtype for v in vals):
            continue  # a broadcast or a scalar: not a residual add
        w = _val(weight)
        if w is None or w.dtype != h.dtype or out_dtype != h.dtype or order[weight] > order[add] or add in taken:
            continue
        taken.add(add)
        found.append((norm, add))
    return found


def fuse(program: Program) -> int:
    graph = program.graph
    pairs = candidates(graph)
    for norm, add in pairs:
        x, residual = add.args
        with graph.inserting_before(add):  # where the add was: its other users all come later
            both = graph.call_function(torch.ops.mlx.add_rms_norm.default, (x, residual, norm.args[1], norm.args[2]))
            h = graph.call_function(operator.getitem, (both, 0))
            normed = graph.call_function(operator.getitem, (both, 1))
        both.meta.update(val=(_val(add), _val(norm)), nn_module_stack=norm.meta.get("nn_module_stack", {}),
                         stack_trace=norm.meta.get("stack_trace"), fused_from=NAME)
        h.meta.update({k: v for k, v in add.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        normed.meta.update({k: v for k, v in norm.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        norm.replace_all_uses_with(normed)
        graph.erase_node(norm)
        add.replace_all_uses_with(h)
        graph.erase_node(add)
    return len(pairs)


def _expected(program: Program) -> int:
    """Fused pairs plus pairs that could still fuse: a leftover shows as MISSED."""
    done = sum(1 for n in program.graph.nodes if n.target == torch.ops.mlx.add_rms_norm.default)
    return done + len(candidates(program.graph))


# the add escapes the match (it is the next residual), which a passes.pattern rewrite refuses: rewired by hand
PASS = FunctionPass(NAME, fuse, expect=_expected)
