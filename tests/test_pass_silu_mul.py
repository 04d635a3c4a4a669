"""SiLU-and-mul -> one mlx.silu_mul node (passes/fused/silu_mul.py), checked with the pass harness."""

import torch
import torch.nn.functional as F

from passes.fused.silu_mul import PASS


def gated(x, gate_w, up_w):  # the Llama MLP's activation, as HF writes it
    return F.silu(F.linear(x, gate_w)) * F.linear(x, up_w)


def test_hf_gated_mlp_fuses_and_matches(check_pass, pass_strategies):
    check_pass(PASS, gated,
               lambda dtype, n: (torch.randn(n, 32, dtype=dtype), torch.randn(48, 32, dtype=dtype) / 6,
                                 torch.randn(48, 32, dtype=dtype) / 6),
               expect_matched=1, ops_before={"silu", "mul.Tensor"}, ops_absent_after={"silu", "mul"},
               ops_after={"mlx.silu_mul"}, dtypes=(torch.float32, torch.bfloat16, torch.float16),
               sizes=pass_strategies.sizes(1, 48), max_examples=6)


def test_vllm_native_split_form(check_pass):
    def silu_and_mul(x):  # vLLM's SiluAndMul.forward_native
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]

    check_pass(PASS, silu_and_mul, lambda dtype, n: (torch.randn(n, 64, dtype=dtype),),
               expect_matched=1, ops_after={"mlx.silu_mul"}, sizes=(1, 5, 33))


def test_silu_with_another_user_is_left_alone_and_reported_missed(check_pass):
    def shared(g, u):
        a = F.silu(g)
        return a * u, a + 1

    report = check_pass(PASS, shared, lambda dtype, n: (torch.randn(n, 8, dtype=dtype), torch.randn(n, 8, dtype=dtype)),
                        expect_matched=0, ops_after={"silu", "mul"})
    assert report.results[torch.float32].missed  # lower-model would flag this pass
