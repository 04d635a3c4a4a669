"""SiLU-and-mul (the gated MLP of Llama, Qwen, Mistral...) -> one `mlx.silu_mul` node, run as `k.silu_mul`.

`silu(gate) * up` is two ATen ops and, emitted naively, three MLX ops; as one fused node it becomes one
kernel-table call, which mx.compile turns into a single kernel. vLLM's native SiluAndMul
(`silu(x[..., :d]) * x[..., d:]`) is the same pattern: `gate` and `up` simply bind to the two slices.
"""

import torch

from passes.fused import FusedOp, declare
from passes.manager import PatternPass
from passes.pattern import Pattern


@torch.library.custom_op("mlx::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the torch reference (a rewritten graph still runs in torch)."""
    return torch.nn.functional.silu(gate) * up


@silu_mul.register_fake
def _(gate, up):
    return torch.empty_like(torch.broadcast_tensors(gate, up)[0])


OP = declare(FusedOp("silu_mul", torch.ops.mlx.silu_mul.default))


def search(gate, up):
    return torch.nn.functional.silu(gate) * up


def replace(gate, up):
    return torch.ops.mlx.silu_mul.default(gate, up)


def _examples():
    return [(torch.randn(4, 8, dtype=dt), torch.randn(4, 8, dtype=dt))
            for dt in (torch.float32, torch.bfloat16, torch.float16)]


def _should_match(program) -> int:
    """Fused nodes plus any silu(.) * . that survived: a survivor makes the pass show as missed."""
    fused = left = 0
    for node in program.graph.nodes:
        if node.target == torch.ops.mlx.silu_mul.default:
            fused += 1
        elif node.target == torch.ops.aten.silu.default:
            left += sum(1 for u in node.users if u.target == torch.ops.aten.mul.Tensor)
    return fused + left


PASS = PatternPass("silu_mul", [Pattern(name="silu_mul", search=search, replace=replace, example_inputs=_examples)],
                   expect=_should_match)
