"""RoPE -> `mlx.rope` (mx.fast.rope with per-token position offsets).

Matches the rotation itself, `x * cos + rotate(x) * sin`, in its neox (rotate-half) and interleaved
(GPT-J) forms, wherever cos/sin come from. The frequencies are then read off the cos/sin values:
the subgraph producing them is a function of the positions alone, so it is evaluated at a few
positions and inv_freq (with any scaling: llama3, linear, YaRN's mscale) recovered exactly from the
angles. No per-model rope code, and every scaling variant is covered by the same pass.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from passes.manager import PatternPass
from passes.pattern import Match, Pattern
from passes.program import Program

_HALF = 99991  # the int sentinel of passes.pattern: example shapes are built so slices use it


def neox(x, cos, sin, half):
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def neox_split(x, cos, sin, half):  # vLLM's native form: rotate the halves separately, then concatenate
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def interleaved_split(x, cos, sin, half):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def _examples(rank: int, half_width: bool):
    d = 2 * _HALF
    x = torch.randn(*([1] * (rank - 1)), d)
    c = torch.randn(*([1] * (rank - 1)), _HALF if half_width else d)
    return (x, c, c.clone())


def _tabulate(program: Program, node: fx.Node, positions: torch.Tensor) -> torch.Tensor:
    """Evaluate `node` for the given positions; it must depend on the positions input alone."""
    needed, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    env = {}
    for n in program.graph.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            if n.name in program.weights:
                env[n] = program.weights[n.name]
            elif n.name == "positions":
                env[n] = positions
            else:
                raise ValueError(f"rope cos/sin depend on input {n.name}")
        else:
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
            env[n] = n.target(*args, **kwargs)
    return env[node]


def _frequencies(cos: torch.Tensor, sin: torch.Tensor, far: int) -> tuple[torch.Tensor, float] | None:
    """inv_freq and mscale from cos/sin rows at positions [0, 1, far] (last dim: one per frequency)."""
    c, s = cos.double(), sin.double()
    mscale = float(c[0].mean())
    if mscale <= 0 or not torch.allclose(c[0], torch.full_like(c[0], mscale), rtol=1e-4):
        return None
    rough = torch.atan2(s[1], c[1])  # < pi for every real rope frequency
    angle = torch.atan2(s[2], c[2])  # refine at a far position: error / far
    turns = torch.round((rough * far - angle) / (2 * math.pi))
    return ((angle + 2 * math.pi * turns) / far).float(), mscale


def _derive(style: str):
    def derive(m: Match, program: Program) -> dict | None:
        x, cos, sin = m.bindings["x"], m.bindings["cos"], m.bindings["sin"]
        x_val = x.meta["val"]
        half = int(x_val.shape[-1]) // 2  # the rotated dims of x, whichever spelling matched
        for far in (4096, 1024, 256, 64, 8):  # the farthest position the tables cover refines best
            try:
                positions = torch.tensor([0, 1, far])
                cos_t, sin_t = (_tabulate(program, n, positions).reshape(3, -1) for n in (cos, sin))
                break
            except (IndexError, RuntimeError):  # a table shorter than `far` rows
                continue
            except ValueError:  # cos/sin depend on more than the positions: not a rope we know
                return None
        else:
            return None
        width = cos_t.shape[-1]
        # Neox tables repeat the frequencies twice ([f, f]); interleaved ones hold them once.
        cos_t, sin_t = cos_t[:, :half], sin_t[:, :half]
        if width not in (half, 2 * half):
            return None
        found = _frequencies(cos_t, sin_t, far)
        if found is None:
            return None
        inv_freq, mscale = found
        head_dim = int(x_val.shape[-1])
        pos_node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "positions")
        return {"inv_freq": inv_freq, "positions": pos_node, "head_dim": head_dim,
                "traditional": style == "interleaved", "mscale": mscale}

    return derive


def _replace(x, cos, sin, inv_freq, positions, head_dim, traditional, mscale, half=None):
    """x is [..., T, heads?, D] in one of two layouts; bring tokens first, rope, restore."""
    aten = torch.ops.aten
    shape = x.node.meta["val"].shape
    if len(shape) == 4:  # HF: [1, heads, T, D]
        t = aten.reshape.default(aten.transpose.int(x, 1, 2), [-1, shape[1], head_dim])
        out = torch.ops.mlx.rope.default(t, positions, inv_freq, head_dim, traditional, mscale)
        return aten.transpose.int(aten.reshape.default(out, [1, -1, shape[1], head_dim]), 1, 2)
    return torch.ops.mlx.rope.default(x, positions, inv_freq, head_dim, traditional, mscale)


def _pattern(name, search, style, rank, half_width):
    return Pattern(
        name=f"rope_{name}_{rank}d",
        search=search,
        replace=_replace,
        example_inputs=lambda: [_examples(rank, half_width)],
        scalars={"half": int},
        derive=_derive(style),
    )


PATTERNS = [
    _pattern("neox", neox, "neox", 4, False),
    _pattern("neox", neox, "neox", 3, False),
    _pattern("neox_split", neox_split, "neox", 3, True),
    _pattern("interleaved", interleaved_split, "interleaved", 3, True),
]

PASS = PatternPass("rope", PATTERNS, expect=lambda p: p.meta.get("expected_ropes"))
