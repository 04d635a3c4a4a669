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
    planes: int = 2  # K and V; 1 for a latent cache (multi-head latent attention: one row of D per token)

    def bytes_per_block(self) -> int:
        """The cache of every layer for one block of tokens."""
        return self.planes * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.size

    def cache_shape(self, num_blocks: int) -> tuple[int, ...]:
        """One layer's cache, K then V, head-major: [2, KVH, blocks, block_size, D] (runtime/kernels/paged.py);
        a latent cache [1, 1, blocks, block_size, D]."""
        return (self.planes, self.num_kv_heads, num_blocks, self.block_size, self.head_dim)


def prepare_weights(weights: dict[str, mx.array], table: dict[str, tuple[str, bool]]) -> dict[str, mx.array]:
    """The dict an emitted step reads (its WEIGHTS table: key -> (weight path, transposed)), made once
    from `weights` by path. Transposed ones are views that share the weights' memory; in the step's
    graph each would be a node, built and evaluated on every call. An empty table: `weights` as given."""
    if not table:
        return weights
    missing = sorted({path for path, _ in table.values() if path not in weights})
    if missing:
        raise KeyError(f"the lowered step reads {len(missing)} weight(s) that the weights given lack: "
                       f"{', '.join(missing)}. The weights must come from the model the step was lowered from "
                       "(lowering.api.mlx_weights / lower_cached); a stale cached artefact is rebuilt by deleting it.")
    out = {key: weights[path].T if transposed else weights[path] for key, (path, transposed) in table.items()}
    mx.eval(list(out.values()))
    return out


class LoweredModel:
    def __init__(self, step_fn, weights: dict[str, mx.array], layout: CacheLayout, num_blocks: int):
        """step_fn: lowering.compile.Step, called with `step_fn.prepare(weights)` (made here, once)."""
        self.step_fn = step_fn
        self.weights = weights
        self.step_weights = step_fn.prepare(weights)  # what step_fn reads
        self.layout = layout
        self.num_blocks = num_blocks
        shape = layout.cache_shape(num_blocks)
        self.kv = [mx.zeros(shape, layout.dtype) for _ in range(layout.num_layers)]
        mx.eval(self.kv)

    def step(self, batch: StepInput) -> mx.array:
        """Run one step; returns logits [R, vocab] for `batch.logits_indices` (evaluated)."""
        logits = self.step_lazy(batch)
        mx.eval(logits, self.kv)
        return logits

    def step_lazy(self, batch: StepInput, input_ids: mx.array | None = None) -> mx.array:
        """Record one step without waiting for it: returns lazy logits (the cache updates are lazy too,
        and are evaluated with them). `input_ids` (int32, [T]) replaces `batch.input_ids` when given,
        so a decode step can take the previous step's on-device argmax: the host builds step n+1
        while the device still runs step n (`mx.async_eval`), as mlx-lm's generate loop does."""
        logits, self.kv = self.step_fn(*self.step_args(batch, self.kv, input_ids))
        return logits

    def step_args(self, batch: StepInput, kv: list, input_ids: mx.array | None = None) -> tuple:
        """The arguments of the emitted step for `batch` over the caches `kv`: (weights, kv, device batch,
        input_ids, positions, logits_indices). The only place they are built, so anything that re-runs a
        step (the NaN guard's eager re-run) runs exactly what the compiled step ran."""
        host = {
            "batch": device_batch(attention_arrays(batch, self.layout.block_size), self.layout, self.num_blocks),
            "positions": batch.positions.astype(np.int32),
            "logits_indices": batch.logits_indices.astype(np.int32),
        }
        if input_ids is None:
            host["input_ids"] = batch.input_ids.astype(np.int32)
        arrays = to_mlx(host)  # one host-to-device array for all of them
        return (self.step_weights, kv, arrays["batch"], arrays.get("input_ids", input_ids), arrays["positions"],
                arrays["logits_indices"])


def device_batch(arrays: dict, layout: CacheLayout, num_blocks: int) -> dict:
    """Index arrays every layer's paged attention shares, made once per step on the host (numpy):
    `kv_rows` [planes * KVH * T], the cache rows ([planes * KVH * slots, D] view) of this step's K, then V,
    head-major; and per group `key_pos` [Lk] and `block_rows` [planes * KVH * S * n] (runtime/kernels/paged.py
    `_gather`). Inside the step each layer would otherwise build them again, as small arange kernels
    that cost more than the attention itself at decode on a GPU."""
    slots = arrays["slot_mapping"].astype(np.int64)
    planes = layout.planes * layout.num_kv_heads  # K heads, then V heads
    heads = np.arange(planes, dtype=np.int64)[:, None] * (num_blocks * layout.block_size)
    arrays["kv_rows"] = (heads + slots[None, :]).reshape(-1).astype(np.int32)
    block_heads = np.arange(planes, dtype=np.int64)[:, None, None] * num_blocks
    for group in (g for g in arrays["groups"] if "blocks" in g):  # fresh prompts read no cache
        group["key_pos"] = np.arange(group["blocks"].shape[1] * layout.block_size, dtype=np.int32)
        group["block_rows"] = (block_heads + group["blocks"][None]).reshape(-1).astype(np.int32)
    return arrays
