"""The fused op docs/writing-a-kernel.md builds: GELU-and-mul (Gemma's gated MLP) -> one mlx.gelu_mul node, run as
`k.gelu_mul` on the device's kernel table. The pass fuses both GELU forms in every dtype and the lowered graph
matches torch; the kernel itself matches float64 NumPy; Gemma through the default pipeline uses it."""

import math

import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from passes.fused.gelu_mul import PASS
from runtime import kernels
from runtime.config import RuntimeConfig

TABLES = {"device": kernels.current(), "generic": kernels.Generic(RuntimeConfig())}


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_gated_mlp_fuses_and_matches(check_pass, approximate):
    def gated(x, gate_w, up_w):  # Gemma's MLP activation, as HF writes it (gelu_pytorch_tanh)
        return F.gelu(F.linear(x, gate_w), approximate=approximate) * F.linear(x, up_w)

    report = check_pass(PASS, gated,
                        lambda dtype, n: (torch.randn(n, 32, dtype=dtype), torch.randn(48, 32, dtype=dtype) / 6,
                                          torch.randn(48, 32, dtype=dtype) / 6),
                        expect_matched=1, ops_before={"gelu", "mul.Tensor"}, ops_absent_after={"gelu", "mul"},
                        ops_after={"mlx.gelu_mul"}, dtypes=(torch.float32, torch.bfloat16, torch.float16),
                        sizes=(1, 7, 48))
    assert f"k.gelu_mul(" in report.sources[torch.float32] and f"approximate={approximate!r}" in \
        report.sources[torch.float32]


def test_vllm_native_split_form(check_pass):
    def gelu_and_mul(x):  # vLLM's GeluAndMul.forward_native (approximate="tanh")
        d = x.shape[-1] // 2
        return F.gelu(x[..., :d], approximate="tanh") * x[..., d:]

    check_pass(PASS, gelu_and_mul, lambda dtype, n: (torch.randn(n, 64, dtype=dtype),),
               expect_matched=1, ops_after={"mlx.gelu_mul"}, sizes=(1, 5, 33))


@pytest.mark.parametrize("table", list(TABLES))
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_kernel_matches_float64(table, approximate, dtype):
    """gelu(gate) in f32, rounded once to the dtype, times up: within one rounding of each step of float64, plus
    f32's absolute error of erf/tanh, which 0.5 * g * (1 + erf) (torch's formula too) carries for negative g."""
    rng = np.random.default_rng(0)
    gate, up = (rng.standard_normal((5, 300)) * 3 for _ in range(2))
    g, u = (mx.array(a.astype(np.float32)).astype(dtype) for a in (gate, up))
    got = np.array(mx.compile(lambda a, b: TABLES[table].gelu_mul(a, b, approximate=approximate))(g, u)
                   .astype(mx.float32)).astype(np.float64)
    g64, u64 = (np.array(a.astype(mx.float32)).astype(np.float64) for a in (g, u))
    if approximate == "tanh":
        act = 0.5 * g64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (g64 + 0.044715 * g64 ** 3)))
    else:
        act = 0.5 * g64 * (1 + np.vectorize(math.erf)(g64 / math.sqrt(2)))
    want = act * u64
    ulp = {mx.float32: 2.0 ** -22, mx.bfloat16: 2.0 ** -7, mx.float16: 2.0 ** -10}[dtype]
    err = np.abs(got - want)
    f32_special = 4 * 2.0 ** -24 * np.abs(g64) * np.abs(u64)  # erf/tanh in f32: absolute error ~ an ulp of 1
    bound = 3 * ulp * np.abs(act) * np.abs(u64) + 2 * ulp * np.abs(want) + f32_special + 1e-6
    assert (err <= bound).all(), f"max abs error {err.max():.3g}"


def test_gemma_lowers_its_mlp_to_gelu_mul():
    """The default pipeline fuses a real Gemma MLP (the coverage family's tiny config, HF front)."""
    from lowering import capture
    from lowering.api import lower
    from vllm_metal_plugin.coverage import tiny_model

    lowered = lower(capture.capture_hf(tiny_model("gemma"), "gemma"))
    assert lowered.source.count("= k.gelu_mul(") == 2 and "k.gelu(" not in lowered.source, lowered.op_histogram()
