"""The kernel table of MLX's Metal backend (Apple silicon): the generic table, MLX's own Metal kernels.

Kernels of our own for Metal (`mx.fast.metal_kernel`) come here once a Mac can test them; until then every
entry is the generic one, which MLX runs with its Metal kernels.
"""

from __future__ import annotations

from runtime.kernels.generic import Generic


class Metal(Generic):
    name = "metal"
