"""The RoPE of q and k folded into the paged attention that reads them -> one `mlx.rope_paged_attention`,
run as `out, kv[i] = k.rope_paged_attention(q, k, v, positions, inv_freq, kv[i], batch, ...)`.

After the rope and attention passes a layer reads `paged_attention(view(rope(q)), view(rope(k)), v)`:
two rotations whose only use is the attention, which writes k into the cache. Handing the attention
the un-rotated q and k lets the kernel table rotate them where it lays out the cache rows: on MLX's CUDA
backend one kernel does the two ropes and the K/V layout (runtime/kernels/cuda_rope.py), and at decode one
kernel does the rotation, the cache write and the attention; elsewhere the rotation is the table's `rope`.

A pair fuses when both ropes share their positions, frequencies, style and scale, have the
attention's head dim, and are read by nothing else (views in between included). It runs last, on the
cleaned graph of either front end.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from passes.fused import FusedOp, declare
from passes.fused.paged_attention import paged_attention
from passes.fused.rope import rope
from passes.manager import FunctionPass
from passes.pattern import record
from passes.program import Program, value_of

aten = torch.ops.aten
NAME = "rope_attention"


@torch.library.custom_op("mlx::rope_paged_attention", mutates_args=())
def rope_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    traditional: bool,
    mscale: float,
    layer: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    sliding_window: int,
    logit_cap: float,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_attention` of q and k rotated by `rope` first: q [T, H*D] and k [T, KVH*D] come un-rotated, so a
    backend can rotate them where it writes the cache."""
    q = rope(q, positions, inv_freq, head_dim, traditional, mscale)
    k = rope(k, positions, inv_freq, head_dim, traditional, mscale)
    return paged_attention(q, k, v, layer, num_heads, num_kv_heads, head_dim, scale, sliding_window, logit_cap, sinks)


@rope_paged_attention.register_fake
def _(q, k, v, positions, inv_freq, traditional, mscale, layer, num_heads, num_kv_heads, head_dim, scale,
      sliding_window, logit_cap, sinks=None):
    return q.new_empty((q.shape[0], num_heads * head_dim))


OP = declare(FusedOp("rope_paged_attention", torch.ops.mlx.rope_paged_attention.default, cache=True))
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _rope_of(node) -> fx.Node | None:
    """The `mlx.rope` node that `node` is (a view of), when nothing else reads it or the views."""
    while isinstance(node, fx.Node) and node.target in _VIEWS and len(node.users) == 1:
        node = node.args[0]
    if isinstance(node, fx.Node) and node.target == torch.ops.mlx.rope.default and len(node.users) == 1:
        return node
    return None


def candidates(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, fx.Node]]:
    """(attention, q rope, k rope) triples that fuse, in graph order."""
    found = []
    for attn in graph.nodes:
        if attn.target != torch.ops.mlx.paged_attention.default:
            continue
        q_rope, k_rope = _rope_of(attn.args[0]), _rope_of(attn.args[1])
        if q_rope is None or k_rope is None or q_rope is k_rope:
            continue
        head_dim = attn.args[6]
        # positions, inv_freq, head_dim, traditional, mscale: one rotation for both
        if q_rope.args[1:] != k_rope.args[1:] or q_rope.args[3] != head_dim:
            continue
        found.append((attn, q_rope, k_rope))
    return found


def _unviewed(x: fx.Node) -> fx.Node:
    """What a view that only the rope reads views: the new [T, heads * D] reshape replaces it."""
    return x.args[0] if x.target in _VIEWS and len(x.users) == 1 else x


def _fused(q, k, v, positions, inv_freq, traditional, mscale, *attention, widths, flat):
    # [T, heads * D]; one already that shape needs no reshape (MLX adds a graph node for one with -1)
    q, k = (x if is_flat else aten.reshape.default(x, [-1, width]) for x, width, is_flat in zip((q, k), widths, flat))
    return torch.ops.mlx.rope_paged_attention.default(q, k, v, positions, inv_freq, traditional, mscale, *attention)


def _is_flat(x: fx.Node, width: int) -> bool:
    val = value_of(x)
    return isinstance(val, torch.Tensor) and val.dim() == 2 and val.shape[1] == width


def fuse(program: Program) -> int:
    graph = program.graph
    triples = candidates(graph)
    for attn, q_rope, k_rope in triples:
        x_q, positions, inv_freq, _head_dim, traditional, mscale = q_rope.args
        x_k = k_rope.args[0]
        widths = [int(x.meta["val"].shape[1:].numel()) for x in (x_q, x_k)]
        x_q, x_k = (_unviewed(x) for x in (x_q, x_k))
        flat = [_is_flat(x, width) for x, width in zip((x_q, x_k), widths)]
        with graph.inserting_before(attn):
            new = record(graph, _fused, x_q, x_k, attn.args[2], positions, inv_freq, traditional, mscale,
                         *attn.args[3:], widths=widths, flat=flat)
        new.meta.update({key: val for key, val in attn.meta.items() if key in ("nn_module_stack", "stack_trace")})
        new.meta["fused_from"] = NAME
        attn.replace_all_uses_with(new)
        graph.erase_node(attn)
    graph.eliminate_dead_code()  # the ropes and the views between them and the attention
    return len(triples)


def _expected(program: Program) -> int:
    """Fused pairs plus pairs that could still fuse: a leftover shows as MISSED."""
    done = sum(1 for n in program.graph.nodes if n.target == torch.ops.mlx.rope_paged_attention.default)
    return done + len(candidates(program.graph))


# the match spans a node with two independent input chains (q's and k's): rewired by hand
PASS = FunctionPass(NAME, fuse, version=2, expect=_expected)
