"""RMSNorm -> `mlx.rms_norm` (mx.fast.rms_norm): the decomposed form in every dtype mix, any eps.

Covers the residual-add form too: `add` then norm leaves the add in place and fuses the norm;
a (1 + weight) scale (Gemma) is just another weight expression, folded by cleanup.
"""

import torch

from passes.manager import PatternPass
from passes.pattern import Pattern

_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
           (torch.float32, torch.bfloat16), (torch.float32, torch.float16)]  # (x, weight)


def search(x, weight, eps):
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(weight.dtype) * weight


def replace(x, weight, eps, out_dtype):
    return torch.ops.mlx.rms_norm.default(x, weight, eps, out_dtype)


rms_norm = Pattern(
    name="rms_norm",
    search=search,
    replace=replace,
    example_inputs=lambda: [(torch.randn(4, 8, dtype=xd), torch.randn(8, dtype=wd)) for xd, wd in _DTYPES],
    scalars={"eps": float},
    derive=lambda m, program: {"out_dtype": m.anchor.meta["val"].dtype},
)

PASS = PatternPass("rms_norm", [rms_norm], expect=lambda p: p.meta.get("expected_norms"))
