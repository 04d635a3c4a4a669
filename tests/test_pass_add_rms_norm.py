"""The add_rms_norm pass (passes/add_rms_norm.py): a residual add and the norm of its result -> one node."""

import torch

from passes.fused.add_rms_norm import PASS as ADD_RMS_NORM
from passes.fused.rms_norm import PASS as RMS_NORM
from lowering.testing import check_pass

ALL = (torch.float32, torch.bfloat16, torch.float16)


def _norm(h, weight, eps=1e-6):
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype) * weight


def residual_block(x, residual, weight):
    """The add's result is the next residual (a second user) and the norm's input."""
    h = x + residual
    return _norm(h, weight), h * 2


def two_layers(x, r1, r2, w1, w2):
    """Chained: the second add reads the first's sum, as consecutive sublayers do."""
    h1 = x + r1
    h2 = h1 + r2 * _norm(h1, w1)
    return _norm(h2, w2), h2


def test_residual_add_and_norm_fuse(check_pass):
    report = check_pass(
        ADD_RMS_NORM, residual_block,
        lambda dt, n: (torch.randn(n, 32, dtype=dt), torch.randn(n, 32, dtype=dt), 1 + torch.randn(32, dtype=dt) / 10),
        pre=("cleanup", RMS_NORM), expect_matched=1, ops_before={"add.Tensor", "mlx.rms_norm"},
        ops_absent_after={"add.Tensor", "mlx.rms_norm"}, ops_after={"mlx.add_rms_norm"}, dtypes=ALL, sizes=(1, 9))
    src = report.sources[torch.float32]
    assert "add, rms_norm = k.add_rms_norm(x, residual, weight" in src, src  # one statement defines both


def test_chained_sublayers_fuse(check_pass):
    check_pass(
        ADD_RMS_NORM, two_layers,
        lambda dt, n: (*(torch.randn(n, 16, dtype=dt) for _ in range(3)), *(1 + torch.randn(16, dtype=dt) / 10 for _ in range(2))),
        pre=("cleanup", RMS_NORM), expect_matched=2, ops_absent_after={"mlx.rms_norm"}, ops_after={"mlx.add_rms_norm"},
        dtypes=ALL, sizes=(1, 5))


def test_broadcast_add_and_mixed_dtype_norm_stay_apart(check_pass):
    def bias_then_norm(x, bias, weight):  # x + a bias row is not a residual add
        return _norm(x + bias, weight)

    check_pass(ADD_RMS_NORM, bias_then_norm,
               lambda dt, n: (torch.randn(n, 16, dtype=dt), torch.randn(16, dtype=dt), torch.randn(16, dtype=dt)),
               pre=("cleanup", RMS_NORM), expect_matched=0, ops_after={"mlx.rms_norm", "add.Tensor"}, sizes=(3,))

    def f32_norm_of_bf16(x, residual, weight):  # the norm's weight and output in f32: not one dtype
        h = x + residual
        hf = h.float()
        return hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6) * weight, h

    check_pass(ADD_RMS_NORM, f32_norm_of_bf16,
               lambda dt, n: (torch.randn(n, 16, dtype=torch.bfloat16), torch.randn(n, 16, dtype=torch.bfloat16),
                              torch.randn(16, dtype=torch.float32)),
               pre=("cleanup", RMS_NORM), expect_matched=0, ops_after={"mlx.rms_norm", "add.Tensor"}, sizes=(3,))


def test_an_add_two_norms_read_fuses_once(check_pass):
    """Parallel sublayers (GPT-J, Phi): two norms of one residual; the first takes the add, the second
    reads the fused node's sum."""
    def parallel(x, residual, w1, w2):  # the fused norms as the rms_norm pass leaves them (decomposed, CSE shares them)
        h = x + residual
        norm = torch.ops.mlx.rms_norm.default
        return norm(h, w1, 1e-6, h.dtype) + norm(h, w2, 1e-5, h.dtype), h

    check_pass(ADD_RMS_NORM, parallel,
               lambda dt, n: (torch.randn(n, 16, dtype=dt), torch.randn(n, 16, dtype=dt),
                              1 + torch.randn(16, dtype=dt) / 10, 1 + torch.randn(16, dtype=dt) / 10),
               expect_matched=1, ops_after={"mlx.add_rms_norm", "mlx.rms_norm"}, dtypes=ALL, sizes=(3,))
