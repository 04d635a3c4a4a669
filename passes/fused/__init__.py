"""Fused ops: each module here is the one home of an op that passes put into graphs.

A module defines the op's torch reference (a `torch.library.custom_op` in the `mlx` namespace, so a
rewritten graph still runs in torch and pass tests compare it with the original), the pass that
creates it (a `PatternPass` of declared patterns, or a `FunctionPass`), and declares it with
`declare(FusedOp(...))`. The lowering is one rule for every fused op (lowering/ops/fused.py): the
emitted step calls `k.<name>(...)` on the kernel table of the device it runs on, whose backends
(runtime/kernels: generic MLX, cpu, cuda, metal) each implement `<name>` or inherit the generic one.
docs/writing-a-kernel.md walks through adding one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FusedOp:
    """A fused op as the emitter sees it. Tensor arguments are passed positionally, the rest by name,
    in the op schema's order."""

    name: str  # the kernel-table entry the emitted step calls: k.<name>(...)
    op: torch._ops.OpOverload  # the torch reference, torch.ops.mlx.<name>.default
    outputs: tuple[str, ...] = ()  # a multi-output op's values, named like the ops they replace
    cache: bool = False  # reads and returns its layer's paged KV cache: `out, kv[i] = k.<name>(..., kv[i], batch, ...)`,
    #                      where its `layer` argument is i


FUSED: dict[str, FusedOp] = {}


def declare(fused: FusedOp) -> FusedOp:
    if FUSED.get(fused.name, fused) != fused:
        raise ValueError(f"fused op {fused.name} is declared twice")
    FUSED[fused.name] = fused
    return fused


def _declare_all() -> None:
    """Import every module of this package: each declares its op (a new op is a new module, nothing else here)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_declare_all()
