"""GELU-and-mul (the gated MLP of Gemma: `gelu_tanh(gate) * up`, and GeGLU's `gelu(gate) * up`) -> one
`mlx.gelu_mul` node, run as `k.gelu_mul`. docs/writing-a-kernel.md builds this op step by step.
"""

import torch

from passes.fused import FusedOp, declare
from passes.manager import PatternPass
from passes.pattern import Pattern

_APPROXIMATE = ("none", "tanh")


@torch.library.custom_op("mlx::gelu_mul", mutates_args=())
def gelu_mul(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu(gate) * up (`approximate`: "none" for the erf form, "tanh" for the tanh form): the torch reference."""
    return torch.nn.functional.gelu(gate, approximate=approximate) * up


@gelu_mul.register_fake
def _(gate, up, approximate):
    return torch.empty_like(torch.broadcast_tensors(gate, up)[0])


OP = declare(FusedOp("gelu_mul", torch.ops.mlx.gelu_mul.default))


def _pattern(approximate: str) -> Pattern:
    def search(gate, up):
        return torch.nn.functional.gelu(gate, approximate=approximate) * up

    def replace(gate, up):
        return torch.ops.mlx.gelu_mul.default(gate, up, approximate)

    examples = lambda: [(torch.randn(4, 8, dtype=dt), torch.randn(4, 8, dtype=dt))  # noqa: E731
                        for dt in (torch.float32, torch.bfloat16, torch.float16)]
    return Pattern(name=f"gelu_{approximate}_mul", search=search, replace=replace, example_inputs=examples)


PASS = PatternPass("gelu_mul", [_pattern(a) for a in _APPROXIMATE])
