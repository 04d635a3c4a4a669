"""Op lowerings: one small function per torch/aten target, registered in the module of its op family."""

from lowering.ops.registry import lowering_for, register, supported_targets
from lowering.ops import creation, data_movement, elementwise, fused, linear, reduction, sorting  # noqa: E402,F401

__all__ = ["lowering_for", "register", "supported_targets"]
