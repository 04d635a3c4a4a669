"""`LoweredModel`: the compiled step, its MLX weights and the paged KV cache; `step(batch) -> logits`."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from runtime.batch import StepInput, attention_arrays, to_mlx


@dataclass(frozen=True)
class CacheLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: mx.Dtype

    def bytes_per_block(self) -> int:
        """K and V of every layer for one block of tokens."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.size

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """One layer's K (or V) cache: head-major, see runtime/attention.py."""
        return (self.num_kv_heads, num_blocks, self.block_size, self.head_dim)


class LoweredModel:
    def __init__(self, step_fn, weights: dict[str, mx.array], layout: CacheLayout, num_blocks: int):
        self.step_fn = step_fn
        self.weights = weights
        self.layout = layout
        self.num_blocks = num_blocks
        shape = layout.cache_shape(num_blocks)
        self.kv = [(mx.zeros(shape, layout.dtype), mx.zeros(shape, layout.dtype)) for _ in range(layout.num_layers)]
        mx.eval(self.kv)

    def step(self, batch: StepInput) -> mx.array:
        """Run one step; returns logits [R, vocab] for `batch.logits_indices` (evaluated)."""
        arrays = to_mlx(attention_arrays(batch, self.layout.block_size))
        logits, kv = self.step_fn(
            self.weights, self.kv, arrays,
            mx.array(batch.input_ids.astype(np.int32)),
            mx.array(batch.positions.astype(np.int32)),
            mx.array(batch.logits_indices.astype(np.int32)),
        )
        self.kv = kv
        mx.eval(logits, kv)
        return logits
