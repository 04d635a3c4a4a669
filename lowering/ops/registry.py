"""The op-lowering registry: one small function per torch/aten target, split by op family.

A lowering receives an `Emitter` (to render arguments as MLX source), the FX node, and the node's
args/kwargs; it returns one MLX expression. `register(*targets)` adds it for each target.
"""

from __future__ import annotations

from typing import Callable

LOWERINGS: dict = {}


def register(*targets) -> Callable:
    def deco(fn: Callable) -> Callable:
        for target in targets:
            if target in LOWERINGS:
                raise ValueError(f"{target} already has a lowering ({LOWERINGS[target].__name__})")
            LOWERINGS[target] = fn
        return fn

    return deco


def lowering_for(target):
    _load_families()
    return LOWERINGS.get(target)


def supported_targets() -> list[str]:
    _load_families()
    return sorted(str(t) for t in LOWERINGS)


def _load_families() -> None:
    from lowering.ops import activation, creation, data_movement, elementwise, fused, linear, reduction  # noqa: F401
