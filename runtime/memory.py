"""Memory accounting: how much the device has, what the weights take, how many KV blocks fit.

The numbers and formulas are documented in docs/memory.md; keep the two in step.
No torch here (the plugin asks for a plan before any step runs).
"""

from __future__ import annotations

import math
import resource
import sys
from dataclasses import asdict, dataclass

import mlx.core as mx

from runtime.config import ConfigError
from runtime.model import CacheLayout

MiB, GiB = 1 << 20, 1 << 30

# Activation headroom (measured on SmolLM2-135M f32, docs/memory.md): peak above weights + cache was
# ~76 KB/token for a 512-token prefill and ~134 KB/token at 2048 tokens, the rest being attention scores.
FIXED_HEADROOM = 128 * MiB  # compiled-graph buffers, allocator slack, logits rows, batch arrays
LIVE_TENSORS = 32  # hidden-sized f32 tensors alive per token within one layer (q/k/v, MLP, residual ...)
AUTO_SEQS = 32  # `auto` keeps room for this many max_model_len sequences (vLLM admits a request only
# when its blocks fit, so this bounds concurrency: 4 held a 32-request batch to ~14 running) ...
AUTO_KV_CAP = 0.25  # ... but never more KV cache than this fraction of device memory


class MemoryPlanError(ConfigError):
    """The requested memory budget cannot hold the model."""


def weights_bytes(weights: dict[str, mx.array]) -> int:
    return sum(int(w.nbytes) for w in weights.values())


def headroom_bytes(hidden_size: int, num_heads: int, max_model_len: int,
                   max_num_batched_tokens: int) -> int:
    """Transient memory of the largest step: one layer's live activations plus its attention scores.

    activations: tokens x hidden x LIVE_TENSORS x 4 bytes (MLX frees each layer's tensors as it goes);
    scores: tokens x heads x max_model_len x 4 (a full chunk attending to the longest context).
    """
    tokens = max_num_batched_tokens
    return FIXED_HEADROOM + tokens * hidden_size * LIVE_TENSORS * 4 + tokens * num_heads * max_model_len * 4


@dataclass(frozen=True)
class KVPlan:
    num_blocks: int
    bytes_per_block: int
    kv_bytes: int
    weights_bytes: int
    headroom_bytes: int
    device_bytes: int
    fraction: str | float
    budget_bytes: int  # weights + headroom + kv: what this plan expects the process to use on the device

    def as_dict(self) -> dict:
        return asdict(self)


def plan_kv_blocks(layout: CacheLayout, weights_bytes: int, fraction: str | float, device_bytes: int,
                   max_model_len: int, max_num_seqs: int = 256, *, hidden_size: int | None = None,
                   num_heads: int | None = None, max_num_batched_tokens: int = 2048) -> KVPlan:
    """Number of KV blocks for `fraction` ("auto" or 0 < f <= 1 of `device_bytes`).

    hidden_size / num_heads default to a GQA-4 guess from the cache layout when the caller lacks them.
    """
    bpb = layout.bytes_per_block()
    hidden = hidden_size or 4 * layout.num_kv_heads * layout.head_dim
    heads = num_heads or 4 * layout.num_kv_heads
    head = headroom_bytes(hidden, heads, max_model_len, max_num_batched_tokens)
    one_seq = math.ceil(max_model_len / layout.block_size)  # blocks for one full-length sequence
    needed = weights_bytes + head + one_seq * bpb

    if fraction == "auto":
        want = min(max_num_seqs, AUTO_SEQS) * one_seq
        cap = int(AUTO_KV_CAP * device_bytes) // bpb
        blocks = max(one_seq, min(want, cap))
        if weights_bytes + head + blocks * bpb > device_bytes:
            raise MemoryPlanError(
                f"VLLM_METAL_MEMORY_FRACTION=auto: the model needs {_fmt(needed)} (weights {_fmt(weights_bytes)}, "
                f"headroom {_fmt(head)}, one {max_model_len}-token sequence of KV cache) but the device has "
                f"{_fmt(device_bytes)}; lower max_model_len"
            )
    else:
        f = float(fraction)
        if not 0.0 < f <= 1.0:
            raise ConfigError(f"VLLM_METAL_MEMORY_FRACTION={fraction!r} is invalid; accepted: \"auto\" or 0 < f <= 1")
        blocks = (int(f * device_bytes) - weights_bytes - head) // bpb
        if blocks < one_seq:
            raise MemoryPlanError(
                f"VLLM_METAL_MEMORY_FRACTION={f:g} gives {_fmt(int(f * device_bytes))} of {_fmt(device_bytes)}, "
                f"but the model needs {needed} bytes ({_fmt(needed)}: weights {_fmt(weights_bytes)} + headroom "
                f"{_fmt(head)} + KV cache for one {max_model_len}-token sequence {_fmt(one_seq * bpb)}); "
                f"use at least {math.ceil(needed / device_bytes * 1000) / 1000:g} or \"auto\""
            )
    return KVPlan(blocks, bpb, blocks * bpb, weights_bytes, head, device_bytes, fraction,
                  weights_bytes + head + blocks * bpb)


def _fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def process_memory() -> dict[str, int]:
    """Current and peak resident set size of this process, in bytes (for reports)."""
    rss = peak = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:  # macOS: no /proc; ask ps (reports only, so a subprocess is fine)
        import subprocess

        out = subprocess.run(["ps", "-o", "rss=", "-p", str(os.getpid())], capture_output=True, text=True)
        rss = int(out.stdout.strip() or 0) * 1024
    # ru_maxrss is bytes on macOS, KiB on Linux
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"rss": rss or maxrss, "peak_rss": max(peak, maxrss)}
