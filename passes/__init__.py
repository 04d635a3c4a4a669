"""FX -> FX rewrites declared as data (see passes.pattern), and the default pipeline.

This package never imports mlx: it rewrites torch graphs into graphs of fused `torch.ops.mlx.*` ops
(passes/fused: one module per op, with its torch reference and the pass that makes it).
"""

from passes.cleanup import cleanup as _cleanup
from passes.fused import FUSED, FusedOp
from passes.fused import (add_rms_norm, collectives, gelu_mul, paged_attention, quantized, rms_norm, rope,
                          rope_paged_attention, silu_mul)
from passes.inplace import PASS as functionalize
from passes.manager import FunctionPass, PassManager, PassResult, PatternPass
from passes.merge_projections import PASS as merge_projections
from passes.program import AttentionLayer, Program, run_in_torch
from passes.squeeze_batch import squeeze_batch as _squeeze_batch

cleanup = FunctionPass("cleanup", _cleanup)


def default_passes() -> list:
    """Order matters: in-place ops become values first (functionalize); cleanup next so patterns see canonical
    ops; vLLM's collectives become `mlx` ones; quantize next, so the linears and embeddings over quantized weights
    are quantized ops before any fusion reads them; attention before rope so the
    GQA/mask plumbing around HF attention is gone; vLLM's IR norms become `mlx.rms_norm` before the norm
    patterns run; merge_projections after the fusions (they match on the separate linears, then read slices
    of the merged one); add_rms_norm on the norms rms_norm made; a final cleanup folds what fusions left
    (the transposes between a rope and its attention), rope_attention folds those ropes into the attentions,
    and squeeze_batch, on the fused graph (whose few op kinds it knows), drops the Hugging Face front's unit
    batch axis."""
    return [functionalize, cleanup, collectives.PASS, quantized.PASS, paged_attention.PASS, rms_norm.IR_PASS,
            rms_norm.PASS, rope.PASS, silu_mul.PASS, gelu_mul.PASS, merge_projections, add_rms_norm.PASS,
            FunctionPass("final_cleanup", _cleanup), rope_paged_attention.PASS, FunctionPass("squeeze_batch", _squeeze_batch)]


def default_manager() -> PassManager:
    return PassManager(default_passes())


__all__ = ["AttentionLayer", "FUSED", "FunctionPass", "FusedOp", "PassManager", "PassResult", "PatternPass",
           "Program", "default_manager", "default_passes", "run_in_torch"]
