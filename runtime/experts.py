"""Expert (mixture-of-experts) matmuls for the emitted step: `gather_mm`, one matmul per row with
that row's expert's weight, never a loop over tokens or experts.

MLX's CPU backend implements `mx.gather_mm` for float32 only (0.32: "[GatherMM::eval] Currently only
supports float32"); there, other dtypes multiply in float32 and round back, as a float32-accumulating
kernel would. Metal and CUDA take every dtype natively.
"""

from __future__ import annotations

import mlx.core as mx


def gather_mm(x: mx.array, weight: mx.array, rhs_indices: mx.array, sorted_indices: bool = False) -> mx.array:
    """x [S, 1, in] @ weight[rhs_indices[s]] ([E, in, out]) -> [S, 1, out]."""
    if x.dtype == mx.float32 or mx.default_device() != mx.cpu:
        return mx.gather_mm(x, weight, rhs_indices=rhs_indices, sorted_indices=sorted_indices)
    out = mx.gather_mm(x.astype(mx.float32), weight.astype(mx.float32), rhs_indices=rhs_indices,
                       sorted_indices=sorted_indices)
    return out.astype(x.dtype)
