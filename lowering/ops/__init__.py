from lowering.ops.registry import lowering_for, register, supported_targets

__all__ = ["lowering_for", "register", "supported_targets"]
