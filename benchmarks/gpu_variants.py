"""Ours with some of the CUDA backend's kernels off: the A/B sides of `gpu.py ab` and `gpu.py profile`.

A variant is a runtime configuration (`RuntimeConfig.kernels_off`, which VLLM_METAL_KERNELS_OFF sets for a
whole process) bound to its own kernel table and its own compiled step, so every variant runs in the same
process as ours, on the same weights.
"""

from __future__ import annotations

from dataclasses import replace

from lowering.compile import load_step
from runtime.config import RuntimeConfig
from runtime.kernels import select

# name -> the kernels it turns off (runtime/config.py KERNEL_SWITCHES), and what runs instead
VARIANTS = {
    # the generic attention: a gather of the cache's blocks and a masked SDPA
    "ours_composed": frozenset({"paged_decode", "decode_layer", "kv_in_place"}),
    # MLX's add and mx.fast.rms_norm instead of one kernel
    "ours_norm_off": frozenset({"add_rms_norm"}),
    # mx.fast.rope on q and k and MLX's concatenation for the cache rows, then a scatter
    "ours_rope_off": frozenset({"rope_rows", "kv_in_place", "decode_layer"}),
    # decode K/V written into the cache by a scatter of the RoPE kernel's rows
    "ours_kv_scatter": frozenset({"kv_in_place", "decode_layer"}),
    # a decode layer in two kernels: RoPE + K/V write, then the paged attention
    "ours_rope_apart": frozenset({"decode_layer"}),
    # the one-kernel decode layer at every batch size (no FUSED_MAX_BLOCKS limit)
    "ours_fused_always": frozenset({"decode_block_limit"}),
    # MLX's silu(gate) * up for one token instead of the row kernel
    "ours_silu_off": frozenset({"silu_row"}),
    # MLX's quantized matmul for every quantized linear, decode included
    "ours_qgemv_off": frozenset({"quantized_gemv"}),
}


def parse(names: str) -> list[str]:
    """Comma-separated variant names, checked."""
    out = [n for n in names.split(",") if n]
    unknown = [n for n in out if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    return out


def variant_step(source: str, name: str, config: RuntimeConfig, jit: bool = True):
    """The emitted `source` loaded against the kernel table of `config` with variant `name`'s kernels off too."""
    off = config.kernels_off | VARIANTS[name]
    return load_step(source, jit=jit, kernels=select(replace(config, kernels_off=off)))
