"""FX -> FX rewrites declared as data (see passes.pattern), and the default pipeline.

This package never imports mlx: it rewrites torch graphs into graphs of fused `torch.ops.mlx.*` ops.
"""

from passes import ops  # noqa: F401  (registers torch.ops.mlx.*)
from passes.add_rms_norm import PASS as add_rms_norm
from passes.attention import PASS as attention
from passes.cleanup import cleanup as _cleanup
from passes.manager import FunctionPass, PassManager, PassResult, PatternPass
from passes.merge_projections import PASS as merge_projections
from passes.program import AttentionLayer, Program, run_in_torch
from passes.rms_norm import PASS as rms_norm
from passes.rope import PASS as rope
from passes.rope_attention import PASS as rope_attention
from passes.silu_mul import PASS as silu_mul
from passes.squeeze_batch import squeeze_batch as _squeeze_batch

cleanup = FunctionPass("cleanup", _cleanup)


def default_passes() -> list:
    """Order matters: cleanup first so patterns see canonical ops; attention before rope so the
    GQA/mask plumbing around HF attention is gone; merge_projections after the fusions (they match
    on the separate linears, then read slices of the merged one); add_rms_norm on the norms rms_norm
    made; a final cleanup folds what fusions left (the transposes between a rope and its attention),
    rope_attention folds those ropes into the attentions, and squeeze_batch, on the fused graph (whose
    few op kinds it knows), drops the Hugging Face front's unit batch axis."""
    return [cleanup, attention, rms_norm, rope, silu_mul, merge_projections, add_rms_norm,
            FunctionPass("final_cleanup", _cleanup), rope_attention, FunctionPass("squeeze_batch", _squeeze_batch)]


def default_manager() -> PassManager:
    return PassManager(default_passes())


__all__ = ["AttentionLayer", "PassManager", "PassResult", "PatternPass", "FunctionPass", "Program",
           "default_manager", "default_passes", "run_in_torch"]
