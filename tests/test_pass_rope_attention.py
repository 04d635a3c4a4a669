"""The rope_attention pass (passes/rope_attention.py): the RoPE of q and k folded into the paged attention."""

import torch

from passes.fused.rope_paged_attention import PASS as ROPE_ATTENTION
from lowering.testing import check_pass

H, KVH, D = 4, 2, 16
rope, attention = torch.ops.mlx.rope.default, torch.ops.mlx.paged_attention.default


def _inputs(dtype, n, rot=D):
    positions = torch.randperm(64)[:n]  # not 0..n-1: a wrong position per token shows
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot))
    return (torch.randn(n, H * D, dtype=dtype), torch.randn(n, KVH * D, dtype=dtype), torch.randn(n, KVH * D, dtype=dtype),
            positions, inv_freq)


def layer(q, k, v, positions, inv_freq):
    """As the rope and attention passes leave a layer: ropes of [T, heads, D] views, flattened for the attention."""
    q = rope(q.view(-1, H, D), positions, inv_freq, D, False, 1.0).view(-1, H * D)
    k = rope(k.view(-1, KVH, D), positions, inv_freq, D, False, 1.0).view(-1, KVH * D)
    return attention(q, k, v, 0, H, KVH, D, D**-0.5, -1, 0.0)


def test_ropes_fold_into_the_attention(check_pass):
    check_pass(ROPE_ATTENTION, layer, _inputs, expect_matched=1, ops_before={"mlx.rope", "mlx.paged_attention"},
               ops_absent_after={"mlx.rope", "mlx.paged_attention"}, ops_after={"mlx.rope_paged_attention"},
               dtypes=(torch.float32, torch.bfloat16), sizes=(1, 7), mlx=False)


def test_partial_and_traditional_rotations_fold(check_pass):
    def gptj(q, k, v, positions, inv_freq):  # GPT-J: adjacent pairs, the first half of each head rotated
        q = rope(q, positions, inv_freq, D, True, 1.0)
        k = rope(k, positions, inv_freq, D, True, 1.0)
        return attention(q, k, v, 0, H, KVH, D, D**-0.5, 8, 0.0)

    check_pass(ROPE_ATTENTION, gptj, lambda dt, n: _inputs(dt, n, rot=D // 2), expect_matched=1,
               ops_after={"mlx.rope_paged_attention"}, ops_absent_after={"mlx.rope"}, sizes=(5,), mlx=False)


def test_ropes_read_elsewhere_or_unlike_stay(check_pass):
    def q_escapes(q, k, v, positions, inv_freq):  # the rotated q is also an output
        qr = rope(q, positions, inv_freq, D, False, 1.0)
        return attention(qr, rope(k, positions, inv_freq, D, False, 1.0), v, 0, H, KVH, D, D**-0.5, -1, 0.0), qr

    def unlike(q, k, v, positions, inv_freq):  # q and k rotated at different positions
        qr = rope(q, positions, inv_freq, D, False, 1.0)
        return attention(qr, rope(k, positions + 1, inv_freq, D, False, 1.0), v, 0, H, KVH, D, D**-0.5, -1, 0.0)

    def k_unrotated(q, k, v, positions, inv_freq):
        return attention(rope(q, positions, inv_freq, D, False, 1.0), k, v, 0, H, KVH, D, D**-0.5, -1, 0.0)

    for fn in (q_escapes, unlike, k_unrotated):
        check_pass(ROPE_ATTENTION, fn, _inputs, expect_matched=0, ops_after={"mlx.rope", "mlx.paged_attention"},
                   ops_absent_after={"mlx.rope_paged_attention"}, sizes=(3,), mlx=False)


def test_a_rope_left_alone_scales_only_its_rotated_dims(check_pass):
    """A rope that no attention reads is the kernel table's `rope`; with a YaRN mscale and a partial rotation the
    emitted code scales the rotated dims only, as the reference (and the runtime's rotation) do."""
    def partial_yarn(q, positions, inv_freq):
        return rope(q.view(-1, H, D), positions, inv_freq, D, False, 0.7)

    def make(dtype, n):
        q, _, _, positions, inv_freq = _inputs(dtype, n, rot=D // 2)
        return q, positions, inv_freq

    check_pass(ROPE_ATTENTION, partial_yarn, make, expect_matched=0, ops_after={"mlx.rope"}, sizes=(1, 6))
