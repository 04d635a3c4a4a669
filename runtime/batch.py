"""A step's batch: vLLM's description (positions, query offsets, context lengths, block tables,
slot mapping) -> the arrays paged attention needs. Vectorised numpy, no loop over tokens or sequences.

Shapes are bucketed so that the compiled step sees few distinct shapes: queries and keys per sequence
are rounded up to a power of two up to 256, above that to sixteenths of their next power of two
(..., 256, 288, 320, ..., 512, 576, 640, ...). A new shape costs one retrace (the kernels are reused)
and padding wastes at most 1/8 of a long group's attention; whole powers of two would pad 513 keys to
1024, doubling the attention of decodes just past a power of two.
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


def bucket(n: int, multiple: int = 1) -> int:
    """P, the next power of two >= max(n, multiple), if P <= 256; else n rounded up to a multiple of
    max(P / 16, multiple)."""
    return int(_buckets(np.array([n]), multiple)[0])


def attention_arrays(step: StepInput, block_size: int) -> dict:
    """{"slot_mapping", "out_index", "groups": [{"q_index", "q_pos", "blocks"}, ...]}.

    Sequences are attended in groups - the decodes (one query each), then the rest (prefills, chunks)
    split by padded shape (Lq, Lk buckets) - so a long prefill chunk pads neither the decodes nor the
    short prompts of the same step to its length (a group costs S_g * Lq_g * Lk_g).
    Queries of a group are laid out [S_g, Lq_g]; `out_index` maps each token back from the groups'
    padded rows, concatenated in group order.
    """
    qsl = step.query_start_loc.astype(np.int64)
    q_lens = np.diff(qsl)
    decode = q_lens == 1
    groups, base = [], 0
    row_of_seq = np.zeros(len(q_lens), np.int64)  # first padded output row of each sequence
    for members in (np.flatnonzero(decode), *_by_padded_shape(step, block_size, q_lens, np.flatnonzero(~decode))):
        if len(members) == 0:
            continue
        group, lq = _group_arrays(step, block_size, qsl, q_lens, members)
        groups.append(group)
        row_of_seq[members] = base + np.arange(len(members)) * lq
        base += len(members) * lq
    seq_of_token = np.repeat(np.arange(len(q_lens)), q_lens)
    out_index = row_of_seq[seq_of_token] + np.arange(len(step.input_ids)) - qsl[seq_of_token]
    return {"slot_mapping": step.slot_mapping.astype(np.int32), "out_index": out_index.astype(np.int32),
            "groups": groups}


_WHOLE_POWERS_UP_TO = 256  # below this, sixteenths would be a new shape (a retrace) every block or two of decode


def _powers(n: np.ndarray) -> np.ndarray:
    """Next power of two >= each entry (exact: frexp's exponent of n - 1 is its bit length)."""
    return np.left_shift(1, np.frexp(np.maximum(n.astype(np.int64), 1) - 1)[1].astype(np.int64))


def _buckets(n: np.ndarray, multiple: int = 1) -> np.ndarray:
    """`bucket` of each entry."""
    n = np.maximum(n.astype(np.int64), multiple)
    power = _powers(n)
    step = np.where(power <= _WHOLE_POWERS_UP_TO, power, np.maximum(power // 16, multiple))
    return -(-n // step) * step


def _by_padded_shape(step: StepInput, block_size: int, q_lens, members) -> list[np.ndarray]:
    """`members` split by the powers of two above their (Lq, Lk), in increasing order. With prompts of
    1..1000 tokens in one step, one group padded 13 sequences to 1024 x 1024 (minutes a step on 2 CPU
    cores). Not by the finer buckets: every group costs its own attention ops in every layer."""
    if len(members) == 0:
        return []
    key = _powers(q_lens[members]) * (1 << 32) + _powers(np.maximum(step.seq_lens[members], block_size)) * 2
    key += step.seq_lens[members] == q_lens[members]  # fresh prompts (no earlier context) apart: no gather
    return [members[key == k] for k in np.unique(key)]


def _group_arrays(step: StepInput, block_size: int, qsl, q_lens, members) -> tuple[dict, int]:
    """Arrays of one group, and its padded queries per sequence (Lq).

    Keys are named by whole blocks (`blocks` [S, Lk / block_size]): a block-table gather copies
    contiguous blocks, where a per-slot gather moves one head-row at a time (several times slower).
    Blocks past a sequence's length are block 0: their keys sit at positions no query can see.
    A group of prompts with no earlier context gets no `blocks`: it attends to its own new K/V.
    """
    lens = q_lens[members]
    lq = bucket(lens.max())
    lk = bucket(int(step.seq_lens[members].max()), block_size)  # a whole number of blocks
    i = np.arange(lq)
    valid = i[None, :] < lens[:, None]
    q_index = np.where(valid, qsl[members, None] + i[None, :], 0)
    q_pos = np.where(valid, step.positions[q_index], 0)
    group = {"q_index": q_index.astype(np.int32), "q_pos": q_pos.astype(np.int32)}
    if lq == 1 or np.any(step.seq_lens[members] != lens):
        j = np.arange(lk // block_size)
        table = step.block_table[members]
        used = -(-step.seq_lens[members] // block_size)  # blocks holding each sequence's context
        blocks = np.where(j[None, :] < used[:, None], table[:, np.minimum(j, table.shape[1] - 1)], 0)
        group["blocks"] = blocks.astype(np.int32)
    return group, lq


def to_mlx(arrays):
    """numpy arrays (in dicts and lists) -> MLX arrays, same structure. The int32 ones (every index array
    of a step: ~10) travel as one MLX array that they are views of: each array made from host memory is
    an allocation and a copy, on MLX's CUDA backend into managed memory (mlx-lm's decode step makes none)."""
    leaves = list(_leaves(arrays))
    ints = [a for a in leaves if a.dtype == np.int32]
    views = {}
    if len(ints) > 1:
        flat = mx.array(np.concatenate([a.ravel() for a in ints]))
        at = 0
        for a in ints:
            views[id(a)] = flat[at:at + a.size].reshape(a.shape)
            at += a.size
    return _rebuild(arrays, lambda a: views[id(a)] if id(a) in views else mx.array(a))


def _leaves(arrays):
    if isinstance(arrays, dict):
        for v in arrays.values():
            yield from _leaves(v)
    elif isinstance(arrays, list):
        for v in arrays:
            yield from _leaves(v)
    else:
        yield np.asarray(arrays)


def _rebuild(arrays, make):
    if isinstance(arrays, dict):
        return {k: _rebuild(v, make) for k, v in arrays.items()}
    if isinstance(arrays, list):
        return [_rebuild(v, make) for v in arrays]
    return make(arrays)
