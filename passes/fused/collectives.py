"""vLLM's tensor-parallel collectives -> `mlx.all_reduce` / `mlx.all_gather` nodes, run as `k.all_reduce(x,
group=...)` and `k.all_gather(x, dim=..., group=..., world_size=...)` on the process's MLX group.

Under tensor parallelism each rank's model is vLLM's shard of it: column-parallel linears keep a slice of the
output features, row-parallel linears (attention's output projection, the MLP's down projection) and the
vocab-parallel embedding end in an all-reduce, and the logits processor all-gathers the vocabulary slices. On a
platform that asks for them (`use_custom_op_collectives`), vLLM calls these as its custom ops
`vllm.all_reduce(x, group_name)` and `vllm.all_gather(x, dim, world_size, group_name)`, which export keeps as
graph nodes. This pass renames them into the `mlx` namespace, keeping vLLM's group name ("tp:0"): the kernel
table looks up the MLX group registered under it (runtime/distributed.py).

The torch references call vLLM's own op, so a rewritten graph still runs in torch inside vLLM's process group.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.fused import FusedOp, declare
from passes.manager import FunctionPass
from passes.program import Program


@torch.library.custom_op("mlx::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """The sum of x over the ranks of vLLM's group `group`: vLLM's own op."""
    return torch.ops.vllm.all_reduce.default(x, group_name=group)


@all_reduce.register_fake
def _(x, group):
    return torch.empty_like(x)


@torch.library.custom_op("mlx::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, dim: int, group: str, world_size: int) -> torch.Tensor:
    """The ranks' x concatenated along `dim` in rank order: vLLM's own op."""
    return torch.ops.vllm.all_gather.default(x, dim, world_size, group_name=group)


@all_gather.register_fake
def _(x, dim, group, world_size):
    shape = list(x.shape)
    shape[dim] *= world_size
    return x.new_empty(shape)


ALL_REDUCE = declare(FusedOp("all_reduce", torch.ops.mlx.all_reduce.default))
ALL_GATHER = declare(FusedOp("all_gather", torch.ops.mlx.all_gather.default))
_VLLM = ("vllm.all_reduce.default", "vllm.all_gather.default")


def _argument(node: fx.Node, index: int, name: str):
    return node.args[index] if len(node.args) > index else node.kwargs[name]


def rename(program: Program) -> int:
    graph = program.graph
    count = 0
    for node in list(graph.nodes):
        target = str(node.target) if node.op == "call_function" else ""
        if target not in _VLLM:
            continue
        x = node.args[0]
        if target == "vllm.all_reduce.default":
            op, args = torch.ops.mlx.all_reduce.default, (x, _argument(node, 1, "group_name"))
        else:
            dim, size = _argument(node, 1, "dim"), _argument(node, 2, "world_size")
            op, args = torch.ops.mlx.all_gather.default, (x, dim, _argument(node, 3, "group_name"), size)
        with graph.inserting_before(node):
            new = graph.call_function(op, args)
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
        new.meta["fused_from"] = "collectives"
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count


def _expected(program: Program) -> int:
    """Renamed collectives plus vLLM ones left: a leftover shows as MISSED."""
    ours = (torch.ops.mlx.all_reduce.default, torch.ops.mlx.all_gather.default)
    return sum(1 for n in program.graph.nodes if n.target in ours or str(n.target) in _VLLM) or None


PASS = FunctionPass("collectives", rename, expect=_expected)
