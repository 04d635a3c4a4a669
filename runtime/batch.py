"""A step's batch: vLLM's description (positions, query offsets, context lengths, block tables,
slot mapping) -> the arrays paged attention needs. Vectorised numpy, no loop over tokens or sequences.

Shapes are bucketed (queries per sequence and keys per sequence to powers of two) so that the
compiled step sees few distinct shapes and MLX's compile cache stays small.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass
class StepInput:
    """One step in vLLM's terms: tokens of S sequences laid end to end."""

    input_ids: np.ndarray  # [T] token ids
    positions: np.ndarray  # [T] position of each token in its sequence
    query_start_loc: np.ndarray  # [S + 1] offsets of each sequence's tokens in input_ids
    seq_lens: np.ndarray  # [S] context length of each sequence after this step
    block_table: np.ndarray  # [S, max_blocks] cache block ids of each sequence
    slot_mapping: np.ndarray  # [T] flat cache slot (block * block_size + offset) of each new token
    logits_indices: np.ndarray  # [R] which tokens need logits (usually each sequence's last)

    def __post_init__(self):
        t = len(self.input_ids)
        if len(self.positions) != t or len(self.slot_mapping) != t:
            raise ValueError(f"input_ids, positions and slot_mapping must have one entry per token ({t})")
        if len(self.query_start_loc) != len(self.seq_lens) + 1 or self.query_start_loc[-1] != t:
            raise ValueError("query_start_loc must have S + 1 entries ending at the token count")


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= max(n, minimum)."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def attention_arrays(step: StepInput, block_size: int) -> dict[str, np.ndarray]:
    qsl = step.query_start_loc.astype(np.int64)
    q_lens = np.diff(qsl)
    num_seqs, num_tokens = len(q_lens), len(step.input_ids)
    lq = bucket(q_lens.max())
    lk = bucket(int(step.seq_lens.max()), block_size)

    i = np.arange(lq)
    valid = i[None, :] < q_lens[:, None]
    q_index = np.where(valid, qsl[:-1, None] + i[None, :], 0)
    q_pos = np.where(valid, step.positions[q_index], 0)

    seq_of_token = np.repeat(np.arange(num_seqs), q_lens)
    out_index = seq_of_token * lq + (np.arange(num_tokens) - qsl[seq_of_token])

    j = np.arange(lk)
    block_col = np.minimum(j // block_size, step.block_table.shape[1] - 1)
    blocks = step.block_table[:, block_col].astype(np.int64)
    kv_slots = np.where(j[None, :] < step.seq_lens[:, None], blocks * block_size + j % block_size, 0)
    return {
        "slot_mapping": step.slot_mapping.astype(np.int32),
        "q_index": q_index.astype(np.int32),
        "q_pos": q_pos.astype(np.int32),
        "out_index": out_index.astype(np.int32),
        "kv_slots": kv_slots.astype(np.int32),
    }


def to_mlx(arrays: dict[str, np.ndarray]) -> dict[str, mx.array]:
    return {k: mx.array(v) for k, v in arrays.items()}
