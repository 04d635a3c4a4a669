"""RoPE -> `mlx.rope`, run as `k.rope` (mx.fast.rope with per-token position offsets, or the CPU's own).

Matches the rotation itself, `x * cos + rotate(x) * sin`, in its neox (rotate-half) and interleaved
(GPT-J) forms, wherever cos/sin come from. The frequencies are then read off the cos/sin values:
the subgraph producing them is a function of the positions alone, so it is evaluated at a few
positions and inv_freq (with any scaling: llama3, linear, YaRN's mscale) recovered exactly from the
angles. No per-model rope code, and every scaling variant is covered by the same pass.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx as fx

from passes.cleanup import CASTS
from passes.fused import FusedOp, declare
from passes.manager import PatternPass
from passes.pattern import Match, Pattern
from passes.program import Program, module_path

log = logging.getLogger(__name__)


@torch.library.custom_op("mlx::rope", mutates_args=())
def rope(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, head_dim: int, traditional: bool, mscale: float
) -> torch.Tensor:
    """Rotary embedding of x [T, heads * head_dim] (or [T, heads, head_dim]) at per-token positions.

    Rotates the first `2 * len(inv_freq)` dims of each head by position x inv_freq (in float32, as models
    compute it; cos/sin rounded to x's dtype); `traditional` pairs adjacent dims (GPT-J), otherwise the two
    halves (GPT-NeoX); `mscale` scales the rotated part (YaRN).
    """
    shape = x.shape
    xh = x.reshape(shape[0], -1, head_dim)
    rot = 2 * inv_freq.shape[0]
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    cos = (angles.cos() * mscale)[:, None, :].to(x.dtype)
    sin = (angles.sin() * mscale)[:, None, :].to(x.dtype)
    xr, xp = xh[..., :rot], xh[..., rot:]
    if traditional:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xr.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((out, xp), dim=-1).reshape(shape)


@rope.register_fake
def _(x, positions, inv_freq, head_dim, traditional, mscale):
    return torch.empty_like(x)


OP = declare(FusedOp("rope", torch.ops.mlx.rope.default))
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


# Positions the frequencies are refined at: from 1 (where every angle is below half a turn) outward, each
# step 8x farther, so the previous estimate's error times 8 stays far below half a turn when the whole
# turns are counted. Stops where the model's table ends (vLLM tabulates max_position_embeddings rows).
_LADDER = (1, 8, 64, 512, 4096, 32768)
_CHECKED = 1025  # every position below this is checked, and 512 more spread out to the farthest


class RopeNotRecovered(ValueError):
    """A rope's frequencies could not be read off its cos/sin to float32 precision: it is left unfused."""


def _subgraph(node: fx.Node) -> set[fx.Node]:
    needed, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(n.all_input_nodes)
    return needed


def _tabulate(program: Program, nodes: list[fx.Node], positions: torch.Tensor) -> list[torch.Tensor]:
    """Evaluate `nodes` (functions of the positions input alone) at `positions`, in the precision of the
    model's float32 sources: a weight the model holds rounded (vLLM's bf16 cos/sin cache) is read from its
    float32 original (`Program.float32_sources`), and casts to a narrower float type are skipped, so the
    tables come out as the model computed them before casting them to its activation dtype."""
    needed = set().union(*(_subgraph(n) for n in nodes))
    env = {}
    for n in program.graph.nodes:
        if n not in needed:
            continue
        if n.op == "placeholder":
            if n.name in program.weights:
                env[n] = program.float32_sources.get(program.weight_paths[n.name], program.weights[n.name])
            elif n.name == "positions":
                env[n] = positions
            else:
                raise RopeNotRecovered(f"its cos/sin depend on the input {n.name}, not on the positions alone")
            continue
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
        out = n.target(*args, **kwargs)
        src = args[0] if args else None
        if n.target in CASTS and isinstance(src, torch.Tensor) and _narrower(out.dtype, src.dtype):
            out = src
        env[n] = out
    return [env[n] for n in nodes]


def _narrower(to: torch.dtype, src: torch.dtype) -> bool:
    return to.is_floating_point and src.is_floating_point and torch.finfo(to).eps > torch.finfo(src).eps


def _frequencies(program: Program, cos: fx.Node, sin: fx.Node, half: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [half] float32, mscale) of a rope whose cos/sin nodes are given, read off the angles at
    the positions of _LADDER and verified against the model's own tables at every position below
    _CHECKED and 512 more up to the farthest; raises RopeNotRecovered if they are not a rope's to
    within float32 rounding."""
    for count in range(len(_LADDER), 0, -1):  # the farthest ladder the tables cover
        far = _LADDER[count - 1]
        checked = torch.unique(torch.cat([torch.arange(min(_CHECKED, far + 1)),
                                          torch.linspace(0, far, 513).round().long(),
                                          torch.tensor(_LADDER[:count])]))
        try:
            cos_t, sin_t = _tabulate(program, [cos, sin], checked)
            break
        except (IndexError, RuntimeError):  # a table shorter than `far` rows
            continue
    else:
        raise RopeNotRecovered("its cos/sin tables hold fewer than 2 positions")
    if cos_t.dtype not in (torch.float32, torch.float64):
        raise RopeNotRecovered(f"its cos/sin are only available in {cos_t.dtype} (no float32 source), which "
                               "cannot tell the frequencies apart to float32 precision")
    width = cos_t.reshape(len(checked), -1).shape[-1]
    if width not in (half, 2 * half):  # neox tables repeat the frequencies ([f, f]); interleaved hold them once
        raise RopeNotRecovered(f"its cos/sin tables are {width} wide for {2 * half} rotated dims")
    c, s = (t.reshape(len(checked), -1)[:, :half].double() for t in (cos_t, sin_t))
    row = {int(p): i for i, p in enumerate(checked)}
    mscale = float(c[row[0]].mean())
    if mscale <= 0 or not torch.allclose(c[row[0]], torch.full_like(c[row[0]], mscale), rtol=1e-6) \
            or s[row[0]].abs().max() > 1e-6:
        raise RopeNotRecovered("its cos/sin at position 0 are not (mscale, 0)")
    freq = torch.zeros(half, dtype=torch.float64)
    for p in _LADDER[:count]:
        angle = torch.atan2(s[row[p]], c[row[p]])
        turns = torch.round((freq * p - angle) / (2 * math.pi))
        freq = (angle + 2 * math.pi * turns) / p
    inv_freq = freq.float()
    theta = checked.float()[:, None] * inv_freq[None, :]  # as the model computes it: float32 position x inv_freq
    err = torch.maximum((theta.double().cos() * mscale - c).abs(), (theta.double().sin() * mscale - s).abs())
    bound = 2.0 ** -21 * (1 + theta.double().abs()) * max(1.0, mscale)  # a few float32 roundings of the angle
    if not bool((err <= bound).all()):
        worst = int(err.div(bound).max(-1).values.argmax())
        raise RopeNotRecovered(f"no frequencies reproduce its cos/sin to float32 rounding (position "
                               f"{int(checked[worst])}: off by {float(err[worst].max()):.3g})")
    return inv_freq, mscale


def _derive(style: str):
    def derive(m: Match, program: Program) -> dict | None:
        x, cos, sin = m.bindings["x"], m.bindings["cos"], m.bindings["sin"]
        head_dim = int(x.meta["val"].shape[-1])  # the rotated dims of x, whichever spelling matched
        try:
            inv_freq, mscale = _frequencies(program, cos, sin, head_dim // 2)
        except RopeNotRecovered as why:  # the rotation stays as the model wrote it: exact, only unfused
            log.warning("rope at %s left unfused: %s", module_path(m.anchor) or m.anchor.name, why)
            program.meta.setdefault("unfused_ropes", []).append(str(why))
            return None
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

PASS = PatternPass("rope", PATTERNS, version=2, expect=lambda p: p.meta.get("expected_ropes"))
