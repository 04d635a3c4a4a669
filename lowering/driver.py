"""A minimal batch driver over `LoweredModel` without vLLM: block allocation, chunked prefill, decode.

vLLM's scheduler does this job when serving; this driver lets tests, the CLI and benchmarks run
the runtime directly with the same StepInput vLLM produces (and share prefix blocks explicitly).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from runtime.batch import StepInput
from runtime.model import LoweredModel


@dataclass
class Sequence:
    tokens: list[int]  # prompt + generated
    blocks: list[int] = field(default_factory=list)
    computed: int = 0  # tokens whose K/V are in the cache


class Driver:
    def __init__(self, model: LoweredModel):
        self.model = model
        self.block_size = model.layout.block_size
        self.free = list(range(model.num_blocks - 1, -1, -1))
        self.seqs: dict[int, Sequence] = {}
        self.ref = np.zeros(model.num_blocks, np.int64)  # sequences using each block
        self.blocks_written = 0

    def add(self, seq_id: int, prompt: list[int], share_from: int | None = None, shared_tokens: int = 0) -> None:
        """Start a sequence; optionally reuse the first `shared_tokens` (whole blocks) of another's cache."""
        seq = Sequence(list(prompt))
        if share_from is not None:
            if shared_tokens % self.block_size:
                raise ValueError("shared_tokens must be a multiple of the block size")
            donor = self.seqs[share_from]
            seq.blocks = donor.blocks[: shared_tokens // self.block_size]
            self.ref[seq.blocks] += 1
            seq.computed = shared_tokens
        self.seqs[seq_id] = seq

    def release(self, seq_id: int) -> None:
        seq = self.seqs.pop(seq_id)
        self.ref[seq.blocks] -= 1
        self.free.extend(b for b in seq.blocks if self.ref[b] == 0)

    def _ensure_blocks(self, seq: Sequence, length: int) -> None:
        """Blocks for `length` tokens, all at once (a long prompt needs hundreds), or none and an error."""
        need = -(-length // self.block_size) - len(seq.blocks)
        if need <= 0:
            return
        if need > len(self.free):
            raise MemoryError(f"KV cache is full: {need} more blocks needed, {len(self.free)} free")
        new = [self.free.pop() for _ in range(need)]
        self.ref[new] += 1
        seq.blocks.extend(new)
        self.blocks_written += need

    def step(self, work: dict[int, int]) -> dict[int, mx.array]:
        """Feed `work[seq_id]` more tokens of each sequence; returns logits of each one's last token."""
        logits = self.model.step(self.prepare(work))
        return {seq_id: logits[i] for i, seq_id in enumerate(work)}

    def prepare(self, work: dict[int, int]) -> StepInput:
        """The StepInput that feeds `work[seq_id]` more tokens of each sequence (allocating their
        blocks and marking them computed); `LoweredModel.step` runs it. Logits rows follow `work`'s order."""
        ids, pos, slots, qsl, lens, tables = [], [], [], [0], [], []
        for seq_id, n in work.items():
            seq = self.seqs[seq_id]
            start, end = seq.computed, seq.computed + n
            if end > len(seq.tokens):
                raise ValueError(f"sequence {seq_id} has only {len(seq.tokens)} tokens")
            self._ensure_blocks(seq, end)
            p = np.arange(start, end)
            blocks = np.array(seq.blocks)
            ids.append(np.array(seq.tokens[start:end]))
            pos.append(p)
            slots.append(blocks[p // self.block_size] * self.block_size + p % self.block_size)
            qsl.append(qsl[-1] + n)
            lens.append(end)
            tables.append(seq.blocks)
            seq.computed = end
        width = max(len(t) for t in tables)
        return StepInput(
            input_ids=np.concatenate(ids), positions=np.concatenate(pos), query_start_loc=np.array(qsl),
            seq_lens=np.array(lens), block_table=np.array([t + [0] * (width - len(t)) for t in tables]),
            slot_mapping=np.concatenate(slots), logits_indices=np.array(qsl[1:]) - 1,
        )

    def generate(self, prompts: dict[int, list[int]], max_new: int, chunk: int | None = None) -> dict[int, list[int]]:
        """Greedy generation of all prompts batched together; prefill in chunks of `chunk` tokens."""
        for seq_id, prompt in prompts.items():
            self.add(seq_id, prompt)
        out = {seq_id: [] for seq_id in prompts}
        while any(len(v) < max_new for v in out.values()):
            work = {}
            for seq_id, seq in self.seqs.items():
                if seq_id in out and len(out[seq_id]) < max_new:
                    left = len(seq.tokens) - seq.computed
                    work[seq_id] = min(left, chunk) if chunk else left
            logits = self.step(work)
            for seq_id, row in logits.items():
                seq = self.seqs[seq_id]
                if seq.computed == len(seq.tokens):  # prompt fully in: this row predicts a new token
                    token = int(mx.argmax(row).item())
                    seq.tokens.append(token)
                    out[seq_id].append(token)
        for seq_id in prompts:
            self.release(seq_id)
        return out
