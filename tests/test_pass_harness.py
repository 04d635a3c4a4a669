"""The pass harness on the existing passes (RMSNorm, RoPE), and the harness's own failure reports."""

import pytest
import torch

from passes.fused.rms_norm import PASS as RMS_NORM
from passes.fused.rope import PASS as ROPE
from lowering.testing import capture, check_pass, graph_text

ALL = (torch.float32, torch.bfloat16, torch.float16)


def hf_rms_norm(x, weight):  # LlamaRMSNorm.forward
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
    return weight * xf.to(x.dtype)


def residual_rms_norm(x, residual, weight):
    h = x + residual
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(h.dtype) * weight, h


def test_rms_norm_fuses_every_dtype(check_pass, pass_strategies):
    report = check_pass(
        RMS_NORM, hf_rms_norm, lambda dt, n: (torch.randn(n, 64, dtype=dt), 1 + torch.randn(64, dtype=dt) / 10),
        expect_matched=1, ops_before={"rsqrt", "pow"}, ops_absent_after={"rsqrt", "pow", "mean"},
        ops_after={"mlx.rms_norm"}, dtypes=ALL, sizes=pass_strategies.sizes(1, 64), max_examples=5)
    assert "k.rms_norm(" in report.sources[torch.float32]
    assert "-%rsqrt" in report.diff() and "+%rms_norm" in report.diff()


def test_rms_norm_residual_form(check_pass):
    check_pass(RMS_NORM, residual_rms_norm,
               lambda dt, n: (torch.randn(n, 32, dtype=dt), torch.randn(n, 32, dtype=dt), torch.randn(32, dtype=dt)),
               expect_matched=1, ops_after={"mlx.rms_norm", "add.Tensor"}, dtypes=ALL, sizes=(1, 9))


class HFRope(torch.nn.Module):
    """HF Llama rotary embedding + apply_rotary_pos_emb on q of shape [1, heads, T, head_dim]."""

    def __init__(self, head_dim=16, base=10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def forward(self, q, positions):
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None].to(q.dtype), emb.sin()[None, None].to(q.dtype)
        half = q.shape[-1] // 2
        rotated = torch.cat((-q[..., half:], q[..., :half]), dim=-1)
        return q * cos + rotated * sin


class InterleavedRope(torch.nn.Module):
    """GPT-J style on x of shape [T, heads, head_dim]."""

    def __init__(self, head_dim=16, base=500.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim))

    def forward(self, x, positions):
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        cos, sin = freqs.cos()[:, None, :].to(x.dtype), freqs.sin()[:, None, :].to(x.dtype)
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)


def _positions(n):
    return torch.randint(0, 2048, (n,))


@pytest.mark.parametrize("dtype", ALL)
def test_rope_neox_hf_layout(check_pass, dtype):
    check_pass(ROPE, HFRope(), lambda dt, n: (torch.randn(1, 4, n, 16, dtype=dt), _positions(n)),
               expect_matched=1, ops_before={"neg", "cat"}, ops_absent_after={"neg", "cat", "cos", "sin"},
               ops_after={"mlx.rope"}, dtypes=(dtype,), sizes=(1, 6, 40),
               atol=3e-5 if dtype == torch.float32 else None)  # angles up to 2048 rad: f32 cos/sin rounding


def test_rope_interleaved(check_pass):
    report = check_pass(ROPE, InterleavedRope(), lambda dt, n: (torch.randn(n, 2, 16, dtype=dt), _positions(n)),
                        expect_matched=1, ops_absent_after={"stack"}, ops_after={"mlx.rope"},
                        sizes=(1, 11), atol=3e-5)
    assert "traditional=True" in report.sources[torch.float32]


def test_harness_reports_a_wrong_match_count_with_the_diff():
    with pytest.raises(AssertionError) as info:
        check_pass(RMS_NORM, hf_rms_norm, lambda dt, n: (torch.randn(n, 8, dtype=dt), torch.randn(8, dtype=dt)),
                   expect_matched=2, mlx=False)
    text = str(info.value)
    assert "matched 1, expected 2" in text and "graph diff of the pass" in text and "+%rms_norm" in text


def test_harness_reports_numeric_mismatch():
    def wrong(m):  # a broken pass: replaces the norm with something else
        return RMS_NORM.run(m) if False else _break(m)

    def _break(program):
        for node in program.graph.nodes:
            if node.target == torch.ops.aten.rsqrt.default:
                node.target = torch.ops.aten.sqrt.default
                return 1
        return 0

    with pytest.raises(AssertionError) as info:
        check_pass(_break, hf_rms_norm, lambda dt, n: (torch.randn(n, 8, dtype=dt), torch.randn(8, dtype=dt)),
                   expect_matched=1, mlx=False)
    assert "rewritten graph (torch) differs" in str(info.value) and "max abs err" in str(info.value)


def test_capture_keeps_argument_names_and_symbolic_sizes():
    program = capture(hf_rms_norm, (torch.randn(8, 4), torch.randn(4)),
                      ({0: torch.export.Dim("size", min=1, max=64)}, None))
    assert program.inputs == ["x", "weight"]
    text = graph_text(program)
    assert "%x = input : f32[s" in text and "rsqrt" in text
